"""The absorbed decode's attention on the latent cache (`mla.latent_attention`): equal to a float64
softmax over each query's visible slots, blocks past the furthest query never read, the decode-
layout weights used when given, and the FP8 latent cache's error bounded."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings, strategies as st

from deepseek_jax import mla
from deepseek_jax.kernels import cpu as cpu_kernels
from deepseek_jax.model import Transformer, init_model_cache
from tests.helpers import init_model, random_tokens, small_config


def _reference(q_lat, q_rope, lat, rope, pos, scale):
  """float64: softmax over slots s <= pos[b, t] of scale (q_lat . c_s + q_rope . k_s), times c."""
  q_lat, q_rope, lat, rope = (np.asarray(x, np.float64) for x in (q_lat, q_rope, lat, rope))
  s = scale * (np.einsum("btnc,bsc->btns", q_lat, lat) + np.einsum("btnr,bsr->btns", q_rope, rope))
  visible = np.arange(lat.shape[1])[None, None, None, :] <= np.asarray(pos)[:, :, None, None]
  s = np.where(visible, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("btns,bsc->btnc", p / p.sum(-1, keepdims=True), lat)


_attend = jax.jit(mla.latent_attention, static_argnames=("block",))


def _blocked(*args, **kw):
  with cpu_kernels.disabled():   # XLA's blocked loop even where the CPU kernel would take the call
    return mla.latent_attention(*args, **kw)


_attend_blocked = jax.jit(_blocked, static_argnames=("block",))


# Shapes come from a few sets so that examples share compiles (each set: a single row and head;
# a decode batch with several heads; several query tokens and heads). The explicit examples pin
# the edge cases whatever the profile draws: one block holding all S slots, a partial last block
# (the clamped, overlapping read) and blocks of one slot, stacked and not.
@settings(deadline=None)
@example(shape=(1, 1, 1, 4, 2), S=3, block=64, stacked=True, seed=1, blocked=True)
@example(shape=(3, 1, 2, 8, 4), S=17, block=5, stacked=False, seed=2, blocked=True)
@example(shape=(2, 3, 3, 8, 2), S=40, block=1, stacked=True, seed=3, blocked=True)
@given(shape=st.sampled_from([(1, 1, 1, 4, 2), (3, 1, 2, 8, 4), (2, 3, 3, 8, 2)]),
       S=st.sampled_from([3, 17, 40]), block=st.sampled_from([1, 5, 16, 64]),
       stacked=st.booleans(), seed=st.integers(0, 2**16), blocked=st.booleans())
def test_blocks_with_online_softmax_equal_the_float64_softmax(shape, S, block, stacked, seed,
                                                              blocked):
  """XLA's blocked loop (`blocked`), or whichever path the platform takes (the CPU kernel where
  it is built)."""
  B, T, N, C, R = shape
  rng = np.random.default_rng(seed)
  T = min(T, S)
  start = rng.integers(0, S - T + 1, B)
  pos = (start[:, None] + np.arange(T)[None, :]).astype(np.int32)   # contiguous per row
  q_lat, q_rope = rng.normal(size=(B, T, N, C)), rng.normal(size=(B, T, N, R))
  lat, rope = rng.normal(size=(B, S, C)), rng.normal(size=(B, S, R))
  # Slots in blocks past the furthest query's are never read: NaN there must not show.
  read_upto = (int(pos.max()) // min(block, S) + 1) * min(block, S)
  if read_upto < S:
    lat[:, read_upto:], rope[:, read_upto:] = np.nan, np.nan
  want = _reference(q_lat, q_rope, np.nan_to_num(lat), np.nan_to_num(rope), pos, 0.3)
  cache = mla.LatentCache(jnp.asarray(lat, jnp.float32), jnp.asarray(rope, jnp.float32))
  layer = None
  if stacked:   # layer 1 of a 2-layer stack; layer 0 is garbage
    cache = mla.LatentCache(*(jnp.stack([jnp.full_like(x, 7.0), x]) for x in cache))
    layer = jnp.int32(1)
  attend = _attend_blocked if blocked else _attend
  got = attend(jnp.asarray(q_lat, jnp.float32), jnp.asarray(q_rope, jnp.float32), cache,
               jnp.asarray(pos), layer, 0.3, block=block)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  return jax.jit(Transformer(cfg).apply)


def _decode_logits(cfg, variables, tokens, dtype=None):
  """One cached call over all tokens (each is written to the cache, then attends from it, in the
  cache's dtype, as in prefill + decode): the last token's logits [B, V]."""
  B, T = tokens.shape
  return _apply(cfg)(variables, tokens, cache=init_model_cache(cfg, B, T, dtype)).logits_BTV[:, -1]


@functools.lru_cache(maxsize=None)
def _small_model():
  """(cfg, tokens, variables, f32-cache logits), built and compiled once for the tests below."""
  cfg = small_config()
  tokens = random_tokens(cfg, 2, 12)
  variables = init_model(Transformer(cfg), tokens)
  return cfg, tokens, variables, _decode_logits(cfg, variables, tokens)


def test_decode_layout_weights_are_read_when_given():
  cfg, tokens, variables, base = _small_model()
  laid = mla.absorbed_weights(cfg, variables)
  np.testing.assert_allclose(np.asarray(_decode_logits(cfg, laid, tokens)), np.asarray(base),
                             atol=1e-5)
  flat = flax.traverse_util.flatten_dict(laid[mla.ABSORBED])
  assert {k[-1] for k in flat} == {"w_uk_NHC", "w_uv_NCJ"} and len(flat) == 2 * 2  # 2 stacks
  zeroed = dict(laid, **{mla.ABSORBED: jax.tree.map(jnp.zeros_like, laid[mla.ABSORBED])})
  assert not np.allclose(np.asarray(_decode_logits(cfg, zeroed, tokens)), np.asarray(base))


def test_fp8_latent_cache_is_smaller_saturates_and_stays_close():
  cfg, tokens, variables, ref = _small_model()
  cache = init_model_cache(cfg, 1, 4, mla.FP8_LATENT)["moe"]
  assert cache.latent_BSC.dtype == mla.FP8_LATENT and cache.rope_BSR.dtype == jnp.bfloat16
  big = jnp.full((1, 1, cfg.kv_lora_rank), 1e6)
  written = mla._write(cache.latent_BSC[0], big, jnp.zeros((1,), jnp.int32))
  assert float(written[0, 0, 0].astype(jnp.float32)) == float(jnp.finfo(mla.FP8_LATENT).max)
  ref = np.asarray(ref, np.float64)
  for dtype, bound in ((jnp.bfloat16, 2e-2), (mla.FP8_LATENT, 1e-1)):
    got = np.asarray(_decode_logits(cfg, variables, tokens, dtype), np.float64)
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert 0 < err < bound, (dtype, err)
