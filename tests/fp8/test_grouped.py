"""The routed experts' block path with its own backward pass (`dispatch.block_swiglu`): FP8
numerics identical to calling `fp8_dot_general` per block, and the f32 numerics identical to
autodiff of the per-block scan."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import dispatch
from deepseek_jax.fp8 import Fp8Dot, grouped
from deepseek_jax.fp8.policy import RECIPES

GROUPED_RECIPES = ["deepseek_v3", "deepseek_v3_fused", "deepseek_v3_hopper", "rowwise"]


def _inputs(seed, X, D, M, E, K):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((X, D)) * np.exp(rng.standard_normal((X, 1)))   # token scales
  experts = np.stack([rng.choice(E, K, replace=False) for _ in range(X)])
  if X > 4:
    experts[: X // 2, 0] = 0                                               # one crowded expert
  weights = rng.random((X, K))
  ws = [rng.standard_normal(s) / np.sqrt(s[1]) for s in ((E, D, M), (E, D, M), (E, M, D))]
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return f32(x), f32(weights), jnp.asarray(experts, jnp.int32), *map(f32, ws)


class _Opaque:
  """An `Fp8Dot` behind an opaque callable (its SwiGLU method kept): `dispatch` must call it once
  per block."""

  def __init__(self, dot):
    self.dot = dot

  def __call__(self, a, b, dn, **kw):
    return self.dot(a, b, dn, **kw)

  def swiglu(self, *args):
    return self.dot.swiglu(*args)


def _per_block(dot):
  """The same dot as an opaque callable: `dispatch` must call it once per block."""
  if isinstance(dot, Fp8Dot):
    return _Opaque(dot)
  return lambda a, b, dn, **kw: dot(a, b, dn, **kw)


@functools.partial(jax.jit, static_argnames=("dots", "block"))
def _value_and_grads(x, weights, experts, wg, wu, wd, dots, block):
  def loss(x, weights, wg, wu, wd):
    y = dispatch.dropless_ffn(x, weights, experts, wg, wu, wd, dots=dots, impl="block",
                              block=block)
    return jnp.sum(jnp.sin(y) * 1e-3), y
  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
      x, weights, wg, wu, wd)
  return (y,) + grads


# One case per recipe (compiling both paths is most of the cost, whatever the shape); together
# the cases cover one token and many (with a crowded expert), K and N at one tile, a ragged second
# tile and two full tiles, E/K 4/2 and 8/3, and rows per block from the default to 8.
@pytest.mark.parametrize("name, X, D, M, E, K, block, seed", [
    ("deepseek_v3", 70, 200, 160, 8, 3, 8, 0),
    ("deepseek_v3_fused", 1, 256, 48, 4, 2, None, 1),
    ("deepseek_v3_hopper", 37, 64, 160, 4, 2, 32, 2),
    ("rowwise", 53, 200, 128, 8, 3, 8, 3)])
def test_fp8_block_path_equals_fp8_dot_general_per_block(name, X, D, M, E, K, block, seed):
  args = _inputs(seed, X, D, M, E, K)
  dot = Fp8Dot(RECIPES[name])
  fast_dots = dispatch.ExpertDots(dot, dot, dot)
  assert dispatch.block_numerics(fast_dots) is not None
  slow_dots = dispatch.ExpertDots(*(_per_block(dot),) * 3)
  assert dispatch.block_numerics(slow_dots) is None
  fast = _value_and_grads(*args, dots=fast_dots, block=block)
  slow = _value_and_grads(*args, dots=slow_dots, block=block)
  for what, a, b in zip(("y", "dx", "dweights", "dgate", "dup", "ddown"), fast, slow):
    a, b = np.asarray(a), np.asarray(b)
    assert np.isfinite(a).all(), what
    # Same tiles, blocks, promotion and summation order: equal up to f32 re-association of the
    # per-block weight-gradient sums.
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_high_precision_block_path_equals_autodiff_of_the_scan(dtype):
  args = _inputs(3, 96, 64, 32, 8, 2)
  x, weights, experts, *ws = args
  cast = lambda a: a.astype(dtype)  # noqa: E731
  args = (cast(x), weights, experts, *map(cast, ws))
  own = _value_and_grads(*args, dots=None, block=16)
  generic = _value_and_grads(*args, dots=dispatch.ExpertDots(*(_per_block(jax.lax.dot_general),)
                                                             * 3), block=16)
  tol = 1e-5 if dtype == "float32" else 2e-2
  for a, b in zip(own, generic):
    assert a.dtype == b.dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_per_tensor_and_delayed_recipes_keep_the_per_block_call():
  """Per-tensor scales span blocks (and delayed ones carry state), so these recipes are not
  eligible for the hoisted quantisation; they still run, one fp8_dot_general per block."""
  for name in ("tensor_current", "tensor_delayed"):
    dot = Fp8Dot(RECIPES[name])
    assert not grouped.supports(RECIPES[name]) and grouped.expert_numerics(dot) is None
    assert dispatch.block_numerics(dispatch.ExpertDots(dot, dot, dot)) is None
  args = _inputs(4, 40, 64, 32, 4, 2)
  dot = Fp8Dot(RECIPES["tensor_current"])
  out = _value_and_grads(*args, dots=dispatch.ExpertDots(dot, dot, dot), block=8)
  assert all(np.isfinite(np.asarray(a)).all() for a in out)
  ref = _value_and_grads(*args, dots=None, block=8)
  rel = np.linalg.norm(np.asarray(out[0] - ref[0])) / np.linalg.norm(np.asarray(ref[0]))
  assert 0 < rel < 0.1


def test_expert_numerics_rejects_ineligible_specs():
  with pytest.raises(ValueError, match="per-block scales"):
    grouped.ExpertNumerics(RECIPES["tensor_current"])


@pytest.mark.parametrize("swiglu_cache", [False, True])
def test_fp8_block_path_in_bfloat16_follows_the_per_block_path(swiglu_cache):
  """bf16 compute: the block path rounds each projection's f32 product to bf16 where the
  per-block `fp8_dot_general` returns bf16, so both agree to bf16 precision. With the SwiGLU
  cache, XLA's excess bf16 precision in differently fused silu(gate) * up moves some FP8
  roundings, and this test's bf16 gradients are far from their f32 values anyway (~50%): the
  two paths then stay equally close to the f32 block path."""
  x, weights, experts, *ws = _inputs(5, 48, 256, 128, 4, 2)
  bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
  args = (bf(x), weights, experts, *map(bf, ws))
  spec = RECIPES["deepseek_v3"]
  dot = Fp8Dot(spec if swiglu_cache else dataclasses.replace(spec, swiglu_cache=None))
  fast = _value_and_grads(*args, dots=dispatch.ExpertDots(dot, dot, dot), block=16)
  slow = _value_and_grads(*args, dots=dispatch.ExpertDots(*(_per_block(dot),) * 3), block=16)
  f32 = _value_and_grads(bf(x).astype(jnp.float32), weights, experts,
                         *(bf(w).astype(jnp.float32) for w in ws),
                         dots=dispatch.ExpertDots(dot, dot, dot), block=16)
  for i, (a, b) in enumerate(zip(fast, slow)):
    assert a.dtype == b.dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not swiglu_cache or i == 0:
      assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)
    else:
      ref = np.asarray(f32[i], np.float32)
      err = lambda v: np.linalg.norm(v - ref) / np.linalg.norm(ref)  # noqa: E731
      assert err(a) <= 1.2 * err(b) + 2e-2 and err(b) <= 1.2 * err(a) + 2e-2


# The FP8 recipe runs the same hand-written VJP plus the quantisation; "none", and "dots" remat,
# run with -m slow.
@pytest.mark.parametrize("recipe, remat", [
    ("deepseek_v3", "full"),
    pytest.param("deepseek_v3", "dots", marks=pytest.mark.slow),
    pytest.param("none", "full", marks=pytest.mark.slow),
    pytest.param("none", "dots", marks=pytest.mark.slow)])
def test_block_path_under_layer_remat(recipe, remat):
  """The block path's hand-written VJP inside the model's remat'd layer scan: "full" or "dots"
  remat gives the loss and every gradient of no remat, bit for bit."""
  import dataclasses  # noqa: PLC0415

  from deepseek_jax.fp8 import make_policy  # noqa: PLC0415
  from deepseek_jax.model import Transformer  # noqa: PLC0415
  from tests.helpers import init_model, random_tokens, small_config  # noqa: PLC0415
  # One MoE layer, no shared expert and no query LoRA: the block path is what is under test, and
  # each other FP8 projection adds compile time (~40% of this test's) and nothing to the property.
  cfg = dataclasses.replace(small_config(n_shared_experts=0, q_lora_rank=None),
                            moe_dispatch="dropless", num_layers=1, first_k_dense_replace=0)
  tokens = random_tokens(cfg, 2, 16)
  variables = init_model(Transformer(cfg), tokens)
  policy = None if recipe == "none" else make_policy(recipe)
  results = {}
  for r in ("none", remat):
    model = Transformer(dataclasses.replace(cfg, remat=r), fp8_policy=policy)
    loss = lambda p, model=model: jnp.mean(  # noqa: E731
        model.apply(dict(variables, params=p), tokens).logits_BTV ** 2)
    results[r] = jax.jit(jax.value_and_grad(loss))(variables["params"])
  for a, b in zip(jax.tree.leaves(results[remat]), jax.tree.leaves(results["none"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
