"""The routed experts' block path with its own backward pass (V3 report §2.1.2 and §3.3):
`block_swiglu` runs SwiGLU over blocks of rows, one expert per block, under the numerics of each
projection (`HighPrecision`, or `fp8.grouped.ExpertNumerics` for the FP8 recipe). `dispatch`
lays the assignments out in blocks and calls it. Letters beyond the dimension key: U rows per
block, W blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from deepseek_jax import vma
from deepseek_jax.fp8 import grouped
from deepseek_jax.fp8.dot import swiglu, swiglu_cache


@dataclasses.dataclass(frozen=True)
class HighPrecision:
  """Expert-projection numerics of plain `lax.dot_general` (default precision, no quantisation).

  The protocol `block_swiglu` expects of each projection (`fp8.grouped.ExpertNumerics` is the
  FP8 one): operand preparers mapping arrays to same-shaped arrays, `weight(w)`,
  `dgrad_weight(w, w_fprop)`, `fprop_x(x)`, `dgrad_g(g)`, `wgrad_x(cache)`, `wgrad_g(g)`;
  `fprop_x_cached(x) -> (cache, fprop_x(x))`; `dot(a, b)` (a @ b of two matrices); and
  `swiglu_cache` (a down projection's SwiGLU cache format, or None). Here all return x.
  """
  swiglu_cache = None

  def _first(self, a, *_):
    return a

  weight = dgrad_weight = fprop_x = dgrad_g = wgrad_x = wgrad_g = _first

  def fprop_x_cached(self, x):
    return x, x

  def dot(self, a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())))


class BlockNumerics(NamedTuple):
  gate_proj: Any
  up_proj: Any
  down_proj: Any


HIGH_PRECISION = BlockNumerics(HighPrecision(), HighPrecision(), HighPrecision())


def block_numerics(dots: Sequence[Any] | None) -> BlockNumerics | None:
  """The numerics `block_swiglu` runs for these dots, or None when some dot is an arbitrary
  callable (then each block calls it, see `_generic_block_swiglu`)."""
  if dots is None:
    return HIGH_PRECISION
  out = []
  for d in dots:
    if d is jax.lax.dot_general:
      out.append(HighPrecision())
      continue
    numerics = grouped.expert_numerics(d)
    if numerics is None:
      return None
    out.append(numerics)
  return BlockNumerics(*out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def block_swiglu(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD,
                 numerics: BlockNumerics = HIGH_PRECISION, gathered: bool = False):
  """y[w] = SwiGLU_{expert_W[w]}(x[w]) for each block of U rows; one scan forward, one back.

  Each operand is prepared once per array (the weights once per call, activations once per
  array or block) rather than once per block and use, and each block's weight gradients are
  added in place into an f32 `[E, ...]` accumulator; the autodiff of a per-block scan instead
  recomputes the preparation under remat and pads every block's gradient to the full stack.
  Numerically it is the per-block computation (row tiles are row-local and column tiles stay
  inside one block); weight gradients accumulate in f32 over blocks. With the down projection's
  `swiglu_cache` (V3 §3.3.3) gate and up are kept in FP8 and h recomputed in the backward.

  `gathered`: the forward runs every block at once (each block's weights gathered, one batched
  product per projection) instead of the scan: the same per-block computation, for few blocks
  (decoding), where the scan's per-block slices and small matmuls dominate; the backward is the
  same scan either way.
  """
  return _block_fwd(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, numerics, gathered)[0]


def _block_fwd(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, numerics, gathered=False):
  ng, nu, nd = numerics
  dtype, fmt = x_WUD.dtype, nd.swiglu_cache
  wg, wu, wd = ng.weight(w_gate_EDM), nu.weight(w_up_EDM), nd.weight(w_down_EMD)
  xg_cache, xg_WUD = ng.fprop_x_cached(x_WUD)
  xu_cache, xu_WUD = (xg_cache, xg_WUD) if nu == ng else nu.fprop_x_cached(x_WUD)

  def project(xg_UD, xu_UD, wg_DM, wu_DM, wd_MD):
    gate_UM = ng.dot(xg_UD, wg_DM).astype(dtype)
    up_UM = nu.dot(xu_UD, wu_DM).astype(dtype)
    h_1UM = swiglu(gate_UM, up_UM)[None]
    if fmt is None:   # gate and up as they are, h as down's fprop caches it
      h_cache, hq_1UM = nd.fprop_x_cached(h_1UM)
      saved = (gate_UM, up_UM, h_cache)
    else:             # gate and up in FP8 (1x128 tiles along M), h recomputed
      hq_1UM = nd.fprop_x(h_1UM)
      saved = (swiglu_cache(gate_UM[None], fmt), swiglu_cache(up_UM[None], fmt))
    return nd.dot(hq_1UM[0], wd_MD).astype(dtype), tuple(map(grouped.loop_bytes, saved))

  if gathered:
    # XLA fuses the layer scan's slice of the stacked weights into these gathers: only the
    # chosen experts' weights are read, where the scan's slices copied the whole layer.
    y_WUD, saved_W = jax.vmap(project)(xg_WUD, xu_WUD, wg[expert_W], wu[expert_W], wd[expert_W])
  else:
    _, (y_WUD, saved_W) = jax.lax.scan(
        lambda _, xs: (None, project(xs[0], xs[1], wg[xs[2]], wu[xs[2]], wd[xs[2]])), None,
        (xg_WUD, xu_WUD, expert_W))
  res = (xg_cache, xu_cache, expert_W, (w_gate_EDM, w_up_EDM, w_down_EMD), (wg, wu, wd), saved_W,
         x_WUD[:0, 0, 0])   # empty; carries x's dtype and manual-axis type for dx
  return y_WUD, res


def _block_bwd(numerics, _gathered, res, dy_WUD):
  ng, nu, nd = numerics
  xg_cache, xu_cache, expert_W, weights, prepared, saved_W, x_cotangent_ref = res
  dtype, fmt = dy_WUD.dtype, nd.swiglu_cache
  wg, wu, wd = (n.dgrad_weight(w, p) for n, w, p in zip(numerics, weights, prepared))
  dy_rows, dy_cols = nd.dgrad_g(dy_WUD), nd.wgrad_g(dy_WUD)
  xg_cols = ng.wgrad_x(xg_cache)
  xu_cols = xg_cols if nu == ng else nu.wgrad_x(xu_cache)

  def body(acc, xs):
    dwg, dwu, dwd = acc
    dyr_UD, dyc_UD, xgc_UD, xuc_UD, saved, e = xs
    saved = tuple(map(grouped.fp8_bytes, saved))
    if fmt is None:
      gate_UM, up_UM, h_cache = saved
    else:   # h recomputed from the FP8 copies of gate and up
      gate_UM, up_UM = (q.dequantize()[0].astype(dtype) for q in saved)
      h_cache = swiglu(gate_UM, up_UM)[None]
    hc_UM = nd.wgrad_x(h_cache)[0]
    dwd = dwd.at[e].add(nd.dot(hc_UM.T, dyc_UD).astype(jnp.float32))
    dh_UM = nd.dot(dyr_UD, wd[e].T).astype(dtype)
    _, swiglu_vjp = jax.vjp(swiglu, gate_UM, up_UM)
    dgate_1UM, dup_1UM = (a[None] for a in swiglu_vjp(dh_UM))
    dx_UD = (ng.dot(ng.dgrad_g(dgate_1UM)[0], wg[e].T).astype(jnp.float32)
             + nu.dot(nu.dgrad_g(dup_1UM)[0], wu[e].T).astype(jnp.float32))
    dwg = dwg.at[e].add(ng.dot(xgc_UD.T, ng.wgrad_g(dgate_1UM)[0]).astype(jnp.float32))
    dwu = dwu.at[e].add(nu.dot(xuc_UD.T, nu.wgrad_g(dup_1UM)[0]).astype(jnp.float32))
    return (dwg, dwu, dwd), dx_UD.astype(dtype)

  xs = (dy_rows, dy_cols, xg_cols, xu_cols, saved_W, expert_W)
  refs = jax.tree.leaves((xs, weights, (wg, wu, wd)))
  acc = tuple(vma.varying_like(jnp.zeros(w.shape, jnp.float32), refs) for w in weights)
  (dwg, dwu, dwd), dx_WUD = jax.lax.scan(body, acc, xs, reverse=True)
  dws = tuple(vma.cotangent_like(d.astype(w.dtype), w) for d, w in zip((dwg, dwu, dwd), weights))
  return (vma.cotangent_like(dx_WUD, x_cotangent_ref), None) + dws


block_swiglu.defvjp(_block_fwd, _block_bwd)
