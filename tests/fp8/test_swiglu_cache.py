"""V3's SwiGLU cache (report §3.3.3): the down projection's backward reads gate and up from FP8
copies (E4M3, 1x128 tiles) and recomputes silu(gate) * up, in the dense MLP, the shared expert
and the routed experts' block path; the forward is unchanged bit for bit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax import dispatch
from deepseek_jax.fp8 import Fp8Dot, grouped
from deepseek_jax.fp8.dot import fp8_dot_general, fp8_swiglu_dot_general, swiglu
from deepseek_jax.fp8.formats import E4M3
from deepseek_jax.fp8.policy import RECIPES, Policy, make_policy
from deepseek_jax.layers import MLP
from tests.fp8 import reference as ref

V3 = RECIPES["deepseek_v3"]
DN = (((2,), (0,)), ((), ()))   # [B, T, F] x [F, D]
U = 2.0 ** -(E4M3.mantissa_bits + 1)   # E4M3's unit roundoff


def _without_cache(policy: Policy) -> Policy:
  off = lambda s: s if s is None else dataclasses.replace(s, swiglu_cache=None)  # noqa: E731
  return Policy(rules=tuple((p, off(s)) for p, s in policy.rules), default=off(policy.default))


def _q64(a):
  """float64 values of the SwiGLU cache's copy of `a` [B, T, F] (NumPy reference quantiser)."""
  a3 = np.asarray(a, np.float32).reshape(1, -1, a.shape[-1])
  blk = ref.blocks("tile", a3.shape, 2)
  data, s = ref.quantize(a3, E4M3.dtype, E4M3.max, blk, 1e-4, True)
  return ref.dequantize(data, s, blk).astype(np.float64).reshape(a.shape)


def _silu64(v):
  return v / (1 + np.exp(-v))


@settings(max_examples=4, deadline=None)
@given(rows=st.integers(1, 40), F=st.sampled_from([64, 200, 256]), D=st.sampled_from([32, 96]),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2 ** 31))
def test_swiglu_gradients_are_the_v3_recompute_within_the_fp8_bound(rows, F, D, scale, seed):
  """Forward bitwise that of fp8_dot_general(silu(gate) * up); d(gate), d(up) are SwiGLU's
  float64 derivative at the NumPy-quantised FP8 copies times the (unchanged) dgrad, and stay
  within the elementwise bound that E4M3 rounding of gate and up allows; dW is the wgrad of the
  recomputed product."""
  rng = np.random.default_rng(seed)
  gate, up = (jnp.asarray(rng.standard_normal((2, rows, F)) * scale, jnp.float32)
              for _ in range(2))
  w = jnp.asarray(rng.standard_normal((F, D)) / np.sqrt(F), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((2, rows, D)), jnp.float32)
  y, y_plain, dgate, dup, dw, dh = (np.asarray(a, np.float64)
                                    for a in _swiglu_and_plain(gate, up, w, ct))
  assert np.array_equal(y, y_plain)
  g64, u64 = np.asarray(gate, np.float64), np.asarray(up, np.float64)
  gq, uq = _q64(gate), _q64(up)
  sig = 1 / (1 + np.exp(-gq))
  tol = lambda r: 1e-5 * np.abs(r) + 1e-6 * np.abs(r).max() + 1e-30  # noqa: E731  f32 rounding
  want_dup, want_dgate = dh * _silu64(gq), dh * uq * sig * (1 + gq * (1 - sig))
  assert np.all(np.abs(dup - want_dup) <= tol(want_dup))
  assert np.all(np.abs(dgate - want_dgate) <= tol(want_dgate))
  # Against the unquantised inputs: |q(v) - v| <= U |v| + the subnormal half-step of its tile,
  # and |silu'| <= 1.1, |silu''| <= 0.5.
  sub = lambda v: np.abs(v).max() * 2.0 ** -9 / E4M3.max  # noqa: E731
  eg, eu = U * np.abs(g64) + sub(g64), U * np.abs(u64) + sub(u64)
  sig64 = 1 / (1 + np.exp(-g64))
  d_silu = sig64 * (1 + g64 * (1 - sig64))
  assert np.all(np.abs(dup - dh * _silu64(g64)) <= np.abs(dh) * 1.1 * eg + tol(want_dup))
  assert np.all(np.abs(dgate - dh * u64 * d_silu)
                <= np.abs(dh) * (np.abs(d_silu) * eu + 0.5 * eg * (np.abs(u64) + eu))
                + tol(want_dgate))
  # dW: the wgrad of fp8_dot_general on the recomputed product (read once, in high precision)
  h_rec = swiglu(jnp.asarray(gq, jnp.float32), jnp.asarray(uq, jnp.float32))
  np.testing.assert_allclose(dw, np.asarray(_wgrad_hp(h_rec, w, ct)), rtol=1e-6,
                             atol=1e-6 * np.abs(dw).max())


