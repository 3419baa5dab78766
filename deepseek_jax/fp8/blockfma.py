"""The Hopper tensor core's block FMA, bit for bit (Khattak & Mikaitis, arXiv 2512.07004).

One FP8 WGMMA step adds a block of `kstep` (32) exact products to the accumulator c in one
multi-term adder: every product (significand in [1, 4), exponent e(a) + e(b), not normalised) and
c are aligned to the largest of their exponents F, the bits below 2^(F - bits) are cut off (toward
zero, `bits` = 13 on H100/H200), the aligned terms are summed exactly and the sum is cut to `bits`
fraction bits of its own leading bit. `block_fma` does this for every (batch, row, col) at once:
products are f32 (exact for FP8 operands), terms are integers in units of 2^(F - bits), summed
exactly (f32 while that is exact, else int32). `round_toward_zero=False` rounds the terms and
the sum to nearest even instead (a what-if; no hardware does this). The insights paper's "limited
accumulation precision" (§3.1.1) is this adder, not an f32 sum cut to 13 bits afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -(1 << 20)   # exponent of zero: below every real one, and sums of two stay in int32
F_FLOOR = -100     # frames below 2^-100 are treated as 2^-100 (keeps 2^(bits - F) normal in f32)
MAX_BITS = 23
# Products per fused loop: XLA fuses GROUP unrolled terms into one loop over [B, R, C], a loop over
# the groups runs them. 16 ran 1.5-2x faster than the whole 32-product block in one fusion and 3x
# faster than 8 (XLA:CPU, [64, 32] x [32, 1024] chains, one process, min of 7; bitwise equal).
GROUP = 16


def exponent(x: jax.Array, emin: int | None = None) -> jax.Array:
  """floor(log2|x|) of f32 `x` as int32 (NEG for zero); `emin` clamps it from below, as the
  hardware reads a subnormal input's exponent (E4M3: -6)."""
  mag = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF)
  e = (mag >> 23) - 127
  if emin is not None:
    e = jnp.maximum(e, emin)
  return jnp.where(mag == 0, NEG, e)


def pow2(e: jax.Array) -> jax.Array:
  """2.0^e as f32 for int32 `e` in the normal range [-126, 127]."""
  return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def keep_bits(s: jax.Array, bits: int, round_toward_zero: bool) -> jax.Array:
  """Integer `s` (int32) cut to `bits` + 1 significant bits (toward zero or to nearest even)."""
  mag = jnp.abs(s)
  width = 32 - jax.lax.clz(mag)                        # significant bits of |s|
  shift = jnp.maximum(width - (bits + 1), 0)
  q = mag >> shift
  if not round_toward_zero:
    rem = mag - (q << shift)
    half = jnp.where(shift > 0, jnp.int32(1) << jnp.maximum(shift - 1, 0), 0)
    up = (shift > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
    q = q + up.astype(jnp.int32)
  return jnp.sign(s) * (q << shift)


def max_block(bits: int) -> int:
  """The largest block whose aligned terms sum exactly in int32 at `bits` fraction bits."""
  return (2 ** 31 - 1 - 2 ** (bits + 1)) // 2 ** (bits + 2)


def block_fma(a: jax.Array, b: jax.Array, c: jax.Array, bits: int = 13,
              round_toward_zero: bool = True, emin_a: int | None = None,
              emin_b: int | None = None) -> jax.Array:
  """c + a . b for one block: `a [B, R, k]`, `b [B, k, C]`, `c [B, R, C]` f32, by the Hopper
  adder with `bits` fraction bits (see the module docstring); `emin_*` clamp the operands'
  exponents as the hardware reads FP8 subnormals (None: f32 values, no clamp)."""
  if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
    raise ValueError(f"bits={bits!r}: must lie in [1, {MAX_BITS}]")
  if a.shape[2] > max_block(bits):
    raise ValueError(f"block of {a.shape[2]} products at {bits} bits: at most {max_block(bits)}")
  k = a.shape[2]
  groups = -(-k // GROUP)
  if groups * GROUP != k:   # zeros have no exponent and add nothing: the result is unchanged
    a = jnp.pad(a, ((0, 0), (0, 0), (0, groups * GROUP - k)))
    b = jnp.pad(b, ((0, 0), (0, groups * GROUP - k), (0, 0)))
  ea, eb = exponent(a, emin_a), exponent(b, emin_b)
  group = lambda x, g, axis: jax.lax.dynamic_slice_in_dim(x, g * GROUP, GROUP, axis)  # noqa: E731

  def frame_of(g, frame):   # GROUP terms unrolled: XLA fuses them into one loop over [B, R, C]
    ea_g, eb_g = group(ea, g, 2), group(eb, g, 1)
    for i in range(GROUP):
      frame = jnp.maximum(frame, ea_g[:, :, i, None] + eb_g[:, None, i, :])
    return frame
  frame = jnp.maximum(jax.lax.fori_loop(0, groups, frame_of, exponent(c)), F_FLOOR)
  up = pow2(bits - frame)                                   # 1 / unit, exact
  rnd = jnp.trunc if round_toward_zero else jnp.round
  exact_f32 = (k + 1) * 2 ** (bits + 2) <= 2 ** 24          # integer-valued f32 sums stay exact

  def sum_of(g, s):         # integer-valued terms: exact in any order
    a_g, b_g = group(a, g, 2), group(b, g, 1)
    for i in range(GROUP):
      t = rnd(a_g[:, :, i, None] * b_g[:, None, i, :] * up)
      s = s + (t if exact_f32 else t.astype(jnp.int32))
    return s
  s = rnd(c * up)
  s = jax.lax.fori_loop(0, groups, sum_of, s if exact_f32 else s.astype(jnp.int32))
  s = keep_bits(s.astype(jnp.int32), bits, round_toward_zero)
  # |s| < 2^(bits + 8): exact in f32 once cut to bits + 1 significant bits; the unit 2^(F - bits)
  # is applied in two exact steps so that neither factor leaves f32's normal range.
  half = (frame - bits) // 2
  return s.astype(jnp.float32) * pow2(half) * pow2(frame - bits - half)
