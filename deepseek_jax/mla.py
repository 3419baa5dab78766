"""Multi-head Latent Attention (V3 report §2.1.1; V2 report §2.1.2-2.1.3).

The cache holds one latent c_KV [C] and one rope key k_R [R] shared by all heads, per token per
layer. Two paths compute the same function: expanded (training, prefill: K and V per head) and
absorbed (decode: W_UK folded into the query, W_UV into the output, attention on the latent). Both
attend through `attention.attention` (blockwise or fused kernels: no [B, N, T, S] at long context).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.attention import attention
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import Dense, RMSNorm, dtype_of
from deepseek_jax.rope import apply_rope, softmax_scale


class LatentCache(NamedTuple):
  """Per-layer latent cache: kv_norm(c_KV) [B, S, C] and rope(k_R) [B, S, R]."""
  latent_BSC: jax.Array
  rope_BSR: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, layers: int | None = None,
               dtype=None) -> LatentCache:
  """Zeroed cache for `layers` stacked layers (default cfg.num_layers): [L, B, S, C] and [L, B, S, R]."""
  L = cfg.num_layers if layers is None else layers
  dt = dtype or dtype_of(cfg.dtype)
  return LatentCache(jnp.zeros((L, batch, max_len, cfg.kv_lora_rank), dt),
                     jnp.zeros((L, batch, max_len, cfg.qk_rope_head_dim), dt))


UNROLL_ROWS = 16   # cache writes: one update per row unrolled up to this batch, else a loop


def _write(cache: jax.Array, new: jax.Array, start_B: jax.Array, layer=None) -> jax.Array:
  """Writes each row's new entries `new` [B, T, width] at its own start position (positions are
  contiguous per row) into `cache` [B, S, width], or into layer `layer` of a stack
  [L, B, S, width] (width: C or R).

  One `dynamic_update_slice` per row, so XLA updates the buffer in place; a vmapped update
  becomes a scatter, and a per-layer slice passed through a scan's xs/ys is copied whole: at
  context 8192 both cost ~4x the attention itself (measured on XLA:CPU).
  """
  new = new.astype(cache.dtype)
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
    return cache
  return jax.lax.fori_loop(0, B, row, cache)


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

  def _absorbed(self, q_nope_BTNH, q_rope_BTNR, latent_BSC, rope_BSR, **mask):
    """W_UK folded into the query and W_UV into the output: attention reads the latent directly
    (one key and value shared by all heads, read in blocks of `attention_block` at long context)."""
    H = self.cfg.qk_nope_head_dim
    w = self.kv_b_proj.kernel.astype(latent_BSC.dtype)   # [C, N, H + J]
    w_uk_CNH, w_uv_CNJ = w[..., :H], w[..., H:]
    q_lat_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w_uk_CNH)
    out_lat_BTNC = self._attend((q_lat_BTNC, q_rope_BTNR), (latent_BSC, rope_BSR), latent_BSC,
                                **mask)
    return jnp.einsum("BTNC,CNJ->BTNJ", out_lat_BTNC, w_uv_CNJ)

  def _self_reading(self, q_nope_BTNH, q_rope_BTNR, latent_BTC, rope_BTR, positions_BT, cache,
                    layer):
    """Absorbed attention through a cache object that writes and reads its own latents, e.g.
    `generate.paged.PagedLatentCache` (blocks gathered through a block table):
    `cache.write_and_attend(latent_BTC, rope_BTR, q_lat_BTNC, q_rope_BTNR, positions_BT, layer,
    scale) -> (cache, out_lat_BTNC)`."""
    H = self.cfg.qk_nope_head_dim
    w = self.kv_b_proj.kernel.astype(cache.dtype)   # [C, N, H + J]
    q_lat_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w[..., :H])
    cache, out_lat_BTNC = cache.write_and_attend(latent_BTC, rope_BTR, q_lat_BTNC, q_rope_BTNR,
                                                 positions_BT, layer, softmax_scale(self.cfg))
    out_BTNJ = jnp.einsum("BTNC,CNJ->BTNJ", out_lat_BTNC, w[..., H:])
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
    if hasattr(cache, "write_and_attend"):   # a cache that stores and reads itself (paged)
      return self._self_reading(q_nope_BTNH, q_rope_BTNR, latent_BTC, rope_BTR, positions_BT,
                                cache, layer)
    start_B = positions_BT[:, 0].astype(jnp.int32)
    cache = LatentCache(_write(cache.latent_BSC, latent_BTC, start_B, layer),
                        _write(cache.rope_BSR, rope_BTR, start_B, layer))
    latent_BSC, rope_BSR = cache
    if layer is not None:
      latent_BSC, rope_BSR = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
                              for a in cache)
    B, S = latent_BSC.shape[:2]
    slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=positions_BT.dtype)[None], (B, S))
    attend = self._absorbed if self.absorb else self._expanded
    out_BTNJ = attend(q_nope_BTNH, q_rope_BTNR, latent_BSC, rope_BSR,
                      q_positions_BT=positions_BT, kv_positions_BS=slots_BS)
    return self.o_proj(checkpoint_name(out_BTNJ, "attention_out")), cache
