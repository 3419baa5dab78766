"""MTP (V3 report §2.2): the module matches the hand-written formula; targets shift by k + 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from deepseek_jax.block import Block
from deepseek_jax.dispatch import LocalExperts
from deepseek_jax.model import Transformer
from deepseek_jax.mtp import mtp_loss, shift_left
from tests.helpers import init_model, random_tokens, small_config


def _rms(x, w, eps=1e-6):
  return w[None, None, :] * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


@settings(max_examples=2)
@given(depth=st.integers(1, 2), seed=st.integers(0, 1000))
def test_mtp_matches_hand_written_formula(depth, seed):
  cfg = small_config(num_mtp_layers=depth)
  tokens = random_tokens(cfg, 2, 7, seed)
  nxt = random_tokens(cfg, 2, 7, seed + 1)
  model = Transformer(cfg)
  v = init_model(model, tokens, seed)
  out = jax.jit(model.apply)(v, tokens, next_tokens_BT=nxt)
  p, rs = v["params"], v["router_state"]
  table = p["embed_tokens"]["embedding"]
  head = p["lm_head"]["kernel"]
  pos = jnp.broadcast_to(jnp.arange(7)[None], (2, 7))
  h = out.hidden_BTD
  for k in range(1, depth + 1):
    lp, lr = p["mtp"][f"layers_{k - 1}"], rs["mtp"][f"layers_{k - 1}"]
    emb = table[shift_left(nxt, k - 1)]                      # Emb(t_{i+k})
    x = jnp.concatenate([_rms(emb, lp["enorm"]["weight"]),   # embedding first,
                         _rms(h, lp["hnorm"]["weight"])], -1)  # then the hidden state
    x = x @ lp["eh_proj"]["kernel"]
    h, _ = jax.jit(Block(cfg, moe=True).apply)({"params": lp["block"],
                                                "router_state": lr["block"]}, x, pos, None)
    logits = _rms(h, lp["shared_head_norm"]["weight"]) @ head
    np.testing.assert_allclose(np.asarray(out.mtp_logits[k - 1]), np.asarray(logits),
                               atol=1e-5 * max(1.0, float(jnp.abs(logits).max())))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _right_and_wrong(nxt, V, depth):
  """Losses of logits that predict token k + 1 (right) or token k (wrong) at depth k, and the
  gradients of the right loss; one program per drawn shape instead of eager ops."""
  right = tuple(20.0 * jax.nn.one_hot(shift_left(nxt, k), V) for k in range(1, depth + 1))
  wrong = tuple(20.0 * jax.nn.one_hot(shift_left(nxt, k - 1), V) for k in range(1, depth + 1))
  loss_right, per_right = mtp_loss(right, nxt, lam=1.0)
  loss_wrong, _ = mtp_loss(wrong, nxt, lam=1.0)
  grads = jax.grad(lambda ls: mtp_loss(ls, nxt, lam=1.0)[0])(right)
  return loss_right, per_right, loss_wrong, grads


@given(T=st.integers(3, 12), depth=st.integers(1, 3), seed=st.integers(0, 1000))
def test_depth_k_predicts_token_k_plus_1_and_ignores_positions_without_target(T, depth, seed):
  V = 11
  nxt = jax.random.randint(jax.random.PRNGKey(seed), (2, T), 0, V)  # nxt[i] = t_{i+1}
  loss_right, per_right, loss_wrong, grads = _right_and_wrong(nxt, V, depth)
  if T > depth:
    assert float(loss_right) < 1e-6 < float(loss_wrong)
  # Positions i with i + k >= T have no target: their logits get no gradient.
  for k, g in enumerate(grads, start=1):
    assert np.all(np.asarray(g[:, max(T - k, 0):]) == 0.0)
  assert len(per_right) == depth


def test_mtp_loss_weighting_and_lambda():
  nxt = jnp.asarray([[1, 2, 3, 4]])
  logits = (jnp.zeros((1, 4, 5)),)
  loss, per = mtp_loss(logits, nxt, lam=0.3)
  np.testing.assert_allclose(float(per[0]), np.log(5), rtol=1e-6)
  np.testing.assert_allclose(float(loss), 0.3 * np.log(5), rtol=1e-6)
  loss2, _ = mtp_loss(logits + logits, nxt, lam=0.3)  # D = 2 depths: lambda / D * sum
  np.testing.assert_allclose(float(loss2), 0.3 * np.log(5), rtol=1e-6)


def test_dense_then_moe_stacks():
  cfg = small_config(num_layers=3, first_k_dense_replace=1, num_mtp_layers=1)
  tokens = random_tokens(cfg, 1, 4)
  v = init_model(Transformer(cfg), tokens)
  dense = v["params"]["dense_blocks"]["layers"]["mlp"]
  moe = v["params"]["moe_blocks"]["layers"]["mlp"]
  assert set(dense) == {"gate_proj", "up_proj", "down_proj"}
  assert dense["gate_proj"]["kernel"].shape == (1, cfg.d_model, cfg.ffn_dim)
  assert moe["experts"]["gate_proj"].shape == (2, cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim)
  assert v["router_state"]["moe_blocks"]["layers"]["mlp"]["gate"]["e_score_correction_bias"].shape == (
      2, cfg.n_routed_experts)
  assert "mtp" in v["router_state"]  # the MTP block is MoE too
  n = sum(x.size for x in jax.tree.leaves(v["params"]))
  counts = cfg.param_counts()
  bias = (cfg.num_moe_layers + cfg.num_mtp_layers) * cfg.n_routed_experts
  assert n == counts["total"] + counts["mtp_total"] - bias  # biases are router_state, not params


def test_dropless_model_equals_dense_model():
  cfg = small_config(num_layers=3, first_k_dense_replace=1, num_mtp_layers=1)
  tokens = random_tokens(cfg, 2, 6)
  v = init_model(Transformer(cfg), tokens)
  import dataclasses
  a = jax.jit(Transformer(cfg).apply)(v, tokens)
  b = jax.jit(Transformer(dataclasses.replace(cfg, moe_dispatch="dropless")).apply)(v, tokens)
  c = jax.jit(Transformer(cfg, experts=LocalExperts("dropless")).apply)(v, tokens)
  np.testing.assert_array_equal(np.asarray(b.logits_BTV), np.asarray(c.logits_BTV))
  np.testing.assert_allclose(np.asarray(a.logits_BTV), np.asarray(b.logits_BTV), atol=1e-5)
  np.testing.assert_allclose(np.asarray(a.mtp_logits[0]), np.asarray(b.mtp_logits[0]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(a.aux["load"]), np.asarray(b.aux["load"]))


def test_the_expert_runner_reaches_the_mtp_block():
  """The main stack is all dense here, so only the MTP block calls the runner it is given."""
  import dataclasses
  calls = []

  @dataclasses.dataclass(frozen=True)
  class Recording(LocalExperts):
    def __call__(self, *args, **kw):
      calls.append(self.kind)
      return super().__call__(*args, **kw)

  cfg = small_config(num_layers=1, first_k_dense_replace=1, num_mtp_layers=1)
  tokens = random_tokens(cfg, 2, 6)
  v = init_model(Transformer(cfg), tokens)
  out = jax.jit(Transformer(cfg, experts=Recording("dropless")).apply)(v, tokens)
  assert calls == ["dropless"]
  want = jax.jit(Transformer(cfg).apply)(v, tokens)
  np.testing.assert_allclose(np.asarray(out.mtp_logits[0]), np.asarray(want.mtp_logits[0]),
                             atol=1e-5)
