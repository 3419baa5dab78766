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

from deepseek_jax import naming
from deepseek_jax.block import BlockStack
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import ACT_BTD, Dense, RMSNorm, dtype_of, gathered
from deepseek_jax.mla import init_cache
from deepseek_jax.mtp import MTP

class ModelOutput(NamedTuple):
  logits_BTV: jax.Array | None        # f32; None when called with logits=False
  mtp_logits: tuple[jax.Array, ...]   # one [B, T, V] per depth k; position i predicts t_{i+k+1}
  aux: dict                           # load [L_moe, E], balance_loss scalar (sum over MoE layers)
  cache: dict | None                  # {'dense': LatentCache, 'moe': LatentCache} when decoding
  hidden_BTD: jax.Array               # final hidden state after the final norm (MTP input)
  # logits=False: what each MTP depth feeds the head (after its shared_head.norm), in place of
  # mtp_logits; `OutputHead` turns these and hidden_BTD into logits.
  mtp_hidden: tuple[jax.Array, ...] = ()


HEAD_AXES = ("embed", "vocab")


def _lm_head(cfg: ModelConfig, fp8_policy, gather: bool = True) -> Dense:
  return Dense((cfg.d_model,), (cfg.vocab_size,), HEAD_AXES, dtype=dtype_of(cfg.dtype),
               param_dtype=dtype_of(cfg.param_dtype), init_std=cfg.init_std,
               fp8_policy=fp8_policy, gather=gather, name=naming.HEAD)


class OutputHead(nn.Module):
  """The Transformer's output head alone, under the same variable names: applied to a
  Transformer's variables (or `head_variables` of them) it computes the logits (compute dtype)
  through the same `Dense`, FP8 path and state. The chunked training loss calls it per chunk."""
  cfg: ModelConfig
  fp8_policy: Any = None
  gather: bool = True      # False: applied to `head_variables(..., gather=True)`

  @nn.compact
  def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
    return _lm_head(self.cfg, self.fp8_policy, self.gather)(hidden_BTD)


def head_variables(variables: dict, gather: bool = False) -> dict:
  """The output head's sub-tree of a Transformer's variables (what `OutputHead` reads). With
  `gather` its kernel is gathered over the batch axes here (`layers.gathered`): once, before a
  chunked loss loops over it (with `OutputHead(gather=False)`), rather than in every chunk."""
  out = {col: {naming.HEAD: tree[naming.HEAD]} for col, tree in variables.items()
         if naming.HEAD in tree}
  if gather and "params" in out:
    head = dict(out["params"][naming.HEAD])
    head["kernel"] = gathered(head["kernel"], HEAD_AXES)
    out["params"] = {naming.HEAD: head}
  return out


def init_model_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Zeroed latent cache: (C + R) values per token for each of the num_layers layers."""
  out = {}
  for name, n in (("dense", cfg.first_k_dense_replace), ("moe", cfg.num_moe_layers)):
    out[name] = init_cache(cfg, batch, max_len, layers=n, dtype=dtype) if n else None
  return out


class Transformer(nn.Module):
  """DeepSeek-V3. `__call__(tokens_BT, positions_BT=None, cache=None, next_tokens_BT=None,
  with_mtp=True, logits=True, segments_BT=None)`.

  With `cache=None` this is the training/prefill path (expanded MLA, causal over `tokens_BT`, MTP
  logits when configured). With a cache (from `init_model_cache`) the new tokens are written at
  `positions_BT` and attend to every cached slot at or before their position (absorbed MLA unless
  `absorb=False`). `next_tokens_BT` (the training targets) feeds MTP depth k with t_{i+k}; without
  it the inputs are shifted in from `tokens_BT`. `logits=False` stops before the output head
  (`hidden_BTD`, `mtp_hidden`): training computes its loss chunk by chunk (`loss.py`), never
  holding [B, T, V] logits. `segments_BT` (training/prefill only): packed documents, each token
  attending within its own segment.

  `experts` runs the routed experts of every MoE block (None: `dispatch.LocalExperts.from_config`;
  for expert parallelism `sharding.expert_parallel.runner(...)`), as `fp8_policy` sets the
  numerics: whoever builds the model chooses, nothing ambient does.
  """
  cfg: ModelConfig
  fp8_policy: Any = None
  experts: Any = None
  absorb: bool = True

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, cache=None, next_tokens_BT=None,
               with_mtp: bool = True, logits: bool = True, segments_BT=None) -> ModelOutput:
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pdt, name=naming.EMBED,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(cfg.init_std), ("vocab", "embed")))
    h_BTD = nn.with_logical_constraint(embed(tokens_BT).astype(dt), ACT_BTD)
    new_cache, aux = {}, {}
    for name, stack, n, moe in (("dense", naming.DENSE_STACK, cfg.first_k_dense_replace, False),
                                ("moe", naming.MOE_STACK, cfg.num_moe_layers, True)):
      if n == 0:
        new_cache[name] = None
        continue
      stack_cache = None if cache is None else cache[name]
      h_BTD, new_cache[name], stack_aux = BlockStack(
          cfg, n, moe, self.fp8_policy, self.absorb, self.experts, name=stack)(
              h_BTD, positions_BT, stack_cache, segments_BT)
      if moe:
        aux = {"load": stack_aux["load"], "balance_loss": jnp.sum(stack_aux["balance_loss"])}
    norm = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=pdt, axis_name="embed", name=naming.FINAL_NORM)
    lm_head = _lm_head(cfg, self.fp8_policy)
    hidden_BTD = norm(h_BTD)
    logits_BTV = lm_head(hidden_BTD).astype(jnp.float32) if logits else None
    mtp_out = ()
    if cfg.num_mtp_layers and cache is None and with_mtp:
      if next_tokens_BT is None:
        next_tokens_BT = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, -1:]], axis=1)
      mtp_out, mtp_aux = MTP(cfg, self.fp8_policy, self.experts, name=naming.MTP)(
          hidden_BTD, next_tokens_BT, positions_BT, embed, lm_head if logits else None,
          segments_BT)
      aux = dict(aux, **mtp_aux)
    return ModelOutput(logits_BTV, mtp_out if logits else (), aux,
                       None if cache is None else new_cache, hidden_BTD,
                       () if logits else mtp_out)


def abstract_variables(cfg: ModelConfig) -> dict:
  """Shapes, dtypes and logical axes (boxed) of every variable of `Transformer(cfg)`; nothing
  is allocated. `flax.core.meta.unbox` drops the boxes."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)
