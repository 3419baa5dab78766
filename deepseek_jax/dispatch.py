"""The routed experts on one device (V3 report §2.1.2, DeepSeekMoE): `dense_ffn` (every expert
on every token, the test oracle), `dropless_ffn` (sort assignments by expert, grouped matmul,
unsort; "gmm", "block" or "ragged" kernels) and `LocalExperts`, the runner the MoE block is given.
Expert id E marks a slot with no expert (expert-parallel padding): zero output, in no group.
Letters beyond the dimension key: U rows per block, W blocks, M2 = 2M (gate and up fused).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax import gmm as gmm_lib
from deepseek_jax import vma
from deepseek_jax.fp8 import grouped
from deepseek_jax.fp8.dot import swiglu, swiglu_cache, swiglu_dot
from deepseek_jax.gmm import auto_block_size, num_blocks  # noqa: F401  (dispatch's API too)

DotGeneral = Callable[..., jax.Array]


class ExpertDots(NamedTuple):
  """The `dot_general` used for each expert projection (HF names)."""
  gate_proj: DotGeneral = jax.lax.dot_general
  up_proj: DotGeneral = jax.lax.dot_general
  down_proj: DotGeneral = jax.lax.dot_general


DROPLESS_IMPLS = ("block", "ragged", "gmm")
PLATFORMS = ("auto",) + gmm_lib.PLATFORMS


def default_dropless_impl(platform: str = "auto") -> str:
  """'gmm' on GPU/TPU (a grouped-matmul kernel), 'block' on CPU; `platform` "auto" asks
  `jax.default_backend()`, any other value is the target and decides alone."""
  return "block" if gmm_lib.resolve_platform(platform) == "cpu" else "gmm"


def _check_shapes(fn: str, x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD):
  X, D = x_XD.shape
  E, _, M = w_gate_EDM.shape
  ok = (weights_XK.shape == experts_XK.shape and weights_XK.shape[0] == X
        and w_gate_EDM.shape == (E, D, M) and w_up_EDM.shape == (E, D, M)
        and w_down_EMD.shape == (E, M, D))
  if not ok:
    raise ValueError(f"{fn}: inconsistent shapes x {x_XD.shape}, weights {weights_XK.shape}, "
                     f"experts {experts_XK.shape}, gate_proj {w_gate_EDM.shape}, up_proj "
                     f"{w_up_EDM.shape}, down_proj {w_down_EMD.shape}; expected [X, D], [X, K], "
                     "[X, K], [E, D, M], [E, D, M], [E, M, D]")


def _combine(y_XKD: jax.Array, weights_XK: jax.Array, dtype) -> jax.Array:
  y_XD = jnp.einsum("XKD,XK->XD", y_XKD, weights_XK.astype(y_XKD.dtype),
                    preferred_element_type=jnp.float32)
  return y_XD.astype(dtype)


# ---- dense: the oracle ----

def dense_ffn(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
              dots: ExpertDots | None = None) -> jax.Array:
  """Every expert on every token; the routing enters only through the [X, E] gate matrix."""
  _check_shapes("dense_ffn", x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  dots = dots or ExpertDots()
  X, E = x_XD.shape[0], w_gate_EDM.shape[0]
  gate_XE = jnp.zeros((X, E), weights_XK.dtype).at[
      jnp.arange(X)[:, None], experts_XK].add(weights_XK, mode="drop")   # id E: no expert
  proj = (((1,), (1,)), ((), ()))                         # XD,EDM->XEM
  gate_XEM, up_XEM = dots.gate_proj(x_XD, w_gate_EDM, proj), dots.up_proj(x_XD, w_up_EDM, proj)
  y_EXD = swiglu_dot(dots.down_proj, gate_XEM, up_XEM, w_down_EMD,
                     (((2,), (1,)), ((1,), (0,))))                      # XEM,EMD->EXD
  y_XD = jnp.einsum("EXD,XE->XD", y_EXD, gate_XE.astype(y_EXD.dtype),
                    preferred_element_type=jnp.float32)
  return y_XD.astype(x_XD.dtype)


# ---- dropless ----

def _sort_by_expert(experts_A: jax.Array, num_experts: int):
  """Stable order by expert and the rows per expert; id E (no expert) sorts last, uncounted."""
  order_A = jnp.argsort(experts_A, stable=True)
  count_E = jnp.zeros((num_experts,), jnp.int32).at[experts_A].add(1, mode="drop")
  return order_A, count_E


def _block_layout(experts_XK, num_experts: int, block: int | None):
  """The padded block layout (`gmm.block_layout`) of the assignments: (U, W, dest_A [A] padded
  row (of W*U) of each assignment (W*U: no expert), token_WU source token of each padded row (X
  for padding), expert_W expert of each block)."""
  X, K = experts_XK.shape
  E, A = num_experts, X * K
  U = block or auto_block_size(A, E)
  order_A, count_E = _sort_by_expert(experts_XK.reshape(A), E)
  layout = gmm_lib.block_layout(count_E, A, U)
  dest_A = jnp.zeros((A,), jnp.int32).at[order_A].set(layout.dest_A, unique_indices=True)
  token_WU = jnp.where(layout.row_WU < A, order_A[jnp.minimum(layout.row_WU, A - 1)] // K, X)
  return U, layout.row_WU.shape[0], dest_A, token_WU, layout.group_W


def _dropless_block(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD, dots, block):
  """Returns y_XKD: expert outputs per assignment, via the padded block layout.

  "block" is fast on CPU, where `jax.lax.ragged_dot` costs O(E) (measured fwd+bwd at X=2048,
  K=4: 5x the block path at E=8, 33x at E=64)."""
  X, D = x_XD.shape
  K = experts_XK.shape[1]
  U, W, dest_A, token_WU, expert_W = _block_layout(experts_XK, w_gate_EDM.shape[0], block)
  x_pad_XD = jnp.concatenate([x_XD, jnp.zeros((1, D), x_XD.dtype)], axis=0)
  x_WUD = x_pad_XD[token_WU]
  numerics = block_numerics(dots)
  if numerics is not None:
    y_WUD = block_swiglu(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, numerics)
  else:
    y_WUD = _generic_block_swiglu(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, dots)
  y_AD = jnp.take(y_WUD.reshape(W * U, D), dest_A, axis=0, mode="fill", fill_value=0)
  return y_AD.reshape(X, K, D)


def _generic_block_swiglu(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, dots):
  """Any `dot_general` callables, one call per block and projection, autodiff for the rest."""
  proj = (((1,), (0,)), ((), ()))                          # UD,DM->UM and UM,MD->UD

  def expert_block(x_UD, e):
    return swiglu_dot(dots.down_proj, dots.gate_proj(x_UD, w_gate_EDM[e], proj),
                      dots.up_proj(x_UD, w_up_EDM[e], proj), w_down_EMD[e], proj)

  # Without the policy the scan saves each block's weight slices for the backward pass, a
  # [blocks, D, M] copy of the weights per projection (3x the time on CPU and the memory of
  # gathering them); saving only the matmul outputs recomputes the cheap slices instead.
  expert_block = jax.checkpoint(
      expert_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  _, y_WUD = jax.lax.scan(lambda c, xs: (c, expert_block(*xs)), None, (x_WUD, expert_W))
  return y_WUD


# ---- the block path's own backward pass ----

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


def block_numerics(dots: ExpertDots | None) -> BlockNumerics | None:
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def block_swiglu(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD,
                 numerics: BlockNumerics = HIGH_PRECISION):
  """y[w] = SwiGLU_{expert_W[w]}(x[w]) for each block of U rows; one scan forward, one back.

  Each operand is prepared once per array (the weights once per call, activations once per
  array or block) rather than once per block and use, and each block's weight gradients are
  added in place into an f32 `[E, ...]` accumulator; the autodiff of a per-block scan instead
  recomputes the preparation under remat and pads every block's gradient to the full stack.
  Numerically it is the per-block computation (row tiles are row-local and column tiles stay
  inside one block); weight gradients accumulate in f32 over blocks. With the down projection's
  `swiglu_cache` (V3 §3.3.3) gate and up are kept in FP8 and h recomputed in the backward.
  """
  return _block_fwd(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, numerics)[0]


def _block_fwd(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, numerics):
  ng, nu, nd = numerics
  dtype, fmt = x_WUD.dtype, nd.swiglu_cache
  wg, wu, wd = ng.weight(w_gate_EDM), nu.weight(w_up_EDM), nd.weight(w_down_EMD)
  xg_cache, xg_WUD = ng.fprop_x_cached(x_WUD)
  xu_cache, xu_WUD = (xg_cache, xg_WUD) if nu == ng else nu.fprop_x_cached(x_WUD)

  def body(_, xs):
    xg_UD, xu_UD, e = xs
    gate_UM = ng.dot(xg_UD, wg[e]).astype(dtype)
    up_UM = nu.dot(xu_UD, wu[e]).astype(dtype)
    h_1UM = swiglu(gate_UM, up_UM)[None]
    if fmt is None:   # gate and up as they are, h as down's fprop caches it
      h_cache, hq_1UM = nd.fprop_x_cached(h_1UM)
      saved = (gate_UM, up_UM, h_cache)
    else:             # gate and up in FP8 (1x128 tiles along M), h recomputed
      hq_1UM = nd.fprop_x(h_1UM)
      saved = (swiglu_cache(gate_UM[None], fmt), swiglu_cache(up_UM[None], fmt))
    return None, (nd.dot(hq_1UM[0], wd[e]).astype(dtype), tuple(map(grouped.loop_bytes, saved)))

  _, (y_WUD, saved_W) = jax.lax.scan(body, None, (xg_WUD, xu_WUD, expert_W))
  res = (xg_cache, xu_cache, expert_W, (w_gate_EDM, w_up_EDM, w_down_EMD), (wg, wu, wd), saved_W,
         x_WUD[:0, 0, 0])   # empty; carries x's dtype and manual-axis type for dx
  return y_WUD, res


def _block_bwd(numerics, res, dy_WUD):
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


def _dropless_ragged(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD):
  """Returns y_XKD via `jax.lax.ragged_dot` on the sorted, unpadded assignments."""
  X, D = x_XD.shape
  K, E = experts_XK.shape[1], w_gate_EDM.shape[0]
  A = X * K
  order_A, count_E = _sort_by_expert(experts_XK.reshape(A), E)
  x_AD = x_XD[order_A // K]
  h_AM = (jax.nn.silu(jax.lax.ragged_dot(x_AD, w_gate_EDM, count_E))
          * jax.lax.ragged_dot(x_AD, w_up_EDM, count_E))
  y_sorted_AD = jax.lax.ragged_dot(h_AM, w_down_EMD, count_E)
  inverse_A = jnp.zeros((A,), jnp.int32).at[order_A].set(
      jnp.arange(A, dtype=jnp.int32), unique_indices=True)
  return y_sorted_AD[inverse_A].reshape(X, K, D)


def _dropless_gmm(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD, platform, fuse, block):
  """Returns y_XKD via `gmm.gmm` on the sorted, unpadded assignments (no-expert slots sort last
  and belong to no group); gate and up are one [E, D, 2M] grouped matmul when `fuse`."""
  X, D = x_XD.shape
  K, (E, _, M) = experts_XK.shape[1], w_gate_EDM.shape
  A = X * K
  order_A, count_E = _sort_by_expert(experts_XK.reshape(A), E)
  x_AD = x_XD[order_A // K]
  grouped_mm = functools.partial(gmm_lib.gmm, group_sizes_E=count_E, platform=platform,
                                 block=block)
  if fuse:
    gate_up_AM2 = grouped_mm(x_AD, (w_gate_EDM, w_up_EDM))
    gate_AM, up_AM = gate_up_AM2[:, :M], gate_up_AM2[:, M:]
  else:
    gate_AM, up_AM = grouped_mm(x_AD, w_gate_EDM), grouped_mm(x_AD, w_up_EDM)
  y_sorted_AD = grouped_mm(jax.nn.silu(gate_AM) * up_AM, w_down_EMD)
  inverse_A = jnp.zeros((A,), jnp.int32).at[order_A].set(
      jnp.arange(A, dtype=jnp.int32), unique_indices=True)
  return y_sorted_AD[inverse_A].reshape(X, K, D)


def dropless_ffn(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                 dots: ExpertDots | None = None, impl: str | None = None,
                 block: int | None = None, platform: str = "auto",
                 fuse_gate_up: bool = True) -> jax.Array:
  """Sorted grouped-matmul dispatch; exact (equal to `dense_ffn`) for any routing.

  `impl`: "gmm" (`gmm.gmm`: a grouped-matmul kernel chosen by `platform`, cost ~ tokens x K
  forward and backward; `fuse_gate_up` runs gate and up as one), "block" (padded blocks, the
  CPU path) or "ragged" (`jax.lax.ragged_dot`, which XLA:GPU rewrites into a dense masked GEMM
  over all experts); None: `default_dropless_impl(platform)`. "gmm" and "ragged" cannot honour
  custom `dots` (the FP8 seam): with them the FP8 recipe runs "block", whose own backward
  (`block_swiglu`) already costs ~ tokens x K. `block`: rows per block U (None:
  `auto_block_size`). Expert ids lie in [0, E], E for a slot with no expert; the expert-parallel
  caller remaps to local ids first.
  """
  _check_shapes("dropless_ffn", x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  if platform not in PLATFORMS:
    raise ValueError(f"dropless_ffn: platform={platform!r} must be one of {PLATFORMS}")
  impl = impl or default_dropless_impl(platform)
  if impl not in DROPLESS_IMPLS:
    raise ValueError(f"dropless_ffn: impl={impl!r} must be one of {DROPLESS_IMPLS}")
  if block is not None and (not isinstance(block, int) or block <= 0):
    raise ValueError(f"dropless_ffn: block={block!r} must be a positive integer")
  experts_XK = experts_XK.astype(jnp.int32)
  if impl == "gmm" and dots is None:
    y_XKD = _dropless_gmm(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                          gmm_lib.resolve_platform(platform), fuse_gate_up, block)
  elif impl == "ragged" and dots is None:
    y_XKD = _dropless_ragged(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  else:
    y_XKD = _dropless_block(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                            dots or ExpertDots(), block)
  return _combine(y_XKD, weights_XK, x_XD.dtype)


# ---- the runner the MoE block is given ----

DISPATCH_KINDS = ("dense", "dropless")


@dataclasses.dataclass(frozen=True)
class LocalExperts:
  """Routed experts on one device: `__call__(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM,
  w_down_EMD, dots=None) -> (y_XD, None)` (no dispatch statistics; see
  `sharding.expert_parallel.ExpertParallel` for the runner that has them).

  `kind` "dense" runs `dense_ffn`, "dropless" runs `dropless_ffn` with `impl` ("gmm", "block",
  "ragged"; None: by platform), `block` rows per block (None: `auto_block_size`), `platform`
  (the target: "cpu", "gpu", "tpu"; "auto": `jax.default_backend()` when called) and
  `fuse_gate_up`. Frozen and hashable, so it can be a flax module attribute.
  """
  kind: str = "dropless"
  impl: str | None = None
  block: int | None = None
  platform: str = "auto"
  fuse_gate_up: bool = True

  def __post_init__(self):
    if self.kind not in DISPATCH_KINDS:
      raise ValueError(f"LocalExperts: kind={self.kind!r} must be one of {DISPATCH_KINDS}")
    if self.impl is not None and self.impl not in DROPLESS_IMPLS:
      raise ValueError(f"LocalExperts: impl={self.impl!r} must be one of {DROPLESS_IMPLS} or None")
    if self.block is not None and (not isinstance(self.block, int) or isinstance(self.block, bool)
                                   or self.block <= 0):
      raise ValueError(f"LocalExperts: block={self.block!r} must be a positive integer or None")
    if self.platform not in PLATFORMS:
      raise ValueError(f"LocalExperts: platform={self.platform!r} must be one of {PLATFORMS}")
    if not isinstance(self.fuse_gate_up, bool):
      raise ValueError(f"LocalExperts: fuse_gate_up={self.fuse_gate_up!r} must be a bool")

  @classmethod
  def from_config(cls, model_cfg) -> "LocalExperts":
    """`model.moe_dispatch`, `model.dropless_impl` ("auto" -> None), `model.dropless_block`,
    `model.platform` and `model.fuse_gate_up`."""
    impl = None if model_cfg.dropless_impl == "auto" else model_cfg.dropless_impl
    return cls(model_cfg.moe_dispatch, impl, model_cfg.dropless_block, model_cfg.platform,
               model_cfg.fuse_gate_up)

  def __call__(self, x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
               dots: ExpertDots | None = None) -> tuple[jax.Array, None]:
    if self.kind == "dense":
      return dense_ffn(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                       dots=dots), None
    run = functools.partial(dropless_ffn, dots=dots, impl=self.impl, block=self.block,
                            platform=self.platform, fuse_gate_up=self.fuse_gate_up)
    impl = self.impl or default_dropless_impl(self.platform)
    if impl == "gmm" and dots is None and gmm_lib.resolve_platform(self.platform) != "cpu":
      return gmm_lib.on_token_shards(run, x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM,
                                     w_down_EMD), None
    return run(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD), None

