"""RMSNorm and RoPE/YaRN against NumPy float64 references; RoPE relative-position property; the
fused gate/up SwiGLU equals two matmuls; RMSNorm and the MLP the same with and without jit."""

import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.ad_checkpoint import print_saved_residuals

from deepseek_jax import rope
from deepseek_jax.config import ModelConfig, YarnConfig
from deepseek_jax.fp8.policy import make_policy
from deepseek_jax.layers import MLP, RMSNorm
from tests.helpers import small_config
from tests.training.conftest import compile_fast

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


class JitVariantsTest(chex.TestCase):
  """The same function traced and compiled (jit) or run op by op: same shapes, same values."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_rmsnorm_output_has_unit_rms(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 16)) * 7.0
    y = self.variant(lambda x: RMSNorm(eps=1e-6).apply({"params": {"weight": jnp.ones(16)}}, x))(x)
    chex.assert_shape(y, x.shape)
    chex.assert_trees_all_close(jnp.mean(y * y, axis=-1), jnp.ones((2, 3)), rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp_shapes_and_values_match_the_eager_run(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    mlp = MLP(8, 16)
    params = flax.core.meta.unbox(mlp.init(jax.random.PRNGKey(1), x))
    chex.assert_trees_all_equal_shapes(params["params"], {
        "gate_proj": {"kernel": jnp.zeros((8, 16))}, "up_proj": {"kernel": jnp.zeros((8, 16))},
        "down_proj": {"kernel": jnp.zeros((16, 8))}})
    y = self.variant(mlp.apply)(params, x)
    chex.assert_shape(y, (2, 3, 8))
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_close(y, mlp.apply(params, x), rtol=1e-5, atol=1e-6)


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


def _mlp_value_and_grads(mlp, params, x):
  f = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(mlp.apply({"params": p}, x))),
                                 argnums=(0, 1)))
  return compile_fast(f, params, x)(params, x)


@settings(max_examples=4, deadline=None)
@given(seed=arrays, d=st.integers(1, 24), f=st.integers(1, 40),
       lead=st.sampled_from([(5,), (2, 3), (1, 2, 2)]))
def test_fused_gate_up_equals_two_matmuls(seed, d, f, lead):
  """One dot against [D, 2, F] gives gate and up (values and gradients) as two dots do, from the
  same `gate_proj`/`up_proj` parameters."""
  x = jax.random.normal(jax.random.PRNGKey(seed), lead + (d,))
  fused, apart = MLP(d, f, fuse_gate_up=True), MLP(d, f, fuse_gate_up=False)
  params = jax.jit(fused.init)(jax.random.PRNGKey(seed + 1), x)["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      lambda s: s.shape, jax.eval_shape(apart.init, jax.random.PRNGKey(0), x)["params"])
  (l0, g0), (l1, g1) = _mlp_value_and_grads(apart, params, x), _mlp_value_and_grads(fused, params, x)
  chex.assert_trees_all_close((l1, g1), (l0, g0), rtol=1e-5, atol=1e-5)


def _dots(mlp, params, x) -> int:
  jaxpr = jax.make_jaxpr(lambda p: mlp.apply({"params": p}, x))(params)
  return sum(str(e.primitive) == "dot_general" for e in jaxpr.jaxpr.eqns)


def test_fp8_gate_and_up_are_not_fused():
  """Fusion is one matmul fewer; with an FP8 recipe on gate/up (scales per tile or block, not
  across the pair) the layer keeps two and computes exactly what the unfused layer does."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 128))
  params = jax.jit(MLP(128, 128).init)(jax.random.PRNGKey(1), x)["params"]
  assert _dots(MLP(128, 128, fuse_gate_up=True), params, x) == 2
  assert _dots(MLP(128, 128, fuse_gate_up=False), params, x) == 3
  policy = make_policy("deepseek_v3")
  fused = MLP(128, 128, fp8_policy=policy, fuse_gate_up=True)
  apart = MLP(128, 128, fp8_policy=policy, fuse_gate_up=False)
  (l0, g0), (l1, g1) = _mlp_value_and_grads(apart, params, x), _mlp_value_and_grads(fused, params, x)
  assert float(l0) == float(l1)
  chex.assert_trees_all_equal(g0, g1)
  plain = _mlp_value_and_grads(MLP(128, 128), params, x)[0]
  assert float(plain) != float(l1)    # the policy did quantise


@pytest.mark.parametrize("fuse", [True, False])
def test_mlp_tags_its_projections_for_remat(fuse, capsys):
  """"mlp_wi" (gate and up) is what the "projections" policy saves of a SwiGLU layer."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
  mlp = MLP(8, 16, fuse_gate_up=fuse)
  params = mlp.init(jax.random.PRNGKey(1), x)["params"]
  f = jax.checkpoint(lambda p, x: jnp.sum(mlp.apply({"params": p}, x) ** 2),
                     policy=jax.checkpoint_policies.save_only_these_names("mlp_wi", "mlp_wo"))
  print_saved_residuals(f, params, x)
  saved = capsys.readouterr().out
  assert saved.count("named 'mlp_wi'") == (1 if fuse else 2)
  assert "named 'mlp_wo'" in saved   # the loss squares it, so the backward needs it
