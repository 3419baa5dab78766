"""Multi-head Latent Attention (V3 report §2.1.1; V2 report §2.1.2-2.1.3).

The cache holds one latent c_KV [C] and one rope key k_R [R] shared by all heads, per token per
layer. Two paths compute the same function: expanded (training: K and V per head, through
`attention.attention`) and absorbed (everything with a cache: W_UK folded into the query, W_UV into
the output, attention on the latent read in blocks with an online softmax, as FlashMLA does).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.attention import attention
from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels import cpu as cpu_kernels
from deepseek_jax.layers import Dense, RMSNorm, dtype_of
from deepseek_jax.rope import apply_rope, softmax_scale

F32 = jnp.float32
_MASKED = -1e30
ABSORBED = "absorbed"   # the collection of decode-layout weights (`absorbed_weights`)


class LatentCache(NamedTuple):
  """Per-layer latent cache: kv_norm(c_KV) [B, S, C] and rope(k_R) [B, S, R] (or [L, B, S, .]
  stacks). `write_and_attend` is the absorbed decode on it (the same hook as the paged cache)."""
  latent_BSC: jax.Array
  rope_BSR: jax.Array

  def write_and_attend(self, latent_BTC, rope_BTR, q_lat_BTNC, q_rope_BTNR, positions_BT, layer,
                       scale):
    start_B = positions_BT[:, 0].astype(jnp.int32)
    cache = LatentCache(_write(self.latent_BSC, latent_BTC, start_B, layer),
                        _write(self.rope_BSR, rope_BTR, start_B, layer))
    return cache, latent_attention(q_lat_BTNC, q_rope_BTNR, cache, positions_BT, layer, scale,
                                   LATENT_BLOCK)


FP8_LATENT = jnp.float8_e4m3fn   # FlashMLA's FP8 cache: the latent in e4m3, the rope key in bf16
_FP8_MAX = float(jnp.finfo(FP8_LATENT).max)


def to_cache_dtype(new, dtype):
  """`new` in a cache's dtype; into e4m3 saturated at +-448 (it has no inf: a cast would make an
  overflowing value NaN)."""
  if jnp.dtype(dtype) == jnp.dtype(FP8_LATENT):
    new = jnp.clip(new, -_FP8_MAX, _FP8_MAX)
  return new.astype(dtype)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, layers: int | None = None,
               dtype=None) -> LatentCache:
  """Zeroed cache for `layers` stacked layers (default cfg.num_layers): [L, B, S, C] and
  [L, B, S, R] in `dtype` (default the compute dtype; `FP8_LATENT` keeps k_R in bf16)."""
  L = cfg.num_layers if layers is None else layers
  dt = jnp.dtype(dtype or dtype_of(cfg.dtype))
  rope_dt = jnp.bfloat16 if dt == FP8_LATENT else dt
  return LatentCache(jnp.zeros((L, batch, max_len, cfg.kv_lora_rank), dt),
                     jnp.zeros((L, batch, max_len, cfg.qk_rope_head_dim), rope_dt))


UNROLL_ROWS = 16   # cache writes: one update per row unrolled up to this batch, else a loop


def _write(cache: jax.Array, new: jax.Array, start_B: jax.Array, layer=None) -> jax.Array:
  """Writes each row's new entries `new` [B, T, width] at its own start position (positions are
  contiguous per row) into `cache` [B, S, width], or into layer `layer` of a stack
  [L, B, S, width] (width: C or R).

  One `dynamic_update_slice` per row, so XLA updates the buffer in place; a vmapped update
  becomes a scatter, and a per-layer slice passed through a scan's xs/ys is copied whole: at
  context 8192 both cost ~4x the attention itself (measured on XLA:CPU).
  """
  new = to_cache_dtype(new, cache.dtype)
  if cpu_kernels.write_applies(cache):
    # XLA:CPU widens a bf16 / f8 update to an f32 one over the whole stack (convert, update,
    # convert back: ~100 ms per MoE stack per step at context 8192, batch 8): on the CPU the
    # kernel copies the new rows in place; elsewhere the update below.
    B, T = new.shape[:2]
    S = cache.shape[-2]
    start_B = jnp.clip(start_B.astype(jnp.int32), 0, S - T)   # where dynamic_update_slice puts it
    rows_BT = (jnp.arange(B, dtype=jnp.int32)[:, None] * S + start_B[:, None]
               + jnp.arange(T, dtype=jnp.int32)[None, :])
    return cpu_kernels.choose(True, lambda n, c, r: cpu_kernels.latent_write(c, n, r, layer),
                              lambda n, c, r: _update(c, n, start_B, layer), new, cache, rows_BT)
  bits = {1: jnp.uint8, 2: jnp.uint16}.get(cache.dtype.itemsize)
  if bits is None or not jnp.issubdtype(cache.dtype, jnp.floating):
    return _update(cache, new, start_B, layer)
  # No kernel: on the CPU a narrow float cache is updated as its bit patterns (XLA:CPU never
  # widens an integer update; the bitcasts then fuse into one pass over the stack, ~0.7 ms per
  # layer at context 8192, batch 8, against ~100 ms widened). GPUs update bf16 in place.
  return cpu_kernels.choose(True, lambda n, c: _update(c, n, start_B, layer, bits),
                            lambda n, c: _update(c, n, start_B, layer), new, cache)


def _update(cache, new, start_B, layer, bits=None):
  """`_write`'s dynamic_update_slice per row, in place; with `bits` (uint8/uint16) a narrow float
  cache is updated as its bit patterns."""
  dtype = cache.dtype
  if bits is not None:
    cache, new = (jax.lax.bitcast_convert_type(x, bits) for x in (cache, new))
  lead = () if layer is None else (layer,)
  zero = jnp.zeros((), jnp.int32)

  def row(b, c):
    row_new = jax.lax.dynamic_index_in_dim(new, b, 0, keepdims=True)
    n = row_new.reshape((1,) * len(lead) + row_new.shape)
    return jax.lax.dynamic_update_slice(c, n, lead + (b, start_B[b], zero))

  B = new.shape[0]
  if B <= UNROLL_ROWS:
    for b in range(B):
      cache = row(b, cache)
  else:
    cache = jax.lax.fori_loop(0, B, row, cache)
  return cache if bits is None else jax.lax.bitcast_convert_type(cache, dtype)


# Cache slots per step of the decode attention's online softmax: small enough that a block
# (B x 512 x (C + R) values) stays in cache between its two uses (scores, then values) and the
# loop stops near the longest row's length; large enough that the loop overhead stays small.
# 512 was the fastest of 256..4096 for tiny.yaml at context 8192 (bench/results/DECODE.md).
LATENT_BLOCK = 512


def online_latent_attention(q_lat_BTNC, q_rope_BTNR, read_block, n_blocks, bk: int, positions_BT,
                            scale):
  """The absorbed decode's attention kernel, shared by the contiguous and the paged cache:
  softmax(scale (q_lat . c_KV + q_rope . k_R)) . c_KV over each query's slots <= its position,
  the cache read in `n_blocks` (traced) blocks of `bk` slots with an online softmax (FlashMLA's
  decode structure). `read_block(j) -> (lat [B, bk, C], rope [B, bk, R], start)` gives block j's
  slots [start, start + bk), start <= j bk (slots below j bk belong to the block before and are
  masked). The T x N query rows of a batch row share each block read. -> [B, T, N, C] in the
  query's dtype."""
  B, T, N, C = q_lat_BTNC.shape
  dt = q_lat_BTNC.dtype
  # M = T x N query rows. Scores come out of c [bk, C] @ q [C, M] (a long-by-skinny product,
  # XLA:CPU's fast case) and are turned to [M, bk] for the softmax and p [M, bk] @ c [bk, C]:
  # 3x faster than [M, C] @ c^T on XLA:CPU (bench/results/DECODE.md).
  q_lat_BCM = jnp.swapaxes((q_lat_BTNC * scale).reshape(B, T * N, C), 1, 2)
  q_rope_BRM = jnp.swapaxes((q_rope_BTNR * scale).astype(dt).reshape(B, T * N, -1), 1, 2)
  pos_BM1 = jnp.repeat(positions_BT.astype(jnp.int32), N, axis=1)[:, :, None]

  def body(j, carry):
    m_BM, l_BM, acc_BMC = carry
    lat_BSC, rope_BSR, start = read_block(j)
    lat_BSC, rope_BSR = lat_BSC.astype(dt), rope_BSR.astype(dt)
    s_BSM = (jnp.einsum("BSC,BCM->BSM", lat_BSC, q_lat_BCM, preferred_element_type=F32)
             + jnp.einsum("BSR,BRM->BSM", rope_BSR, q_rope_BRM, preferred_element_type=F32))
    slot_11S = (start + jnp.arange(bk, dtype=jnp.int32))[None, None, :]
    visible_BMS = (slot_11S <= pos_BM1) & (slot_11S >= j * bk)
    # Finite: a masked slot's exp underflows to exactly 0 once a visible slot was seen (block
    # 0 holds slot 0); a row that sees nothing stays finite (no NaN into the layers after).
    s_BMS = jnp.where(visible_BMS, jnp.swapaxes(s_BSM, 1, 2), _MASKED)
    m_new_BM = jnp.maximum(m_BM, jnp.max(s_BMS, axis=-1))
    p_BMS = jnp.exp(s_BMS - m_new_BM[..., None])
    rescale_BM = jnp.exp(m_BM - m_new_BM)
    pv_BMC = jnp.einsum("BMS,BSC->BMC", p_BMS.astype(dt), lat_BSC, preferred_element_type=F32)
    return (m_new_BM, l_BM * rescale_BM + jnp.sum(p_BMS, axis=-1),
            acc_BMC * rescale_BM[..., None] + pv_BMC)

  init = (jnp.full((B, T * N), _MASKED, F32), jnp.zeros((B, T * N), F32),
          jnp.zeros((B, T * N, C), F32))
  _, l_BM, acc_BMC = jax.lax.fori_loop(0, n_blocks, body, init)
  out_BMC = acc_BMC / jnp.maximum(l_BM, 1e-30)[..., None]
  return out_BMC.astype(dt).reshape(B, T, N, C)


