"""LogFMT-nBit, the logarithmic communication format of Insights §3.2 (ISCA '25).

Per 1x128 tile along the last axis, an n-bit code is a sign bit and an (n-1)-bit index k: 0 codes
zero, 1 the tile's smallest nonzero magnitude, kmax = 2**(n-1) - 1 its largest (both sent as f32
metadata and decoded verbatim), and the codes between are evenly spaced in log space. Values round
to the nearest code in linear space (`rounding='log'` for comparison); inf or NaN make a NaN tile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax.fp8.scaling import TILE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogFmtArray:
  """Encoded `[..., D]`: codes `[..., D]`; per-tile f32 `min_mag`, `max_mag` `[..., ceil(D/T)]`."""
  codes: jax.Array
  min_mag: jax.Array
  max_mag: jax.Array
  n_bits: int = dataclasses.field(metadata=dict(static=True))
  tile: int = dataclasses.field(metadata=dict(static=True))


def _check(n_bits: int, tile: int, rounding: str = "linear") -> None:
  if not (isinstance(n_bits, int) and 3 <= n_bits <= 16):
    raise ValueError(f"logfmt n_bits={n_bits!r}: must be an integer in [3, 16] (a sign bit and "
                     "at least 2 index bits for zero, min and max)")
  if not (isinstance(tile, int) and tile > 0):
    raise ValueError(f"logfmt tile={tile!r}: must be a positive integer")
  if rounding not in ("linear", "log"):
    raise ValueError(f"logfmt rounding={rounding!r}: must be 'linear' (the paper) or 'log'")


def _tiles(x, tile):
  """[..., D] -> [..., nT, T] (zero-padded) and the pad."""
  D = x.shape[-1]
  nT = -(-D // tile)
  pad = nT * tile - D
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (nT, tile)), pad


def _decode_mag(k, mn, mx, kmax):
  """Magnitude of index `k` (int32) for tiles with min `mn`, max `mx` (broadcast)."""
  lmin = jnp.log(mn)
  step = (jnp.log(mx) - lmin) / (kmax - 1)
  mid = jnp.exp(lmin + step * (k - 1).astype(jnp.float32))
  return jnp.where(k == 0, 0.0, jnp.where(k == 1, mn, jnp.where(k == kmax, mx, mid)))


def encode(x: jax.Array, n_bits: int = 8, tile: int = TILE, rounding: str = "linear") -> LogFmtArray:
  """LogFMT-n encoding of `x [..., D]` along its last axis, 1 x `tile` tiles."""
  _check(n_bits, tile, rounding)
  kmax = 2 ** (n_bits - 1) - 1
  x = x.astype(jnp.float32)
  xt, pad = _tiles(x, tile)
  finite = jnp.all(jnp.isfinite(xt), axis=-1, keepdims=True)
  a = jnp.where(jnp.isfinite(xt), jnp.abs(xt), 0.0)
  mx = jnp.max(a, axis=-1, keepdims=True)
  mn = jnp.min(jnp.where(a > 0, a, jnp.inf), axis=-1, keepdims=True)
  mn = jnp.maximum(mn, mx * jnp.float32(2.0 ** -32))
  empty = mx == 0
  mn = jnp.where(empty, 1.0, mn)          # placeholders keep the logs finite; all codes are 0
  mx_safe = jnp.where(empty, 1.0, mx)
  lmin = jnp.log(mn)
  step = (jnp.log(mx_safe) - lmin) / (kmax - 1)
  t = (jnp.log(jnp.where(a > 0, a, mn)) - lmin) / jnp.where(step > 0, step, 1.0)
  k0 = jnp.clip(jnp.round(t).astype(jnp.int32) + 1, 1, kmax)
  cands = [jnp.zeros_like(k0)] + [jnp.clip(k0 + d, 1, kmax) for d in (-1, 0, 1)]
  best_k, best_d = None, None
  for c in cands:
    v = _decode_mag(c, mn, mx_safe, kmax)
    if rounding == "linear":
      d = jnp.abs(a - v)
    else:  # log space: log 0 = -inf, so zero is chosen only for zeros
      d = jnp.where((a > 0) & (v > 0), jnp.abs(jnp.log(jnp.where(a > 0, a, 1.0)) -
                                               jnp.log(jnp.where(v > 0, v, 1.0))),
                    jnp.where((a == 0) & (v == 0), 0.0, jnp.inf))
    if best_k is None:
      best_k, best_d = c, d
    else:
      better = d < best_d
      best_k, best_d = jnp.where(better, c, best_k), jnp.where(better, d, best_d)
  k = jnp.where(a > 0, best_k, 0)
  sign = jnp.signbit(xt).astype(jnp.int32)
  codes = (sign << (n_bits - 1)) | k
  codes = codes.reshape(codes.shape[:-2] + (-1,))
  if pad:
    codes = codes[..., :x.shape[-1]]
  nan = jnp.float32(jnp.nan)
  meta = lambda m: jnp.where(finite, jnp.where(empty, 0.0, m), nan)[..., 0]
  return LogFmtArray(codes.astype(jnp.uint8 if n_bits <= 8 else jnp.uint16), meta(mn), meta(mx),
                     n_bits, tile)


def decode(enc: LogFmtArray) -> jax.Array:
  """f32 values of a LogFMT encoding."""
  n, tile = enc.n_bits, enc.tile
  kmax = 2 ** (n - 1) - 1
  codes = enc.codes.astype(jnp.int32)
  ct, pad = _tiles(codes, tile)
  k = ct & kmax
  negative = (ct >> (n - 1)) & 1
  mn, mx = enc.min_mag[..., None], enc.max_mag[..., None]
  ok = jnp.isfinite(mx) & (mx > 0)
  mag = _decode_mag(k, jnp.where(ok, mn, 1.0), jnp.where(ok, mx, 1.0), kmax)
  mag = jnp.where(jnp.isnan(mx), jnp.nan, jnp.where(ok, mag, 0.0))
  y = jnp.where(negative == 1, -mag, mag)
  y = y.reshape(y.shape[:-2] + (-1,))
  return y[..., :enc.codes.shape[-1]] if pad else y


def roundtrip(x: jax.Array, n_bits: int = 8, tile: int = TILE, rounding: str = "linear"):
  """decode(encode(x)) in x's dtype: what a LogFMT transfer delivers."""
  return decode(encode(x, n_bits, tile, rounding)).astype(x.dtype)


