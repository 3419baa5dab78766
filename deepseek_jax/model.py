"""The DeepSeek-V3 Transformer (V3 report §2): embed -> dense blocks -> MoE blocks -> norm -> head.

Pre-norm blocks h += MLA(norm(h)); h += FFN(norm(h)). The first `first_k_dense_replace` blocks use
a dense SwiGLU FFN, the rest DeepSeekMoE; each stack runs under its own `nn.scan` (compile time does
not grow with depth) with an optional remat policy. Multi-token prediction modules (§2.2) follow the
main model when `num_mtp_layers > 0` and the call is a training/prefill call.

Variables: `params` (trainable) and `router_state` (the balancing biases, moved by
`router.update_router_bias`, never by the optimizer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, Dense, RMSNorm, dtype_of
from deepseek_jax.mla import MLA, LatentCache, init_cache

ACT_BTD = ("act_batch", "act_seq", "act_embed")


class ModelOutput(NamedTuple):
  logits_BTV: jax.Array
  mtp_logits: tuple[jax.Array, ...]   # one [B, T, V] per depth k; position i predicts t_{i+k+1}
  aux: dict                           # load [L_moe, E], balance_loss scalar (sum over MoE layers)
  cache: dict | None                  # {'dense': LatentCache, 'moe': LatentCache} when decoding
  hidden_BTD: jax.Array               # final hidden state after the final norm (MTP input)


def init_model_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Zeroed latent cache: (C + R) values per token for each of the num_layers layers."""
  out = {}
  for name, n in (("dense", cfg.first_k_dense_replace), ("moe", cfg.num_moe_layers)):
    out[name] = init_cache(cfg, batch, max_len, layers=n, dtype=dtype) if n else None
  return out


class Block(nn.Module):
  """One pre-norm decoder block (HF names: input_layernorm, self_attn, post_attention_layernorm, mlp)."""
  cfg: ModelConfig
  fp8_policy: Any = None
  moe: bool = False
  absorb: bool = True

  @nn.compact
  def __call__(self, h_BTD, positions_BT, cache, layer=None):
    """-> (h, (cache, aux)); `cache`/`layer` as in `MLA.__call__`."""
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    norm_kw = dict(eps=cfg.rms_norm_eps, param_dtype=pdt, axis_name="embed")
    attn_BTD, cache = MLA(cfg, self.fp8_policy, self.absorb, name="self_attn")(
        RMSNorm(name="input_layernorm", **norm_kw)(h_BTD), positions_BT, cache, layer)
    h_BTD = h_BTD + attn_BTD
    x_BTD = RMSNorm(name="post_attention_layernorm", **norm_kw)(h_BTD)
    if self.moe:
      from deepseek_jax.moe import MoE  # noqa: PLC0415 (MoE builds on this module's layers)
      y_BTD, aux = MoE(cfg, self.fp8_policy, name="mlp")(x_BTD)
    else:
      y_BTD = MLP(cfg.d_model, cfg.ffn_dim, dtype=dt, param_dtype=pdt, init_std=cfg.init_std,
                  fp8_policy=self.fp8_policy, name="mlp")(x_BTD)
      aux = {}
    h_BTD = nn.with_logical_constraint(h_BTD + y_BTD, ACT_BTD)
    return h_BTD, (cache, aux)