@jax.jit
def _swiglu_and_plain(gate, up, w, ct):
  y, vjp = jax.vjp(lambda g, u, w: fp8_swiglu_dot_general(g, u, w, DN, spec=V3), gate, up, w)
  y_plain, plain_vjp = jax.vjp(lambda h, w: fp8_dot_general(h, w, DN, spec=V3),
                               swiglu(gate, up), w)
  return (y, y_plain, *vjp(ct), plain_vjp(ct)[0])   # dgrad (the last) does not read x


@jax.jit
def _wgrad_hp(h, w, ct):
  spec = dataclasses.replace(V3, cache="hp")
  return jax.vjp(lambda w: fp8_dot_general(h, w, DN, spec=spec), w)[1](ct)[0]


def _mlp_residuals(policy, x, F):
  """The residuals of width F the MLP's backward keeps (shapes and dtypes, traced only)."""
  model = MLP(x.shape[-1], F, fp8_policy=policy)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def residuals(variables, x):
    _, vjp = jax.vjp(lambda x: model.apply(variables, x), x)
    return [a for a in jax.tree.leaves(vjp) if hasattr(a, "dtype") and a.shape[-1:] == (F,)]
  return jax.eval_shape(residuals, variables, x)


def test_mlp_keeps_gate_and_up_as_float8_bytes():
  """The residuals the MLP's backward keeps at width F: only FP8 bytes with the cache (gate,
  up, and the gate/up weights' FP8 copies); without it, f32 gate, up and SwiGLU internals."""
  x = jnp.ones((2, 24, 64), jnp.float32)
  on = _mlp_residuals(make_policy("deepseek_v3"), x, 256)
  off = _mlp_residuals(_without_cache(make_policy("deepseek_v3")), x, 256)
  # FP8 bytes: float8, or their uint8 bit patterns (`scaling.loop_bytes`, for the layer scan)
  assert on and all(a.dtype in (jnp.float8_e4m3fn, jnp.uint8) for a in on)
  assert sum(a.size for a in on if a.size == 48 * 256) == 2 * 48 * 256   # gate and up, once
  assert sum(a.dtype == jnp.float32 for a in off) >= 2


def test_mlp_fwd_bwd_temporaries_shrink():
  """XLA's own accounting of one MLP's fwd+bwd: the FP8 cache needs fewer temporary bytes than
  the f32 gate and up it replaces."""
  x = jnp.ones((2, 64, 128), jnp.float32)
  temp = {}
  for name, policy in (("on", make_policy("deepseek_v3_fused")),
                       ("off", _without_cache(make_policy("deepseek_v3_fused")))):
    model = MLP(128, 512, fp8_policy=policy)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)   # lowering needs shapes only
    step = jax.jit(jax.grad(lambda v, x, model=model: jnp.sum(model.apply(v, x) ** 2)))
    temp[name] = step.lower(variables, x).compile().memory_analysis().temp_size_in_bytes
  # 2 x 128 x 512 f32 values (gate, up) at 4 B become 1 B each
  assert temp["on"] <= temp["off"] - 2 * 128 * 512 * 3


