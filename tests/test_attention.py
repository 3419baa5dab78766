"""Attention: blockwise (and fused, which falls back to it on CPU) equals the materialized reference in
values and gradients; it never holds [B, N, T, S] and its memory grows linearly in T; segments keep
packed documents apart; the absorbed decode reads the latent cache in blocks; the fused kernels
compile for an H200 (cuDNN) and a TPU v5p (splash)."""

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.aot import targets
from deepseek_jax.attention import attention
from deepseek_jax.mla import MLA
from deepseek_jax.model import Transformer, init_model_cache
from tests.helpers import HAS_GPU_COMPILER, HAS_TPU_COMPILER, init_model, random_tokens, small_config


def _inputs(seed, B, T, S, N, H, R, J, shared_v=False):
  """MLA-shaped operands: nope part per head, rope key shared by all heads (head dims scaled down
  from 128 + 64 / 128). NumPy draws them: eager jax.random compiles per shape."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  q_terms = (normal(B, T, N, H), normal(B, T, N, R))
  k_terms = (normal(B, S, N, H), normal(B, S, R))
  v = normal(B, S, J) if shared_v else normal(B, S, N, J)
  return q_terms, k_terms, v


def _value_and_grads(impl, q_terms, k_terms, v, block, **mask):
  def loss(q_terms, k_terms, v):
    out_BTNj = attention(q_terms, k_terms, v, scale=0.4, impl=impl, block=block, platform="cpu",
                         **mask)
    return jnp.sum(jnp.sin(out_BTNj)), out_BTNj   # a loss whose cotangent varies per element

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, out), grads = fn(q_terms, k_terms, v)
  return out, grads


def _assert_close(a, b, atol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@settings(max_examples=5)
@given(B=st.integers(1, 2), T=st.integers(1, 19), N=st.integers(1, 3), H=st.sampled_from([4, 8]),
       R=st.sampled_from([2, 4]), J=st.sampled_from([4, 6]), block=st.integers(1, 24),
       starts=st.lists(st.integers(0, 50), min_size=2, max_size=2),
       docs=st.integers(0, 3), impl=st.sampled_from(["blockwise", "fused"]), seed=st.integers(0, 9))
def test_blockwise_equals_materialized(B, T, N, H, R, J, block, starts, docs, impl, seed):
  """Self-attention with ragged per-row positions, and packed documents when docs > 0; blocks that
  do and do not divide T."""
  q_terms, k_terms, v = _inputs(seed, B, T, T, N, H, R, J)
  positions_BT = jnp.asarray(starts[:B], jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  segments_BT = None
  if docs:
    bounds = np.random.default_rng(seed + 1).integers(0, T, (B, 1, docs))
    segments_BT = jnp.asarray(np.sum(np.arange(T)[None, :, None] >= bounds, axis=-1), jnp.int32)
  mask = dict(q_positions_BT=positions_BT, segments_BT=segments_BT)
  want = _value_and_grads("materialized", q_terms, k_terms, v, block, **mask)
  got = _value_and_grads(impl, q_terms, k_terms, v, block, **mask)
  _assert_close(got, want)


def test_cache_mode_with_shared_values_equals_materialized():
  """The absorbed decode's shape: keys and values shared by all heads, a cache longer than the
  context with stale slots past each row's position (ragged rows), several key blocks."""
  B, T, S = 2, 3, 29
  q_terms, k_terms, v = _inputs(0, B, T, S, 3, 8, 4, 6, shared_v=True)
  k_terms = (k_terms[0][:, :, 0], k_terms[1])            # the latent: one key for all heads
  positions_BT = jnp.asarray([[20], [4]], jnp.int32) + jnp.arange(T, dtype=jnp.int32)[None]
  slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  mask = dict(q_positions_BT=positions_BT, kv_positions_BS=slots_BS)
  want = _value_and_grads("materialized", q_terms, k_terms, v, 5, **mask)
  _assert_close(_value_and_grads("blockwise", q_terms, k_terms, v, 5, **mask), want)