class StackBlock(Block):
  """A `Block` that carries the whole `[L, ...]` cache stack and takes its layer index as the
  scanned input: `((h, stack), positions, layer) -> ((h, stack), aux)`. Decoding scans this, so
  each layer writes its new tokens into the stack in place instead of the scan slicing a layer
  out (xs) and stacking it back (ys), which copies the whole cache every step."""

  def __call__(self, carry, positions_BT, layer):
    h_BTD, stack = carry
    h_BTD, (stack, aux) = super().__call__(h_BTD, positions_BT, stack, layer)
    return (h_BTD, stack), aux


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class BlockStack(nn.Module):
  """`n` blocks of one kind, scanned (stacked params with a leading 'layers' axis) or unrolled."""
  cfg: ModelConfig
  n: int
  moe: bool
  fp8_policy: Any = None
  absorb: bool = True

  @nn.compact
  def __call__(self, h_BTD, positions_BT, cache):
    cfg = self.cfg
    block_cls = Block if cache is None else StackBlock
    if cfg.remat != "none":
      block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat],
                           prevent_cse=not cfg.scan_layers)
    kw = dict(cfg=cfg, fp8_policy=self.fp8_policy, moe=self.moe, absorb=self.absorb)
    if cfg.scan_layers:
      axes = {"params": 0, "router_state": 0, "fp8_state": 0, "intermediates": 0}
      scanned = nn.scan(block_cls, variable_axes=axes, split_rngs={"params": True},
                        in_axes=(nn.broadcast, 0), length=self.n,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      if cache is None:
        h_BTD, (_, aux) = scanned(name="layers", **kw)(h_BTD, positions_BT, None)
      else:
        (h_BTD, cache), aux = scanned(name="layers", **kw)(
            (h_BTD, cache), positions_BT, jnp.arange(self.n, dtype=jnp.int32))
      return h_BTD, cache, aux
    auxes = []
    for i in range(self.n):
      block = block_cls(name=f"layers_{i}", **kw)
      if cache is None:
        h_BTD, (_, a) = block(h_BTD, positions_BT, None)
      else:
        (h_BTD, cache), a = block((h_BTD, cache), positions_BT, i)
      auxes.append(a)
    return h_BTD, cache, jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)


class Transformer(nn.Module):
  """DeepSeek-V3. `__call__(tokens_BT, positions_BT=None, cache=None, next_tokens_BT=None)`.

  With `cache=None` this is the training/prefill path (expanded MLA, causal over `tokens_BT`, MTP
  logits when configured). With a cache (from `init_model_cache`) the new tokens are written at
  `positions_BT` and attend to every cached slot at or before their position (absorbed MLA unless
  `absorb=False`). `next_tokens_BT` (the training targets) feeds MTP depth k with t_{i+k}; without
  it the inputs are shifted in from `tokens_BT`.
  """
  cfg: ModelConfig
  fp8_policy: Any = None
  absorb: bool = True

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, cache=None, next_tokens_BT=None,
               with_mtp: bool = True) -> ModelOutput:
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pdt, name="embed_tokens",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(cfg.init_std), ("vocab", "embed")))
    h_BTD = nn.with_logical_constraint(embed(tokens_BT).astype(dt), ACT_BTD)
    new_cache, aux = {}, {}
    for name, n, moe in (("dense", cfg.first_k_dense_replace, False),
                         ("moe", cfg.num_moe_layers, True)):
      if n == 0:
        new_cache[name] = None
        continue
      stack_cache = None if cache is None else cache[name]
      h_BTD, new_cache[name], stack_aux = BlockStack(
          cfg, n, moe, self.fp8_policy, self.absorb, name=f"{name}_blocks")(
              h_BTD, positions_BT, stack_cache)
      if moe:
        aux = {"load": stack_aux["load"], "balance_loss": jnp.sum(stack_aux["balance_loss"])}
    norm = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=pdt, axis_name="embed", name="norm")
    lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), dtype=dt,
                    param_dtype=pdt, init_std=cfg.init_std, fp8_policy=self.fp8_policy,
                    name="lm_head")
    hidden_BTD = norm(h_BTD)
    logits_BTV = lm_head(hidden_BTD).astype(jnp.float32)
    mtp_logits = ()
    if cfg.num_mtp_layers and cache is None and with_mtp:
      from deepseek_jax.mtp import MTP  # noqa: PLC0415
      if next_tokens_BT is None:
        next_tokens_BT = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, -1:]], axis=1)
      mtp_logits, mtp_aux = MTP(cfg, self.fp8_policy, name="mtp")(
          hidden_BTD, next_tokens_BT, positions_BT, embed, lm_head)
      aux = dict(aux, **mtp_aux)
    return ModelOutput(logits_BTV, mtp_logits, aux, None if cache is None else new_cache,
                       hidden_BTD)
