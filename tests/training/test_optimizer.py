"""AdamW, the V3-shaped schedule, the decay mask and BF16 moments (V3 report §4.2, §3.3.4)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.config import TrainConfig
from deepseek_jax.model import Transformer
from deepseek_jax.training import optimizer
from tests.training.conftest import small_config


def test_schedule_has_the_v3_shape():
  cfg = TrainConfig(steps=1000, learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=100,
                    decay_start_frac=0.5, decay_end_frac=0.9)
  lr = np.asarray(jax.jit(jax.vmap(optimizer.lr_schedule(cfg)))(jnp.arange(1000)))
  assert lr[0] == pytest.approx(1e-5, rel=1e-5)                  # (0 + 1) / 100 of the peak
  assert np.all(np.diff(lr[:100]) > 0)                           # linear warmup
  assert np.allclose(lr[99:501], 1e-3)                           # constant at the peak
  assert np.all(np.diff(lr[500:900]) < 0)                        # cosine decay
  assert lr[700] == pytest.approx(0.55e-3, rel=1e-4)             # cosine midpoint
  assert np.allclose(lr[900:], 1e-4)                             # constant tail at min_lr


def test_decay_mask_skips_norms_and_biases():
  model = Transformer(small_config().model)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                    jnp.zeros((1, 4), jnp.int32))["params"])
  mask = optimizer.decay_mask(params)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  norms = [p for p in flat if p.endswith("norm/weight") or "layernorm" in p]
  assert norms and not any(flat[p] for p in norms)
  for p in ("embed_tokens/embedding", "lm_head/kernel", "moe_blocks/layers/mlp/experts/gate_proj",
            "moe_blocks/layers/mlp/gate/kernel", "self_attn/kv_a_proj_with_mqa/kernel"):
    matches = [k for k in flat if p in k]
    assert matches and all(flat[k] for k in matches), p


def test_weight_decay_is_decoupled_and_masked():
  cfg = TrainConfig(steps=10, learning_rate=0.1, warmup_steps=0, weight_decay=0.5,
                    decay_start_frac=1.0, decay_end_frac=1.0)
  tx = optimizer.make_optimizer(cfg)
  params = {"dense": {"kernel": jnp.ones((2, 2))}, "norm": {"weight": jnp.ones((2,))},
            "bias": jnp.ones((2,))}

  @jax.jit
  def step(params):
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    return optax.apply_updates(params, updates)
  new = step(params)
  np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5)   # w -= lr * wd * w
  np.testing.assert_array_equal(new["norm"]["weight"], 1.0)
  np.testing.assert_array_equal(new["bias"], 1.0)


def test_gradient_clipping_bounds_the_first_step():
  cfg = TrainConfig(steps=10, learning_rate=1.0, warmup_steps=0, weight_decay=0.0, grad_clip=1.0,
                    adam_b1=0.0, adam_b2=0.0, decay_start_frac=1.0, decay_end_frac=1.0)
  tx = optimizer.make_optimizer(cfg)
  p = {"w": jnp.zeros((4,))}
  g = {"w": jnp.asarray([300.0, -400.0, 0.0, 0.0])}
  inner = optax.clip_by_global_norm(1.0)

  @jax.jit
  def norms(g, p):
    clipped, _ = inner.update(g, inner.init(p))
    updates, _ = tx.update(g, tx.init(p), p)   # Adam with b=0 is sign-like: |u| <= lr
    return optax.global_norm(clipped), jnp.max(jnp.abs(updates["w"]))
  clipped_norm, max_update = norms(g, p)
  assert float(clipped_norm) == pytest.approx(1.0, rel=1e-6)
  assert float(max_update) <= 1.0 + 1e-6


def test_bf16_moments_are_stored_in_bf16_and_track_f32():
  base = dict(steps=50, learning_rate=1e-2, warmup_steps=0, decay_start_frac=1.0,
              decay_end_frac=1.0)
  tx32 = optimizer.make_optimizer(TrainConfig(**base))
  tx16 = optimizer.make_optimizer(TrainConfig(**base, bf16_moments=True))
  target = jnp.linspace(-1, 1, 64)
  loss = lambda p: jnp.sum((p["w"] - target) ** 2)  # noqa: E731
  p32 = p16 = {"w": jnp.zeros((64,))}
  s32, s16 = tx32.init(p32), tx16.init(p16)
  floats = [x for x in jax.tree.leaves(s16) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.bfloat16 for x in floats)

  @jax.jit
  def train(p32, s32, p16, s16):
    def body(_, c):
      p32, s32, p16, s16 = c
      u, s32 = tx32.update(jax.grad(loss)(p32), s32, p32)
      u16, s16 = tx16.update(jax.grad(loss)(p16), s16, p16)
      return optax.apply_updates(p32, u), s32, optax.apply_updates(p16, u16), s16
    return jax.lax.fori_loop(0, 30, body, (p32, s32, p16, s16))
  p32, s32, p16, s16 = train(p32, s32, p16, s16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(s16)
             if jnp.issubdtype(x.dtype, jnp.floating))
  assert p16["w"].dtype == jnp.float32
  np.testing.assert_allclose(p16["w"], p32["w"], atol=2e-2)
  assert float(jnp.sum((p16["w"] - target) ** 2)) < 0.5 * float(jnp.sum(target ** 2))
