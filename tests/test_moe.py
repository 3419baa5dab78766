"""DeepSeekMoE block and dispatch: dropless == dense (values, gradients), parameters, FP8 seam."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from deepseek_jax import dispatch, router
from deepseek_jax.config import ModelConfig
from deepseek_jax.moe import MoE

seeds = st.integers(0, 2**31 - 1)
# These tests compile many small programs; XLA's backend optimisations cost more than they save.
fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def _assert_close(got, want, tol=1e-5, what=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.max(np.abs(want)), 1e-30)
  err = np.max(np.abs(got - want)) / scale
  assert err <= tol, f"{what}: max error {err:.2e} (relative to max |value| {scale:.2e})"


def _assert_trees_close(got, want, tol=1e-5):
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(paths, jax.tree.leaves(got)):
    _assert_close(g, w, tol, jax.tree_util.keystr(path))


def _cfg(E, K, G, topk_group, shared, scoring="sigmoid", bias=True, norm=True, **kw):
  return ModelConfig(d_model=16, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
                     topk_group=topk_group, n_shared_experts=shared, scoring_func=scoring,
                     routing_bias=bias, norm_topk_prob=norm, moe_ffn_dim=8, init_std=0.3, **kw)


@functools.lru_cache(maxsize=None)
def _init_fn(cfg, shape):
  return fast_jit(lambda key: nn.meta.unbox(MoE(cfg).init(key, jnp.zeros(shape + (cfg.d_model,)))))


def _variables(cfg, shape, seed, bias_scale=0.3):
  """Initialised variables with a random nonzero selection bias (when the config has one)."""
  variables = _init_fn(cfg, shape)(jax.random.key(seed))
  if cfg.routing_bias:
    variables["router_state"]["gate"]["e_score_correction_bias"] = bias_scale * jax.random.normal(
        jax.random.key(seed + 1), (cfg.n_routed_experts,))
  return variables


@functools.lru_cache(maxsize=None)
def _apply_fn(model):
  return fast_jit(model.apply)


# ---- the module: dropless == dense over configs ----

# (config, (B, T)) pairs: hypothesis draws a pair and the values; each pair compiles once.
CASES = [
    (_cfg(16, 4, 4, 2, 1), (1, 3)),                             # V3 routing, fewer tokens than E
    (_cfg(8, 2, 1, 1, 0, "softmax", bias=False, norm=False), (2, 16)),   # V2 greedy, no shared
    (_cfg(8, 3, 4, 2, 2, "softmax"), (2, 5)),                   # softmax + bias, 2 shared, odd K
    (_cfg(6, 6, 3, 3, 1, bias=False), (1, 4)),                  # K = E: every expert, every token
]


def _loss_fn(model, variables):
  def loss(params, x_BTD, ct_BTD):
    y_BTD, aux = model.apply({**variables, "params": params}, x_BTD)
    return jnp.sum(y_BTD * ct_BTD) + 1e3 * aux["balance_loss"], (y_BTD, aux)
  return loss


@functools.partial(fast_jit, static_argnums=0)
def _dense_and_dropless(cfg, variables, x_BTD, ct_BTD):
  out = {}
  for name in ("dense", "dropless"):
    model = MoE(cfg, experts=dispatch.LocalExperts(name, impl="block"))
    out[name] = jax.value_and_grad(_loss_fn(model, variables), (0, 1), has_aux=True)(
        variables["params"], x_BTD, ct_BTD)
  return out


@given(st.sampled_from(CASES), seeds)
def test_dropless_equals_dense_values_and_gradients(case, seed):
  cfg, shape = case
  variables = _variables(cfg, shape, seed % 1000)
  x_BTD, ct_BTD = jax.random.normal(jax.random.key(seed), (2,) + shape + (cfg.d_model,))
  out = _dense_and_dropless(cfg, variables, x_BTD, ct_BTD)
  (_, (y_dense, aux_dense)), g_dense = out["dense"]
  (_, (y, aux)), g = out["dropless"]
  _assert_close(y, y_dense, what="output")
  _assert_trees_close(g, g_dense)
  np.testing.assert_array_equal(np.asarray(aux["load"]), np.asarray(aux_dense["load"]))
  # Nothing dropped: every token sends exactly K assignments.
  assert float(jnp.sum(aux["load"])) == shape[0] * shape[1] * cfg.num_experts_per_tok
  # The gradient reaches the router kernel (through the combine weights and the balance loss).
  assert float(jnp.max(jnp.abs(g[0]["gate"]["kernel"]))) > 0


# ---- the pure dispatch functions on adversarial routings ----

def _dispatch_inputs(seed, X, E, K, D, M, pattern):
  rng = np.random.default_rng(seed)
  if pattern == "random":
    experts = rng.integers(0, E, size=(X, K))               # duplicates within a token allowed
  elif pattern == "one_expert":
    experts = np.full((X, K), E - 1)
  else:                                                    # "skewed": most rows on expert 0
    experts = np.where(rng.random((X, K)) < 0.8, 0, rng.integers(0, E, size=(X, K)))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return (f32(rng.normal(size=(X, D))), f32(rng.uniform(0.1, 1, size=(X, K))),
          jnp.asarray(experts, jnp.int32), f32(rng.normal(size=(E, D, M)) * 0.3),
          f32(rng.normal(size=(E, D, M)) * 0.3), f32(rng.normal(size=(E, M, D)) * 0.3))


@functools.partial(fast_jit, static_argnums=(0, 1))
def _ffn_value_and_grad(impl, block, x, w, e, wg, wu, wd):
  def loss(x, w, wg, wu, wd):
    if impl == "dense":
      y = dispatch.dense_ffn(x, w, e, wg, wu, wd)
    else:
      y = dispatch.dropless_ffn(x, w, e, wg, wu, wd, impl=impl, block=block)
    return jnp.sum(y * jnp.cos(y)), y
  return jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True)(x, w, wg, wu, wd)


@given(st.sampled_from([(3, 16, 2), (40, 4, 3)]),      # (X, E, K); X < E in the first
       st.sampled_from(["random", "one_expert", "skewed"]),
       st.sampled_from([("block", None), ("block", 1), ("ragged", None)]), seeds)
def test_dropless_ffn_equals_dense_ffn_on_any_routing(XEK, pattern, impl_block, seed):
  (X, E, K), (impl, block) = XEK, impl_block
  args = _dispatch_inputs(seed, X, E, K, 8, 4, pattern)
  (_, y), g = _ffn_value_and_grad(impl, block, *args)
  (_, y_ref), g_ref = _ffn_value_and_grad("dense", None, *args)
  _assert_close(y, y_ref, what="output")
  for name, a, b in zip(["x", "weights", "gate_proj", "up_proj", "down_proj"], g, g_ref):
    _assert_close(a, b, what=f"d{name}")


def test_dropless_is_compiled_once_for_any_routing():
  traces = []

  @fast_jit
  def f(x, w, e, wg, wu, wd):
    traces.append(1)
    return (dispatch.dropless_ffn(x, w, e, wg, wu, wd, impl="block", block=4),
            dispatch.dense_ffn(x, w, e, wg, wu, wd))

  for pattern in ("random", "one_expert", "skewed"):
    y, y_ref = f(*_dispatch_inputs(0, 24, 8, 2, 8, 4, pattern))
    _assert_close(y, y_ref, what=pattern)
  assert len(traces) == 1


@given(st.integers(1, 4096), st.integers(1, 64), st.sampled_from([1, 4, 16, 128]), seeds)
def test_block_count_bounds_every_routing(A, E, U, seed):
  rng = np.random.default_rng(seed)
  # A random split of A rows over E experts, and the worst case (one row on each of E-1 experts).
  n = min(E, A)
  splits = [np.bincount(rng.integers(0, E, A), minlength=E),
            np.r_[np.ones(n - 1, int), A - n + 1, np.zeros(E - n, int)]]
  for counts in splits:
    assert counts.sum() == A and np.sum(-(-counts // U)) <= dispatch.num_blocks(A, E, U)
  if (A - n) % U == 0:    # then the worst case reaches the bound: it is tight
    assert np.sum(-(-splits[1] // U)) == dispatch.num_blocks(A, E, U)
  U = dispatch.auto_block_size(A, E)
  assert 1 <= U <= 128 and U & (U - 1) == 0 and U < 2 * -(-A // min(A, E))


def test_dropless_rejects_bad_arguments():
  args = _dispatch_inputs(0, 4, 4, 2, 8, 4, "random")
  with pytest.raises(ValueError, match="impl"):
    dispatch.dropless_ffn(*args, impl="megablocks")
  with pytest.raises(ValueError, match="block"):
    dispatch.dropless_ffn(*args, impl="block", block=0)
  with pytest.raises(ValueError, match=r"\[E, M, D\]"):
    dispatch.dropless_ffn(*args[:5], args[5][:, :, :3])


# ---- the module: parameters, router state, aux, FP8 seam, dtypes ----

SMALL = _cfg(8, 2, 2, 1, 1)     # shared by the tests below, with inputs of shape (2, 8, 16)
SMALL_SHAPE = (2, 8)


def test_parameter_names_shapes_dtypes_and_axes():
  cfg = _cfg(8, 2, 2, 1, 2, param_dtype="bfloat16")
  variables = jax.eval_shape(lambda: MoE(cfg).init(jax.random.key(0), jnp.ones((2, 3, 16))))
  specs = nn.get_partition_spec(variables)
  v = nn.meta.unbox(variables)
  p, s = v["params"], specs["params"]
  assert p["gate"]["kernel"].shape == (16, 8) and p["gate"]["kernel"].dtype == jnp.float32
  assert tuple(s["gate"]["kernel"]) == ("embed", "experts")
  bias = v["router_state"]["gate"]["e_score_correction_bias"]
  assert bias.shape == (8,) and bias.dtype == jnp.float32
  assert tuple(specs["router_state"]["gate"]["e_score_correction_bias"]) == ("experts",)
  for name, shape, axes in [("gate_proj", (8, 16, 8), ("experts", "expert_embed", "moe_mlp")),
                            ("up_proj", (8, 16, 8), ("experts", "expert_embed", "moe_mlp")),
                            ("down_proj", (8, 8, 16), ("experts", "moe_mlp", "expert_embed"))]:
    assert p["experts"][name].shape == shape and p["experts"][name].dtype == jnp.bfloat16
    assert tuple(s["experts"][name]) == axes
  assert p["shared_experts"]["gate_proj"]["kernel"].shape == (16, 16)    # 2 shared * M
  assert tuple(s["shared_experts"]["down_proj"]["kernel"]) == ("moe_mlp", "embed")
  assert set(p) == {"gate", "experts", "shared_experts"}
  none = jax.eval_shape(
      lambda: MoE(_cfg(8, 2, 2, 1, 0, bias=False)).init(jax.random.key(0), jnp.ones((1, 2, 16))))
  assert set(none) == {"params"} and set(none["params"]) == {"gate", "experts"}
  # Real values: the bias starts at zero, expert weights ~ normal(init_std).
  real = _variables(SMALL, SMALL_SHAPE, 0, bias_scale=0.0)
  assert not np.any(np.asarray(real["router_state"]["gate"]["e_score_correction_bias"]))
  w = np.asarray(real["params"]["experts"]["gate_proj"])
  assert abs(w.std() - SMALL.init_std) < 0.2 * SMALL.init_std


def test_bias_steers_selection_and_aux_reports_load():
  x_BTD = jax.random.normal(jax.random.key(1), SMALL_SHAPE + (16,))
  model = MoE(SMALL)
  v = _variables(SMALL, SMALL_SHAPE, 0, bias_scale=0.0)
  apply = _apply_fn(model)
  _, aux = apply(v, x_BTD)
  v["router_state"]["gate"]["e_score_correction_bias"] = jnp.zeros(8).at[5].set(10.0)
  y_biased, aux_biased = apply(v, x_BTD)
  assert float(aux_biased["load"][5]) == 16 and float(aux["load"][5]) < 16
  assert float(jnp.sum(aux_biased["load"])) == 2 * 8 * 2
  assert aux["balance_loss"].shape == () and float(aux["balance_loss"]) > 0
  assert y_biased.shape == x_BTD.shape
  with pytest.raises(Exception, match="router_state"):
    model.apply({"params": v["params"]}, x_BTD)


def test_moe_block_matches_the_formula_in_numpy():
  """y = shared(x) + sum_k w_k Expert_{e_k}(x), routed by `router.route` on f32 x W_g (§2.8-9)."""
  x_BTD = jax.random.normal(jax.random.key(2), SMALL_SHAPE + (16,))
  v = _variables(SMALL, SMALL_SHAPE, 3)
  y_BTD, aux = _apply_fn(MoE(SMALL))(v, x_BTD)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])

  @fast_jit
  def reference_routing(x_BTD, kernel_DE, bias_E):
    out = router.route(x_BTD.reshape(16, 16) @ kernel_DE, bias_E, SMALL)
    return out, router.balance_loss(out.scores_XE.reshape(2, 8, 8),
                                    out.experts_XK.reshape(2, 8, 2), SMALL)

  out, loss = reference_routing(x_BTD, v["params"]["gate"]["kernel"],
                                v["router_state"]["gate"]["e_score_correction_bias"])
  silu = lambda a: a / (1 + np.exp(-a))
  swiglu = lambda x, g, u, d: (silu(x @ g) * (x @ u)) @ d
  x_XD = np.asarray(x_BTD, np.float64).reshape(16, 16)
  sh = p["shared_experts"]
  want = swiglu(x_XD, sh["gate_proj"]["kernel"], sh["up_proj"]["kernel"], sh["down_proj"]["kernel"])
  ex = p["experts"]
  for t in range(16):
    for w, e in zip(np.asarray(out.weights_XK[t]), np.asarray(out.experts_XK[t])):
      want[t] += w * swiglu(x_XD[t], ex["gate_proj"][e], ex["up_proj"][e], ex["down_proj"][e])
  _assert_close(np.asarray(y_BTD).reshape(16, 16), want, what="MoE block vs formula")
  np.testing.assert_array_equal(np.asarray(aux["load"]),
                                np.asarray(router.expert_load(out.experts_XK, 8)))
  np.testing.assert_allclose(float(aux["balance_loss"]), float(loss), rtol=1e-5)


class _ScalingPolicy:
  """A stand-in FP8 policy: records the paths asked for and scales chosen products."""

  def __init__(self, scales):
    self.scales, self.asked = scales, []

  def dot_general_for(self, path):
    self.asked.append(path)
    for suffix, c in self.scales.items():
      if path.endswith(suffix):
        return lambda a, b, dims, **kw: c * jax.lax.dot_general(a, b, dims, **kw)
    return None


@pytest.mark.parametrize("dispatch_name", ["dense", "dropless"])
def test_expert_matmuls_go_through_the_fp8_seam_and_the_router_does_not(dispatch_name):
  cfg = dataclasses.replace(SMALL, moe_dispatch=dispatch_name)
  x_BTD = jax.random.normal(jax.random.key(1), SMALL_SHAPE + (16,))
  v = _variables(SMALL, SMALL_SHAPE, 4)
  no_routed = _ScalingPolicy({"experts/down_proj": 0.0})
  doubled = _ScalingPolicy({"experts/down_proj": 2.0})

  @fast_jit
  def outputs(v, x_BTD):
    return [MoE(cfg, fp8_policy=p).apply(v, x_BTD)[0] for p in (None, no_routed, doubled)]

  y, y_shared, y_double = outputs(v, x_BTD)
  # y = shared + routed, so doubling the routed down projection gives 2y - shared.
  _assert_close(y_double, 2 * y - y_shared, what="routed part through the seam")
  assert float(jnp.max(jnp.abs(y - y_shared))) > 1e-3
  asked = set(no_routed.asked)
  for name in ("gate_proj", "up_proj", "down_proj"):
    assert f"experts/{name}" in asked and f"shared_experts/{name}" in asked
  assert not any(p == "gate" or p.startswith("gate/") for p in asked)


def test_bfloat16_compute_follows_float32():
  x_BTD = jax.random.normal(jax.random.key(1), SMALL_SHAPE + (16,))
  v = _variables(SMALL, SMALL_SHAPE, 5)

  @fast_jit
  def outputs(v, x_BTD):
    return [MoE(dataclasses.replace(SMALL, dtype=d)).apply(v, x_BTD)
            for d in ("float32", "bfloat16")]

  (y32, aux32), (y16, aux16) = outputs(v, x_BTD)
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  # The router stays f32, so the same experts are chosen; values agree to bf16 precision.
  np.testing.assert_array_equal(np.asarray(aux16["load"]), np.asarray(aux32["load"]))
  _assert_close(y16.astype(jnp.float32), y32, tol=3e-2, what="bf16 vs f32")


def test_config_chooses_the_default_runner_and_an_explicit_one_wins():
  """`MoE(cfg)` runs `LocalExperts.from_config(cfg)`: model.dropless_block=4 gives [W, 4, D]
  blocks; a runner passed explicitly overrides the config (here the dense oracle)."""
  cfg = dataclasses.replace(SMALL, moe_dispatch="dropless", dropless_impl="block",
                            dropless_block=4)
  x_BTD = jnp.zeros(SMALL_SHAPE + (16,))
  v = _variables(SMALL, SMALL_SHAPE, 6)
  text = lambda model: jax.jit(model.apply).lower(v, x_BTD).as_text()  # noqa: E731
  blocks = f"tensor<{dispatch.num_blocks(16 * 2, 8, 4)}x4x16xf32>"
  assert blocks in text(MoE(cfg))
  dense = text(MoE(cfg, experts=dispatch.LocalExperts("dense")))
  assert blocks not in dense and "tensor<16x8x8xf32>" in dense   # h_XEM: all E experts
  with pytest.raises(ValueError, match="kind"):
    dispatch.LocalExperts("expert_parallel")
  with pytest.raises(ValueError, match="block"):
    dispatch.LocalExperts("dropless", "block", 0)
