"""NumPy references for the FP8 tests: the quantiser and the promoted GEMM, written independently
of the JAX code from the rules in `deepseek_jax/fp8/scaling.py` and `accumulate.py`."""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
TINY = np.finfo(np.float32).tiny


def blocks(granularity: str, shape, contract: int, tile: int = 128):
  B, R, C = shape
  if granularity == "tensor":
    return (B, R, C)
  if granularity == "axis":
    return (1, R, 1) if contract == 1 else (1, 1, C)
  if granularity == "tile":
    return (1, min(tile, R), 1) if contract == 1 else (1, 1, min(tile, C))
  return (1, min(tile, R), min(tile, C))


def expand(s, blk, shape):
  for ax in range(3):
    s = np.repeat(s, blk[ax], axis=ax)
  return s[:shape[0], :shape[1], :shape[2]]


def pow2_ceil(s):
  m, e = np.frexp(s)
  up = np.ldexp(np.ones_like(s), e).astype(F32)
  return np.where(np.isfinite(s), np.where(m == 0.5, s, up), s).astype(F32)


def quantize(x, np_dtype, fmt_max, blk, amax_floor, pow2):
  """(data as np_dtype, scale_inv f32) by the documented rules, in float32 NumPy."""
  with np.errstate(all="ignore"):
    x = np.asarray(x, F32)
    x = np.where(np.abs(x) < TINY, np.copysign(F32(0), x), x)    # XLA:CPU: denormals are zero
    n = [-(-d // b) for d, b in zip(x.shape, blk)]
    a = np.pad(np.abs(x), [(0, k * b - d) for d, b, k in zip(x.shape, blk, n)])
    a = a.reshape(n[0], blk[0], n[1], blk[1], n[2], blk[2]).max(axis=(1, 3, 5))
    s = (np.maximum(a, F32(amax_floor)) * F32(1.0 / fmt_max)).astype(F32)
    if pow2:
      s = pow2_ceil(s)
    y = (x / expand(s, blk, x.shape)).astype(F32)
    data = np.clip(y, -fmt_max, fmt_max).astype(np_dtype)
  return data, s


def dequantize(data, s, blk):
  return data.astype(F32) * expand(s, blk, data.shape)


def promoted_gemm(a_data, sa, blk_a, b_data, sb, blk_b, n_c):
  """[B,M,K] x [B,K,N]: per N_C-slice partial (float64 then rounded to f32), then
  out = partial_0 * s_0, out = out + partial_k * s_k in f32, slice after slice."""
  B, M, K = a_data.shape
  N = b_data.shape[2]
  a = a_data.astype(np.float64)
  b = b_data.astype(np.float64)
  sa_full = expand(sa, (blk_a[0], blk_a[1], 1), (B, M, sa.shape[2]))
  sb_full = expand(sb, (blk_b[0], 1, blk_b[2]), (B, sb.shape[1], N))
  out = None
  for k0 in range(0, K, n_c):
    part = np.einsum("bmk,bkn->bmn", a[:, :, k0:k0 + n_c], b[:, k0:k0 + n_c]).astype(F32)
    ia = 0 if sa.shape[2] == 1 else k0 // blk_a[2]
    ib = 0 if sb.shape[1] == 1 else k0 // blk_b[1]
    s = (sa_full[:, :, ia:ia + 1] * sb_full[:, ib:ib + 1, :]).astype(F32)
    term = (part * s).astype(F32)
    out = term if out is None else (out + term).astype(F32)
  return out


def e4m3(x):
  return np.asarray(x, F32).astype(ml_dtypes.float8_e4m3fn)


def sqnr_db(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return 10 * np.log10(np.sum(ref ** 2) / np.sum((y - ref) ** 2))
