"""The CPU routed-experts kernel (`kernels/cpu.moe_decode`, `moe_decode.cc`): each (token, k)'s
expert SwiGLU against float64, for any widths (the 8-lane padding), expert counts and slots with
no expert; `dropless_ffn` takes it for a few f32 tokens and keeps XLA's blocks otherwise; its
gradient is XLA's path's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from deepseek_jax import dispatch
from deepseek_jax.kernels import cpu as cpu_kernels


@pytest.fixture(scope="module", autouse=True)
def _kernel():
  if not cpu_kernels.available():
    pytest.skip("the CPU kernels are not built here: the model runs XLA's path")


def _inputs(X, K, E, D, M, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(X, D))
  experts = rng.integers(0, E + 1, (X, K))   # id E: a slot with no expert
  gates = rng.random((X, K))
  wg, wu = rng.normal(size=(E, D, M)) / np.sqrt(D), rng.normal(size=(E, D, M)) / np.sqrt(D)
  wd = rng.normal(size=(E, M, D)) / np.sqrt(M)
  return x, experts, gates, wg, wu, wd


def _reference(x, experts, wg, wu, wd):
  """float64: y[x, k] = (silu(x Wg[e]) * x Wu[e]) Wd[e], zeros for id E."""
  E = wg.shape[0]
  out = np.zeros(experts.shape + (x.shape[1],))
  for i, k in np.ndindex(*experts.shape):
    e = experts[i, k]
    if e < E:
      g, u = x[i] @ wg[e], x[i] @ wu[e]
      out[i, k] = (g / (1 + np.exp(-g)) * u) @ wd[e]
  return out


@jax.jit
def _kernel_call(x, experts, wg, wu, wd):
  return cpu_kernels.moe_decode(x, experts, wg, wu, wd)


@settings(deadline=None, max_examples=25)
@example(X=8, K=4, E=16, D=256, M=128, seed=0)   # tiny.yaml decoding at batch 8
@example(X=1, K=1, E=1, D=8, M=8, seed=1)
@given(X=st.integers(1, 12), K=st.integers(1, 4), E=st.integers(1, 9),
       D=st.sampled_from([3, 8, 13, 24]), M=st.sampled_from([5, 8, 16, 40]),
       seed=st.integers(0, 2**16))
def test_kernel_is_the_float64_expert_ffn(X, K, E, D, M, seed):
  x, experts, _, wg, wu, wd = _inputs(X, K, E, D, M, seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  got = _kernel_call(f32(x), jnp.asarray(experts, jnp.int32), f32(wg), f32(wu), f32(wd))
  want = _reference(*(np.asarray(f32(a), np.float64) for a in (x,)), experts,
                    *(np.asarray(f32(a), np.float64) for a in (wg, wu, wd)))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def _dropless(*args, **kw):
  return dispatch.dropless_ffn(*args, impl="block", **kw)


def test_dropless_takes_it_for_decoding_and_its_gradient_is_xlas():
  x, experts, gates, wg, wu, wd = (jnp.asarray(a, jnp.int32 if i == 1 else jnp.float32)
                                   for i, a in enumerate(_inputs(8, 4, 16, 24, 40, 3)))
  args = (x, gates, experts, wg, wu, wd)
  assert cpu_kernels.MOE_TARGET in jax.jit(_dropless).lower(*args).as_text()
  with cpu_kernels.disabled():
    xla = jax.jit(lambda *a: _dropless(*a))
    assert cpu_kernels.MOE_TARGET not in xla.lower(*args).as_text()
    want = xla(*args)
    loss = lambda x, wg, wd: jnp.sum(_dropless(x, gates, experts, wg, wu, wd) ** 2)  # noqa: E731
    want_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, wg, wd)
  np.testing.assert_allclose(np.asarray(jax.jit(_dropless)(*args)), np.asarray(want),
                             atol=1e-5, rtol=1e-5)
  loss = lambda x, wg, wd: jnp.sum(_dropless(x, gates, experts, wg, wu, wd) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, wg, wd)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_it_stays_out_where_it_does_not_apply():
  """Above MAX_MOE_TOKENS tokens, bf16, a pinned block size, or the FP8 seam (custom dots):
  XLA's blocks."""
  def text(X, dtype=jnp.float32, **kw):
    x, experts, gates, wg, wu, wd = _inputs(X, 2, 4, 8, 8, 0)
    args = (jnp.asarray(x, dtype), jnp.asarray(gates, dtype), jnp.asarray(experts, jnp.int32),
            *(jnp.asarray(w, dtype) for w in (wg, wu, wd)))
    return jax.jit(lambda *a: _dropless(*a, **kw)).lower(*args).as_text()
  assert cpu_kernels.MOE_TARGET in text(cpu_kernels.MAX_MOE_TOKENS)
  assert cpu_kernels.MOE_TARGET not in text(cpu_kernels.MAX_MOE_TOKENS + 1)
  assert cpu_kernels.MOE_TARGET not in text(4, jnp.bfloat16)
  assert cpu_kernels.MOE_TARGET not in text(4, block=2)
  assert cpu_kernels.MOE_TARGET not in text(4, dots=dispatch.ExpertDots())
