"""Low-precision number formats and saturating casts (V3 report §3.3, App. B; Insights §3.1).

A `Format` stores a quantised operand: the hardware FP8 types E4M3 and E5M2 (and AMD's fnuz
variants), or a format emulated through `lax.reduce_precision`, such as V3's E5M6. Casts saturate
at +-max (XLA would turn E4M3 overflow into NaN); NaN propagates and is never sanitised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_FNUZ = (jnp.dtype(jnp.float8_e4m3fnuz), jnp.dtype(jnp.float8_e5m2fnuz))


@dataclasses.dataclass(frozen=True)
class Format:
  """A floating-point storage format with `exponent_bits` and `mantissa_bits`.

  `dtype` is the storage dtype: a real FP8 dtype, or for emulated formats a wider standard dtype
  holding every value exactly (then `emulated` is True and `cast` rounds through reduce_precision).
  """
  name: str
  exponent_bits: int
  mantissa_bits: int
  max: float
  dtype: Any
  emulated: bool = False

  def cast(self, x: jax.Array) -> jax.Array:
    """Saturating round-to-nearest-even cast of (f32) `x` into this format's storage dtype."""
    x = jnp.clip(x.astype(jnp.float32), -self.max, self.max)
    if self.emulated:
      x = jax.lax.reduce_precision(x, exponent_bits=self.exponent_bits,
                                   mantissa_bits=self.mantissa_bits)
    return x.astype(self.dtype)

  def round(self, x: jax.Array) -> jax.Array:
    """`cast(x)` read back as f32, bitwise, without FP8 conversions (the emulator's fast path).

    XLA:CPU converts to and from FP8 in scalar code (measured ~4x the cost of these few
    vectorised ops). Normal values round through `reduce_precision` with one extra exponent bit
    (so e4m3's top binade, which IEEE-style rounding would call overflow, stays finite after the
    clip); `reduce_precision` flushes the target's subnormals to zero, so values below the
    smallest normal round to multiples of the subnormal spacing explicitly (half to even).
    The fnuz formats (no negative zero) take the conversion path.
    """
    if self.dtype in _FNUZ:
      return self.cast(x).astype(jnp.float32)
    x = jnp.clip(x.astype(jnp.float32), -self.max, self.max)
    if self.emulated:   # exactly what `cast` computes, minus the (exact) narrowing
      return jax.lax.reduce_precision(x, exponent_bits=self.exponent_bits,
                                      mantissa_bits=self.mantissa_bits)
    bias = 2 ** (self.exponent_bits - 1) - 1
    tiny = 2.0 ** (1 - bias)                          # smallest normal
    step = 2.0 ** (1 - bias - self.mantissa_bits)     # subnormal spacing
    normal = jax.lax.reduce_precision(x, exponent_bits=min(self.exponent_bits + 1, 8),
                                      mantissa_bits=self.mantissa_bits)
    sub = jnp.round(x * jnp.float32(1 / step)) * jnp.float32(step)
    return jnp.where(jnp.abs(x) < jnp.float32(tiny), sub, normal)

  @property
  def bits(self) -> int:
    return 1 + self.exponent_bits + self.mantissa_bits

  @property
  def bit_codec(self) -> bool:
    """Bytes written and read with integer ops (`encode`, `decode`): real 8-bit formats but fnuz."""
    return not self.emulated and self.bits == 8 and self.dtype not in _FNUZ

  def encode(self, r: jax.Array) -> jax.Array:
    """uint8 bit patterns of f32 `r` already in this format (`round`'s output): bitwise
    `r.astype(dtype)` viewed as uint8, in vectorised integer ops; XLA:CPU
    converts to FP8 in scalar code (measured 3x `round` itself)."""
    bias, mb = 2 ** (self.exponent_bits - 1) - 1, self.mantissa_bits
    bits = jax.lax.bitcast_convert_type(r.astype(jnp.float32), jnp.uint32)
    sign = (bits >> 24) & jnp.uint32(0x80)
    a = bits & jnp.uint32(0x7FFFFFFF)
    normal = (a - jnp.uint32((127 - bias) << 23)) >> (23 - mb)   # exponent rebiased, exact
    mag = jax.lax.bitcast_convert_type(a, jnp.float32)
    sub = (mag * jnp.float32(2.0 ** (bias - 1 + mb))).astype(jnp.uint32)  # integer multiples
    out = jnp.where(mag < jnp.float32(2.0 ** (1 - bias)), sub, normal)
    nan, inf = (int(np.float32(v).astype(self.dtype).view(np.uint8)) & 0x7F
                for v in (np.nan, np.inf))
    out = jnp.where(a >= jnp.uint32(0x7F800000),
                    jnp.where(a == jnp.uint32(0x7F800000), jnp.uint32(inf), jnp.uint32(nan)), out)
    return (sign | out).astype(jnp.uint8)

  def decode(self, b: jax.Array) -> jax.Array:
    """f32 values of uint8 bit patterns (or of this format's bytes), bitwise `astype(float32)`,
    in vectorised integer ops."""
    if b.dtype != jnp.uint8:
      b = jax.lax.bitcast_convert_type(b, jnp.uint8)
    bias, mb = 2 ** (self.exponent_bits - 1) - 1, self.mantissa_bits
    b = b.astype(jnp.uint32)
    mag = b & jnp.uint32(0x7F)
    normal = jax.lax.bitcast_convert_type((mag << (23 - mb)) + jnp.uint32((127 - bias) << 23),
                                          jnp.float32)
    sub = mag.astype(jnp.float32) * jnp.float32(2.0 ** (1 - bias - mb))
    v = jnp.where(mag < jnp.uint32(1 << mb), sub, normal)
    top = 0x7F & ~((1 << mb) - 1)        # all-ones exponent, zero mantissa
    if np.isfinite(float(np.uint8(top).view(self.dtype))):   # e4m3fn: only S.1111.111 is NaN
      v = jnp.where(mag == jnp.uint32(0x7F), jnp.float32(np.nan), v)
    else:                                                     # IEEE-like: inf and NaNs
      v = jnp.where(mag >= jnp.uint32(top), jnp.where(mag == jnp.uint32(top),
                                                      jnp.float32(np.inf), jnp.float32(np.nan)), v)
    s = (b & jnp.uint32(0x80)) << 24
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(v, jnp.uint32) | s,
                                        jnp.float32)