def test_blockwise_never_holds_scores_of_all_queries_and_keys():
  """No value of the forward or backward program has the [B, N, T, S] shape."""
  B, T, N = 1, 40, 2
  q_terms, k_terms, v = _inputs(0, B, T, T, N, 8, 4, 6)
  positions_BT = jnp.arange(T, dtype=jnp.int32)[None]

  def loss(impl):
    return lambda *a: jnp.sum(attention(*a, q_positions_BT=positions_BT, scale=0.4, impl=impl,
                                        block=8, platform="cpu"))

  quadratic = re.compile(rf"\[{B},{N},{T},{T}\]")
  for impl, holds in (("materialized", True), ("blockwise", False)):
    text = str(jax.make_jaxpr(jax.grad(loss(impl), argnums=(0, 1, 2)))(q_terms, k_terms, v))
    assert bool(quadratic.search(text)) == holds, impl


def _mla_layer_temp_bytes(cfg, T):
  mla = MLA(cfg)
  x = jax.ShapeDtypeStruct((1, T, cfg.d_model), jnp.float32)
  pos = jax.ShapeDtypeStruct((1, T), jnp.int32)
  params = jax.eval_shape(mla.init, jax.random.key(0), x, pos)

  def loss(params, x_BTD, positions_BT):
    return jnp.sum(jnp.square(mla.apply(params, x_BTD, positions_BT)[0]))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, pos).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_one_layer_temporaries_grow_linearly_with_blockwise():
  """XLA's memory analysis of one MLA layer, forward + backward, at T = 1k, 2k, 4k: at most 2.2x
  per doubling with blockwise attention; the materialized reference grows ~4x (the check bites)."""
  cfg = small_config(d_model=32, num_heads=2, q_lora_rank=None, kv_lora_rank=16,
                     qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, attention_block=256)
  grow = {}
  for impl, seqs in (("blockwise", (1024, 2048, 4096)), ("materialized", (1024, 2048))):
    c = dataclasses.replace(cfg, attention_impl=impl)
    temps = [_mla_layer_temp_bytes(c, T) for T in seqs]
    grow[impl] = [b / a for a, b in zip(temps, temps[1:])]
  assert max(grow["blockwise"]) <= 2.2, grow
  assert min(grow["materialized"]) >= 3.0, grow


# One dense layer, T=10 in blocks of 4: three query and key blocks, the last partial.
TINY = small_config(num_layers=1, attention_block=4)


@functools.cache
def _tiny_variables():
  return init_model(Transformer(TINY), random_tokens(TINY, 1, 4))


def _grads_of_model(cfg, tokens_BT, **kw):
  model = Transformer(cfg)

  def loss(params):
    out = model.apply(dict(_tiny_variables(), params=params), tokens_BT, **kw)
    return jnp.sum(out.logits_BTV * jax.nn.one_hot(tokens_BT, cfg.vocab_size)), out.logits_BTV

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(_tiny_variables()["params"])
  return logits, grads


def test_transformer_blockwise_equals_materialized():
  tokens = random_tokens(TINY, 2, 10)
  kw = dict(segments_BT=jnp.asarray([[0] * 6 + [1] * 4, [0] * 3 + [1] * 7], jnp.int32))
  want = _grads_of_model(dataclasses.replace(TINY, attention_impl="materialized"), tokens, **kw)
  got = _grads_of_model(dataclasses.replace(TINY, attention_impl="blockwise"), tokens, **kw)
  _assert_close(got, want, atol=1e-5)


def test_packed_documents_equal_separate_sequences():
  """Two documents packed in one row with segment ids (positions restarting) give each document's
  own logits: no attention crosses the boundary. Rows 1 and 2 hold each document alone, followed
  by filler (one call, one compile)."""
  model = Transformer(dataclasses.replace(TINY, attention_impl="blockwise"))
  doc_a, doc_b = random_tokens(TINY, 1, 6, seed=1)[0], random_tokens(TINY, 1, 5, seed=2)[0]
  fill = jnp.zeros((6,), jnp.int32)
  tokens = jnp.stack([jnp.concatenate([doc_a, doc_b]), jnp.concatenate([doc_a, fill[:5]]),
                      jnp.concatenate([doc_b, fill])])
  positions = jnp.asarray([list(range(6)) + list(range(5))] * 2 + [list(range(5)) + list(range(6))],
                          jnp.int32)
  segments = jnp.asarray([[0] * 6 + [1] * 5] * 2 + [[0] * 5 + [1] * 6], jnp.int32)
  out = jax.jit(model.apply)(_tiny_variables(), tokens, positions, segments_BT=segments).logits_BTV
  np.testing.assert_allclose(np.asarray(out[0, :6]), np.asarray(out[1, :6]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[0, 6:]), np.asarray(out[2, :5]), atol=1e-5)


