"""Causal softmax attention that need not hold [B, N, T, S] (FlashAttention: Dao et al. 2022, 2023),
shaped for MLA (V3 report §2.1.1).

Scores are a sum of terms q_i . k_i, each key per head [B, S, N, k] or shared by all heads
[B, S, k] (MLA's rope key; the latent in absorbed decoding); values likewise. Implementations:
"materialized" (the reference), "blockwise" (online softmax over blocks of queries and keys, a custom
VJP that saves only the output and the logsumexp, fully masked blocks skipped), "fused" (cuDNN on GPU,
splash attention on TPU, blockwise where the kernel does not apply). Reasons: docs/design-notes.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

IMPLS = ("auto", "materialized", "blockwise", "fused")
F32 = jnp.float32
_NOWHERE = jnp.iinfo(jnp.int32).min   # the position of padded queries: they see no key


class Mask(NamedTuple):
  """Query i of row b sees key j when kv_positions[b, j] <= q_positions[b, i] and, with segments
  (packed documents), both tokens belong to the same segment."""
  q_positions_BT: jax.Array
  kv_positions_BS: jax.Array
  q_segments_BT: jax.Array | None = None
  kv_segments_BS: jax.Array | None = None

  def visible_BTS(self) -> jax.Array:
    seen_BTS = self.kv_positions_BS[:, None, :] <= self.q_positions_BT[:, :, None]
    if self.q_segments_BT is None:
      return seen_BTS
    return seen_BTS & (self.kv_segments_BS[:, None, :] == self.q_segments_BT[:, :, None])


def attention(q_terms, k_terms, v, *, q_positions_BT, kv_positions_BS=None, segments_BT=None,
              scale: float, impl: str = "auto", block: int = 512, platform: str = "auto"):
  """softmax(scale * sum_i q_i . k_i, masked) . v -> [B, T, N, j] in v's dtype.

  `q_terms`: queries [B, T, N, k_i]; `k_terms`: keys [B, S, N, k_i] or [B, S, k_i]; `v`: [B, S, N, j]
  or [B, S, j]. `kv_positions_BS=None` is self-attention (the keys are the queries' tokens; only then
  may `segments_BT` restrict it to documents); otherwise the keys are a cache at those positions.
  `impl`/`block`/`platform`: `ModelConfig.attention_impl`/`attention_block`/`platform`.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: must be one of {', '.join(IMPLS)}")
  if segments_BT is not None and kv_positions_BS is not None:
    raise ValueError("segments_BT: document segments apply to self-attention only "
                     "(kv_positions_BS=None); a cache has no segments")
  platform = _platform(platform)
  S = k_terms[0].shape[1]
  if impl == "auto":
    impl = "fused" if platform != "cpu" else "materialized" if S <= block else "blockwise"
  if impl == "fused":
    out = _fused(q_terms, k_terms, v, segments_BT, scale, platform,
                 self_attention=kv_positions_BS is None)
    if out is not None:
      return out
    impl = "blockwise"
  mask = Mask(q_positions_BT, q_positions_BT if kv_positions_BS is None else kv_positions_BS,
              segments_BT, segments_BT)
  if impl == "materialized":
    return _materialized(tuple(q_terms), tuple(k_terms), v, mask, scale)
  # Tiles of at most block x block scores per row and head: square in training and prefill,
  # one row of up to block^2 keys when decoding a token (as fast as materialized at T = 1).
  bq = min(block, q_terms[0].shape[1])
  return _blockwise(tuple(q_terms), tuple(k_terms), v, mask, scale, bq,
                    min(S, max(block, block * block // bq)))


def _platform(platform: str) -> str:
  if platform == "auto":
    platform = jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def _n(x) -> str:
  """The einsum letter of x's head axis: "N" per head, "" for a key or value shared by all heads."""
  return "N" if x.ndim == 4 else ""


def _scores_BNTS(q_terms, k_terms, scale):
  return scale * sum(jnp.einsum(f"BTNk,BS{_n(k)}k->BNTS", q, k, preferred_element_type=F32)
                     for q, k in zip(q_terms, k_terms))


def _materialized(q_terms, k_terms, v, mask: Mask, scale):
  scores_BNTS = jnp.where(mask.visible_BTS()[:, None], _scores_BNTS(q_terms, k_terms, scale),
                          -jnp.inf)
  probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(v.dtype)
  return jnp.einsum(f"BNTS,BS{_n(v)}j->BTNj", probs_BNTS, v)


# ---- blockwise: online softmax over [query block, key block] tiles ----
# Query blocks are cut out of a padded copy (O(T), small in decode); key blocks are read in place
# with dynamic slices, so a long cache is never copied. The last key block starts early enough to
# fit; the keys it shares with the block before are masked ("fresh" keys only).

def _split(x, size: int, axis: int = 1, fill=0):
  """x cut along `axis` into blocks of `size` (the last padded with `fill`), block index first."""
  n = -(-x.shape[axis] // size)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n * size - x.shape[axis])
  x = jnp.pad(x, pad, constant_values=fill)
  x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _join(x, length: int, axis: int = 1):
  """Inverse of `_split`: blocks (index first) back along `axis`, padding dropped."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _query_side(mask: Mask, bq: int):
  """Query positions and segments in blocks [nq, B, bq]; padded queries see nothing."""
  return (_split(mask.q_positions_BT, bq, fill=_NOWHERE),
          None if mask.q_segments_BT is None else _split(mask.q_segments_BT, bq))


def _key_block(j, bk: int, S: int):
  """(start, slicer) of key block j: `slicer(x)` reads keys [start, start + bk) along axis 1."""
  start = jnp.minimum(j * bk, S - bk)
  return start, lambda x: jax.lax.dynamic_slice_in_dim(x, start, bk, axis=1)


def _tile_visible_BTS(q_side, mask: Mask, j, bk: int):
  S = mask.kv_positions_BS.shape[1]
  start, read = _key_block(j, bk, S)
  kv_seg = None if mask.kv_segments_BS is None else read(mask.kv_segments_BS)
  visible_BTS = Mask(q_side[0], read(mask.kv_positions_BS), q_side[1], kv_seg).visible_BTS()
  fresh_S = start + jnp.arange(bk) >= j * bk
  return visible_BTS & fresh_S[None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q_terms, k_terms, v, mask, scale, bq, bk):
  return _blockwise_fwd(q_terms, k_terms, v, mask, scale, bq, bk)[0]


def _blockwise_fwd(q_terms, k_terms, v, mask, scale, bq, bk):
  B, T, N = q_terms[0].shape[:3]
  S = k_terms[0].shape[1]
  key_blocks = jnp.arange(-(-S // bk))

  def query_block(xs):
    q_i, q_side_i = xs

    def key_block(carry, j):
      read = _key_block(j, bk, S)[1]
      k_j, v_j = [read(k) for k in k_terms], read(v)
      visible_BTS = _tile_visible_BTS(q_side_i, mask, j, bk)

      def update(carry):
        m_BNT, l_BNT, acc_BNTj = carry
        s_BNTS = jnp.where(visible_BTS[:, None], _scores_BNTS(q_i, k_j, scale), -jnp.inf)
        m_new_BNT = jnp.maximum(m_BNT, s_BNTS.max(-1))
        # Rows that have seen no key yet keep m = -inf; shifting them by 0 keeps exp() at 0, not NaN.
        shift_BNT = jnp.where(jnp.isneginf(m_new_BNT), 0.0, m_new_BNT)
        p_BNTS = jnp.exp(s_BNTS - shift_BNT[..., None])
        rescale_BNT = jnp.exp(m_BNT - shift_BNT)
        pv_BNTj = jnp.einsum(f"BNTS,BS{_n(v_j)}j->BNTj", p_BNTS.astype(v.dtype), v_j,
                             preferred_element_type=F32)
        return (m_new_BNT, l_BNT * rescale_BNT + p_BNTS.sum(-1),
                acc_BNTj * rescale_BNT[..., None] + pv_BNTj)

      # Causal and document masks (and cache slots past every position) leave whole tiles empty:
      # skip them (about half the tiles of causal self-attention).
      return jax.lax.cond(jnp.any(visible_BTS), update, lambda c: c, carry), None

    init = (jnp.full((B, N, bq), -jnp.inf, F32), jnp.zeros((B, N, bq), F32),
            jnp.zeros((B, N, bq, v.shape[-1]), F32))
    (m_BNT, l_BNT, acc_BNTj), _ = jax.lax.scan(key_block, init, key_blocks)
    seen_BNT = l_BNT > 0
    out_BNTj = acc_BNTj / jnp.where(seen_BNT, l_BNT, 1.0)[..., None]
    lse_BNT = jnp.where(seen_BNT, m_BNT + jnp.log(jnp.where(seen_BNT, l_BNT, 1.0)), -jnp.inf)
    return jnp.swapaxes(out_BNTj, 1, 2).astype(v.dtype), lse_BNT

  qb = [_split(q, bq) for q in q_terms]                       # [nq, B, bq, N, k]
  out_blocks, lse_blocks = jax.lax.map(query_block, (qb, _query_side(mask, bq)))
  out_BTNj, lse_BNT = _join(out_blocks, T), _join(lse_blocks, T, axis=2)
  return out_BTNj, (q_terms, k_terms, v, mask, out_BTNj, lse_BNT)


def _blockwise_bwd(scale, bq, bk, res, dout_BTNj):
  """FlashAttention-2's backward: per tile, p from the saved logsumexp, ds = p (dp - delta)."""
  q_terms, k_terms, v, mask, out_BTNj, lse_BNT = res
  T, S = q_terms[0].shape[1], k_terms[0].shape[1]
  delta_BNT = jnp.einsum("BTNj,BTNj->BNT", dout_BTNj.astype(F32), out_BTNj.astype(F32))
  q_blocks = ([_split(q, bq) for q in q_terms], _split(dout_BTNj, bq),
              _split(lse_BNT, bq, axis=2), _split(delta_BNT, bq, axis=2), _query_side(mask, bq))

  def key_block(carry, j):
    dq_acc, dk_acc, dv_acc = carry
    start, read = _key_block(j, bk, S)
    k_j, v_j = [read(k) for k in k_terms], read(v)

    def query_block(carry, xs):
      q_i, do_i, lse_i, delta_i, q_side_i = xs
      visible_BTS = _tile_visible_BTS(q_side_i, mask, j, bk)

      def grads(_):
        s_BNTS = _scores_BNTS(q_i, k_j, scale)
        p_BNTS = jnp.where(visible_BTS[:, None], jnp.exp(s_BNTS - lse_i[..., None]), 0.0)
        dv = jnp.einsum(f"BNTS,BTNj->BS{_n(v_j)}j", p_BNTS.astype(do_i.dtype), do_i,
                        preferred_element_type=F32)
        dp_BNTS = jnp.einsum(f"BTNj,BS{_n(v_j)}j->BNTS", do_i, v_j, preferred_element_type=F32)
        ds_BNTS = scale * p_BNTS * (dp_BNTS - delta_i[..., None])
        dq = tuple(jnp.einsum(f"BNTS,BS{_n(k)}k->BTNk", ds_BNTS.astype(k.dtype), k,
                              preferred_element_type=F32) for k in k_j)
        dk = tuple(jnp.einsum(f"BNTS,BTNk->BS{_n(k)}k", ds_BNTS.astype(q.dtype), q,
                              preferred_element_type=F32) for q, k in zip(q_i, k_j))
        return dq, dk, dv

      def nothing(_):
        return (tuple(jnp.zeros(q.shape, F32) for q in q_i),
                tuple(jnp.zeros(k.shape, F32) for k in k_j), jnp.zeros(v_j.shape, F32))

      dq, dk, dv = jax.lax.cond(jnp.any(visible_BTS), grads, nothing, None)
      dk_j, dv_j = carry
      return (tuple(a + b for a, b in zip(dk_j, dk)), dv_j + dv), dq

    zeros = (tuple(jnp.zeros(k.shape, F32) for k in k_j), jnp.zeros(v_j.shape, F32))
    (dk_j, dv_j), dq_parts = jax.lax.scan(query_block, zeros, q_blocks)

    def add(acc, d):   # keys shared with the block before got 0 here (masked): adding is exact
      return jax.lax.dynamic_update_slice_in_dim(acc, read(acc) + d, start, axis=1)

    # Each key block adds its share to every query block: an O(T) add per block, no [T, S] state.
    return (tuple(a + b for a, b in zip(dq_acc, dq_parts)),
            tuple(add(a, d) for a, d in zip(dk_acc, dk_j)), add(dv_acc, dv_j)), None

  init = (tuple(jnp.zeros(q.shape, F32) for q in q_blocks[0]),
          tuple(jnp.zeros(k.shape, F32) for k in k_terms), jnp.zeros(v.shape, F32))
  (dq_blocks, dk, dv), _ = jax.lax.scan(key_block, init, jnp.arange(-(-S // bk)))
  dq = tuple(_join(d, T).astype(q.dtype) for d, q in zip(dq_blocks, q_terms))
  dk = tuple(d.astype(k.dtype) for d, k in zip(dk, k_terms))
  return dq, dk, dv.astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- fused kernels ----

def _per_head(q_terms, k_terms):
  """One query and one key per head [B, ., N, sum k_i]: shared keys broadcast over the heads."""
  N = q_terms[0].shape[2]
  keys = [k if k.ndim == 4 else jnp.broadcast_to(k[:, :, None], k.shape[:2] + (N, k.shape[-1]))
          for k in k_terms]
  return jnp.concatenate(q_terms, axis=-1), jnp.concatenate(keys, axis=-1)


def _fused(q_terms, k_terms, v, segments_BT, scale, platform, *, self_attention):
  """The platform's fused kernel, or None where it does not apply (then blockwise runs).

  Both kernels mask by index (key j <= query i), which is the position mask of self-attention whose
  positions increase along each row (within each document), as every caller's do."""
  if platform == "cpu" or not self_attention or v.ndim != 4:
    return None
  q_BTNk, k_BSNk = _per_head(q_terms, k_terms)
  if platform == "gpu":
    # cuDNN: bf16/fp16, head dims <= 256 and multiples of 8 (qk != v needs Hopper and cuDNN >= 9.10).
    # Document masks need the packed layout's static segment count, which the config does not give.
    dims_ok = all(d <= 256 and d % 8 == 0 for d in (q_BTNk.shape[-1], v.shape[-1]))
    if segments_BT is not None or v.dtype not in (jnp.bfloat16, jnp.float16) or not dims_ok:
      return None
    return _cudnn(q_BTNk.astype(v.dtype), k_BSNk.astype(v.dtype), v, scale)
  if platform == "tpu":
    return _splash(q_BTNk, k_BSNk, v, segments_BT, scale)
  return None


# The cuDNN primitives are bound directly: jax's wrapper checks the compute capability of the default
# backend's device, which is the host's CPU when compiling for a GPU target ahead of time.
_CUDNN = dict(seed=0, dropout_rate=0.0, variadic_args=(False, False),
              mask_type=cudnn.MaskType.CAUSAL, layout=cudnn.AttentionLayout.BTNH.value,
              sliding_window_length=None)


def _absent(dtype):
  """The kernel's unused optional operands (bias, lengths, offsets, page tables)."""
  return (jnp.zeros((0,), dtype),) * 7


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cudnn(q_BTNk, k_BSNk, v_BSNj, scale):
  return _cudnn_fwd(q_BTNk, k_BSNk, v_BSNj, scale)[0]


def _cudnn_fwd(q_BTNk, k_BSNk, v_BSNj, scale):
  out_BTNj, stats = cudnn._dot_product_attention_fwd_p_wrapper.bind(
      q_BTNk, k_BSNk, v_BSNj, *_absent(v_BSNj.dtype), scale=scale, is_training=True, **_CUDNN)
  return out_BTNj, (q_BTNk, k_BSNk, v_BSNj, out_BTNj, stats)


def _cudnn_bwd(scale, res, dout_BTNj):
  q_BTNk, k_BSNk, v_BSNj, out_BTNj, stats = res
  grads = cudnn._dot_product_attention_bwd_p_wrapper.bind(
      q_BTNk, k_BSNk, v_BSNj, *_absent(v_BSNj.dtype), stats, out_BTNj, dout_BTNj, scale=scale,
      **_CUDNN)
  return tuple(grads[:3])


_cudnn.defvjp(_cudnn_fwd, _cudnn_bwd)

SPLASH_TILE = 512   # splash tiles (queries = keys); sequences are padded to a multiple (128 if short)


def _splash(q_BTNk, k_BSNk, v_BSNj, segments_BT, scale):
  """Splash attention per row: causal, documents as segment ids; padding is its own segment."""
  B, T = q_BTNk.shape[:2]
  tile = SPLASH_TILE if T >= SPLASH_TILE else 128
  Tp = -(-T // tile) * tile
  seg_BT = None
  if segments_BT is not None or Tp > T:
    seg_BT = jnp.zeros((B, T), jnp.int32) if segments_BT is None else segments_BT.astype(jnp.int32)
    seg_BT = jnp.pad(seg_BT, ((0, 0), (0, Tp - T)), constant_values=-1)
  pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
  # Splash has no scale argument: scale the query (in the compute dtype).
  q_BTNk, k_BSNk, v_BSNj = (jnp.pad(x, pad) for x in ((q_BTNk * scale).astype(v_BSNj.dtype),
                                                       k_BSNk.astype(v_BSNj.dtype), v_BSNj))
  run = functools.partial(_splash_rows, tile=tile)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    # XLA cannot partition a Mosaic kernel: run it per shard, batch and heads split as the logical
    # rules split them, each sequence whole (the causal mask needs all of it).
    qkv = nn.logical_to_mesh_axes(("act_batch", None, "heads", None))
    rows = nn.logical_to_mesh_axes(("act_batch", None))
    run = jax.shard_map(run, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv, check_vma=False)
  return run(q_BTNk, k_BSNk, v_BSNj, seg_BT)[:, :T]


def _splash_rows(q_BTNk, k_BSNk, v_BSNj, seg_BT, *, tile: int):
  Tp, N = q_BTNk.shape[1:3]
  # Separate dq and dkv backward kernels: the fused one keeps a dq partial per key tile, which
  # grows as T^2 / tile (96 MiB at T=4096 for small.yaml, measured on v5p).
  sizes = dict.fromkeys(("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                         "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"), tile)
  kernel = splash.make_splash_mha(
      splash_mask.MultiHeadMask([splash_mask.CausalMask((Tp, Tp))] * N), head_shards=1,
      q_seq_shards=1, block_sizes=splash.BlockSizes(**sizes))

  def row(q_TNk, k_SNk, v_SNj, seg_T):
    out_NTj = kernel(*(jnp.swapaxes(x, 0, 1) for x in (q_TNk, k_SNk, v_SNj)),
                     segment_ids=None if seg_T is None else splash.SegmentIds(seg_T, seg_T))
    return jnp.swapaxes(out_NTj, 0, 1)

  return jax.vmap(row)(q_BTNk, k_BSNk, v_BSNj, seg_BT)
