"""The CPU latent decode kernel (`kernels/cpu.py`, `latent_decode.cc`): the float64 softmax over
each query's visible slots for every cache dtype it reads, any row count and width (the 8-lane
padding), rows split across threads, rows that see nothing; the same decode as XLA's blocked loop;
and XLA's path wherever it does not apply or cannot be built."""

import functools
import os
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from deepseek_jax import mla
from deepseek_jax.kernels import cpu as cpu_kernels
from deepseek_jax.model import Transformer, init_model_cache
from tests.helpers import init_model, random_tokens, small_config


@pytest.fixture(scope="module", autouse=True)
def _kernel():
  if not cpu_kernels.available():
    compiler = shutil.which(shlex.split(os.environ.get("CXX", "c++"))[0])
    if compiler and os.environ.get(cpu_kernels.ENABLE_ENV, "1") != "0":   # a broken source
      pytest.fail(f"the CPU kernel did not build with {compiler}: {cpu_kernels.build_error}")
    pytest.skip("the CPU kernel is not built here (no C++ compiler, or "
                f"{cpu_kernels.ENABLE_ENV}=0): the model runs XLA's path")


DTYPES = {"f32": (jnp.float32, jnp.float32), "bf16": (jnp.bfloat16, jnp.bfloat16),
          "fp8 latent": (jnp.float8_e4m3fn, jnp.bfloat16)}


def _reference(q_lat, q_rope, lat, rope, pos, scale):
  """float64 over the cache as stored: softmax over slots s <= pos of scale (q . c + q_R . k_R)
  times c; zeros for a query that sees no slot."""
  q_lat, q_rope, lat, rope = (np.asarray(x, np.float64) for x in (q_lat, q_rope, lat, rope))
  s = scale * (np.einsum("btnc,bsc->btns", q_lat, lat) + np.einsum("btnr,bsr->btns", q_rope, rope))
  visible = np.arange(lat.shape[1])[None, None, None, :] <= np.asarray(pos)[:, :, None, None]
  s = np.where(visible, s, -np.inf)
  top = np.where(visible.any(-1, keepdims=True), s.max(-1, keepdims=True), 0.0)
  p = np.exp(s - top)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("btns,bsc->btnc", p, lat)


@functools.partial(jax.jit, static_argnames=("layer",))
def _kernel_call(q_lat, q_rope, lat, rope, pos, layer, table=None):
  return cpu_kernels.latent_decode(q_lat, q_rope, lat, rope, pos, layer, 0.25, table=table)