def _ieee_max(exponent_bits: int, mantissa_bits: int) -> float:
  """Largest finite value of an IEEE-like format (top exponent reserved for inf/NaN)."""
  bias = 2 ** (exponent_bits - 1) - 1
  return float((2.0 - 2.0 ** -mantissa_bits) * 2.0 ** bias)


def emulated(name: str, exponent_bits: int, mantissa_bits: int) -> Format:
  """An IEEE-like format emulated through `lax.reduce_precision` (e.g. the paper's E5M6)."""
  if not (isinstance(exponent_bits, int) and 2 <= exponent_bits <= 8):
    raise ValueError(f"emulated format {name!r}: exponent_bits={exponent_bits!r} must be an "
                     "integer in [2, 8] (f32 holds the computation)")
  if not (isinstance(mantissa_bits, int) and 0 <= mantissa_bits <= 23):
    raise ValueError(f"emulated format {name!r}: mantissa_bits={mantissa_bits!r} must be an "
                     "integer in [0, 23]")
  fits_bf16 = exponent_bits <= 8 and mantissa_bits <= 7
  return Format(name, exponent_bits, mantissa_bits, _ieee_max(exponent_bits, mantissa_bits),
                jnp.bfloat16 if fits_bf16 else jnp.float32, emulated=True)


def _real(name: str, dtype, exponent_bits: int, mantissa_bits: int) -> Format:
  return Format(name, exponent_bits, mantissa_bits, float(ml_dtypes.finfo(dtype).max),
                jnp.dtype(dtype))


E4M3 = _real("e4m3", jnp.float8_e4m3fn, 4, 3)          # max 448, no inf
E5M2 = _real("e5m2", jnp.float8_e5m2, 5, 2)            # max 57344, has inf
E4M3FNUZ = _real("e4m3fnuz", jnp.float8_e4m3fnuz, 4, 3)  # max 240 (AMD MI300)
E5M2FNUZ = _real("e5m2fnuz", jnp.float8_e5m2fnuz, 5, 2)  # max 57344 (AMD MI300)
E5M6 = emulated("e5m6", 5, 6)                          # max 65024; V3's cached attention-out input
BF16 = emulated("bf16", 8, 7)                          # for communication experiments

FORMATS = {f.name: f for f in (E4M3, E5M2, E4M3FNUZ, E5M2FNUZ, E5M6, BF16)}


def format_by_name(name: str) -> Format:
  if name not in FORMATS:
    raise ValueError(f"fp8 format {name!r}: unknown (valid: {', '.join(sorted(FORMATS))})")
  return FORMATS[name]


def min_normal(fmt: Format) -> float:
  """Smallest positive normal value of `fmt` (below it, values lose mantissa bits)."""
  bias = 2 ** (fmt.exponent_bits - 1) - 1
  if fmt.dtype in (jnp.dtype(jnp.float8_e4m3fnuz), jnp.dtype(jnp.float8_e5m2fnuz)):
    bias += 1  # fnuz formats shift the exponent bias by one
  return float(2.0 ** (1 - bias))