def test_blockwise_absorbed_decode_equals_expanded_forward():
  """Prefill into a long cache, then decode one token per step with the latent cache read in
  blocks of 4 slots (most past the rows' positions, skipped): logits equal the expanded forward."""
  T, prefill, max_len = 9, 6, 19
  tokens = random_tokens(TINY, 2, T)
  variables = _tiny_variables()
  ref = Transformer(dataclasses.replace(TINY, attention_impl="materialized"))
  full = jax.jit(ref.apply)(variables, tokens).logits_BTV
  model = Transformer(dataclasses.replace(TINY, attention_impl="blockwise"), absorb=True)
  step = jax.jit(lambda t, p, c: model.apply(variables, t, positions_BT=p, cache=c))
  out = step(tokens[:, :prefill], jnp.broadcast_to(jnp.arange(prefill)[None], (2, prefill)),
             init_model_cache(TINY, 2, max_len))
  logits, cache = [out.logits_BTV], out.cache
  for t in range(prefill, T):
    out = step(tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache)
    logits.append(out.logits_BTV)
    cache = out.cache
  np.testing.assert_allclose(np.asarray(jnp.concatenate(logits, axis=1)), np.asarray(full),
                             atol=1e-5)


def test_mla_tags_its_projections_for_remat_policies():
  cfg = small_config()
  x = jnp.ones((1, 4, cfg.d_model))
  pos = jnp.arange(4, dtype=jnp.int32)[None]
  mla = MLA(cfg)
  params = jax.eval_shape(mla.init, jax.random.key(0), x, pos)
  text = str(jax.make_jaxpr(lambda p: mla.apply(p, x, pos))(params))
  for name in ("mla_q", "mla_kv", "attention_out"):
    assert f"name={name}" in text, name


def test_bad_arguments_say_what_is_wrong():
  q_terms, k_terms, v = _inputs(0, 1, 4, 4, 1, 4, 2, 4)
  pos = jnp.arange(4, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match="impl='flash'"):
    attention(q_terms, k_terms, v, q_positions_BT=pos, scale=1.0, impl="flash")
  with pytest.raises(ValueError, match="segments_BT"):
    attention(q_terms, k_terms, v, q_positions_BT=pos, kv_positions_BS=pos, segments_BT=pos,
              scale=1.0)


# ---- the fused kernels, compiled ahead of time for accelerators that are not here ----



def _fused_hlo(devices, platform, T=256, N=2):
  """Optimized HLO of fused attention fwd + bwd at MLA's head dims (qk 128 + 64, v 128), bf16."""
  s = NamedSharding(Mesh(np.array(devices[:1]), ("d",)), P())
  bf16 = jnp.bfloat16
  shapes = ((1, T, N, 128), (1, T, N, 64), (1, T, N, 128), (1, T, 64), (1, T, N, 128))
  args = [jax.ShapeDtypeStruct(sh, bf16, sharding=s) for sh in shapes]
  pos = jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=s)

  def loss(qn, qr, kn, kr, v, pos):
    out = attention((qn, qr), (kn, kr), v, q_positions_BT=pos, scale=0.1, impl="fused",
                    platform=platform)
    return jnp.sum(out.astype(jnp.float32))

  # conftest's "highest" matmul precision would ask Mosaic for an f32 contraction of bf16 tiles.
  with jax.default_matmul_precision("default"):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args, pos)
  return lowered.compile().as_text()


@pytest.mark.aot
@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs the [gpu] extra (jax-cuda12-plugin)")
def test_fused_compiles_to_cudnn_for_h200():
  text = _fused_hlo(targets.devices(targets.parse_target("h200:1")), "gpu")
  calls = set(re.findall(r'custom_call_target="([^"]+)"', text))
  assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= calls, calls


@pytest.mark.aot
@pytest.mark.skipif(not HAS_TPU_COMPILER, reason="needs the [tpu] extra (libtpu)")
def test_fused_compiles_to_splash_for_v5p():
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  text = _fused_hlo(targets.devices(targets.parse_target("tpu-v5p:2x2x1")), "tpu")
  assert 'custom_call_target="tpu_custom_call"' in text
  for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
    assert kernel in text, kernel
