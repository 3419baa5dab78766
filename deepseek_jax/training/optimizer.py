"""AdamW with DeepSeek-V3's schedule and numerics (V3 report §4.2; BF16 moments §3.3.4).

Warmup -> constant -> cosine -> constant tail, boundaries as fractions of the run; AdamW (0.9, 0.95,
weight decay 0.1, none on norm weights and biases); global-norm clipping (1.0) before Adam;
optional BF16 moments. Gradient accumulation happens in the train step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.config import TrainConfig

# Leaf names that are never decayed: RMSNorm weights ("weight") and any bias.
_NO_DECAY_NAMES = ("weight",)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Warmup -> constant -> cosine -> constant tail (all boundaries scale with `cfg.steps`)."""
  peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
  warmup = cfg.warmup_steps
  start = max(warmup, int(round(cfg.decay_start_frac * cfg.steps)))
  end = max(start, int(round(cfg.decay_end_frac * cfg.steps)))

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (s + 1.0) / max(warmup, 1))
    frac = jnp.clip((s - start) / max(end - start, 1), 0.0, 1.0)
    cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(math.pi * frac))
    return jnp.where(s < warmup, warm, jnp.where(s < start, peak, cosine))
  return schedule


def decay_mask(params):
  """True where weight decay applies: every matrix-like parameter, not norm weights or biases."""
  def decays(path, _):
    # The last dict key names the parameter (boxes add a trailing '.value' attribute).
    name = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    return name not in _NO_DECAY_NAMES and "bias" not in name
  return jax.tree_util.tree_map_with_path(decays, params)


def with_moment_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """Stores `inner`'s floating-point state in `dtype` (BF16 moments) and updates it in FP32."""
  def cast(tree, to):
    return jax.tree.map(
        lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def init(params):
    return cast(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)
  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip(global norm) -> Adam(b1, b2) [BF16 moments] -> masked decoupled weight decay -> -lr."""
  adam = optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)
  if cfg.bf16_moments:
    adam = with_moment_dtype(adam, jnp.bfloat16)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      adam,
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(lr_schedule(cfg)),
  )
