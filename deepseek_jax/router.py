"""DeepSeekMoE routing and auxiliary-loss-free balancing (V3 report §2.1.2, Eq. 12-20).

Pure fp32 functions: `route` (scores, a bias for selection only, group-limited top-k, combine
weights), `balance_loss` (sequence-wise, Eq. 17-20), `update_router_bias` (the bias rule applied
after each optimizer step) and `max_violation` (MaxVio, arXiv 2408.15664 Eq. 4).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig

# Added to the normalising sum as in HF; the scores of chosen experts are never all zero in
# practice, this only keeps an all-underflow row finite.
_NORM_EPS = 1e-20


class RouterOutput(NamedTuple):
  weights_XK: jax.Array   # f32: unbiased scores [normalised] * routed_scaling_factor
  experts_XK: jax.Array   # int32 chosen experts (order within a token carries no meaning)
  scores_XE: jax.Array    # f32 unbiased sigmoid/softmax scores of every expert


def expert_scores(logits_XE: jax.Array, scoring_func: str) -> jax.Array:
  """Affinity scores s_{i,t} in fp32: sigmoid (V3) or softmax over experts (V2)."""
  logits_XE = logits_XE.astype(jnp.float32)
  if scoring_func == "sigmoid":
    return jax.nn.sigmoid(logits_XE)
  if scoring_func == "softmax":
    return jax.nn.softmax(logits_XE, axis=-1)
  raise ValueError(f"scoring_func={scoring_func!r}: must be 'sigmoid' (V3) or 'softmax' (V2)")


def limit_groups(sel_XE: jax.Array, n_group: int, topk_group: int, top2_sum: bool) -> jax.Array:
  """Masks to -inf every expert outside the `topk_group` best of `n_group` contiguous groups.

  Group score: sum of the group's two largest selection scores (`top2_sum`, V3 with routing bias)
  or its maximum (V2). Exactly `topk_group` groups survive per token, ties broken by lower index.
  Local letters: e the experts of one group (E/G), g the groups kept per token (`topk_group`).
  """
  X, E = sel_XE.shape
  if n_group == 1 or topk_group >= n_group:
    return sel_XE
  sel_XGe = sel_XE.reshape(X, n_group, E // n_group)
  if top2_sum:
    group_XG = jnp.sum(jax.lax.top_k(sel_XGe, 2)[0], axis=-1)
  else:
    group_XG = jnp.max(sel_XGe, axis=-1)
  _, kept_Xg = jax.lax.top_k(group_XG, topk_group)
  keep_XG = jnp.zeros((X, n_group), bool).at[jnp.arange(X)[:, None], kept_Xg].set(True)
  return jnp.where(keep_XG[:, :, None], sel_XGe, -jnp.inf).reshape(X, E)


def route(logits_XE: jax.Array, bias_E: jax.Array | None, cfg: ModelConfig) -> RouterOutput:
  """Chooses K experts per token and their combine weights (semantics §2.8, steps 2-8).

  `bias_E` (the `e_score_correction_bias`) shifts selection only; None means no bias. The group
  rule follows `cfg.routing_bias`: top-2 sum when True, max-of-group when False.
  """
  E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
  if logits_XE.ndim != 2 or logits_XE.shape[-1] != E:
    raise ValueError(f"route: logits shape {logits_XE.shape} must be "
                     f"[tokens, n_routed_experts={E}]")
  if bias_E is not None and not cfg.routing_bias:
    raise ValueError("route: a bias was given but model.routing_bias=False; pass None or enable "
                     "model.routing_bias")
  scores_XE = expert_scores(logits_XE, cfg.scoring_func)
  sel_XE = scores_XE
  if bias_E is not None:
    sel_XE = scores_XE + bias_E.astype(jnp.float32)[None, :]
  sel_XE = limit_groups(sel_XE, cfg.n_group, cfg.topk_group, top2_sum=cfg.routing_bias)
  # Selection must not carry gradient; the weights below are gathered from the unbiased scores.
  _, experts_XK = jax.lax.top_k(jax.lax.stop_gradient(sel_XE), K)
  experts_XK = experts_XK.astype(jnp.int32)
  weights_XK = jnp.take_along_axis(scores_XE, experts_XK, axis=-1)
  if cfg.norm_topk_prob:
    weights_XK = weights_XK / (jnp.sum(weights_XK, axis=-1, keepdims=True) + _NORM_EPS)
  weights_XK = weights_XK * cfg.routed_scaling_factor
  return RouterOutput(weights_XK, experts_XK, scores_XE)


def expert_load(experts_XK: jax.Array, num_experts: int) -> jax.Array:
  """Assignment counts per expert, f32 [E]; any leading shape of `experts_XK` is flattened."""
  flat_A = experts_XK.reshape(-1)
  return jnp.zeros((num_experts,), jnp.float32).at[flat_A].add(1.0)


def balance_loss(scores_BTE: jax.Array, experts_BTK: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Sequence-wise balance loss alpha * sum_i f_i P_i (V3 Eq. 17-20), averaged over sequences.

  f_i = E / (K T) * (number of tokens of the sequence routed to i): 1 for every expert under
  uniform routing. P_i = mean over the sequence of s_{i,t} / sum_j s_{j,t}. Only P carries
  gradient. Under uniform routing the loss is alpha.
  """
  B, T, E = scores_BTE.shape
  K = experts_BTK.shape[-1]
  if experts_BTK.shape[:2] != (B, T):
    raise ValueError(f"balance_loss: experts {experts_BTK.shape} and scores {scores_BTE.shape} "
                     "disagree on [batch, positions]")
  counts_BE = jax.vmap(lambda e_TK: expert_load(e_TK, E))(experts_BTK)
  f_BE = counts_BE * (E / (K * T))
  s_BTE = scores_BTE.astype(jnp.float32)
  p_BE = jnp.mean(s_BTE / jnp.sum(s_BTE, axis=-1, keepdims=True), axis=1)
  return cfg.balance_loss_alpha * jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def update_router_bias(bias_E: jax.Array, load_E: jax.Array, gamma: float) -> jax.Array:
  """Aux-loss-free balancing step: b_i += gamma * sign(mean load - load_i) (V3 §2.1.2).

  Works on one layer [E] or stacked layers [L, E] (the mean is per layer, over the last axis).
  Gradient-free; the bias keeps its dtype (f32).
  """
  load = load_E.astype(jnp.float32)
  # sign(E * mean - E * load_i): exact for integer counts (a load equal to the mean stays put).
  step = jnp.sign(jnp.sum(load, axis=-1, keepdims=True) - load.shape[-1] * load)
  return (bias_E + gamma * step).astype(bias_E.dtype)


def max_violation(load_E: jax.Array) -> jax.Array:
  """MaxVio = (max load - mean load) / mean load over the last axis ([E] -> scalar, [L, E] -> [L]).

  0 when there is no load at all.
  """
  load = load_E.astype(jnp.float32)
  mean = jnp.mean(load, axis=-1)
  return jnp.where(mean > 0, (jnp.max(load, axis=-1) - mean) / jnp.maximum(mean, 1e-30), 0.0)
