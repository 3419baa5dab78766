"""The paged latent cache: attention through block tables equals a float64 reference over the
row's positions, paged decoding equals contiguous decoding (logits close, greedy tokens
identical), the allocator never hands a block out twice and gets every block back."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.generate import paged
from deepseek_jax.kernels import cpu as cpu_kernels
from deepseek_jax.mla import FP8_LATENT
from deepseek_jax.model import Transformer, init_model_cache
from tests.helpers import init_model, small_config


@functools.partial(jax.jit, static_argnames=("group",))
def _write_attend(lat_pool, rope_pool, table, new_lat, new_rope, q_lat, q_rope, pos, group):
  cache = paged.PagedLatentCache(lat_pool, rope_pool, table, group)
  return cache.write_and_attend(new_lat, new_rope, q_lat, q_rope, pos, None, 0.5)


@settings(max_examples=8, deadline=None)
@given(P=st.sampled_from([1, 2, 4, 8]), group=st.integers(1, 3), lengths=st.lists(
    st.integers(1, 40), min_size=1, max_size=3), T=st.integers(1, 3), seed=st.integers(0, 99))
def test_attention_through_block_table_equals_reference(P, group, lengths, T, seed):
  """Rows own random disjoint blocks; the new T tokens of each row are written at its length and
  attend causally to everything before them; stale data elsewhere in the pool is never seen."""
  rs = np.random.RandomState(seed)
  B, N, C, R = len(lengths), 2, 4, 2
  MB = -(-(max(lengths) + T) // P) + 1
  NB = B * MB + 1
  lat_pool = rs.randn(NB, P, C).astype(np.float32)   # stale contents everywhere
  rope_pool = rs.randn(NB, P, R).astype(np.float32)
  perm = rs.permutation(np.arange(1, NB))
  table = np.zeros((B, MB), np.int32)
  for b, n in enumerate(lengths):
    need = -(-(n + T) // P)
    table[b, :need] = perm[b * MB:b * MB + need]
  pos = np.array(lengths)[:, None] + np.arange(T)[None]   # [B, T]
  new_lat, new_rope = rs.randn(B, T, C), rs.randn(B, T, R)
  q_lat, q_rope = rs.randn(B, T, N, C), rs.randn(B, T, N, R)
  f32 = lambda x: jnp.asarray(x, jnp.float32)   # noqa: E731
  cache, out = _write_attend(f32(lat_pool), f32(rope_pool), table, f32(new_lat), f32(new_rope),
                             f32(q_lat), f32(q_rope), jnp.asarray(pos, jnp.int32), group)
  lat_all, rope_all = lat_pool.astype(np.float64), rope_pool.astype(np.float64)
  for b in range(B):
    for t in range(T):
      p = pos[b, t]
      lat_all[table[b, p // P], p % P] = new_lat[b, t]
      rope_all[table[b, p // P], p % P] = new_rope[b, t]
  np.testing.assert_allclose(np.asarray(cache.latent_pool)[1:], lat_all[1:], rtol=1e-6)
  for b in range(B):
    S = pos[b, -1] + 1
    keys = np.array([lat_all[table[b, s // P], s % P] for s in range(S)])
    ropes = np.array([rope_all[table[b, s // P], s % P] for s in range(S)])
    for t in range(T):
      s = 0.5 * (np.einsum("nc,sc->ns", q_lat[b, t], keys) + np.einsum("nr,sr->ns", q_rope[b, t],
                                                                        ropes))
      s[:, pos[b, t] + 1:] = -np.inf
      p = np.exp(s - s.max(axis=1, keepdims=True))
      want = (p / p.sum(axis=1, keepdims=True)) @ keys
      np.testing.assert_allclose(np.asarray(out[b, t]), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernel", [True, False])
def test_a_paged_fp8_write_keeps_the_rope_key_in_bf16_and_saturates(kernel):
  """An FP8-latent pool: the rope key is stored in its bf16 pool exactly (not through e4m3), and
  an overflowing latent saturates at +-448 instead of becoming NaN; on XLA's scatter
  (`kernel=False`) as with the CPU kernel's row copy."""
  P, C, R = 4, 8, 4
  cache = paged.PagedLatentCache(jnp.zeros((3, P, C), FP8_LATENT),
                                 jnp.zeros((3, P, R), jnp.bfloat16), jnp.array([[1, 2]], jnp.int32))
  lat = jnp.full((1, 1, C), 1e4, jnp.float32).at[0, 0, 0].set(-1e6)
  rope = jnp.full((1, 1, R), 1.0 + 2**-6, jnp.float32)   # exact in bf16; e4m3 rounds it to 1
  with contextlib.nullcontext() if kernel else cpu_kernels.disabled():
    out = jax.jit(lambda c, a, b, p: c.write(a, b, p, None))(cache, lat, rope, jnp.array([[5]]))
  text = jax.jit(lambda c, a, b, p: c.write(a, b, p, None)).lower(
      cache, lat, rope, jnp.array([[5]])).as_text()
  stored = np.asarray(out.latent_pool[2, 1].astype(jnp.float32))
  np.testing.assert_array_equal(stored, [-448.0] + [448.0] * (C - 1))
  np.testing.assert_array_equal(np.asarray(out.rope_pool[2, 1].astype(jnp.float32)), 1.0 + 2**-6)
  assert not np.asarray(out.latent_pool.astype(jnp.float32))[[0, 1]].any()   # nothing else
  if kernel and cpu_kernels.available():
    assert cpu_kernels.WRITE_TARGET in text


