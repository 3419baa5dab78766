"""Rotary position embedding with interleaved pairs and YaRN (V3 report §2.1.1, §4.3; YaRN paper).

Pair j of the rope slice is (x[2j], x[2j+1]) rotated by angle pos * f_j, as in the released
weights (HF's rotate-half on the raw layout is wrong for them). With YaRN, frequencies below the
low correction dim keep f_j, above the high one use f_j / factor, and pairs between blend linearly;
the attention temperature mscale^2 is folded into the softmax scale, not into cos/sin.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig, YarnConfig, yarn_mscale


def yarn_correction_range(dim: int, theta: float, yarn: YarnConfig) -> tuple[float, float]:
  """(low, high) pair indices of the YaRN ramp: floor/ceil of the correction dims, clamped."""
  def corr(rot: float) -> float:
    return dim * math.log(yarn.original_max_position_embeddings / (rot * 2 * math.pi)) / (
        2 * math.log(theta))
  low = max(math.floor(corr(yarn.beta_fast)), 0)
  high = min(math.ceil(corr(yarn.beta_slow)), dim - 1)
  return float(low), float(high if high != low else high + 0.001)


def inv_frequencies(dim: int, theta: float, yarn: YarnConfig | None) -> np.ndarray:
  """Per-pair angular frequencies f_j, j in [0, dim/2), in float64."""
  freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  if yarn is None:
    return freqs
  low, high = yarn_correction_range(dim, theta, yarn)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  smooth = 1.0 - ramp
  return freqs / yarn.factor * (1.0 - smooth) + freqs * smooth


def cos_sin_scale(yarn: YarnConfig | None) -> float:
  """HF multiplies cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for V3)."""
  if yarn is None:
    return 1.0
  return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)


def softmax_scale(cfg: ModelConfig) -> float:
  """qk_head_dim^-0.5, times mscale^2 under YaRN (V3: 192^-0.5 * 1.368888^2 = 0.1352338)."""
  scale = cfg.qk_head_dim ** -0.5
  if cfg.yarn is not None:
    m = yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim)
    scale *= m * m
  return scale


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Rotates interleaved pairs of the last axis of `x` [B, T, ..., R] at `positions` [B, T].

  Angles and the rotation are computed in f32 and the result cast back to x's dtype.
  """
  R = x.shape[-1]
  inv_freq = jnp.asarray(inv_frequencies(R, cfg.rope_theta, cfg.yarn), jnp.float32)
  angle_BTr = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # r = R/2 pairs
  scale = cos_sin_scale(cfg.yarn)
  cos, sin = jnp.cos(angle_BTr) * scale, jnp.sin(angle_BTr) * scale
  extra = x.ndim - angle_BTr.ndim  # broadcast over head axes between T and R
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
  sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
  x32 = x.astype(jnp.float32)
  even, odd = x32[..., 0::2], x32[..., 1::2]
  rot_even = even * cos - odd * sin
  rot_odd = even * sin + odd * cos
  return jnp.stack([rot_even, rot_odd], axis=-1).reshape(x.shape).astype(x.dtype)
