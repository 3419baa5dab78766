"""MLA: absorbed latent-cache decoding equals the expanded training path; cache size; ragged batches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from deepseek_jax import mla
from deepseek_jax.model import Transformer, init_model_cache
from tests.helpers import init_model, mla_configs, random_tokens, small_config


def _decode_all(model, variables, tokens_BT, prefill: int, chunk: int, max_len: int):
  """Prefill `prefill` tokens, then decode the rest `chunk` tokens per step; returns all logits."""
  B, T = tokens_BT.shape
  cache = init_model_cache(model.cfg, B, max_len)
  step = jax.jit(lambda v, t, p, c: model.apply(v, t, positions_BT=p, cache=c))
  out = []
  for start in [0] + list(range(prefill, T, chunk)):
    stop = prefill if start == 0 else min(start + chunk, T)
    pos = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32)[None], (B, stop - start))
    o = step(variables, tokens_BT[:, start:stop], pos, cache)
    cache = o.cache
    out.append(o.logits_BTV)
  return jnp.concatenate(out, axis=1)


@settings(max_examples=4)
@given(cfg=mla_configs(), prefill=st.integers(1, 6), chunk=st.integers(1, 3), absorb=st.booleans())
def test_cached_decode_equals_full_forward(cfg, prefill, chunk, absorb):
  T = 9
  tokens = random_tokens(cfg, 2, T)
  model = Transformer(cfg, absorb=absorb)
  variables = init_model(model, tokens)
  full = jax.jit(model.apply)(variables, tokens).logits_BTV   # compiled: eager ops cost more
  dec = _decode_all(model, variables, tokens, prefill, chunk, max_len=12)
  scale = float(jnp.max(jnp.abs(full)))
  np.testing.assert_allclose(np.asarray(dec), np.asarray(full), atol=1e-5 * max(scale, 1.0))


def test_absorbed_equals_expanded_decode_step():
  cfg = small_config(first_k_dense_replace=2, q_lora_rank=None)
  tokens = random_tokens(cfg, 3, 8)
  variables = init_model(Transformer(cfg), tokens)
  cache = init_model_cache(cfg, 3, 8)
  apply = lambda absorb: jax.jit(Transformer(cfg, absorb=absorb).apply)  # noqa: E731
  pre = apply(False)(variables, tokens[:, :7], cache=cache)
  pos = jnp.full((3, 1), 7, jnp.int32)
  a = apply(True)(variables, tokens[:, 7:], positions_BT=pos, cache=pre.cache)
  e = apply(False)(variables, tokens[:, 7:], positions_BT=pos, cache=pre.cache)
  np.testing.assert_allclose(np.asarray(a.logits_BTV), np.asarray(e.logits_BTV), atol=1e-5)
  # Layer 0 writes identical latents; later layers see inputs that differ by f32 round-off.
  for x, y in zip(jax.tree.leaves(a.cache), jax.tree.leaves(e.cache)):
    np.testing.assert_array_equal(np.asarray(x[0]), np.asarray(y[0]))
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_ragged_positions_per_row():
  """Rows at different positions in one decode step each match their own full forward."""
  cfg = small_config(first_k_dense_replace=2)
  tokens = random_tokens(cfg, 2, 10)
  model = Transformer(cfg)
  variables = init_model(model, tokens)
  apply = jax.jit(model.apply)
  full = apply(variables, tokens).logits_BTV
  cache = init_model_cache(cfg, 2, 12)
  cache = apply(variables, tokens[:, :8], cache=cache).cache  # row 1 later ignores slots >= 5
  pos = jnp.asarray([[8], [5]], jnp.int32)
  step_tokens = jnp.stack([tokens[0, 8:9], tokens[1, 5:6]])
  out = apply(variables, step_tokens, positions_BT=pos, cache=cache).logits_BTV
  np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(full[0, 8]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[1, 0]), np.asarray(full[1, 5]), atol=1e-5)


@given(cfg=mla_configs())
@settings(max_examples=8)
def test_cache_holds_exactly_c_plus_r_per_layer(cfg):
  cache = init_model_cache(cfg, batch=1, max_len=1)
  values = sum(x.size for x in jax.tree.leaves(cache))
  assert values == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_layers == cfg.cache_values_per_token


# Unrolled writes (3 rows) and the loop (UNROLL_ROWS + 1), each under one layer layout; the two
# other combinations run with -m slow.
@pytest.mark.parametrize("rows, scan", [
    (3, True), (mla.UNROLL_ROWS + 1, False),
    pytest.param(3, False, marks=pytest.mark.slow),
    pytest.param(mla.UNROLL_ROWS + 1, True, marks=pytest.mark.slow)])
def test_stack_writes_touch_only_the_new_slots(rows, scan):
  """The decode path writes each row's new latents into the `[L, B, S, .]` stack in place: every
  other slot keeps its bits, and the step's logits match the full forward at ragged positions."""
  cfg = dataclasses.replace(small_config(first_k_dense_replace=1), scan_layers=scan)
  T = 7
  tokens = random_tokens(cfg, rows, T)
  model = Transformer(cfg)
  variables = init_model(model, tokens)
  full = jax.jit(model.apply)(variables, tokens).logits_BTV
  cache = init_model_cache(cfg, rows, T + 1)
  cache = jax.jit(lambda v, t, c: model.apply(v, t, cache=c).cache)(variables, tokens, cache)
  pos_B = jnp.asarray([(3 * b) % T for b in range(rows)], jnp.int32)   # ragged
  step_tokens = tokens[jnp.arange(rows), pos_B][:, None]
  out = jax.jit(lambda v, t, p, c: model.apply(v, t, positions_BT=p, cache=c))(
      variables, step_tokens, pos_B[:, None], cache)
  want = full[jnp.arange(rows), pos_B]
  np.testing.assert_allclose(np.asarray(out.logits_BTV[:, 0]), np.asarray(want), atol=1e-5)
  for old, new in zip(jax.tree.leaves(cache), jax.tree.leaves(out.cache)):
    old, new = np.asarray(old), np.asarray(new)                          # [L, B, S, F]
    written = np.zeros(old.shape[:3], bool)
    written[:, np.arange(rows), np.asarray(pos_B)] = True
    np.testing.assert_array_equal(new[~written], old[~written])
    # The slot was already filled by the prefill with the same token: rewritten to round-off.
    np.testing.assert_allclose(new[written], old[written], atol=1e-5)

