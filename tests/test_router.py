"""Router properties (V3 §2.1.2): selection vs weights, group limit, balance loss, balancing."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from deepseek_jax import router
from deepseek_jax.config import ModelConfig


def _cfg(E, K, G, topk_group, scoring="sigmoid", bias=True, norm=True, scale=2.5):
  return ModelConfig(d_model=16, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
                     topk_group=topk_group, scoring_func=scoring, routing_bias=bias,
                     norm_topk_prob=norm, routed_scaling_factor=scale, moe_ffn_dim=8)


# A fixed menu (hypothesis picks from it) so compiled routers are shared across tests.
CONFIGS = [
    _cfg(16, 4, 4, 2),                                   # V3 shape: sigmoid, bias, top-2 group sum
    _cfg(16, 4, 4, 2, "softmax", bias=False, norm=False, scale=1.0),   # V2: max-of-group rule
    _cfg(8, 2, 1, 1),                                    # no group limit
    _cfg(12, 3, 3, 3, norm=False),                       # every group kept
    _cfg(8, 4, 4, 2),                                    # K fills the kept groups exactly
    _cfg(8, 1, 2, 1, "softmax"),                         # softmax with bias, K = 1
    _cfg(6, 2, 6, 2, bias=False),                        # one expert per group (V2 rule only)
]
TOKENS = [3, 24]
configs = st.sampled_from(CONFIGS)
tokens = st.sampled_from(TOKENS)
seeds = st.integers(0, 2**31 - 1)
# Many small programs: XLA's backend optimisations cost more than they save here.
fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
route = fast_jit(router.route, static_argnums=2)
limit_groups = fast_jit(router.limit_groups, static_argnums=(1, 2, 3))
balance_loss = fast_jit(router.balance_loss, static_argnums=2)


def _inputs(cfg, seed, tokens):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(tokens, cfg.n_routed_experts)), jnp.float32)
  bias = jnp.asarray(rng.normal(scale=0.3, size=cfg.n_routed_experts), jnp.float32)
  return logits, (bias if cfg.routing_bias else None)


def _reference_route(logits, bias, cfg):
  """Hand-written NumPy (float64) version of semantics §2.8, one token at a time."""
  logits = np.asarray(logits, np.float64)
  if cfg.scoring_func == "sigmoid":
    s = 1 / (1 + np.exp(-logits))
  else:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    s = z / z.sum(-1, keepdims=True)
  sel = s + (0 if bias is None else np.asarray(bias, np.float64))
  E, G, K = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
  experts, weights = [], []
  for t in range(s.shape[0]):
    row = sel[t].copy()
    if G > 1:
      grp = row.reshape(G, E // G)
      gscore = (np.sort(grp, -1)[:, -2:].sum(-1) if cfg.routing_bias else grp.max(-1))
      kept = np.argsort(-gscore, kind="stable")[:cfg.topk_group]
      for g in range(G):
        if g not in kept:
          row[g * (E // G):(g + 1) * (E // G)] = -np.inf
    chosen = np.argsort(-row, kind="stable")[:K]
    w = s[t, chosen]
    if cfg.norm_topk_prob:
      w = w / w.sum()
    order = np.argsort(chosen)
    experts.append(chosen[order])
    weights.append(w[order] * cfg.routed_scaling_factor)
  return np.array(experts), np.array(weights)


def _sorted_by_expert(out):
  order = np.argsort(np.asarray(out.experts_XK), axis=-1)
  return (np.take_along_axis(np.asarray(out.experts_XK), order, -1),
          np.take_along_axis(np.asarray(out.weights_XK), order, -1))


@given(configs, tokens, seeds)
def test_route_matches_numpy_reference(cfg, tokens, seed):
  logits, bias = _inputs(cfg, seed, tokens)
  out = route(logits, bias, cfg)
  ref_e, ref_w = _reference_route(logits, bias, cfg)
  got_e, got_w = _sorted_by_expert(out)
  np.testing.assert_array_equal(got_e, ref_e)
  np.testing.assert_allclose(got_w, ref_w, rtol=1e-5, atol=1e-7)
  assert out.experts_XK.dtype == jnp.int32 and out.weights_XK.dtype == jnp.float32


def test_group_score_is_top2_sum_not_max():
  # Group 0 holds the single largest score, group 1 the larger top-2 sum: the V3 rule keeps
  # group 1, the V2 max rule keeps group 0.
  base = dict(d_model=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
              moe_ffn_dim=8)
  s = np.array([[0.95, 0.10, 0.05, 0.04, 0.7, 0.7, 0.03, 0.02]])
  logits = jnp.asarray(np.log(s / (1 - s)), jnp.float32)
  v3 = route(logits, jnp.zeros(8), ModelConfig(routing_bias=True, **base))
  v2 = route(logits, None, ModelConfig(routing_bias=False, **base))
  assert sorted(np.asarray(v3.experts_XK)[0]) == [4, 5]
  assert sorted(np.asarray(v2.experts_XK)[0]) == [0, 1]


@given(configs.filter(lambda c: c.norm_topk_prob), tokens, seeds)
def test_normalised_weights_sum_to_scaling_factor(cfg, tokens, seed):
  logits, bias = _inputs(cfg, seed, tokens)
  w = route(logits, bias, cfg).weights_XK
  np.testing.assert_allclose(np.sum(np.asarray(w), -1), cfg.routed_scaling_factor, rtol=1e-5)


@given(configs.filter(lambda c: c.routing_bias), seeds)
def test_bias_changes_selection_not_weights(cfg, seed):
  logits, _ = _inputs(cfg, seed, 24)
  # Favour the expert the unbiased router likes least, strongly enough to win a slot everywhere.
  plain = route(logits, jnp.zeros(cfg.n_routed_experts), cfg)
  worst = int(np.argmin(np.asarray(plain.scores_XE).sum(0)))
  assume(not np.all(np.any(np.asarray(plain.experts_XK) == worst, axis=-1)))
  bias = jnp.zeros(cfg.n_routed_experts).at[worst].set(10.0)
  biased = route(logits, bias, cfg)
  assert np.all(np.any(np.asarray(biased.experts_XK) == worst, axis=-1))
  assert not np.array_equal(np.sort(np.asarray(biased.experts_XK), -1),
                            np.sort(np.asarray(plain.experts_XK), -1))
  # Weights are the unbiased scores of the chosen experts (then normalised and scaled).
  s_XK = np.take_along_axis(np.asarray(biased.scores_XE), np.asarray(biased.experts_XK), -1)
  if cfg.norm_topk_prob:
    s_XK = s_XK / s_XK.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(biased.weights_XK), s_XK * cfg.routed_scaling_factor,
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(biased.scores_XE), np.asarray(plain.scores_XE))


@given(configs, tokens, seeds)
def test_experts_within_kept_groups(cfg, tokens, seed):
  logits, bias = _inputs(cfg, seed, tokens)
  out = route(logits, bias, cfg)
  per_group = cfg.n_routed_experts // cfg.n_group
  groups_XK = np.asarray(out.experts_XK) // per_group
  for t in range(tokens):
    assert len(set(groups_XK[t])) <= cfg.topk_group
    assert len(set(np.asarray(out.experts_XK)[t])) == cfg.num_experts_per_tok
  # The groups used are exactly (a subset of) the groups the masking keeps.
  sel = np.asarray(out.scores_XE) + (0.0 if bias is None else np.asarray(bias)[None, :])
  masked = limit_groups(jnp.asarray(sel), cfg.n_group, cfg.topk_group, cfg.routing_bias)
  chosen = np.take_along_axis(np.asarray(masked), np.asarray(out.experts_XK), -1)
  assert np.all(np.isfinite(chosen))
  kept_groups = np.isfinite(np.asarray(masked)).reshape(tokens, cfg.n_group, per_group).all(-1)
  assert np.all(kept_groups.sum(-1) == min(cfg.topk_group, cfg.n_group))


@given(configs, seeds)
def test_route_is_permutation_equivariant_over_tokens(cfg, seed):
  logits, bias = _inputs(cfg, seed, 24)
  perm = np.random.default_rng(seed + 1).permutation(24)
  a = route(logits, bias, cfg)
  b = route(logits[perm], bias, cfg)
  ea, wa = _sorted_by_expert(a)
  eb, wb = _sorted_by_expert(b)
  np.testing.assert_array_equal(ea[perm], eb)
  np.testing.assert_allclose(wa[perm], wb, rtol=1e-6)


def test_route_rejects_bad_input():
  cfg = ModelConfig(d_model=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                    topk_group=1, routing_bias=False, moe_ffn_dim=8)
  with pytest.raises(ValueError, match="routing_bias"):
    router.route(jnp.zeros((3, 8)), jnp.zeros(8), cfg)
  with pytest.raises(ValueError, match="n_routed_experts=8"):
    router.route(jnp.zeros((3, 7)), None, cfg)
  with pytest.raises(ValueError, match="scoring_func"):
    router.expert_scores(jnp.zeros((3, 8)), "relu")


# ---- load, balance loss, bias updates ----

@given(st.sampled_from([4, 16]), tokens, st.sampled_from([1, 4]), seeds)
def test_expert_load_counts_assignments(E, X, K, seed):
  experts = np.random.default_rng(seed).integers(0, E, size=(X, K))
  load = fast_jit(router.expert_load, static_argnums=1)(jnp.asarray(experts, jnp.int32), E)
  np.testing.assert_array_equal(np.asarray(load), np.bincount(experts.ravel(), minlength=E))
  assert load.dtype == jnp.float32


def test_balance_loss_is_alpha_under_uniform_routing():
  B, T, E, K = 3, 32, 16, 4
  cfg = ModelConfig(d_model=16, n_routed_experts=E, num_experts_per_tok=K, n_group=1,
                    topk_group=1, moe_ffn_dim=8, balance_loss_alpha=1e-4)
  # Exactly uniform: equal scores, each expert chosen K*T/E times per sequence.
  experts = (np.arange(T * K).reshape(T, K) % E)[None].repeat(B, 0)
  loss = balance_loss(jnp.full((B, T, E), 0.3), jnp.asarray(experts, jnp.int32), cfg)
  np.testing.assert_allclose(float(loss), 1e-4, rtol=1e-6)
  # Random routing with random scores: ~alpha in expectation.
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(B * 64, 512 // 8, E)).reshape(-1, E), jnp.float32)
  out = route(logits, None, cfg)
  loss = balance_loss(out.scores_XE.reshape(B * 64, -1, E),
                             out.experts_XK.reshape(B * 64, -1, K), cfg)
  np.testing.assert_allclose(float(loss), 1e-4, rtol=0.1)
  # Collapsed routing (every token on experts 0..K-1 with most of the score mass): E/K x larger.
  scores = np.full((B, T, E), 1e-3)
  scores[..., :K] = 1.0
  collapsed = np.broadcast_to(np.arange(K), (B, T, K))
  loss = balance_loss(jnp.asarray(scores), jnp.asarray(collapsed, jnp.int32), cfg)
  assert float(loss) > 0.9 * (E / K) * 1e-4


def test_balance_loss_gradient_reaches_scores_only_through_P():
  B, T, E, K = 2, 8, 8, 2
  cfg = ModelConfig(d_model=16, n_routed_experts=E, num_experts_per_tok=K, n_group=1,
                    topk_group=1, moe_ffn_dim=8)
  scores = jax.random.uniform(jax.random.key(0), (B, T, E), minval=0.1)
  experts = jax.random.randint(jax.random.key(1), (B, T, K), 0, E)
  g = fast_jit(jax.grad(router.balance_loss), static_argnums=2)(scores, experts, cfg)
  # d/ds of alpha * mean_b sum_i f_i * mean_t s_i / sum_j s_j, by hand.
  f = np.stack([np.bincount(np.asarray(experts[b]).ravel(), minlength=E) for b in range(B)])
  f = f * E / (K * T)
  s = np.asarray(scores, np.float64)
  tot = s.sum(-1, keepdims=True)
  fb = f[:, None, :]
  ref = (fb / tot - (fb * s).sum(-1, keepdims=True) / tot**2) / T / B * cfg.balance_loss_alpha
  np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-12)


@given(st.sampled_from([1, 3]), st.sampled_from([4, 16]), seeds)
def test_update_router_bias_and_max_violation_on_stacked_layers(L, E, seed):
  rng = np.random.default_rng(seed)
  load = rng.integers(0, 6, size=(L, E)).astype(np.float32)   # small counts: ties with the mean
  bias = rng.normal(size=(L, E)).astype(np.float32)
  update = fast_jit(router.update_router_bias)
  new = update(jnp.asarray(bias), jnp.asarray(load), 1e-3)
  expect = bias + 1e-3 * np.sign(load.mean(-1, keepdims=True) - load)
  np.testing.assert_allclose(np.asarray(new), expect, rtol=1e-6)
  assert new.dtype == jnp.float32 and new.shape == (L, E)
  vio = fast_jit(router.max_violation)(jnp.asarray(load))
  mean = load.mean(-1)
  expect = np.where(mean > 0, (load.max(-1) - mean) / np.maximum(mean, 1e-30), 0.0)
  np.testing.assert_allclose(np.asarray(vio), expect, rtol=1e-5)
  assert vio.shape == (L,)
  one = update(jnp.asarray(bias[0]), jnp.asarray(load[0]), 1e-3)
  np.testing.assert_allclose(np.asarray(one), np.asarray(new[0]), rtol=1e-6)


def test_bias_updates_drive_max_violation_down():
  """Aux-loss-free balancing on a router with a skewed logit bias (fresh tokens every step)."""
  E, K, D, X, steps, gamma = 16, 4, 32, 512, 300, 2e-3
  cfg = ModelConfig(d_model=D, n_routed_experts=E, num_experts_per_tok=K, n_group=4,
                    topk_group=2, moe_ffn_dim=8)
  w_DE = jax.random.normal(jax.random.key(0), (D, E)) / np.sqrt(D)
  skew_E = jnp.linspace(-1.5, 1.5, E)

  def step(bias_E, key):
    x_XD = jax.random.normal(key, (X, D))
    out = router.route(x_XD @ w_DE + skew_E[None, :], bias_E, cfg)
    load_E = router.expert_load(out.experts_XK, E)
    return router.update_router_bias(bias_E, load_E, gamma), router.max_violation(load_E)

  _, vio = jax.jit(lambda k: jax.lax.scan(step, jnp.zeros(E), jax.random.split(k, steps)))(
      jax.random.key(1))
  vio = np.asarray(vio)
  print("MaxVio every 25 steps:", " ".join(f"{v:.3f}" for v in vio[::25]), f"final {vio[-1]:.3f}")
  first, last = vio[:5].mean(), vio[-20:].mean()
  assert first > 1.0, first
  assert last < 0.2 * first, (first, last)
