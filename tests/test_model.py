"""Transformer properties: causality by gradients, scan == unrolled, remat == no remat (every
policy), the policies keep what they name, jit == eager."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from hypothesis import given, settings, strategies as st
from jax.ad_checkpoint import print_saved_residuals

from deepseek_jax.block import _REMAT_POLICIES, PROJECTIONS, Block, unstacked
from deepseek_jax.model import Transformer
from tests.helpers import init_model, mla_configs, random_tokens, replace, small_config
from tests.training.conftest import compile_fast


@settings(max_examples=4)
@given(cfg=mla_configs(moe=False))
def test_causality_by_gradients(cfg):
  """d logits[:, t] / d embedding rows of tokens at s > t is exactly zero; at s <= t it is not."""
  T = 8
  tokens = jnp.tile(jnp.arange(T, dtype=jnp.int32)[None] % cfg.vocab_size, (2, 1))
  model = Transformer(cfg)
  variables = init_model(model, tokens)

  @jax.jit
  def emb_grad(params, t):
    def loss(p):
      logits_BTV = model.apply(dict(variables, params=p), tokens).logits_BTV
      return jnp.sum(jnp.take(logits_BTV, t, axis=1) ** 2)
    return jax.grad(loss)(params)["embed_tokens"]["embedding"]  # [V, D]; token s is row s

  for t in range(T):
    per_pos = np.abs(np.asarray(emb_grad(variables["params"], t)[:T])).sum(-1)
    assert np.all(per_pos[t + 1:] == 0.0), (t, per_pos)
    assert np.all(per_pos[: t + 1] > 0.0), (t, per_pos)


def _unstack(tree, n):
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


@settings(max_examples=3)
@given(cfg=mla_configs(moe=False))
def test_scan_equals_unrolled(cfg):
  tokens = random_tokens(cfg, 2, 6)
  scanned = Transformer(cfg)
  variables = init_model(scanned, tokens)
  params = dict(variables["params"])
  stack = params.pop("dense_blocks")["layers"]
  params["dense_blocks"] = {f"layers_{i}": p for i, p in enumerate(_unstack(stack, cfg.num_layers))}
  unrolled = Transformer(replace(cfg, scan_layers=False))
  a = jax.jit(scanned.apply)(variables, tokens).logits_BTV
  b = jax.jit(unrolled.apply)({"params": params}, tokens).logits_BTV
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # And the unrolled model declares the same parameter tree, layer by layer.
  shapes = jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), tokens)["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda a: a.shape, nn.meta.unbox(shapes))


def test_unstacked_is_the_unrolled_model_with_the_same_weights():
  """`block.unstacked` (decoding's layout): every collection of a dense + MoE model (params and
  the routers' biases) split per layer; the unrolled model applies it to the same logits, and
  declares the same tree."""
  cfg = small_config(num_layers=3, first_k_dense_replace=1)
  tokens = random_tokens(cfg, 2, 6)
  variables = init_model(Transformer(cfg), tokens)
  cfg_u, unrolled = unstacked(cfg, variables)
  assert not cfg_u.scan_layers and unstacked(cfg_u, unrolled)[1] is unrolled
  a = jax.jit(Transformer(cfg).apply)(variables, tokens).logits_BTV
  b = jax.jit(Transformer(cfg_u).apply)(unrolled, tokens).logits_BTV
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg_u).init, jax.random.PRNGKey(0), tokens))
  assert jax.tree.map(jnp.shape, unrolled) == jax.tree.map(lambda a: a.shape, shapes)


@settings(max_examples=3)
@given(cfg=mla_configs(moe=False), policy=st.sampled_from(["full", "dots"]), scan=st.booleans())
def test_remat_equals_no_remat(cfg, policy, scan):
  cfg = replace(cfg, scan_layers=scan)
  tokens = random_tokens(cfg, 2, 6)
  base = Transformer(cfg)
  variables = init_model(base, tokens)
  remat = Transformer(replace(cfg, remat=policy))

  def loss(model, params):
    return jnp.mean(model.apply({"params": params}, tokens).logits_BTV ** 2)

  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(variables["params"])
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_jit_equals_eager_and_shapes():
  cfg = small_config(first_k_dense_replace=2)
  tokens = random_tokens(cfg, 3, 5)
  model = Transformer(cfg)
  variables = init_model(model, tokens)
  eager = model.apply(variables, tokens)
  jitted = jax.jit(model.apply)(variables, tokens)
  assert eager.logits_BTV.shape == (3, 5, cfg.vocab_size)
  assert eager.logits_BTV.dtype == jnp.float32
  assert eager.hidden_BTD.shape == (3, 5, cfg.d_model)
  np.testing.assert_allclose(np.asarray(eager.logits_BTV), np.asarray(jitted.logits_BTV), atol=1e-5)


def test_projection_remat_equals_no_remat():
  """The tag-based policies (offload included, which XLA:CPU lowers too) change what the
  backward pass keeps, never the loss or the gradients."""
  cfg = small_config(num_layers=1)
  tokens = random_tokens(cfg, 2, 6)
  base = Transformer(cfg)
  variables = init_model(base, tokens)
  p = variables["params"]

  def value_and_grad(model):
    f = jax.value_and_grad(
        lambda p: jnp.mean(model.apply(dict(variables, params=p), tokens).logits_BTV ** 2))
    return compile_fast(jax.jit(f), p)(p)

  l0, g0 = value_and_grad(base)
  for policy in ("projections", "projections_offload"):
    l1, g1 = value_and_grad(Transformer(replace(cfg, remat=policy)))
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_remat_policies_save_what_they_name(capsys):
  """Under "projections" a block keeps the tagged projections and nothing else it computed;
  "projections_offload" keeps the same plus its input, moved to host memory."""
  cfg = small_config(first_k_dense_replace=1)
  h_BTD = jax.random.normal(jax.random.PRNGKey(0), (2, 5, cfg.d_model))
  pos_BT = jnp.broadcast_to(jnp.arange(5)[None], (2, 5))
  block = Block(cfg)
  variables = jax.jit(block.init)(jax.random.PRNGKey(1), h_BTD, pos_BT, None)
  saved = {}
  for name in ("projections", "projections_offload"):
    f = jax.checkpoint(lambda v, h: jnp.sum(block.apply(v, h, pos_BT, None)[0] ** 2),
                       policy=_REMAT_POLICIES[name])
    print_saved_residuals(f, variables, h_BTD)
    saved[name] = capsys.readouterr().out.splitlines()
  computed = [line for line in saved["projections"] if "from the argument" not in line
              and "from a constant" not in line]
  assert computed and all(re.search(r"named '(\w+)'", l)[1] in PROJECTIONS for l in computed)
  tags = {re.search(r"named '(\w+)'", l)[1] for l in computed}
  assert {"mla_q", "mla_kv", "attention_out", "mlp_wi"} <= tags
  moved = [line for line in saved["projections_offload"] if "device_put" in line]
  assert len(moved) == 1 and f"[{2},{5},{cfg.d_model}]" in moved[0].replace(" ", "")
