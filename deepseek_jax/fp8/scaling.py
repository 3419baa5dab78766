"""Scaling recipes and the quantiser: fine-grained FP8 scales (V3 report §3.3.1-3.3.2, App. B).

An operand is quantised as `[batch, rows, cols]`, one of rows/cols being the contracting axis
(`contract`), with one scale per block: the tensor, one row or column (`axis`), a 1x128 tile along
the contracting axis (`tile`, activations) or a 128x128 block (`block`, weights). Scales come from
the block's amax, optionally rounded up to a power of two; non-finite blocks dequantise to NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax.fp8.formats import E4M3, Format

GRANULARITIES = ("tensor", "axis", "tile", "block")
MIN_AMAX_FLOOR = 1e-30  # keeps amax_floor / fmt.max a normal f32 for every format
# DeepSeek-V3's granularity (§3.3.1), read by every FP8 default (GEMM operands, the E5M6 cache,
# the dispatch and LogFMT wire tiles): activations and gradients in 1 x TILE tiles along the
# contracting axis, weights in BLOCK x BLOCK blocks.
TILE = 128
BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Scaling:
  """How one operand slot computes its scales (hashable: it is static in every trace)."""
  granularity: str = "tile"
  tile: int = TILE             # tile length, or block side for granularity 'block'
  mode: str = "current"       # 'current' (online amax) | 'delayed' (amax history, tensor only)
  pow2: bool = True
  amax_floor: float = 1e-4    # DeepGEMM's floor for activations and weights
  history: int = 16           # delayed: amax history length
  margin: int = 0             # delayed: scale headroom of 2**margin against growth

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"scaling.granularity={self.granularity!r}: must be one of {GRANULARITIES}")
    if not (isinstance(self.tile, int) and self.tile > 0):
      raise ValueError(f"scaling.tile={self.tile!r}: must be a positive integer")
    if self.mode not in ("current", "delayed"):
      raise ValueError(f"scaling.mode={self.mode!r}: must be 'current' or 'delayed'")
    if self.mode == "delayed" and self.granularity != "tensor":
      raise ValueError(f"scaling.mode='delayed' with granularity={self.granularity!r}: delayed "
                       "scaling keeps one amax history per tensor; use granularity='tensor'")
    if not (isinstance(self.amax_floor, (int, float)) and self.amax_floor >= MIN_AMAX_FLOOR):
      raise ValueError(f"scaling.amax_floor={self.amax_floor!r}: must be >= {MIN_AMAX_FLOOR} "
                       "(all-zero blocks would get a zero scale)")
    if not (isinstance(self.history, int) and self.history > 0):
      raise ValueError(f"scaling.history={self.history!r}: must be a positive integer")
    if not (isinstance(self.margin, int) and self.margin >= 0):
      raise ValueError(f"scaling.margin={self.margin!r}: must be an integer >= 0")

  def blocks(self, shape: tuple[int, int, int], contract: int) -> tuple[int, int, int]:
    """Block size (batch, rows, cols) covered by one scale of a `[batch, rows, cols]` operand."""
    if contract not in (1, 2):
      raise ValueError(f"contract={contract!r}: must be 1 or 2 (axis of rows or cols)")
    n_batch, n_rows, n_cols = shape
    g, t = self.granularity, self.tile
    if g == "tensor":
      return (n_batch, n_rows, n_cols)
    if g == "axis":
      return (1, n_rows, 1) if contract == 1 else (1, 1, n_cols)
    if g == "tile":
      return (1, min(t, n_rows), 1) if contract == 1 else (1, 1, min(t, n_cols))
    return (1, min(t, n_rows), min(t, n_cols))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """Quantised `[batch, rows, cols]` data with f32 dequantisation multipliers per `blocks`.

  `scale_inv` has shape `ceil(data.shape / blocks)`. A pytree (data and scales are leaves, the
  rest static), so it flows through scan, remat and custom_vjp residuals as FP8 bytes.
  """
  data: jax.Array
  scale_inv: jax.Array
  blocks: tuple[int, int, int] = dataclasses.field(metadata=dict(static=True))
  fmt: Format | None = dataclasses.field(metadata=dict(static=True))   # None: not quantised
  contract: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return self.data.shape

  @property
  def T(self) -> QArray:
    """The transpose `[batch, cols, rows]` (no requantisation)."""
    b_batch, b_rows, b_cols = self.blocks
    return QArray(self.data.swapaxes(1, 2), self.scale_inv.swapaxes(1, 2),
                  (b_batch, b_cols, b_rows), self.fmt, 3 - self.contract)

  def scales_full(self, axes=(0, 1, 2)) -> jax.Array:
    """Scales repeated over their blocks along `axes` (other axes keep their block count)."""
    return expand_scales(self.scale_inv, self.blocks, self.data.shape, axes)

  def dequantize(self) -> jax.Array:
    """f32 values `data * scale_inv` (exact for power-of-two scales); FP8 bytes, or their uint8
    bit patterns (`loop_bytes`), are read with `Format.decode`."""
    if self.fmt is not None and self.fmt.bit_codec:
      return self.fmt.decode(self.data) * self.scales_full()
    return self.data.astype(jnp.float32) * self.scales_full()


def unquantized(x: jax.Array, contract: int) -> QArray:
  """A high-precision operand in QArray form (unit scale), so GEMMs treat both alike."""
  return QArray(x.astype(jnp.float32), jnp.ones((1, 1, 1), jnp.float32), tuple(x.shape), None,
                contract)


def pow2_ceil(s: jax.Array) -> jax.Array:
  """Smallest power of two >= s, for positive normal f32 `s`; inf and NaN pass through."""
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  mantissa = bits & jnp.uint32(0x007FFFFF)
  up = (bits & jnp.uint32(0x7F800000)) + jnp.uint32(0x00800000)
  r = jax.lax.bitcast_convert_type(jnp.where(mantissa == 0, bits, up), jnp.float32)
  return jnp.where(jnp.isfinite(s), r, s)


def block_amax(x: jax.Array, blocks: tuple[int, int, int]) -> jax.Array:
  """max|x| per block, shape ceil(shape / blocks); ragged blocks are zero-padded."""
  shape = x.shape
  n = [-(-d // b) for d, b in zip(shape, blocks)]
  pad = [(0, k * b - d) for d, b, k in zip(shape, blocks, n)]
  a = jnp.abs(x)
  if any(p for _, p in pad):
    a = jnp.pad(a, pad)
  dims, reduce = [], []   # only non-trivial axes: fewer, fusable kernels on XLA:CPU
  for k, b in zip(n, blocks):
    dims += [k] if k > 1 else []
    if b > 1:
      dims.append(b)
      reduce.append(len(dims) - 1)
  a = a.reshape(dims)
  return (jnp.max(a, axis=tuple(reduce)) if reduce else a).reshape(n)


def scale_from_amax(amax: jax.Array, fmt: Format, scaling: Scaling) -> jax.Array:
  """f32 dequantisation multiplier for an amax (floored; x 2**margin; pow2 rounds up)."""
  s = jnp.maximum(amax.astype(jnp.float32), jnp.float32(scaling.amax_floor))
  if scaling.margin:
    s = s * jnp.float32(2.0 ** scaling.margin)
  s = s * jnp.float32(1.0 / fmt.max)  # XLA folds `/ const` into this anyway; say it explicitly
  return pow2_ceil(s) if scaling.pow2 else s


def _scaled(x, fmt, scaling, contract, amax, fn):
  if x.ndim != 3:
    raise ValueError(f"{fn}: expected a [batch, rows, cols] array, got shape {x.shape}")
  x = x.astype(jnp.float32)
  blocks = scaling.blocks(x.shape, contract)
  if amax is None:
    amax = block_amax(x, blocks)
  else:
    amax = jnp.reshape(jnp.asarray(amax, jnp.float32), (1, 1, 1))
  scale_inv = scale_from_amax(amax, fmt, scaling)
  # Repeated scales (not a 6-d blocked view) keep x in its layout: 2-3x faster on XLA:CPU.
  return x, blocks, scale_inv, expand_scales(scale_inv, blocks, x.shape)


def quantize(x: jax.Array, fmt: Format, scaling: Scaling, contract: int,
             amax: jax.Array | None = None) -> QArray:
  """Quantises `[batch, rows, cols]` with scales along `contract`; `amax` overrides the measured one
  (delayed scaling; per-tensor, any shape broadcasting to (1, 1, 1))."""
  x, blocks, scale_inv, s_full = _scaled(x, fmt, scaling, contract, amax, "quantize")
  if fmt.bit_codec:
    return QArray(_narrow(fmt.round(x / s_full), fmt), scale_inv, blocks, fmt, contract)
  return QArray(fmt.cast(x / s_full), scale_inv, blocks, fmt, contract)


def quantize_with_values(x: jax.Array, fmt: Format, scaling: Scaling, contract: int,
                         amax: jax.Array | None = None) -> tuple[QArray, jax.Array]:
  """`(q, q.dequantize())` for `q = quantize(...)`, bitwise, without reading the FP8 bytes back:
  the values come from `Format.round` and the bytes are their exact narrowing."""
  x, blocks, scale_inv, s_full = _scaled(x, fmt, scaling, contract, amax,
                                         "quantize_with_values")
  r = fmt.round(x / s_full)
  return QArray(_narrow(r, fmt), scale_inv, blocks, fmt, contract), r * s_full


def _narrow(r: jax.Array, fmt: Format) -> jax.Array:
  """`r.astype(fmt.dtype)` bitwise for values already in `fmt` (`Format.round`'s output)."""
  if fmt.bit_codec:
    return jax.lax.bitcast_convert_type(fmt.encode(r), fmt.dtype)
  return r.astype(fmt.dtype)


def fake_quantize(x: jax.Array, fmt: Format, scaling: Scaling, contract: int,
                  amax: jax.Array | None = None) -> jax.Array:
  """`quantize(...).dequantize()` bitwise, in f32 and without FP8 bytes (`Format.round`): the
  emulator's path for operands that are consumed at once."""
  x, _, _, s_full = _scaled(x, fmt, scaling, contract, amax, "fake_quantize")
  return fmt.round(x / s_full) * s_full


def expand_scales(scale_inv, blocks, shape, axes=(0, 1, 2)):
  """Repeats per-block scales over their blocks along `axes` (others keep the block count)."""
  for ax in axes:
    scale_inv = jnp.repeat(scale_inv, blocks[ax], axis=ax)
    scale_inv = jax.lax.slice_in_dim(scale_inv, 0, shape[ax], axis=ax)
  return scale_inv


def requantize(q: QArray, fmt: Format, scaling: Scaling, contract: int) -> QArray:
  """Re-tiles a quantised operand (e.g. 1x128 -> 128x1 for wgrad) from its dequantised values."""
  return quantize(q.dequantize(), fmt, scaling, contract)


def tensor_amax(x: jax.Array) -> jax.Array:
  """Per-tensor max|x| (f32 scalar), what delayed scaling records."""
  return jnp.max(jnp.abs(x.astype(jnp.float32)))


def loop_bytes(a):
  """A cache leaving a scan body (or a custom_vjp's residuals, which layer scans stack): FP8 bytes
  as their uint8 bit patterns (XLA:CPU updates an f8 loop buffer through an f16 copy of the whole
  buffer per step, measured 6x the block path's time); anything else unchanged."""
  if isinstance(a, QArray) and a.data.dtype.itemsize == 1 and a.data.dtype != jnp.uint8:
    return dataclasses.replace(a, data=jax.lax.bitcast_convert_type(a.data, jnp.uint8))
  return a


def fp8_bytes(a):
  """The inverse of `loop_bytes`."""
  if isinstance(a, QArray) and a.data.dtype == jnp.uint8:
    return dataclasses.replace(a, data=jax.lax.bitcast_convert_type(a.data, a.fmt.dtype))
  return a
