"""Grouped matmul over rows sorted by expert (V3 report §2.1.2, the routed experts; MegaBlocks'
gmm, arXiv 2211.15841): out[a] = lhs[a] @ rhs[group(a)], forward and backward costing rows x D x M,
never E x rows. Rows past sum(group_sizes) belong to no group: zero output, zero gradient.

Kernels by platform: GPU tokamax's Mosaic-GPU sm90 kernel (bf16/f16, D and M multiples of 128)
or its Triton kernel; TPU jax's megablox gmm/tgmm; CPU, or no kernel: XLA over the padded block
layout (each group padded to U rows, one [U, D] x [D, M] matmul per block). Letters beyond the
key: U rows per block, W blocks.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import vma

PLATFORMS = ("cpu", "gpu", "tpu")
KERNELS = ("xla", "megablox", "mosaic_gpu", "triton")
_HALF = (jnp.bfloat16, jnp.float16)


# ---- the block layout (the XLA kernel; dispatch's "block" path shares it) ----

def auto_block_size(num_assignments: int, num_experts: int) -> int:
  """Rows per block U (a power of two): padding costs up to E (U - 1) rows and each block a small
  matmul, so the best U grows like sqrt(A / E); on CPU (bench/bench_moe.py --sweep-blocks) U = 32
  is best or within noise for A = 8192, E = 8..64: nearest power of two to sqrt(A / E) in
  [32, 128], no larger than the mean rows per nonempty expert (decode: a few tokens)."""
  A, E = max(num_assignments, 1), num_experts
  target = 2 ** math.floor(math.log2(math.sqrt(A / E)) + 0.5) if A >= E else 1
  mean_rows = -(-A // min(E, A))
  return int(min(max(target, 32), 128, 2 ** math.ceil(math.log2(mean_rows))))


def num_blocks(num_assignments: int, num_experts: int, block: int) -> int:
  """Static bound on blocks: sum_e ceil(n_e / block) over any routing with sum_e n_e <= A.

  ceil(n / U) <= (n + U - 1) / U for each of the at most min(E, A) nonempty experts.
  """
  nonempty = min(num_experts, num_assignments)
  return (num_assignments + nonempty * (block - 1)) // block


class BlockLayout(NamedTuple):
  """Sorted rows with each group padded to a multiple of U rows, in W = `num_blocks` blocks."""
  dest_A: jax.Array    # [A] padded row of each row (W * U: the row is in no group)
  row_WU: jax.Array    # [W, U] row held by each padded slot (A: padding)
  group_W: jax.Array   # [W] group of each block


def block_layout(group_sizes_E: jax.Array, rows: int, block: int) -> BlockLayout:
  """The padded layout of `rows` rows sorted by group; W is the worst case over all group sizes
  summing to at most `rows`, so every shape is static."""
  E, U = group_sizes_E.shape[0], block
  W = num_blocks(rows, E, U)
  sizes_E = group_sizes_E.astype(jnp.int32)
  end_E = jnp.cumsum(sizes_E)
  start_E = end_E - sizes_E
  blocks_E = (sizes_E + U - 1) // U
  pad_start_E = (jnp.cumsum(blocks_E) - blocks_E) * U
  a_A = jnp.arange(rows, dtype=jnp.int32)
  group_A = jnp.searchsorted(end_E, a_A, side="right").astype(jnp.int32)  # E: past the groups
  g_A = jnp.minimum(group_A, E - 1)
  dest_A = jnp.where(group_A < E, pad_start_E[g_A] + a_A - start_E[g_A], W * U)
  row_WU = jnp.full((W * U,), rows, jnp.int32).at[dest_A].set(a_A, mode="drop").reshape(W, U)
  # Unused trailing blocks map to group E-1: their rows are padding (zeros), so they add nothing.
  group_W = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks_E), jnp.arange(W), side="right"), E - 1)
  return BlockLayout(dest_A, row_WU, group_W.astype(jnp.int32))


def _pad_rows(x_A_, layout: BlockLayout):
  """[A, n] -> [W, U, n] in the padded layout (zero rows for padding)."""
  x_pad = jnp.concatenate([x_A_, jnp.zeros((1, x_A_.shape[1]), x_A_.dtype)])
  return x_pad[layout.row_WU]


def _xla_gmm(x_A_, w_EDM, group_sizes_E, block, transpose):
  """x @ w[group] (x [A, D] -> [A, M]) or x @ w[group].T (x [A, M] -> [A, D]), one matmul per
  block; a scan, so the weights are sliced per block, never gathered into [W, D, M]."""
  layout = block_layout(group_sizes_E, x_A_.shape[0], block)
  contract = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))

  def body(_, xs):
    x_U_, e = xs
    y = jax.lax.dot_general(x_U_, w_EDM[e], contract, preferred_element_type=jnp.float32)
    return None, y.astype(x_A_.dtype)

  _, y_WU_ = jax.lax.scan(body, None, (_pad_rows(x_A_, layout), layout.group_W))
  W, U, n = y_WU_.shape
  return jnp.take(y_WU_.reshape(W * U, n), layout.dest_A, axis=0, mode="fill", fill_value=0)


def _xla_tgmm(x_AD, dy_AM, group_sizes_E, block):
  """dw[e] = x[group e].T @ dy[group e], added in place per block into an f32 [E, D, M]."""
  layout = block_layout(group_sizes_E, x_AD.shape[0], block)
  E, D, M = group_sizes_E.shape[0], x_AD.shape[1], dy_AM.shape[1]

  def body(acc_EDM, xs):
    x_UD, dy_UM, e = xs
    dw_DM = jax.lax.dot_general(x_UD, dy_UM, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
    return acc_EDM.at[e].add(dw_DM), None

  xs = (_pad_rows(x_AD, layout), _pad_rows(dy_AM, layout), layout.group_W)
  acc_EDM = vma.varying_like(jnp.zeros((E, D, M), jnp.float32), xs)
  acc_EDM, _ = jax.lax.scan(body, acc_EDM, xs)
  return acc_EDM.astype(x_AD.dtype)


# ---- the kernels (imported on first use) ----

@functools.cache
def _tokamax():
  """tokamax's GPU ragged-dot kernels, or None. Imported here, not at the top: the import takes
  about 2.3 s (flax.nnx, qwix) that a CPU process never needs."""
  try:
    from tokamax._src.ops.ragged_dot import base  # noqa: PLC0415
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_common as mgpu  # noqa: PLC0415
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_kernel_sm90 as sm90  # noqa: PLC0415
    from tokamax._src.ops.ragged_dot import pallas_triton as triton  # noqa: PLC0415
  except ImportError:
    return None
  return base, mgpu, sm90, triton


@functools.cache
def _megablox():
  # The module, not the package's `gmm` (megablox's own custom_vjp, which we do not use).
  from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm, tgmm  # noqa: PLC0415
  return gmm, tgmm


def _hopper_or_cross_compiling() -> bool:
  """The sm90 kernel needs wgmma (Hopper). Cross-compiling from a host without a GPU (the AOT
  path) targets Hopper; a process on a GPU checks its own."""
  if jax.default_backend() != "gpu":
    return True
  cc = getattr(jax.devices()[0], "compute_capability", None)
  return cc is None or 9.0 <= float(cc) < 10.0


def select_kernel(platform: str, dtype, d: int, m: int) -> tuple[str, str | None]:
  """(kernel, why a GPU/TPU runs the XLA fallback or None) for operands of `dtype`, [.., D, M]."""
  if platform == "tpu":
    if d % 128 or m % 128:
      return "xla", f"megablox tiles need D and M multiples of 128 (D={d}, M={m})"
    return "megablox", None
  if platform == "gpu":
    if _tokamax() is None:
      return "xla", "tokamax is not installed (pip install 'deepseek-jax[gpu]')"
    if (jnp.dtype(dtype) in map(jnp.dtype, _HALF) and d % 128 == 0 and m % 128 == 0
        and _hopper_or_cross_compiling()):
      return "mosaic_gpu", None
    return "triton", None
  return "xla", None


@functools.cache
def _note(platform: str, why: str):
  warnings.warn(f"gmm on {platform}: XLA block fallback ({why}); cost stays ~ rows x D x M",
                stacklevel=3)


class _Spec(NamedTuple):
  kernel: str
  block: int        # U of the XLA kernel
  interpret: bool


@contextlib.contextmanager
def _interpreted(spec: _Spec):
  """Pallas interpret mode for CPU tests: megablox takes a flag; tokamax's kernels take none,
  so its Triton kernels run under jax's interpret switch (the HLO interpreter) and its Mosaic-GPU
  kernels under the Mosaic-GPU interpreter (both jax-internal in jax 0.10)."""
  if not spec.interpret or spec.kernel in ("xla", "megablox"):
    yield
    return
  if spec.kernel == "mosaic_gpu":
    from jax._src.pallas.mosaic_gpu.interpret import params  # noqa: PLC0415
    with params.force_gpu_interpret_mode():
      yield
    return
  from jax._src import config as jax_config  # noqa: PLC0415
  state = jax_config.pallas_tpu_interpret_mode_context_manager
  previous = state.swap_local(True)
  try:
    yield
  finally:
    state.set_local(previous)


def _cat(ws, axis):
  return ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=axis)


def _kernel_gmm(spec: _Spec, x_A_, ws, group_sizes_E, transpose: bool):
  """x @ w[group] ([A, D] -> [A, M], w = the `ws` [E, D, Mi] side by side) or, with `transpose`,
  x @ w[group].T ([A, M] -> [A, D]). Rows in no group hold anything (kernels leave them
  unwritten). The concatenation happens here, in both passes, so that it is a short-lived
  temporary and never a residual kept from the forward pass to the backward one."""
  if spec.kernel == "xla":
    return _xla_gmm(x_A_, _cat(ws, 2), group_sizes_E, spec.block, transpose)
  dtype = x_A_.dtype
  A = x_A_.shape[0]
  w_EDM = _cat(ws, 2) if spec.kernel == "megablox" or not transpose else None
  if spec.kernel == "megablox":
    gmm_fn, _ = _megablox()
    tm, tk, tn = _megablox_tiles(w_EDM, transpose)
    with _mosaic_tpu_precision(dtype):
      return gmm_fn(_pad_to(x_A_, tm), w_EDM, group_sizes_E, dtype, (tm, tk, tn),
                    transpose_rhs=transpose, interpret=spec.interpret)[:A]
  base, mgpu, sm90, triton = _tokamax()
  # tokamax's kernels take [E, K, N] only: the input gradient multiplies by a transposed copy.
  w_E__ = _cat([jnp.swapaxes(w, 1, 2) for w in ws], 1) if transpose else w_EDM
  with _interpreted(spec):
    if spec.kernel == "mosaic_gpu":
      return sm90.ragged_dot_kernel(_pad_to(x_A_, _MGPU_ROWS), w_E__, group_sizes_E,
                                    jnp.dtype(dtype), _mgpu_config(mgpu))[:A]
    return triton._ragged_dot(  # noqa: SLF001
        x_A_, w_E__, group_sizes=group_sizes_E,
        ragged_dot_dimension_numbers=base.DEFAULT_RAGGED_DOT_DIM_NUMS, precision=None,
        out_dtype=jnp.dtype(dtype), split_k_intermediate_dtype=None, config=_triton_config(triton))


def _kernel_tgmm(spec: _Spec, x_AD, dy_AM, group_sizes_E):
  """dw[e] = x[group e].T @ dy[group e] -> [E, D, M]; rows in no group are not read."""
  if spec.kernel == "xla":
    return _xla_tgmm(x_AD, dy_AM, group_sizes_E, spec.block)
  dtype = x_AD.dtype
  if spec.kernel == "megablox":
    _, tgmm_fn = _megablox()
    tm, D, M = 128, x_AD.shape[1], dy_AM.shape[1]
    with _mosaic_tpu_precision(dtype):
      return tgmm_fn(_pad_to(x_AD, tm).T, _pad_to(dy_AM, tm), group_sizes_E, dtype,
                     (tm, _tile(D, 512), _tile(M, 512)), interpret=spec.interpret)
  base, mgpu, sm90, triton = _tokamax()
  with _interpreted(spec):
    if spec.kernel == "mosaic_gpu":
      return sm90.ragged_contracting_dim_dot_kernel(
          _pad_to(x_AD, _MGPU_ROWS), _pad_to(dy_AM, _MGPU_ROWS), group_sizes_E, jnp.dtype(dtype),
          _mgpu_config(mgpu))
    dw_EDM = triton._ragged_contracting_dim_dot(  # noqa: SLF001
        x_AD, dy_AM, group_sizes=group_sizes_E,
        ragged_dot_dimension_numbers=base.RAGGED_CONTRACTING_DOT_DIM_NUMS, precision=None,
        out_dtype=jnp.dtype(dtype), config=_triton_config(triton))
  # tokamax 0.0.12's Triton kernel reads the block_k rows before an empty group's start (its
  # last, masked iteration runs at index -1 when the group has no rows): zero those groups.
  return jnp.where(group_sizes_E[:, None, None] > 0, dw_EDM, 0).astype(dtype)


def _mosaic_tpu_precision(dtype):
  """Mosaic-TPU rejects an fp32 contract precision on bf16 operands ("Bad lhs type"), which a
  process-wide jax_default_matmul_precision=highest would ask of megablox's dots; for half
  precision operands the products are exact in f32 anyway."""
  if jnp.dtype(dtype) in map(jnp.dtype, _HALF):
    return jax.default_matmul_precision("default")
  return contextlib.nullcontext()


def _pad_to(x_A_, rows: int):
  """Zero rows up to a multiple of `rows`: megablox requires it, and the Mosaic-GPU kernels read
  whole tiles (rows or, in tgmm, the contracting dimension) without bounds."""
  return jnp.pad(x_A_, ((0, -x_A_.shape[0] % rows), (0, 0))) if x_A_.shape[0] % rows else x_A_


def _tile(n: int, cap: int) -> int:
  """The largest multiple of 128 <= cap dividing n; n itself when n <= cap or none divides."""
  if n <= cap:
    return n
  return next((t for t in range(cap - cap % 128, 0, -128) if n % t == 0), n)


def _megablox_tiles(w_EDM, transpose: bool) -> tuple[int, int, int]:
  # tm = 128 bounds the partial-tile waste by E x 128 rows (8% at A = 98304, E = 64); k and n
  # tiles as large as VMEM comfortably holds (an f32 accumulator of tm x tn).
  _, D, M = w_EDM.shape
  k, n = (M, D) if transpose else (D, M)
  return 128, _tile(k, 512), _tile(n, 1536)


_MGPU_ROWS = 128   # a multiple of the sm90 config's block_m (64) and block_k (128)


def _mgpu_config(mgpu):
  # tokamax's sm90 heuristic (PallasMosaicGpuRaggedDot._get_heuristics_config), named here
  # because tokamax looks it up on the default device, which is the CPU when cross-compiling.
  return mgpu.Config(block_m=64, block_n=64, block_k=128, num_stages=2, split_k=1,
                     grid_block_n=1, warp_specialized=True, persistent=False, async_store=True,
                     grid_minor_dim=mgpu.MatmulDimension.M, grid_tile_width=1)


def _triton_config(triton):
  # block_m = 64 (tokamax's heuristic: 128) halves the per-group partial-tile waste.
  return triton.Config(block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=4)


# ---- the differentiable grouped matmul ----

def _in_groups(y_A_, group_sizes_E):
  valid_A = jnp.arange(y_A_.shape[0]) < jnp.sum(group_sizes_E)
  return jnp.where(valid_A[:, None], y_A_, jnp.zeros((), y_A_.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x_AD, ws, group_sizes_E, spec: _Spec):
  return _in_groups(_kernel_gmm(spec, x_AD, ws, group_sizes_E, False), group_sizes_E)


def _gmm_fwd(x_AD, ws, group_sizes_E, spec):
  return _gmm(x_AD, ws, group_sizes_E, spec), (x_AD, ws, group_sizes_E)


def _gmm_bwd(spec, res, dy_AM):
  x_AD, ws, group_sizes_E = res
  dy_AM = dy_AM.astype(x_AD.dtype)
  dx_AD = _in_groups(_kernel_gmm(spec, dy_AM, ws, group_sizes_E, True), group_sizes_E)
  dw_EDM = _kernel_tgmm(spec, x_AD, dy_AM, group_sizes_E)
  cuts = list(itertools.accumulate(w.shape[2] for w in ws))[:-1]
  dws = tuple(vma.cotangent_like(d.astype(w.dtype), w)
              for d, w in zip(jnp.split(dw_EDM, cuts, axis=2), ws))
  return vma.cotangent_like(dx_AD, x_AD), dws, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs_AD: jax.Array, rhs_EDM: jax.Array | Sequence[jax.Array], group_sizes_E: jax.Array,
        *, platform: str, kernel: str | None = None, block: int | None = None,
        interpret: bool = False) -> jax.Array:
  """out[a] = lhs[a] @ rhs[e] for the rows a of group e ([A, M], lhs's dtype, f32 accumulation);
  rows sorted by group, group e holding `group_sizes_E[e]` rows, rows past their sum in none.

  `rhs_EDM` may be several [E, D, Mi] side by side (gate and up: one kernel, [A, sum Mi] out).
  `platform` ("cpu", "gpu", "tpu": the target, not the host) picks the kernel (`select_kernel`;
  a GPU/TPU without one warns once and runs the XLA block layout); `kernel` forces one of KERNELS.
  `block`: rows per block U of the XLA kernel (None: `auto_block_size`). `interpret`: run the
  Pallas kernels in interpret mode (CPU tests; tokamax's Mosaic-GPU tgmm cannot be interpreted).
  """
  ws = tuple(rhs_EDM) if isinstance(rhs_EDM, (tuple, list)) else (rhs_EDM,)
  shapes = [w.shape for w in ws]
  if (lhs_AD.ndim != 2 or not ws or any(len(sh) != 3 or sh[:2] != (shapes[0][0], lhs_AD.shape[1])
                                        for sh in shapes)):
    raise ValueError(f"gmm: lhs {lhs_AD.shape} and rhs {shapes} must be [A, D] and [E, D, M] "
                     "(several rhs: [E, D, Mi] each)")
  if group_sizes_E.shape != shapes[0][:1] or not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
    raise ValueError(f"gmm: group_sizes {group_sizes_E.shape} {group_sizes_E.dtype} must be "
                     f"integers of shape [E] = ({shapes[0][0]},)")
  if any(w.dtype != lhs_AD.dtype for w in ws):
    raise ValueError(f"gmm: lhs dtype {lhs_AD.dtype} != rhs dtype "
                     f"{[str(w.dtype) for w in ws]}; cast first")
  if platform not in PLATFORMS:
    raise ValueError(f"gmm: platform={platform!r} must be one of {PLATFORMS} (resolve 'auto' "
                     "with resolve_platform)")
  (A, D), E = lhs_AD.shape, shapes[0][0]
  if kernel is None:   # every width must suit the kernel: their gcd does
    kernel, why = select_kernel(platform, lhs_AD.dtype, D, math.gcd(*(sh[2] for sh in shapes)))
    if why:
      _note(platform, why)
  elif kernel not in KERNELS:
    raise ValueError(f"gmm: kernel={kernel!r} must be one of {KERNELS} or None (by platform)")
  elif kernel == "mosaic_gpu" and jnp.dtype(lhs_AD.dtype) not in map(jnp.dtype, _HALF):
    raise ValueError(f"gmm: kernel='mosaic_gpu' takes bfloat16/float16, not {lhs_AD.dtype}; use "
                     "'triton'")
  if kernel in ("mosaic_gpu", "triton") and _tokamax() is None:
    raise ValueError(f"gmm: kernel={kernel!r} needs tokamax (pip install 'deepseek-jax[gpu]')")
  if block is not None and (not isinstance(block, int) or block <= 0):
    raise ValueError(f"gmm: block={block!r} must be a positive integer or None")
  spec = _Spec(kernel, block or auto_block_size(A, E), bool(interpret))
  return _gmm(lhs_AD, ws, group_sizes_E.astype(jnp.int32), spec)


def resolve_platform(platform: str) -> str:
  """"auto" -> the platform of `jax.default_backend()` (at call time); others pass through."""
  if platform != "auto":
    return platform
  backend = jax.default_backend()
  return backend if backend in PLATFORMS else ("gpu" if backend in ("cuda", "rocm") else "cpu")


def on_token_shards(fn, *args, tokens: int = 3):
  """`fn(*args)` per device on its own tokens ("act_tokens": the first `tokens` args and every
  output split by rows, the rest whole): XLA cannot partition a Pallas kernel and XLA:GPU
  replicates a top-k; inside a `shard_map` (expert parallelism) nothing changes."""
  mesh, rows = jax.sharding.get_abstract_mesh(), nn.logical_to_mesh_axes(("act_tokens", None))
  axes, sizes = rows[0] or (), dict(zip(mesh.axis_names, mesh.axis_sizes))
  shards = math.prod(sizes.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes))
  if (mesh.empty or mesh.size == 1 or args[0].shape[0] % shards   # e.g. init on one sequence
      or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)):
    return fn(*args)
  specs = (rows,) * tokens + (jax.sharding.PartitionSpec(),) * (len(args) - tokens)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)(*args)
