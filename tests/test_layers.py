"""RMSNorm and RoPE/YaRN against NumPy float64 references; RoPE relative-position property."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

from deepseek_jax import rope
from deepseek_jax.config import ModelConfig, YarnConfig
from deepseek_jax.layers import RMSNorm
from tests.helpers import small_config

arrays = st.integers(0, 2**31 - 1)


@given(seed=arrays, d=st.integers(1, 64), scale=st.floats(1e-3, 1e3))
def test_rmsnorm_matches_float64(seed, d, scale):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, 5, d)) * scale
  w = rng.standard_normal(d)
  y = RMSNorm(eps=1e-6).apply({"params": {"weight": jnp.asarray(w, jnp.float32)}},
                              jnp.asarray(x, jnp.float32))
  ref = w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_rmsnorm_casts_before_weight():
  """bf16 input: the normalised value is rounded to bf16 *before* the weight multiply."""
  x = jnp.asarray([[1.0, 2.0, 3.0, 4.005]], jnp.bfloat16)
  w = jnp.asarray([1.001, 0.999, 1.003, 1.0], jnp.float32)
  y = RMSNorm().apply({"params": {"weight": w}}, x)
  x32 = np.asarray(x, np.float32)
  n = (x32 / np.sqrt(np.mean(x32**2) + 1e-6)).astype(jnp.bfloat16)
  ref = np.asarray(w.astype(jnp.bfloat16)) * n
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32))


def _rope_ref(x, pos, inv_freq):
  """Complex-number rotation of interleaved pairs, float64."""
  xc = x[..., 0::2] + 1j * x[..., 1::2]
  rot = xc * np.exp(1j * pos[..., None] * inv_freq)
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = rot.real, rot.imag
  return out


@given(seed=arrays, half=st.integers(1, 16), yarn=st.booleans())
def test_rope_matches_float64(seed, half, yarn):
  R = 2 * half
  cfg = small_config(qk_rope_head_dim=R,
                     yarn=YarnConfig(factor=8.0, original_max_position_embeddings=64) if yarn else None)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 7, R))
  pos = rng.integers(0, 200, (2, 7))
  y = rope.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), cfg)
  ref = _rope_ref(x, pos.astype(np.float64), rope.inv_frequencies(R, cfg.rope_theta, cfg.yarn))
  np.testing.assert_allclose(np.asarray(y), ref, atol=2e-4 * max(1, np.abs(ref).max()))


@given(seed=arrays, shift=st.integers(0, 100))
def test_rope_scores_depend_only_on_position_difference(seed, shift):
  cfg = small_config(qk_rope_head_dim=8)
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 8)), jnp.float32) for _ in range(2))
  pq, pk = rng.integers(0, 50, 2)
  def score(a, b):
    rq = rope.apply_rope(q, jnp.full((1, 1), a), cfg)
    rk = rope.apply_rope(k, jnp.full((1, 1), b), cfg)
    return float(jnp.sum(rq * rk))
  assert math.isclose(score(pq, pk), score(pq + shift, pk + shift), rel_tol=1e-4, abs_tol=1e-4)


def test_yarn_v3_dimensions():
  cfg = ModelConfig()  # the 671B defaults
  assert rope.yarn_correction_range(64, 10000.0, cfg.yarn) == (10.0, 23.0)
  assert math.isclose(rope.softmax_scale(cfg), 0.1352338, rel_tol=1e-6)
  f = rope.inv_frequencies(64, 10000.0, cfg.yarn)
  base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
  np.testing.assert_allclose(f[:11], base[:11], rtol=1e-12)      # pairs <= low keep f_j
  np.testing.assert_allclose(f[23:], base[23:] / 40, rtol=1e-12)  # pairs >= high use f_j / 40
  assert np.all((f[11:23] < base[11:23]) & (f[11:23] > base[11:23] / 40))
  assert rope.cos_sin_scale(cfg.yarn) == 1.0


def test_no_yarn_scale_is_plain():
  cfg = small_config()
  assert rope.softmax_scale(cfg) == cfg.qk_head_dim ** -0.5
