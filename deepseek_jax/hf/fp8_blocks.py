"""DeepSeek's FP8 checkpoint format: E4M3 weights with 128x128 block scales (V3 report §3.3).

Each quantized linear `X.weight` [out, in] is stored as float8_e4m3fn next to `X.weight_scale_inv`,
float32 of shape (ceil(out/128), ceil(in/128)). The exact rule (`reference/deepseek-semantics.md`
§3) is W[r, c] = float32(q[r, c]) * scale_inv[r // 128, c // 128]: a multiply despite the name,
computed in f32, with partial edge blocks using their own block's scale (`kv_a_proj_with_mqa`,
576 rows in V3, is the one weight that is not 128-aligned). HF's CPU dequantizer infers the block
as rows // scale_rows and is wrong on such weights, so this module computes the rule itself.

Quantization follows the reference: per block scale = amax / 448 (edge blocks are zero-padded,
which does not change their amax) and q = e4m3(w / scale). Dequantize-then-quantize reproduces a
checkpoint's q and scales bit for bit (fl(fl(448 s) / 448) = s in binary32), which the tests check.
Host-side NumPy: checkpoints are converted one tensor at a time.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BLOCK = 128
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0


def grid_shape(shape: tuple[int, int], block: int = BLOCK) -> tuple[int, int]:
  """Scale grid (ceil(rows / block), ceil(cols / block))."""
  return (-(-shape[0] // block), -(-shape[1] // block))


def dequantize(q: np.ndarray, scale_inv: np.ndarray, dtype=np.float32,
               block: int = BLOCK) -> np.ndarray:
  """W = f32(q) * scale_inv[r // block, c // block], cast once to `dtype` at the end."""
  if q.ndim != 2:
    raise ValueError(f"FP8 weight must be 2-d [out, in], got shape {q.shape}")
  want = grid_shape(q.shape, block)
  if tuple(scale_inv.shape) != want:
    raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                     f"{tuple(q.shape)}: expected the ceil grid {want} of {block}x{block} blocks")
  R, C = q.shape
  s = np.asarray(scale_inv, np.float32)
  out = np.empty((R, C), np.float32)
  for i in range(want[0]):  # one block row at a time: no full-size scale array
    rows = slice(i * block, min((i + 1) * block, R))
    out[rows] = q[rows].astype(np.float32) * np.repeat(s[i], block)[:C][None, :]
  return out if np.dtype(dtype) == np.float32 else out.astype(dtype)


def quantize(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """(q float8_e4m3fn [R, C], scale_inv f32 grid) with scale = amax / 448 per block.

  An all-zero block gets scale 1 (the reference would divide 0 by 0)."""
  if w.ndim != 2:
    raise ValueError(f"FP8 weight must be 2-d [out, in], got shape {w.shape}")
  R, C = w.shape
  gr, gc = grid_shape(w.shape, block)
  w32 = np.asarray(w, np.float32)
  padded = np.zeros((gr * block, gc * block), np.float32)
  padded[:R, :C] = w32
  amax = np.abs(padded.reshape(gr, block, gc, block)).max(axis=(1, 3))
  scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
  q = np.empty((R, C), E4M3)
  for i in range(gr):
    rows = slice(i * block, min((i + 1) * block, R))
    q[rows] = (w32[rows] / np.repeat(scale[i], block)[:C][None, :]).astype(E4M3)
  return q, scale