def _paged(x_BSW, P, rng):
  """x [B, S, W] scattered into a pool [NB, P, W] of shuffled blocks (block 0 unused, the rest
  NaN-free zeros past S) and the table [B, MB] that reads it back."""
  B, S, W = x_BSW.shape
  MB = -(-S // P)
  padded = jnp.pad(x_BSW, ((0, 0), (0, MB * P - S), (0, 0))).reshape(B * MB, P, W)
  order = rng.permutation(B * MB) + 1
  pool = jnp.zeros((B * MB + 1, P, W), x_BSW.dtype).at[order].set(padded)
  return pool, jnp.asarray(order.reshape(B, MB), jnp.int32)


@settings(deadline=None, max_examples=30)
@example(B=1, T=1, N=4, C=64, R=16, S=3000, dtype="f32", stacked=False, block=None, seed=0)
@example(B=2, T=2, N=3, C=13, R=3, S=5, dtype="bf16", stacked=True, block=None, seed=1)
@example(B=1, T=1, N=1, C=8, R=8, S=1, dtype="fp8 latent", stacked=True, block=4, seed=2)
@example(B=3, T=1, N=4, C=64, R=16, S=1100, dtype="f32", stacked=True, block=16, seed=3)
@given(B=st.integers(1, 3), T=st.integers(1, 2), N=st.integers(1, 6),
       C=st.sampled_from([4, 8, 13, 64]), R=st.sampled_from([2, 8, 16]),
       S=st.integers(1, 1200), dtype=st.sampled_from(sorted(DTYPES)), stacked=st.booleans(),
       block=st.sampled_from([None, 1, 4, 16]), seed=st.integers(0, 2**16))
def test_kernel_is_the_float64_softmax(B, T, N, C, R, S, dtype, stacked, block, seed):
  """Contiguous (`block` None: example 0 splits its row into 3 thread items) or paged with
  blocks of `block` slots in a shuffled pool; ragged widths (example 1) pad to 8 lanes."""
  rng = np.random.default_rng(seed)
  lat_dt, rope_dt = DTYPES[dtype]
  q_lat, q_rope = rng.normal(size=(B, T, N, C)), rng.normal(size=(B, T, N, R))
  lat = jnp.asarray(rng.normal(size=(B, S, C)), jnp.float32).astype(lat_dt)
  rope = jnp.asarray(rng.normal(size=(B, S, R)), jnp.float32).astype(rope_dt)
  # Any position: before the first slot (sees nothing), inside, and past the end (sees all S).
  pos = rng.integers(-1, S + 3, (B, T)).astype(np.int32)
  table = None
  if block is not None:   # the last block's slots past S are zeros, readable like any other
    pad = ((0, 0), (0, -S % block), (0, 0))
    lat, rope = jnp.pad(lat, pad), jnp.pad(rope, pad)
  want = _reference(q_lat, q_rope, lat.astype(jnp.float32), rope.astype(jnp.float32), pos, 0.25)
  if block is not None:
    (lat, table), (rope, _) = _paged(lat, block, np.random.default_rng(seed)), _paged(
        rope, block, np.random.default_rng(seed))
  layer = 0
  if stacked:   # layer 1 of a 3-layer stack; the others hold NaN, which must not be read
    lat, rope = (jnp.stack([jnp.full_like(x, jnp.nan), x, jnp.full_like(x, jnp.nan)])
                 for x in (lat, rope))
    layer = 1
  got = _kernel_call(jnp.asarray(q_lat, jnp.float32), jnp.asarray(q_rope, jnp.float32), lat, rope,
                     jnp.asarray(pos), layer, table)
  np.testing.assert_allclose(np.asarray(got), want, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("S,nan_slots", [(1, slice(0, 1)), (2048, slice(0, 1024)),
                                          (300, slice(299, 300))])
def test_a_nan_in_a_visible_slot_is_not_dropped(S, nan_slots):
  """A NaN cache row a query sees makes its output NaN, as XLA's softmax does, also where the
  NaN slots are a whole thread item of their own (S=2048: two items, the first all NaN)."""
  rng = np.random.default_rng(0)
  lat = rng.normal(size=(1, S, 8)).astype(np.float32)
  lat[:, nan_slots] = np.nan
  q = jnp.asarray(rng.normal(size=(1, 1, 4, 8)), jnp.float32)
  got = _kernel_call(q, jnp.zeros((1, 1, 4, 8)), jnp.asarray(lat), jnp.zeros((1, S, 8)),
                     jnp.full((1, 1), S - 1, jnp.int32), 0)
  assert np.isnan(np.asarray(got)).all()


@pytest.mark.parametrize("C", [256, 254])
@pytest.mark.parametrize("nan", [False, True])
def test_every_e4m3_byte_is_read_as_its_value(C, nan):
  """One visible slot: the output is that slot's latent row (a softmax over one slot is 1), so
  every finite e4m3fn byte (both zeros, the subnormals, +-448) must come back as its value,
  through the eight-lane decode and (C=254) the scalar tail; a NaN byte makes the output NaN."""
  codes = np.arange(256, dtype=np.uint8)
  row = np.concatenate([codes[(codes & 0x7F) != 0x7F], np.array([0x80, 0], np.uint8)])[:C]
  if nan:
    row[C // 2] = 0xFF
  lat = jnp.asarray(row.view(jnp.float8_e4m3fn).reshape(1, 1, C))
  rng = np.random.default_rng(C)
  q = jnp.asarray(rng.normal(size=(1, 1, 2, C)), jnp.float32)
  got = np.asarray(_kernel_call(q, jnp.zeros((1, 1, 2, 8)), lat,
                                jnp.zeros((1, 1, 8), jnp.bfloat16), jnp.zeros((1, 1), jnp.int32), 0))
  if nan:
    assert np.isnan(got).all()
  else:
    want = np.broadcast_to(row.view(jnp.float8_e4m3fn).astype(np.float32), got.shape)
    np.testing.assert_array_equal(got, want)


@functools.lru_cache(maxsize=None)
def _decoder(cfg, kernel: bool):
  def step(variables, tokens, cache, positions):
    return Transformer(cfg).apply(variables, tokens, positions, cache=cache).logits_BTV
  if kernel:
    return jax.jit(step)

  def blocked(*args):
    with cpu_kernels.disabled():
      return step(*args)
  return jax.jit(blocked)


@pytest.mark.parametrize("T", [1, 2])   # a decode step; two tokens (an MTP draft's check)
def test_decode_with_the_kernel_is_the_decode_with_xla(T):
  cfg = small_config()
  B, P = 2, 9
  tokens = random_tokens(cfg, B, P + T, seed=3)
  variables = init_model(Transformer(cfg), tokens)
  cache = init_model_cache(cfg, B, 32)
  prompt_logits = jax.jit(lambda v, t, c: Transformer(cfg).apply(v, t, cache=c))(
      variables, tokens[:, :P], cache)
  cache = prompt_logits.cache
  positions = jnp.broadcast_to(P + jnp.arange(T, dtype=jnp.int32), (B, T))
  got = _decoder(cfg, True)(variables, tokens[:, P:], cache, positions)
  want = _decoder(cfg, False)(variables, tokens[:, P:], cache, positions)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  text = _decoder(cfg, True).lower(variables, tokens[:, P:], cache, positions).as_text()
  assert cpu_kernels.TARGET in text   # the kernel ran, not XLA's loop twice


def test_the_kernel_stays_out_where_it_does_not_apply(monkeypatch, tmp_path):
  q = jnp.zeros((1, 1, 4, 8))
  lat, rope = jnp.zeros((1, 16, 8)), jnp.zeros((1, 16, 4))
  assert cpu_kernels.applies(q, lat, rope)
  assert not cpu_kernels.applies(jnp.zeros((1, 17, 4, 8)), lat, rope)   # 68 rows: a matmul
  assert not cpu_kernels.applies(q, lat.astype(jnp.float16), rope)      # a dtype it does not read
  with cpu_kernels.disabled():
    assert not cpu_kernels.applies(q, lat, rope)
  text = jax.jit(mla.latent_attention).lower(
      jnp.zeros((1, 17, 4, 8)), jnp.zeros((1, 17, 4, 4)), mla.LatentCache(lat, rope),
      jnp.zeros((1, 17), jnp.int32), None, 1.0).as_text()
  assert cpu_kernels.TARGET not in text
  # No compiler: no kernel, and nothing written.
  with monkeypatch.context() as m:
    m.setenv("CXX", str(tmp_path / "no-such-compiler"))
    m.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    assert cpu_kernels._build() is None and not (tmp_path / "cache").exists()
  # Switched off by the environment; back on (built once, registered again) without it.
  with monkeypatch.context() as m:
    m.setenv(cpu_kernels.ENABLE_ENV, "0")
    cpu_kernels.available.cache_clear()
    assert not cpu_kernels.available()
  cpu_kernels.available.cache_clear()
  assert cpu_kernels.available()


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 3), T=st.integers(1, 3), S=st.integers(3, 40), W=st.sampled_from([3, 16]),
       dtype=st.sampled_from([jnp.bfloat16, jnp.float8_e4m3fn]), stacked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_narrow_cache_writes_are_dynamic_update_slices(B, T, S, W, dtype, stacked, seed):
  """`mla._write` on a bf16 / e4m3 cache (the CPU kernel's in-place copy) equals the XLA
  update, starts past the end clamped as dynamic_update_slice clamps them."""
  T = min(T, S)
  rng = np.random.default_rng(seed)
  shape = ((3,) if stacked else ()) + (B, S, W)
  cache = jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)
  new = jnp.asarray(rng.normal(size=(B, T, W)), jnp.float32)
  start = jnp.asarray(rng.integers(0, S + 2, B), jnp.int32)
  layer = jnp.int32(2) if stacked else None
  write = jax.jit(mla._write)
  with cpu_kernels.disabled():
    want = jax.jit(lambda *a: mla._write(*a))(cache, new, start, layer)
  got = write(cache, new, start, layer)
  assert cpu_kernels.WRITE_TARGET in write.lower(cache, new, start, layer).as_text()
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                np.asarray(want.astype(jnp.float32)))