def test_mlp_without_fp8_or_with_other_recipes_is_unchanged():
  """Only the deepseek_v3 family sets the cache; 'none' and the other recipes multiply
  silu(gate) * up as before (their residuals keep gate and up)."""
  assert all(RECIPES[n].swiglu_cache == E4M3 for n in
             ("deepseek_v3", "deepseek_v3_fused", "deepseek_v3_hopper"))
  assert all(RECIPES[n].swiglu_cache is None for n in
             ("tensor_current", "tensor_delayed", "rowwise"))
  x = jnp.ones((2, 8, 64), jnp.float32)
  assert any(a.dtype == jnp.float32 for a in _mlp_residuals(None, x, 128))
  assert any(a.dtype == jnp.float32 for a in _mlp_residuals(make_policy("rowwise"), x, 128))


class _F32Cache(grouped.ExpertNumerics):
  """The block path's cache before FP8 bytes: f32 copies of the FP8 values (the test oracle)."""

  def fprop_x_cached(self, x):
    cache, values = super().fprop_x_cached(x)
    return (cache.dequantize() if hasattr(cache, "dequantize") else cache), values


def _block_residuals_and_grads(numerics, args):
  """(residual shapes and dtypes, (y, dx, dw_gate, dw_up, dw_down)) of the block path."""
  x, experts, wg, wu, wd = args
  f = lambda *a: dispatch.block_swiglu(*a[:1], experts, *a[1:], numerics)  # noqa: E731

  def run(*a):
    y, vjp = jax.vjp(f, *a)
    return (y,) + vjp(jnp.cos(y))
  residuals = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(f, *a)[1]), x, wg, wu, wd)
  return residuals, jax.jit(run)(x, wg, wu, wd)


@pytest.mark.parametrize("name, swiglu_cache", [("deepseek_v3", True), ("deepseek_v3", False),
                                                ("rowwise", False)])
def test_block_path_caches_float8_bytes_with_bitwise_the_old_results(name, swiglu_cache):
  """The routed experts' block path keeps x (and h, or gate and up) as FP8 bytes and scales; y
  and every gradient equal bitwise those of the former f32 copies of the same FP8 values."""
  spec = RECIPES[name] if swiglu_cache else dataclasses.replace(RECIPES[name], swiglu_cache=None)
  rng = np.random.default_rng(7)
  W, Ub, D, M, E = 6, 16, 256, 128, 4
  args = (jnp.asarray(rng.standard_normal((W, Ub, D)), jnp.float32),
          jnp.asarray(rng.integers(0, E, W), jnp.int32),
          *(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
            for s in ((E, D, M), (E, D, M), (E, M, D))))
  new = dispatch.BlockNumerics(*(grouped.ExpertNumerics(spec),) * 3)
  old = dispatch.BlockNumerics(*(_F32Cache(spec),) * 3)
  residuals, got = _block_residuals_and_grads(new, args)
  _, want = _block_residuals_and_grads(old, args)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  acts = [a for a in residuals if hasattr(a, "dtype") and a.shape[-1] in (D, M)
          and a.size >= W * Ub * M]   # activations (weights are [E, ...], smaller here)
  acts = [a for a in acts if a.shape[0] == W]
  # FP8 bytes: float8, or their uint8 bit patterns in scan buffers (`grouped.loop_bytes`)
  f8 = [a for a in acts if a.dtype in (jnp.float8_e4m3fn, jnp.uint8)]
  others = [a for a in acts if a.dtype not in (jnp.float8_e4m3fn, jnp.uint8)]
  if swiglu_cache:   # x, gate and up
    assert len(f8) == 3 and not others, [(a.shape, a.dtype) for a in acts]
  else:              # x and h; gate and up stay in the compute dtype
    assert len(f8) == 2 and len(others) == 2, [(a.shape, a.dtype) for a in acts]
