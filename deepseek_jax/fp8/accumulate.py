"""GEMM accumulation of quantised operands (V3 report §3.3.2; Insights §3.1.1).

`gemm(a, b, accum)`: the f32 product `[batch, rows, cols]` of two `QArray`s `a [batch, rows, k]`
and `b [batch, k, cols]`, accumulated as `f32` (one dot), `promote(N_C)` (the paper's fix: f32
partial sums promoted every N_C of k), `hopper` (the H100/H200 tensor core bit for bit: 32-product
blocks aligned with the accumulator, 13 bits, toward zero; `blockfma.py`) or `limited` (an older,
milder model: exact f32 sums of 32 products, the running sum cut to 13 bits). `backend='fp8'`
feeds the FP8 bytes to `dot_general`; 'emulate' casts to f32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax.fp8.blockfma import MAX_BITS, block_fma, max_block
from deepseek_jax.fp8.scaling import QArray

MODES = ("f32", "promote", "limited", "hopper")
TENSOR_CORE = ("limited", "hopper")   # modes that model the tensor core's own accumulator
BACKENDS = ("emulate", "fp8")
_BATCHED = (((2,), (1,)), ((0,), (0,)))  # [batch, rows, k] x [batch, k, cols]
UNROLL_MAX_STEPS = 8  # promote slices unrolled statically up to this many, else a fori_loop


@dataclasses.dataclass(frozen=True)
class Accum:
  """Accumulation mode of a GEMM: 'f32', 'promote', 'hopper' or 'limited' (see the factories)."""
  mode: str = "promote"
  interval: int | None = 128       # N_C: promotion interval (hopper/limited: None = never)
  mantissa_bits: int = 13          # hopper/limited: fraction bits of the accumulator
  round_toward_zero: bool = True   # hopper/limited: truncation (else to nearest even)
  kstep: int = 32                  # hopper/limited: products per tensor-core block

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"accum.mode={self.mode!r}: must be one of {MODES}")
    if self.mode == "promote" and not (isinstance(self.interval, int) and self.interval > 0):
      raise ValueError(f"accum.interval={self.interval!r}: promote needs a positive N_C")
    if self.mode in TENSOR_CORE:
      if not (isinstance(self.mantissa_bits, int) and 1 <= self.mantissa_bits <= MAX_BITS):
        raise ValueError(f"accum.mantissa_bits={self.mantissa_bits!r}: must lie in "
                         f"[1, {MAX_BITS}]")
      if not (isinstance(self.kstep, int) and self.kstep > 0):
        raise ValueError(f"accum.kstep={self.kstep!r}: must be a positive integer")
      if self.mode == "hopper" and self.kstep > max_block(self.mantissa_bits):
        raise ValueError(f"accum.kstep={self.kstep}: at {self.mantissa_bits} bits at most "
                         f"{max_block(self.mantissa_bits)} products per block")
      if self.interval is not None and (self.interval <= 0 or self.interval % self.kstep):
        raise ValueError(f"accum.interval={self.interval!r}: must be a positive multiple of "
                         f"kstep={self.kstep} (or None: never promote)")


F32 = Accum("f32", interval=None)


def promote(n_c: int = 128) -> Accum:
  """The paper's fix (DeepGEMM's promotion): an f32 partial sum per N_C-slice of k, scaled and
  added in f32 slice after slice; scales must be constant within a slice."""
  return Accum("promote", interval=n_c)


def limited(mantissa_bits: int = 13, round_toward_zero: bool = True, promote: int | None = None,
            kstep: int = 32) -> Accum:
  """The project's first Hopper model, kept for comparison: products summed `kstep` at a time
  exactly in f32, each chunk added into an accumulator keeping `mantissa_bits` fraction bits,
  truncated or rounded to nearest even; flushed into f32 (times the scales) every `promote` of k,
  or never. No alignment inside a block: it passes the hardware probe that `hopper` fails."""
  return Accum("limited", interval=promote, mantissa_bits=mantissa_bits,
               round_toward_zero=round_toward_zero, kstep=kstep)


def hopper(mantissa_bits: int = 13, round_toward_zero: bool = True, promote: int | None = None,
           kstep: int = 32) -> Accum:
  """The H100/H200 FP8 tensor core (Khattak & Mikaitis, arXiv 2512.07004): each block of `kstep`
  products and the accumulator aligned to their largest exponent, cut to `mantissa_bits`
  fraction bits toward zero (`blockfma.block_fma`); flushed into f32 (times the scales) every
  `promote` of k, or never (None: scales constant along k, or power-of-two scales applied to the
  values as MX formats do)."""
  return Accum("hopper", interval=promote, mantissa_bits=mantissa_bits,
               round_toward_zero=round_toward_zero, kstep=kstep)


def truncate_mantissa(x: jax.Array, mantissa_bits: int, round_toward_zero: bool) -> jax.Array:
  """Keeps `mantissa_bits` fraction bits of f32 `x` (exponent range unchanged)."""
  if not round_toward_zero:
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=mantissa_bits)
  mask = jnp.uint32((0xFFFFFFFF << (23 - mantissa_bits)) & 0xFFFFFFFF)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(bits & mask, jnp.float32)


def _operand(q: QArray, backend: str) -> jax.Array:
  if backend == "fp8" and q.fmt is not None:
    return q.data
  return q.data.astype(jnp.float32)


def _dot(a, b):
  # f32 emulation must not drop to TF32/bf16 passes on GPUs; FP8 operands keep DEFAULT, the
  # precision XLA's FP8 GEMM rewrite expects.
  hi = a.dtype == jnp.float32 and b.dtype == jnp.float32
  kw = dict(precision=jax.lax.Precision.HIGHEST if hi else None,
            preferred_element_type=jnp.float32)
  if a.shape[0] == 1:  # a plain 2-d dot (no batch dim): remat policies and backends prefer it
    return jax.lax.dot_general(a[0], b[0], (((1,), (0,)), ((), ())), **kw)[None]
  return jax.lax.dot_general(a, b, _BATCHED, **kw)


def _k_block(q: QArray, k_axis: int) -> int | None:
  """Scale block length along k, or None when one scale covers all of k."""
  return None if q.scale_inv.shape[k_axis] == 1 else q.blocks[k_axis]


def gemm(a: QArray, b: QArray, accum: Accum, backend: str = "emulate") -> jax.Array:
  """f32 `[batch, rows, cols]` product of quantised `a [batch, rows, k]`, `b [batch, k, cols]`."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
  if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
    raise ValueError(f"gemm: shapes {a.shape} x {b.shape} do not chain as "
                     "[batch, rows, k] x [batch, k, cols]")
  ka, kb = _k_block(a, 2), _k_block(b, 1)
  if accum.mode == "f32":
    if backend == "emulate":
      return _dot(a.dequantize(), b.dequantize())
    if ka is None and kb is None:  # scales factor out of the whole k: rescale the output
      return _dot(a.data, b.data) * (a.scales_full((0, 1)) * b.scales_full((0, 2)))
    accum = promote(max(k for k in (ka, kb) if k is not None))
  if accum.mode in TENSOR_CORE and backend == "fp8":
    raise ValueError(f"accum.mode={accum.mode!r} emulates a hardware accumulator; use "
                     "backend='emulate'")
  interval = accum.interval
  if interval is None:  # hopper/limited without promotion: one accumulator over all of k
    if ka is not None or kb is not None:
      raise ValueError(f"accum={accum.mode}(promote=None) needs scales constant along K (tensor or "
                       "axis granularity): the tensor core cannot apply per-block scales")
    interval = -(-a.shape[2] // accum.kstep) * accum.kstep
  for name, k in (("lhs", ka), ("rhs", kb)):
    if k is not None and k % interval:
      raise ValueError(f"accum interval {interval}: the {name} scale block along k is {k}; "
                       "it must be a multiple of the promotion interval")
  return _promoted(a, b, accum, interval, backend)


def _promoted(a: QArray, b: QArray, accum: Accum, interval: int, backend: str) -> jax.Array:
  batch, rows, k_len = a.shape
  cols = b.shape[2]
  a_data, b_data = _operand(a, backend), _operand(b, backend)
  sa, sb = a.scales_full((0, 1)), b.scales_full((0, 2))   # k keeps its block count
  ka, kb = _k_block(a, 2), _k_block(b, 1)

  def scaled(k0, partial):
    sa_k0 = jax.lax.dynamic_slice_in_dim(sa, 0 if ka is None else k0 // ka, 1, 2)
    sb_k0 = jax.lax.dynamic_slice_in_dim(sb, 0 if kb is None else k0 // kb, 1, 1)
    return partial * (sa_k0 * sb_k0)

  if accum.mode not in TENSOR_CORE:
    # Slices [k0, k0 + N_C) with a shorter last one (no zero padding: a k of 32 or 200 costs
    # what it costs); static up to UNROLL_MAX_STEPS slices, else a loop over the full ones.
    full, rest = divmod(k_len, interval)
    if full + (rest > 0) <= UNROLL_MAX_STEPS:
      out = None
      for k0 in range(0, k_len, interval):
        k1 = min(k0 + interval, k_len)
        term = scaled(k0, _dot(a_data[:, :, k0:k1], b_data[:, k0:k1]))
        out = term if out is None else out + term
      return out
    part = lambda k0: _dot(jax.lax.dynamic_slice_in_dim(a_data, k0, interval, 2),  # noqa: E731
                           jax.lax.dynamic_slice_in_dim(b_data, k0, interval, 1))
    out = jax.lax.fori_loop(1, full, lambda i, o: o + scaled(i * interval, part(i * interval)),
                            scaled(0, part(0)))
    if rest:
      k0 = full * interval
      out = out + scaled(k0, _dot(a_data[:, :, k0:], b_data[:, k0:]))
    return out

  # hopper/limited: kstep-sized tensor-core blocks, zero-padded to whole intervals (zeros add
  # nothing and, having no exponent, align nothing).
  steps = -(-k_len // interval)
  pad = steps * interval - k_len
  if pad:
    a_data = jnp.pad(a_data, ((0, 0), (0, 0), (0, pad)))
    b_data = jnp.pad(b_data, ((0, 0), (0, pad), (0, 0)))
  chunks = interval // accum.kstep
  chunk = interval // chunks

  emin = lambda q: None if q.fmt is None else 2 - 2 ** (q.fmt.exponent_bits - 1)  # noqa: E731

  def slice_partial(k0):
    def add_chunk(c, acc):
      a_blk = jax.lax.dynamic_slice_in_dim(a_data, k0 + c * chunk, chunk, 2)
      b_blk = jax.lax.dynamic_slice_in_dim(b_data, k0 + c * chunk, chunk, 1)
      if accum.mode == "hopper":
        return block_fma(a_blk, b_blk, acc, accum.mantissa_bits, accum.round_toward_zero,
                         emin(a), emin(b))
      return truncate_mantissa(acc + _dot(a_blk, b_blk), accum.mantissa_bits,
                               accum.round_toward_zero)
    return jax.lax.fori_loop(0, chunks, add_chunk, jnp.zeros((batch, rows, cols), jnp.float32))

  return jax.lax.fori_loop(1, steps, lambda i, out: out + scaled(i * interval, slice_partial(
      i * interval)), scaled(0, slice_partial(0)))