@pytest.fixture(scope="module")
def model():
  cfg = small_config(num_layers=3, first_k_dense_replace=1)
  return cfg, init_model(Transformer(cfg), jnp.zeros((1, 4), jnp.int32))


def test_paged_decoding_equals_contiguous(model, P=4, group=2):
  """Feed a ragged batch token by token (prompts, then 12 greedy tokens) through both caches:
  the same tokens at every step and logits within float32 rounding (blocks of 4 read two at a
  time: the online softmax crosses groups; other sizes and multi-token writes: the hypothesis
  test above and the engine's tests). One shape, so two compiles."""
  cfg, variables = model
  rs = np.random.RandomState(P)
  lengths, steps, S = np.array([13, 5]), 12, 64
  B, MB = len(lengths), S // P
  prompt = rs.randint(0, cfg.vocab_size, (B, 13)).astype(np.int32)
  table = rs.permutation(np.arange(1, B * MB + 1)).reshape(B, MB).astype(np.int32)
  model_fn = jax.jit(lambda v, t, p, c: Transformer(cfg).apply(v, t, p, cache=c))
  logits = {}
  for name in ("paged", "contiguous"):
    cache = (paged.model_cache(paged.init_model_pools(cfg, B * MB + 1, P), table, group)
             if name == "paged" else init_model_cache(cfg, B, S))
    tok, pos, seen = jnp.asarray(prompt[:, 0]), np.zeros(B, np.int32), []
    for _ in range(max(lengths) + steps - 1):
      out = model_fn(variables, tok[:, None], jnp.asarray(pos)[:, None], cache)
      cache, pos = out.cache, pos + 1
      nxt = jnp.argmax(out.logits_BTV[:, 0], -1)
      in_prompt = pos < lengths   # rows still reading their prompt take its next token
      tok = jnp.where(in_prompt, prompt[np.arange(B), np.minimum(pos, 12)], nxt)
      seen.append(out.logits_BTV[:, 0])
    logits[name] = np.stack(seen)
  np.testing.assert_array_equal(logits["paged"].argmax(-1), logits["contiguous"].argmax(-1))
  np.testing.assert_allclose(logits["paged"], logits["contiguous"], rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(2, 12), block_size=st.integers(1, 5),
       ops=st.lists(st.tuples(st.sampled_from(["reserve", "grow", "free"]), st.integers(0, 4),
                              st.integers(1, 30)), max_size=40))
def test_allocator_invariants(num_blocks, block_size, ops):
  """Random reserve/grow/free: no block owned twice, scratch never handed out, a reservation is
  honoured (growing within it never fails), every block back in the pool at the end."""
  pool = paged.BlockPool(num_blocks, block_size)
  promised: dict[int, int] = {}
  for op, owner, tokens in ops:
    if op == "reserve" and owner not in promised:
      if pool.reserve(owner, tokens):
        promised[owner] = tokens
    elif op == "grow" and owner in promised:
      pool.ensure(owner, min(tokens, promised[owner]))   # within its promise: must not fail
    elif op == "free":
      pool.free(owner)
      promised.pop(owner, None)
    held = [b for blocks in pool.owned.values() for b in blocks]
    assert len(held) == len(set(held)) and paged.SCRATCH not in held
    assert all(1 <= b < num_blocks for b in held)
    assert pool.in_use == len(held) and pool.available() >= 0
    for o, blocks in pool.owned.items():
      np.testing.assert_array_equal(pool.table_row(o, 40)[:len(blocks)], blocks)
  for owner in list(pool.owned):
    pool.free(owner)
  assert pool.in_use == 0 and pool.free_count == num_blocks - 1 and not pool.owned


def test_allocator_refuses_when_full_and_bytes_per_token():
  pool = paged.BlockPool(3, 4)
  assert pool.reserve("a", 8) and not pool.reserve("b", 1)
  pool.free("a")
  assert pool.reserve("b", 5)
  with pytest.raises(paged.OutOfBlocks):
    pool.ensure("b", 9)     # beyond the pool (past its reservation)
  cfg = small_config()
  C, R, L = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_layers
  pools = paged.init_model_pools(cfg, 5, 4)
  total = sum(a.nbytes for p in pools.values() if p is not None for a in p)
  assert total == 5 * 4 * paged.bytes_per_token(cfg) == 5 * 4 * (C + R) * L * 4