def latent_attention(q_lat_BTNC, q_rope_BTNR, cache: LatentCache, positions_BT, layer, scale,
                     block: int = LATENT_BLOCK):
  """`online_latent_attention` on a contiguous `[B, S, .]` cache or layer `layer` of a
  `[L, B, S, .]` stack, read in place (never a copy of the layer) up to the block of the
  furthest query. -> [B, T, N, C] in the query's dtype. On the CPU, decoding (few query rows)
  runs the one-pass kernel of `kernels/cpu.py` instead (same function; a query that
  sees no slot gets zeros there, a finite mean here)."""
  B = q_lat_BTNC.shape[0]
  S = cache.latent_BSC.shape[-2]
  bk = min(block, S)
  n_blocks = jnp.minimum(jnp.max(positions_BT).astype(jnp.int32) // bk + 1, -(-S // bk))
  lead = () if layer is None else (layer,)
  zero = jnp.zeros((), jnp.int32)

  def read(x, start):   # [B, bk, width] at slots [start, start + bk)
    size = (1,) * len(lead) + (B, bk, x.shape[-1])
    return jax.lax.dynamic_slice(x, lead + (zero, start, zero), size).reshape(B, bk, -1)

  def read_block(j):
    start = jnp.minimum(j * bk, S - bk)   # the last block ends at S; its overlap is masked
    return read(cache.latent_BSC, start), read(cache.rope_BSR, start), start

  def blocked():
    return online_latent_attention(q_lat_BTNC, q_rope_BTNR, read_block, n_blocks, bk,
                                   positions_BT, scale)

  # One pass over the cache on the CPU (kernels/cpu.py); XLA's blocked loop elsewhere.
  return cpu_kernels.choose(
      cpu_kernels.applies(q_lat_BTNC, cache.latent_BSC, cache.rope_BSR),
      lambda *a: cpu_kernels.latent_decode(*a, layer, scale), lambda *_: blocked(),
      q_lat_BTNC, q_rope_BTNR, cache.latent_BSC, cache.rope_BSR, positions_BT)


def split_kv_b(kernel, H: int):
  """kv_b_proj's kernel [..., C, N, H + J] as the absorbed decode's W_UK [..., N, H, C] (the
  query's map into the latent) and W_UV [..., N, C, J] (the latent output's map to the values)."""
  w_uk_NHC = jnp.moveaxis(kernel[..., :H], -3, -1)
  w_uv_NCJ = jnp.swapaxes(kernel[..., H:], -3, -2)
  return w_uk_NHC, w_uv_NCJ


def absorbed_weights(cfg: ModelConfig, variables: dict) -> dict:
  """`variables` with the `absorbed` collection added: every MLA's W_UK and W_UV split out of
  kv_b_proj in the compute dtype (stacked layers keep their layer axis), so that decoding reads
  them as they are instead of slicing and casting kv_b_proj in every step."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get("params", {})))
  out = {}
  for path, kernel in flat.items():
    if path[-2:] == ("kv_b_proj", "kernel"):
      w_uk, w_uv = split_kv_b(kernel.astype(dtype_of(cfg.dtype)), cfg.qk_nope_head_dim)
      out[path[:-2] + ("w_uk_NHC",)], out[path[:-2] + ("w_uv_NCJ",)] = w_uk, w_uv
  return dict(variables, **{ABSORBED: flax.traverse_util.unflatten_dict(out)})


class MLA(nn.Module):
  """MLA attention. Call with `cache=None` for the expanded causal path, else a `LatentCache`."""
  cfg: ModelConfig
  fp8_policy: Any = None
  absorb: bool = True

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
              init_std=cfg.init_std, fp8_policy=self.fp8_policy)
    D, N, C, R = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    H, J = cfg.qk_nope_head_dim, cfg.v_head_dim
    norm_kw = dict(eps=cfg.rms_norm_eps, param_dtype=dtype_of(cfg.param_dtype))
    if cfg.q_lora_rank is None:
      self.q_proj = Dense((D,), (N, H + R), ("embed", "heads", "qk_head_dim"), **kw)
    else:
      Q = cfg.q_lora_rank
      self.q_a_proj = Dense((D,), (Q,), ("embed", "q_latent"), **kw)
      self.q_a_layernorm = RMSNorm(axis_name="q_latent", **norm_kw)
      self.q_b_proj = Dense((Q,), (N, H + R), ("q_latent", "heads", "qk_head_dim"), **kw)
    self.kv_a_proj_with_mqa = Dense((D,), (C + R,), ("embed", "kv_latent"), **kw)
    self.kv_a_layernorm = RMSNorm(axis_name="kv_latent", **norm_kw)
    self.kv_b_proj = Dense((C,), (N, H + J), ("kv_latent", "heads", "kv_head_dim"), **kw)
    self.o_proj = Dense((N, J), (D,), ("heads", "v_head_dim", "embed"), **kw)

  def _query(self, x_BTD, positions_BT):
    cfg = self.cfg
    if cfg.q_lora_rank is None:
      q = self.q_proj(x_BTD)   # [B, T, N, H + R]
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
    H = cfg.qk_nope_head_dim
    return (checkpoint_name(q[..., :H], "mla_q"),
            checkpoint_name(apply_rope(q[..., H:], positions_BT, cfg), "mla_q"))

  def _latent(self, x_BTD, positions_BT):
    C = self.cfg.kv_lora_rank
    kv = self.kv_a_proj_with_mqa(x_BTD)   # [B, T, C + R]
    latent_BTC = self.kv_a_layernorm(kv[..., :C])
    rope_BTR = apply_rope(kv[..., C:], positions_BT, self.cfg)
    return checkpoint_name(latent_BTC, "mla_kv"), checkpoint_name(rope_BTR, "mla_kv")

  def _attend(self, q_terms, k_terms, v, **mask):
    cfg = self.cfg
    return attention(q_terms, k_terms, v, scale=softmax_scale(cfg), impl=cfg.attention_impl,
                     block=cfg.attention_block, platform=cfg.platform, **mask)

  def _expanded(self, q_nope_BTNH, q_rope_BTNR, latent_BSC, rope_BSR, **mask):
    """Per-head K/V expansion from the latent (training, prefill, and the decode baseline)."""
    H = self.cfg.qk_nope_head_dim
    kv = self.kv_b_proj(latent_BSC)   # [B, S, N, H + J]
    k_nope_BSNH, v_BSNJ = kv[..., :H], kv[..., H:]
    return self._attend((q_nope_BTNH, q_rope_BTNR), (k_nope_BSNH, rope_BSR), v_BSNJ, **mask)

  def _absorbed_weights(self):
    """W_UK [N, H, C] and W_UV [N, C, J] in the compute dtype: the `absorbed` collection's when
    the caller laid them out once (`absorbed_weights`), else split from kv_b_proj here."""
    if self.has_variable(ABSORBED, "w_uk_NHC"):
      w_uk_NHC, w_uv_NCJ = (self.get_variable(ABSORBED, n) for n in ("w_uk_NHC", "w_uv_NCJ"))
    else:
      w_uk_NHC, w_uv_NCJ = split_kv_b(self.kv_b_proj.kernel, self.cfg.qk_nope_head_dim)
    dt = dtype_of(self.cfg.dtype)
    return w_uk_NHC.astype(dt), w_uv_NCJ.astype(dt)

  def _self_reading(self, q_nope_BTNH, q_rope_BTNR, latent_BTC, rope_BTR, positions_BT, cache,
                    layer):
    """Absorbed decode: W_UK folded into the query and W_UV into the output, the attention on
    the latent through the cache's own `write_and_attend(latent_BTC, rope_BTR, q_lat_BTNC,
    q_rope_BTNR, positions_BT, layer, scale) -> (cache, out_lat_BTNC)`: `LatentCache` (blocks
    read in place) or e.g. `generate.paged.PagedLatentCache` (blocks through a block table)."""
    w_uk_NHC, w_uv_NCJ = self._absorbed_weights()
    q_lat_BTNC = jnp.einsum("BTNH,NHC->BTNC", q_nope_BTNH, w_uk_NHC)
    cache, out_lat_BTNC = cache.write_and_attend(latent_BTC, rope_BTR, q_lat_BTNC, q_rope_BTNR,
                                                 positions_BT, layer, softmax_scale(self.cfg))
    out_BTNJ = jnp.einsum("BTNC,NCJ->BTNJ", out_lat_BTNC.astype(w_uv_NCJ.dtype), w_uv_NCJ)
    return self.o_proj(checkpoint_name(out_BTNJ, "attention_out")), cache

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               cache: LatentCache | None = None, layer=None, segments_BT: jax.Array | None = None
               ) -> tuple[jax.Array, LatentCache | None]:
    """Returns (output [B, T, D], updated cache or None).

    `cache` is this layer's `[B, S, .]` cache, or with `layer` (an index, traced or static) the
    whole `[L, B, S, .]` stack, updated in place at that layer (the decode path of the model's
    layer scan, which carries the stack). `segments_BT` (int, cache=None only): packed documents;
    a token attends only within its own segment."""
    q_nope_BTNH, q_rope_BTNR = self._query(x_BTD, positions_BT)
    latent_BTC, rope_BTR = self._latent(x_BTD, positions_BT)
    if cache is None:
      out_BTNJ = self._expanded(q_nope_BTNH, q_rope_BTNR, latent_BTC, rope_BTR,
                                q_positions_BT=positions_BT, segments_BT=segments_BT)
      return self.o_proj(checkpoint_name(out_BTNJ, "attention_out")), None
    if segments_BT is not None:
      raise ValueError("segments_BT: document segments apply to the training/prefill path "
                       "(cache=None) only; decode with one document per row")
    if self.absorb:
      return self._self_reading(q_nope_BTNH, q_rope_BTNR, latent_BTC, rope_BTR, positions_BT,
                                cache, layer)
    # The decode baseline: K and V expanded from every cached slot in every step.
    start_B = positions_BT[:, 0].astype(jnp.int32)
    cache = LatentCache(_write(cache.latent_BSC, latent_BTC, start_B, layer),
                        _write(cache.rope_BSR, rope_BTR, start_B, layer))
    latent_BSC, rope_BSR = cache
    if layer is not None:
      latent_BSC, rope_BSR = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
                              for a in cache)
    B, S = latent_BSC.shape[:2]
    slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=positions_BT.dtype)[None], (B, S))
    out_BTNJ = self._expanded(q_nope_BTNH, q_rope_BTNR, latent_BSC.astype(q_nope_BTNH.dtype),
                              rope_BSR.astype(q_nope_BTNH.dtype), q_positions_BT=positions_BT,
                              kv_positions_BS=slots_BS)
    return self.o_proj(checkpoint_name(out_BTNJ, "attention_out")), cache
