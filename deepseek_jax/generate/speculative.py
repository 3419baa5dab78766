"""MTP self-speculative decoding (V3 report §2.2, §5.4.3; speculative sampling, arXiv 2211.17192).

MTP depth 1 drafts the token after next from the main model's final hidden state; the main model
verifies [pending token, draft] in one two-position pass over the latent cache, and speculative
sampling (`accept`) keeps the output distribution exactly the main model's (under greedy decoding:
identical to plain greedy decoding). Each step emits one or two tokens per row.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import naming
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import Dense, dtype_of
from deepseek_jax.mla import LatentCache, init_cache
from deepseek_jax.model import Transformer
from deepseek_jax.mtp import MTPLayer


class _Depth1(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden_BTD, emb_BTD, positions_BT, lm_head, cache):
    _, logits_BTV, _, cache = MTPLayer(self.cfg, name=naming.unrolled_layer(0))(
        hidden_BTD, emb_BTD, positions_BT, lm_head, cache)
    return logits_BTV, cache


class MTPDrafter(nn.Module):
  """MTP depth 1 with a latent cache, applied to the Transformer's own variables (its variable
  tree is a sub-tree of the Transformer's, by the names of `naming`). `__call__(hidden_BTD,
  next_tokens_BT, positions_BT, cache) -> (logits_BTV, cache)`: position i embeds t_{i+1} and
  predicts t_{i+2}."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden_BTD, next_tokens_BT, positions_BT, cache: LatentCache):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    emb_BTD = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pdt, name=naming.EMBED)(
        next_tokens_BT).astype(dt)
    lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), dtype=dt,
                    param_dtype=pdt, name=naming.HEAD)
    return _Depth1(cfg, name=naming.MTP)(hidden_BTD, emb_BTD, positions_BT, lm_head, cache)


def init_draft_cache(cfg: ModelConfig, batch: int, max_len: int) -> LatentCache:
  """Latent cache of the MTP block: [B, S, C] and [B, S, R].

  Written at both verified positions every step; the slot past the accepted prefix is rewritten by
  the next step (queries never look past their own position). Only depth 1 drafts: a depth-k cache
  needs t_{i+k}, unknown until k - 1 more positions are verified."""
  c = init_cache(cfg, batch, max_len, layers=1)
  return LatentCache(c.latent_BSC[0], c.rope_BSR[0])


def check_speculative(cfg: ModelConfig) -> None:
  if cfg.num_mtp_layers < 1:
    raise ValueError("speculative decoding drafts with the MTP module, but this model has "
                     "num_mtp_layers=0 (load a checkpoint that holds model.layers.{num_layers})")


def draft(cfg, variables, cache, hidden_BTD, next_tokens_BT, positions_BT, index_B):
  """Runs the drafter over T positions; returns (drafter logits at `index_B` [B, V], cache)."""
  logits_BTV, cache = MTPDrafter(cfg).apply(variables, hidden_BTD, next_tokens_BT, positions_BT,
                                             cache)
  return jnp.take_along_axis(logits_BTV, index_B[:, None, None], axis=1)[:, 0], cache


def accept(rng, p0_BV, p1_BV, q_BV, draft_B):
  """Speculative sampling for one draft: accept d with probability min(1, p0(d) / q(d)); the bonus
  token comes from norm(max(p0 - q, 0)) after a rejection, else from p1. The first emitted token
  is then distributed exactly as p0. Returns (accepted_B bool, bonus_B)."""
  k_acc, k_bonus = jax.random.split(rng)
  p_d = jnp.take_along_axis(p0_BV, draft_B[:, None], axis=1)[:, 0]
  q_d = jnp.take_along_axis(q_BV, draft_B[:, None], axis=1)[:, 0]
  accepted_B = jax.random.uniform(k_acc, p_d.shape) * q_d < p_d
  residual_BV = jnp.maximum(p0_BV - q_BV, 0.0)
  mass_B1 = jnp.sum(residual_BV, axis=-1, keepdims=True)
  residual_BV = jnp.where(mass_B1 > 0, residual_BV / jnp.maximum(mass_B1, 1e-30), p0_BV)
  bonus_BV = jnp.where(accepted_B[:, None], p1_BV, residual_BV)
  bonus_B = jax.random.categorical(k_bonus, jnp.log(bonus_BV)).astype(draft_B.dtype)
  return accepted_B, bonus_B


def verify(cfg, variables, cache, tokens_B, draft_B, positions_B, q_BV, rng, probs_fn):
  """One speculative step for every row: the main model over [pending token, draft].

  Returns (cache, emitted_B2, accepted_B, hidden_B2D, positions_B2): emitted[:, 0] is the
  accepted draft or the bonus token, emitted[:, 1] the bonus token after an accepted draft (a
  repeat otherwise); the hidden states and positions feed the drafter's next call.
  `probs_fn(logits_BV) -> probs_BV` is the sampling distribution.
  """
  x_B2 = jnp.stack([tokens_B, draft_B], axis=1)
  pos_B2 = positions_B[:, None] + jnp.arange(2, dtype=positions_B.dtype)[None, :]
  out = Transformer(cfg).apply(variables, x_B2, pos_B2, cache=cache)
  accepted_B, bonus_B = accept(rng, probs_fn(out.logits_BTV[:, 0]), probs_fn(out.logits_BTV[:, 1]),
                               q_BV, draft_B)
  emitted_B2 = jnp.where(accepted_B[:, None], jnp.stack([draft_B, bonus_B], 1),
                         jnp.stack([bonus_B, bonus_B], 1))
  return out.cache, emitted_B2, accepted_B, out.hidden_BTD, pos_B2