def test_paged_writes_of_a_narrow_pool_are_the_scatter():
  """`PagedLatentCache.write` into bf16 pools (the kernel's rows: block * P + offset; positions
  past the table go to the scratch block) equals XLA's scatter."""
  from deepseek_jax.generate.paged import PagedLatentCache
  rng = np.random.default_rng(0)
  L, NB, P, C, R, B, T = 2, 9, 4, 8, 4, 3, 2
  pools = [jnp.asarray(rng.normal(size=(L, NB, P, w)), jnp.bfloat16) for w in (C, R)]
  table = jnp.asarray([[3, 5], [1, 2], [8, 7]], jnp.int32)
  positions = jnp.asarray([[0, 1], [6, 7], [7, 8]], jnp.int32)   # row 2's second: past the table
  new = [jnp.asarray(rng.normal(size=(B, T, w)), jnp.float32) for w in (C, R)]

  def write(lp, rp, *args):
    return PagedLatentCache(lp, rp, table).write(*args, jnp.int32(1))
  got = jax.jit(write)(*pools, *new, positions)
  with cpu_kernels.disabled():
    want = jax.jit(lambda *a: write(*a))(*pools, *new, positions)
  assert cpu_kernels.WRITE_TARGET in jax.jit(write).lower(*pools, *new, positions).as_text()
  for g, w in ((got.latent_pool, want.latent_pool), (got.rope_pool, want.rope_pool)):
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                  np.asarray(w.astype(jnp.float32)))
