"""Multi-token prediction (V3 report §2.2; input order as in the code that runs the released weights).

Depth k (1..D) at position i: x = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]) (embedding first),
h^k = TRM_k(x) (a full MLA + MoE block), logits = lm_head(shared_head.norm(h^k)) predict t_{i+k+1}.
h^0 is the main model's hidden state after its final norm; Emb and lm_head are shared with it.
The loss is lambda / D * sum_k CE_k, each CE_k averaged over the positions that have a target.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import naming
from deepseek_jax.block import Block
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import ACT_BTD, Dense, RMSNorm, dtype_of


def shift_left(x_BT: jax.Array, k: int, fill: int = 0) -> jax.Array:
  """x[:, i + k] at position i; the last k positions get `fill`."""
  if k == 0:
    return x_BT
  pad = jnp.full((x_BT.shape[0], k), fill, x_BT.dtype)
  return jnp.concatenate([x_BT[:, k:], pad], axis=1)


class MTPLayer(nn.Module):
  """One MTP depth (HF layer `num_hidden_layers + k - 1`: enorm, hnorm, eh_proj, block, shared_head.norm)."""
  cfg: ModelConfig
  fp8_policy: Any = None
  experts: Any = None   # the block's routed-expert runner (`moe.RoutedExperts`)

  @nn.compact
  def __call__(self, h_BTD, emb_BTD, positions_BT, lm_head, cache=None, segments_BT=None):
    """-> (h, logits, aux, cache); with a `LatentCache` the block decodes through it (drafting).
    With `lm_head=None` the logits slot holds the head's input (after shared_head.norm)."""
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    norm_kw = dict(eps=cfg.rms_norm_eps, param_dtype=pdt, axis_name="embed")
    D = cfg.d_model
    # [enorm(emb) ; hnorm(h)]: the last dimension is 2D wide (D2 in the suffix).
    x_BTD2 = jnp.concatenate([RMSNorm(name=naming.MTP_ENORM, **norm_kw)(emb_BTD),
                              RMSNorm(name=naming.MTP_HNORM, **norm_kw)(h_BTD)], axis=-1)
    x_BTD = Dense((2 * D,), (D,), ("mtp_in", "embed"), dtype=dt, param_dtype=pdt,
                  init_std=cfg.init_std, fp8_policy=self.fp8_policy, name=naming.MTP_PROJ)(x_BTD2)
    h_BTD, (cache, aux) = Block(cfg, self.fp8_policy, moe=True, experts=self.experts,
                                name=naming.MTP_BLOCK)(x_BTD, positions_BT, cache,
                                                       segments_BT=segments_BT)
    head_in_BTD = RMSNorm(name=naming.MTP_HEAD_NORM, **norm_kw)(h_BTD)
    if lm_head is None:
      return h_BTD, head_in_BTD, aux, cache
    return h_BTD, lm_head(head_in_BTD).astype(jnp.float32), aux, cache


class MTP(nn.Module):
  """D sequential MTP depths sharing the main embedding and output head; -> (per-depth logits,
  aux), or the per-depth head inputs with `lm_head=None` (the chunked training loss)."""
  cfg: ModelConfig
  fp8_policy: Any = None
  experts: Any = None

  @nn.compact
  def __call__(self, hidden_BTD, next_tokens_BT, positions_BT, embed, lm_head, segments_BT=None):
    h_BTD, logits, loads, balance = hidden_BTD, [], [], []
    for k in range(1, self.cfg.num_mtp_layers + 1):
      # Depth k embeds t_{i+k} = next_tokens[i+k-1]; positions past the end hold a filler token
      # whose outputs only reach positions without a target (causal attention).
      # constrained like the main embedding: the lookup otherwise inherits the table's split of D
      # (fsdp), which the partitioner can only turn into a batch split through the full array
      emb_BTD = nn.with_logical_constraint(
          embed(shift_left(next_tokens_BT, k - 1)).astype(h_BTD.dtype), ACT_BTD)
      layer = MTPLayer(self.cfg, self.fp8_policy, self.experts, name=naming.unrolled_layer(k - 1))
      h_BTD, logits_BTV, aux, _ = layer(h_BTD, emb_BTD, positions_BT, lm_head,
                                        segments_BT=segments_BT)
      logits.append(logits_BTV)
      loads.append(aux["load"])
      balance.append(aux["balance_loss"])
    return tuple(logits), {"mtp_load": jnp.stack(loads), "mtp_balance_loss": sum(balance)}


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weight_BT: jax.Array):
  """Mean token cross-entropy over positions with weight > 0 (f32); 0 when there are none."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  w_BT = weight_BT.astype(jnp.float32)
  return jnp.sum(nll_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)


def mtp_loss(mtp_logits, next_tokens_BT: jax.Array, weight_BT: jax.Array | None = None,
             lam: float = 0.3):
  """lambda / D * sum_k CE_k. Depth k at position i targets next_tokens[i+k] (= t_{i+k+1}).

  Returns (loss, per-depth CE list). Positions with i + k >= T (no target in the window) and
  positions whose target weight is 0 are ignored.
  """
  if not mtp_logits:
    return jnp.zeros((), jnp.float32), []
  if weight_BT is None:
    weight_BT = jnp.ones(next_tokens_BT.shape, jnp.float32)
  per_depth = [cross_entropy(logits_BTV, *depth_targets(next_tokens_BT, weight_BT, k))
               for k, logits_BTV in enumerate(mtp_logits, start=1)]
  return lam / len(per_depth) * sum(per_depth), per_depth


def depth_targets(next_tokens_BT: jax.Array, weight_BT: jax.Array, k: int):
  """(targets, weights) of MTP depth k: next_tokens[i+k] (= t_{i+k+1}) at position i, weight 0
  where i + k >= T (no target in the window) or the target's own weight is 0."""
  T = next_tokens_BT.shape[1]
  valid_BT = (jnp.arange(T)[None, :] + k < T).astype(jnp.float32)
  return shift_left(next_tokens_BT, k), valid_BT * shift_left(weight_BT.astype(jnp.float32), k)
