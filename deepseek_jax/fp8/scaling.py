"""Scaling recipes and the quantiser: fine-grained FP8 scales (V3 report §3.3.1-3.3.2, App. B).

An operand is quantised in a canonical 3-d layout `[B, R, C]` (B a batch of independent matrices,
e.g. experts; one of R/C is the GEMM's contracting axis, named by `contract`). A scale covers a
block of `(bB, bR, bC)` elements:

| granularity | contracting axis last (contract=2) | contracting axis first (contract=1) |
|---|---|---|
| tensor      | (B, R, C): one scale for the operand   | same |
| axis        | (1, 1, C): one per row (amax over K)    | (1, R, 1) |
| tile (1xT)  | (1, 1, T): DeepSeek's activation tiles  | (1, T, 1) (the 128x1 wgrad tiles) |
| block (TxT) | (1, T, T): DeepSeek's weight blocks     | same (transpose-invariant) |

Per block: amax = max|x| (NaN propagates), floored at `amax_floor`; the dequantisation multiplier
`scale_inv = amax * f32(1 / fmt.max)`, optionally rounded *up* to a power of two (so
`x / scale_inv` never exceeds max, and re-tiling a cached FP8 tensor is exact, §3.3.2);
`data = cast(x / scale_inv)` with a saturating cast. A block holding +-inf or NaN gets a
non-finite scale and dequantises to NaN: upstream overflow stays visible. f32 subnormal inputs
become signed zeros: XLA:CPU treats them as zero (denormals-are-zero), and elsewhere they fall far
below the smallest FP8 subnormal at any scale the amax floor allows. Ragged blocks (K not a
multiple of T) are zero-padded for the amax only (the last tile is simply shorter).
`mode='delayed'` takes its amax from an explicit history (`delayed.py`) instead of the tensor;
it is per-tensor only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax.fp8.formats import E4M3, Format

GRANULARITIES = ("tensor", "axis", "tile", "block")
MIN_AMAX_FLOOR = 1e-30  # keeps amax_floor / fmt.max a normal f32 for every format


@dataclasses.dataclass(frozen=True)
class Scaling:
  """How one operand slot computes its scales (hashable: it is static in every trace)."""
  granularity: str = "tile"
  tile: int = 128
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
    """Block size (bB, bR, bC) covered by one scale for a `[B, R, C]` operand."""
    if contract not in (1, 2):
      raise ValueError(f"contract={contract!r}: must be 1 or 2 (axis of R or C)")
    B, R, C = shape
    g, t = self.granularity, self.tile
    if g == "tensor":
      return (B, R, C)
    if g == "axis":
      return (1, R, 1) if contract == 1 else (1, 1, C)
    if g == "tile":
      return (1, min(t, R), 1) if contract == 1 else (1, 1, min(t, C))
    return (1, min(t, R), min(t, C))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """Quantised `[B, R, C]` data with f32 dequantisation multipliers per `blocks`.

  `scale_inv` has shape `ceil([B, R, C] / blocks)`. A pytree (data and scales are leaves, the
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
    """The transpose `[B, C, R]` (no requantisation)."""
    bB, bR, bC = self.blocks
    return QArray(self.data.swapaxes(1, 2), self.scale_inv.swapaxes(1, 2), (bB, bC, bR),
                  self.fmt, 3 - self.contract)

  def scales_full(self, axes=(0, 1, 2)) -> jax.Array:
    """Scales repeated over their blocks along `axes` (other axes keep their block count)."""
    return expand_scales(self.scale_inv, self.blocks, self.data.shape, axes)

  def dequantize(self) -> jax.Array:
    """f32 values `data * scale_inv` (exact for power-of-two scales)."""
    return self.data.astype(jnp.float32) * self.scales_full()


def unquantized(x_BRC: jax.Array, contract: int) -> QArray:
  """A high-precision operand in QArray form (unit scale), so GEMMs treat both alike."""
  B, R, C = x_BRC.shape
  return QArray(x_BRC.astype(jnp.float32), jnp.ones((1, 1, 1), jnp.float32), (B, R, C), None,
                contract)


def pow2_ceil(s: jax.Array) -> jax.Array:
  """Smallest power of two >= s, for positive normal f32 `s`; inf and NaN pass through."""
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  mantissa = bits & jnp.uint32(0x007FFFFF)
  up = (bits & jnp.uint32(0x7F800000)) + jnp.uint32(0x00800000)
  r = jax.lax.bitcast_convert_type(jnp.where(mantissa == 0, bits, up), jnp.float32)
  return jnp.where(jnp.isfinite(s), r, s)


def block_amax(x_BRC: jax.Array, blocks: tuple[int, int, int]) -> jax.Array:
  """max|x| per block, shape ceil(shape / blocks); ragged blocks are zero-padded."""
  shape = x_BRC.shape
  n = [-(-d // b) for d, b in zip(shape, blocks)]
  pad = [(0, k * b - d) for d, b, k in zip(shape, blocks, n)]
  a = jnp.abs(x_BRC)
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


def _scaled(x_BRC, fmt, scaling, contract, amax, fn):
  if x_BRC.ndim != 3:
    raise ValueError(f"{fn}: expected a [B, R, C] array, got shape {x_BRC.shape}")
  x = x_BRC.astype(jnp.float32)
  blocks = scaling.blocks(x.shape, contract)
  if amax is None:
    amax = block_amax(x, blocks)
  else:
    amax = jnp.reshape(jnp.asarray(amax, jnp.float32), (1, 1, 1))
  scale_inv = scale_from_amax(amax, fmt, scaling)
  # Repeated scales (not a 6-d blocked view) keep x in its layout: 2-3x faster on XLA:CPU.
  return x, blocks, scale_inv, expand_scales(scale_inv, blocks, x.shape)


def quantize(x_BRC: jax.Array, fmt: Format, scaling: Scaling, contract: int,
             amax: jax.Array | None = None) -> QArray:
  """Quantises `[B, R, C]` with scales along `contract`; `amax` overrides the measured one
  (delayed scaling; per-tensor, any shape broadcasting to (1, 1, 1))."""
  x, blocks, scale_inv, s_full = _scaled(x_BRC, fmt, scaling, contract, amax, "quantize")
  return QArray(fmt.cast(x / s_full), scale_inv, blocks, fmt, contract)


def quantize_with_values(x_BRC: jax.Array, fmt: Format, scaling: Scaling, contract: int,
                         amax: jax.Array | None = None) -> tuple[QArray, jax.Array]:
  """`(q, q.dequantize())` for `q = quantize(...)`, bitwise, without reading the FP8 bytes back:
  the values come from `Format.round` and the bytes are their exact narrowing."""
  x, blocks, scale_inv, s_full = _scaled(x_BRC, fmt, scaling, contract, amax,
                                         "quantize_with_values")
  r = fmt.round(x / s_full)
  return QArray(r.astype(fmt.dtype), scale_inv, blocks, fmt, contract), r * s_full


def fake_quantize(x_BRC: jax.Array, fmt: Format, scaling: Scaling, contract: int,
                  amax: jax.Array | None = None) -> jax.Array:
  """`quantize(...).dequantize()` bitwise, in f32 and without FP8 bytes (`Format.round`): the
  emulator's path for operands that are consumed at once."""
  x, _, _, s_full = _scaled(x_BRC, fmt, scaling, contract, amax, "fake_quantize")
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
