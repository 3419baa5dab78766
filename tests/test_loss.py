"""The chunked training loss (loss.py): equal to the full-logits loss in value and gradient, MTP
depths included, for any chunk size; never a [B, T, V] array; the head's dot is the FP8 policy's."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from deepseek_jax import loss, mtp
from deepseek_jax.fp8.policy import make_policy
from deepseek_jax.model import OutputHead, Transformer, head_variables
from tests.helpers import random_tokens, small_config
from tests.training.conftest import compile_fast

B, T = 2, 9


@pytest.fixture(scope="module")
def model_and_variables():
  # vocab 96: no other activation of this model ends in V (d_model 32, MTP's concat 64)
  cfg = small_config(num_layers=1, first_k_dense_replace=1, num_mtp_layers=2, vocab_size=96)
  model = Transformer(cfg)
  tokens = random_tokens(cfg, B, T)
  init = compile_fast(jax.jit(model.init), jax.random.PRNGKey(0), tokens)
  return model, nn.meta.unbox(init(jax.random.PRNGKey(0), tokens))


def _losses(model, variables, tokens, targets, weight, chunk):
  """(full-logits loss, chunked loss) functions of the params: CE + 0.3 * MTP, per-depth CEs."""
  head = OutputHead(model.cfg, model.fp8_policy).apply

  def full(params):
    out = model.apply(dict(variables, params=params), tokens, next_tokens_BT=targets)
    m, per = mtp.mtp_loss(out.mtp_logits, targets, weight, 0.3)
    return mtp.cross_entropy(out.logits_BTV, targets, weight) + m, per

  def chunked(params):
    v = dict(variables, params=params)
    out = model.apply(v, tokens, next_tokens_BT=targets, logits=False)
    assert out.logits_BTV is None and out.mtp_logits == ()
    m, per = loss.chunked_mtp_loss(head, head_variables(v), out.mtp_hidden, targets, weight, 0.3,
                                   chunk)
    return loss.chunked_cross_entropy(head, head_variables(v), out.hidden_BTD, targets, weight,
                                      chunk) + m, per

  return full, chunked


def test_chunked_equals_full_logits_through_the_model(model_and_variables):
  """The training loss of a model with two MTP depths, chunks not dividing T, some weights 0:
  the same loss, per-depth CEs and gradients (every parameter) as from full logits, f32."""
  model, variables = model_and_variables
  tokens, targets = random_tokens(model.cfg, B, T, 1), random_tokens(model.cfg, B, T, 2)
  weight = (jax.random.uniform(jax.random.PRNGKey(3), (B, T)) >= 0.3).astype(jnp.float32)
  full, chunked = _losses(model, variables, tokens, targets, weight, chunk=4)
  p = variables["params"]
  (l0, per0), g0 = compile_fast(jax.jit(jax.value_and_grad(full, has_aux=True)), p)(p)
  (l1, per1), g1 = compile_fast(jax.jit(jax.value_and_grad(chunked, has_aux=True)), p)(p)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(per1), np.asarray(per0), rtol=1e-6)
  _assert_close_trees(g1, g0)


def _assert_close_trees(got, want):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(a).max()) + 1e-9,
                               err_msg=jax.tree_util.keystr(path))


@settings(max_examples=5, deadline=None)
@given(T_=st.integers(1, 12), chunk=st.integers(1, 14), seed=st.integers(0, 1000),
       drop=st.sampled_from([0.0, 0.5, 1.0]))
def test_chunked_cross_entropy_equals_full_logits(model_and_variables, T_, chunk, seed, drop):
  """At the head: any length, any chunk (dividing T or not, longer than T), any weights (all 0
  included): value, d/d head variables and d/d hidden states as from full logits."""
  model, variables = model_and_variables
  head, hv = OutputHead(model.cfg).apply, head_variables(variables)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  h_BTD = jax.random.normal(k1, (B, T_, model.cfg.d_model))
  targets = jax.random.randint(k2, (B, T_), 0, model.cfg.vocab_size)
  weight = (jax.random.uniform(k3, (B, T_)) >= drop).astype(jnp.float32)
  full = lambda v, h: mtp.cross_entropy(head(v, h), targets, weight)  # noqa: E731
  chunked = lambda v, h: loss.chunked_cross_entropy(head, v, h, targets, weight, chunk)  # noqa: E731
  l0, g0 = compile_fast(jax.jit(jax.value_and_grad(full, argnums=(0, 1))), hv, h_BTD)(hv, h_BTD)
  l1, g1 = compile_fast(jax.jit(jax.value_and_grad(chunked, argnums=(0, 1))), hv, h_BTD)(hv, h_BTD)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6, atol=1e-7)
  _assert_close_trees(g1, g0)


def test_no_logits_array_spans_more_than_a_chunk(model_and_variables):
  """With chunks of 4 positions no intermediate of the loss or its gradient holds more than
  [B, 4, V] logits (the full-logits loss holds [B, T, V])."""
  model, variables = model_and_variables
  tokens = targets = random_tokens(model.cfg, B, T)
  full, chunked = _losses(model, variables, tokens, targets, jnp.ones((B, T)), chunk=4)
  V = model.cfg.vocab_size

  def logits_sizes(fn):
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: fn(p)[0]))(variables["params"])
    found = []

    def walk(jp):
      for eqn in jp.eqns:
        found.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars
                     if getattr(v.aval, "shape", ())[-1:] == (V,)
                     and v.aval.shape != (model.cfg.d_model, V))   # not the head's kernel
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          walk(sub)
    walk(jaxpr.jaxpr)
    return found
  assert max(logits_sizes(full)) == B * T * V
  assert max(logits_sizes(chunked)) == B * 4 * V


def test_the_head_multiplies_through_the_fp8_policy():
  """An FP8 recipe set on the head changes the chunked loss as it changes the full-logits one
  (per-token activation tiles: the same values), so the chunks go through the policy's dot."""
  cfg = small_config(d_model=128, vocab_size=256)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  h_BTD = jax.random.normal(k1, (B, T, cfg.d_model))
  targets, weight = jax.random.randint(k2, (B, T), 0, cfg.vocab_size), jnp.ones((B, T))
  policy = make_policy("deepseek_v3", overrides=("lm_head=deepseek_v3",))
  hv = OutputHead(cfg).init(jax.random.PRNGKey(1), h_BTD)
  values = {}
  for name, head in (("plain", OutputHead(cfg).apply), ("fp8", OutputHead(cfg, policy).apply)):
    both = jax.jit(lambda v, h, head=head: (
        mtp.cross_entropy(head(v, h), targets, weight),
        loss.chunked_cross_entropy(head, v, h, targets, weight, 4)))
    values[name] = [float(x) for x in compile_fast(both, hv, h_BTD)(hv, h_BTD)]
  np.testing.assert_allclose(values["fp8"][1], values["fp8"][0], rtol=1e-6)
  np.testing.assert_allclose(values["plain"][1], values["plain"][0], rtol=1e-6)
  assert abs(values["fp8"][1] - values["plain"][1]) > 1e-4


@given(loss_chunk=st.integers(0, 5000), batch=st.integers(1, 16), seq=st.integers(1, 4096),
       vocab=st.integers(2, 200_000), platform=st.sampled_from(["cpu", "gpu", "tpu"]))
def test_chunk_positions(loss_chunk, batch, seq, vocab, platform):
  c = loss.chunk_positions(loss_chunk, batch, seq, vocab, platform)
  assert 1 <= c <= seq
  if loss_chunk:
    assert c == max(1, min(seq, loss_chunk // batch))
  elif c > 1:   # automatic: the chunk's f32 logits fit the platform's budget
    assert batch * c * vocab * 4 <= loss.CHUNK_BYTES[platform]