def bits_per_element(n_bits: int, tile: int = TILE) -> float:
  """Wire cost including the two f32 metadata values per tile."""
  return n_bits + 64 / tile


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLogFmt:
  """A LogFMT encoding as it travels: n-bit codes packed into bytes `[..., ceil(D*n/8)]` (bit i
  of code j at bit j*n + i, little-endian), plus the per-tile min and max."""
  packed: jax.Array
  min_mag: jax.Array
  max_mag: jax.Array
  n_bits: int = dataclasses.field(metadata=dict(static=True))
  tile: int = dataclasses.field(metadata=dict(static=True))
  width: int = dataclasses.field(metadata=dict(static=True))   # D, the number of codes per row


def _lanes(k: int, ndim: int, dtype) -> jax.Array:
  """0..k-1 along a new last axis of an ndim-dimensional array (explicit rank, no promotion)."""
  return jnp.arange(k, dtype=dtype).reshape((1,) * (ndim - 1) + (k,))


def pack(enc: LogFmtArray) -> PackedLogFmt:
  """Packs the codes densely: D codes of n bits take ceil(D*n/8) bytes (uint16 storage would
  spend 16 bits on a 10-bit code). Pure bit shuffling, no arithmetic on the values."""
  n, D = enc.n_bits, enc.codes.shape[-1]
  codes = enc.codes.astype(jnp.uint32)
  bits = ((codes[..., None] >> _lanes(n, codes.ndim + 1, jnp.uint32)) & 1).astype(jnp.uint8)
  bits = bits.reshape(bits.shape[:-2] + (D * n,))
  nbytes = -(-D * n // 8)
  if nbytes * 8 != D * n:
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, nbytes * 8 - D * n)])
  bits = bits.reshape(bits.shape[:-1] + (nbytes, 8))
  packed = jnp.sum(bits << _lanes(8, bits.ndim, jnp.uint8), axis=-1, dtype=jnp.uint8)
  return PackedLogFmt(packed, enc.min_mag, enc.max_mag, n, enc.tile, D)


def unpack(p: PackedLogFmt) -> LogFmtArray:
  """Inverse of `pack` (bit-exact)."""
  n, D = p.n_bits, p.width
  bits = (p.packed[..., None] >> _lanes(8, p.packed.ndim + 1, jnp.uint8)) & 1
  bits = bits.reshape(bits.shape[:-2] + (-1,))[..., :D * n].astype(jnp.uint32)
  bits = bits.reshape(bits.shape[:-1] + (D, n))
  codes = jnp.sum(bits << _lanes(n, bits.ndim, jnp.uint32), axis=-1, dtype=jnp.uint32)
  return LogFmtArray(codes.astype(jnp.uint8 if n <= 8 else jnp.uint16), p.min_mag, p.max_mag,
                     n, p.tile)
