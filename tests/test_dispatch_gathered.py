"""The block path's gathered form (`dispatch.gathers_experts`: at most E assignments, one per
block, each expert's weights gathered for one batched product): equal to the dense oracle in
values and gradients, the same per-block numerics as the scan (FP8 bit for bit), and no sort or
loop over blocks left in the program."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from deepseek_jax import dispatch, expert_blocks
from deepseek_jax.fp8 import Fp8Dot
from deepseek_jax.fp8.policy import RECIPES

# Many small programs: XLA's backend optimisations cost more than they save here.
fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def _inputs(seed, X, E, K, D, M, no_expert=0.0):
  """Random routing with duplicates allowed; a fraction `no_expert` of slots gets id E (no
  expert, as expert-parallel padding)."""
  rng = np.random.default_rng(seed)
  experts = rng.integers(0, E, size=(X, K))
  experts = np.where(rng.random((X, K)) < no_expert, E, experts)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return (f32(rng.normal(size=(X, D))), f32(rng.uniform(0.1, 1, size=(X, K))),
          jnp.asarray(experts, jnp.int32), f32(rng.normal(size=(E, D, M)) / np.sqrt(D)),
          f32(rng.normal(size=(E, D, M)) / np.sqrt(D)), f32(rng.normal(size=(E, M, D)) / np.sqrt(M)))


@functools.partial(fast_jit, static_argnums=(0, 1))
def _value_and_grads(impl, dots, x, w, e, wg, wu, wd):
  def loss(x, w, wg, wu, wd):
    if impl == "dense":
      y = dispatch.dense_ffn(x, w, e, wg, wu, wd, dots=dots)
    else:
      y = dispatch.dropless_ffn(x, w, e, wg, wu, wd, dots=dots, impl=impl)
    return jnp.sum(y * jnp.cos(y)), y
  return jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True)(x, w, wg, wu, wd)


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


# (X, E, K, D, M) with X * K <= E; hypothesis draws the case, the routing and the values, so
# each case compiles once.
CASES = [(2, 16, 4, 24, 16), (3, 12, 3, 8, 4)]


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(CASES), st.sampled_from([0.0, 0.3]), st.integers(0, 2**31 - 1))
def test_gathered_equals_the_dense_oracle(case, no_expert, seed):
  X, E, K, D, M = case
  assert dispatch.gathers_experts(X * K, E)
  args = _inputs(seed, X, E, K, D, M, no_expert)
  (_, y), g = _value_and_grads("block", None, *args)
  (_, y_ref), g_ref = _value_and_grads("dense", None, *args)
  assert _rel_err(y, y_ref) <= 1e-5
  for name, a, b in zip(["x", "weights", "gate_proj", "up_proj", "down_proj"], g, g_ref):
    assert _rel_err(a, b) <= 1e-5, name
  # Slots with no expert contribute nothing, and their combine weight gets no gradient.
  none_XK = np.asarray(args[2]) == E
  assert np.all(np.asarray(g[1])[none_XK] == 0)


def test_the_domain_is_at_most_E_assignments_one_per_block():
  assert dispatch.gathers_experts(16, 16) and dispatch.gathers_experts(8, 16, block=1)
  assert not dispatch.gathers_experts(17, 16)
  assert not dispatch.gathers_experts(8, 16, block=4)   # an explicit block size keeps the loop


def _primitives(jaxpr) -> set[str]:
  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      out |= _primitives(sub)
  return out


def test_decode_sized_dispatch_has_no_sort_and_no_loop():
  """Batch 2 of tiny.yaml's MoE (16 experts, top-4): no argsort, no scan over blocks forward."""
  args = _inputs(0, 2, 16, 4, 8, 4)
  jaxpr = jax.make_jaxpr(lambda *a: dispatch.dropless_ffn(*a, impl="block"))(*args).jaxpr
  prims = _primitives(jaxpr)
  assert "sort" not in prims and "scan" not in prims and "while" not in prims, prims
  looped = _primitives(jax.make_jaxpr(
      lambda *a: dispatch.dropless_ffn(*a, impl="block", block=2))(*args).jaxpr)
  assert "scan" in looped   # the test can fail: the loop path does have them


def _blocks(seed, X, E, K, D, M):
  x, _, experts, *ws = _inputs(seed, X, E, K, D, M)
  return x[jnp.arange(X * K) // K][:, None], experts.reshape(X * K), ws


@functools.partial(fast_jit, static_argnums=(0, 1))
def _block_value_and_grads(numerics, gathered, x_WUD, expert_W, wg, wu, wd):
  def loss(x, wg, wu, wd):
    y = expert_blocks.block_swiglu(x, expert_W, wg, wu, wd, numerics, gathered)
    return jnp.sum(jnp.sin(y)), y
  return jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(x_WUD, wg, wu, wd)


def test_fp8_gathered_equals_the_scan_bit_for_bit():
  """The FP8 recipe keeps its numerics: the same prepared operands and per-block products."""
  dot = Fp8Dot(RECIPES["deepseek_v3"])   # 1x128 / 128x128 tiles, SwiGLU cache
  numerics = dispatch.block_numerics(dispatch.ExpertDots(dot, dot, dot))
  assert numerics is not None
  x_WUD, expert_W, ws = _blocks(1, 2, 8, 3, 128, 128)
  scan = _block_value_and_grads(numerics, False, x_WUD, expert_W, *ws)
  gathered = _block_value_and_grads(numerics, True, x_WUD, expert_W, *ws)
  for a, b in zip(jax.tree.leaves(gathered), jax.tree.leaves(scan)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_high_precision_gathered_equals_the_scan():
  x_WUD, expert_W, ws = _blocks(2, 3, 16, 4, 16, 8)
  scan = _block_value_and_grads(dispatch.HIGH_PRECISION, False, x_WUD, expert_W, *ws)
  gathered = _block_value_and_grads(dispatch.HIGH_PRECISION, True, x_WUD, expert_W, *ws)
  for a, b in zip(jax.tree.leaves(gathered), jax.tree.leaves(scan)):
    assert _rel_err(a, b) <= 1e-6


def test_opaque_dots_are_vmapped_over_the_blocks_and_match_the_oracle():
  """A `dot_general` the block path cannot see into runs once per block under vmap."""
  calls = []

  def opaque(a, b, dn, **kw):
    calls.append(a.shape)
    return jax.lax.dot_general(a, b, dn, **kw)

  dots = dispatch.ExpertDots(opaque, opaque, opaque)
  assert dispatch.block_numerics(dots) is None
  args = _inputs(3, 2, 16, 4, 8, 4, no_expert=0.25)
  (_, y), g = _value_and_grads("block", dots, *args)
  (_, y_ref), g_ref = _value_and_grads("dense", None, *args)
  assert calls and all(len(s) == 2 for s in calls)   # traced per block: [U, D] operands
  assert _rel_err(y, y_ref) <= 1e-5
  for a, b in zip(g, g_ref):
    assert _rel_err(a, b) <= 1e-5
