"""The pure training and evaluation steps (V3 report §2.1.2 balancing, §2.2 MTP, §4.2).

loss = CE + lambda * MTP + alpha * sequence-wise balance, one optimizer update over `grad_accum`
microbatches; then the routing biases move against the whole batch's load and a delayed-scaling FP8
recipe rolls its amax history. A non-finite step changes only the step, data and non-finite
counters. Config, model and optimizer are bound with `functools.partial`; no host I/O here.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from deepseek_jax import naming, router
from deepseek_jax.config import Config, ModelConfig
from deepseek_jax.fp8 import delayed
from deepseek_jax.layers import dtype_of, gather_specs
from deepseek_jax.loss import chunk_positions, chunked_cross_entropy, chunked_mtp_loss
from deepseek_jax.model import HEAD_AXES, OutputHead, head_variables
from deepseek_jax.mtp import cross_entropy
from deepseek_jax.training.optimizer import lr_schedule
from deepseek_jax.training.state import TrainState, model_variables

Batch = dict[str, jax.Array]   # {'tokens': [B, T] int32, 'targets': [B, T] int32}


def _rows_per_device(batch: int) -> int:
  """The rows of `batch` one device holds under the traced mesh and logical rules (the chunk
  budget is per device: the global batch would shrink chunks to a position when it is large)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return batch
  axes = nn.logical_to_mesh_axes(("act_batch",))[0]
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return max(1, batch // math.prod(sizes.get(a, 1) for a in axes))


def compute_weights(params, model_cfg: ModelConfig):
  """The float32 weights the layers cast to a lower compute dtype anyway, cast once up front.

  Same values (every layer casts its kernel before use), but the cast now happens on each
  device's shard, so FSDP all-gathers move compute-dtype bytes (half of f32) and the weight
  gradients are reduce-scattered in that dtype too. The router's f32 kernel (V3 keeps routing in
  high precision) and 1-d weights (norms, biases) are left as they are.
  """
  dt = dtype_of(model_cfg.dtype)
  if dt == jnp.float32:
    return params

  def cast(path, p):
    keys = {getattr(k, "key", None) for k in path}
    if naming.ROUTER in keys or p.ndim < 2 or p.dtype != jnp.float32:
      return p
    return p.astype(dt)

  return jax.tree_util.tree_map_with_path(cast, params)


def _keep_gathered(path, x):
  """The head kernel's gradient sum, kept whole over the batch axes (`layers.gather_specs`)."""
  specs = gather_specs(HEAD_AXES) if getattr(path[-1], "key", None) == "kernel" else None
  return x if specs is None else jax.lax.with_sharding_constraint(x, specs[0])


def loss_fn(params, fp8_state, router_state, batch: Batch, *, model, cfg: Config):
  """Returns (loss, aux) for one (micro)batch; aux holds the loss parts and the expert loads."""
  tokens_BT, targets_BT = batch["tokens"], batch["targets"]
  variables = model_variables(compute_weights(params, model.cfg), router_state, fp8_state)
  # The model stops before the head; the loss applies it chunk by chunk (no [B, T, V] logits).
  # 'segments' (optional, [B, T] int): packed documents; attention stays within each one.
  out = model.apply(variables, tokens_BT, next_tokens_BT=targets_BT, logits=False,
                    segments_BT=batch.get("segments"))
  weight_BT = jnp.ones(targets_BT.shape, jnp.float32)
  # The head's kernel is gathered once (not per chunk); its gradient sums stay gathered across
  # the chunks and are reduce-scattered once.
  head = OutputHead(model.cfg, model.fp8_policy, gather=False).apply
  head_vars = head_variables(variables, gather=True)
  constrain = functools.partial(jax.tree_util.tree_map_with_path, _keep_gathered)
  B, T = targets_BT.shape
  platform = model.cfg.platform if model.cfg.platform != "auto" else jax.default_backend()
  chunk = chunk_positions(cfg.train.loss_chunk, _rows_per_device(B), T, model.cfg.vocab_size,
                          platform)
  ce = chunked_cross_entropy(head, head_vars, out.hidden_BTD, targets_BT, weight_BT, chunk,
                             constrain)
  mtp, per_depth = chunked_mtp_loss(head, head_vars, out.mtp_hidden, targets_BT, weight_BT,
                                    cfg.train.mtp_loss_weight, chunk, constrain)
  zero = jnp.zeros((), jnp.float32)
  balance = out.aux.get("balance_loss", zero) + out.aux.get("mtp_balance_loss", zero)
  aux = {"ce": ce, "mtp": mtp, "balance": balance,
         "mtp_ce": jnp.stack(per_depth) if per_depth else jnp.zeros((0,), jnp.float32)}
  for name in ("load", "mtp_load"):
    if name in out.aux:
      aux[name] = out.aux[name]
  return ce + mtp + balance, aux


def _grads(params, fp8_state, router_state, batch: Batch, *, model, cfg: Config):
  """(loss, aux, grads, fp8 observations) over `grad_accum` equal microbatches.

  Loss, loss parts and gradients are means; expert loads are summed. The gradient with respect to
  `fp8_state` carries the amaxes each FP8 GEMM saw (`fp8.delayed`); microbatches merge them by max.
  """
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  kw = dict(model=model, cfg=cfg)
  n = cfg.train.grad_accum
  if n == 1:
    (loss, aux), (grads, obs) = grad_fn(params, fp8_state, router_state, batch, **kw)
    return loss, aux, grads, obs
  # BT -> [n, B/n, T]: microbatches along the leading axis
  micro = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)

  def body(carry, mb):
    (loss, aux), (grads, obs) = grad_fn(params, fp8_state, router_state, mb, **kw)
    total, total_aux, total_grads, seen = carry
    add = functools.partial(jax.tree.map, jnp.add)
    return (total + loss, add(total_aux, aux), add(total_grads, grads),
            delayed.merge(seen, obs)), None

  first = jax.tree.map(lambda x: x[0], micro)
  (loss_s, aux_s), (grads_s, obs_s) = jax.eval_shape(
      lambda: grad_fn(params, fp8_state, router_state, first, **kw))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, aux_s, grads_s, obs_s))
  (loss, aux, grads, obs), _ = jax.lax.scan(body, zeros, micro)
  mean = lambda x: x / n  # noqa: E731
  aux = {k: (v if k in ("load", "mtp_load") else mean(v)) for k, v in aux.items()}
  return mean(loss), aux, jax.tree.map(mean, grads), obs


def _bias_load_pairs(router_state, aux, model_cfg: ModelConfig) -> dict:
  """Maps each routing-bias leaf of `router_state` to its layer's load (same shape)."""
  def load_for(path, bias):
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    loc = naming.locate(model_cfg, keys)
    if loc.kind == naming.MOE_STACK:
      load = aux["load"]                      # [L_moe, E]; a scanned stack takes all rows
      load = load if loc.index is None else load[loc.index]
    elif loc.kind == naming.MTP:
      load = aux["mtp_load"][loc.index]       # [D, E] -> depth k's [E]
    else:
      raise ValueError(f"router_state leaf {'/'.join(keys)}: no expert load to balance it with")
    if load.shape != bias.shape:
      raise ValueError(f"router_state leaf {'/'.join(keys)}: shape {bias.shape} != load "
                       f"{load.shape}")
    return load
  return jax.tree_util.tree_map_with_path(load_for, router_state)


def update_router_biases(router_state, aux, gamma: float, model_cfg: ModelConfig):
  """b += gamma * sign(mean load - load) on every MoE layer (main stack and MTP depths)."""
  loads = _bias_load_pairs(router_state, aux, model_cfg)
  return jax.tree.map(lambda b, l: router.update_router_bias(b, l, gamma), router_state, loads)


def train_step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
               cfg: Config) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step on `batch` ({'tokens', 'targets'}: [B, T] int32)."""
  loss, aux, grads, obs = _grads(state.params, state.fp8_state, state.router_state, batch,
                                 model=model, cfg=cfg)
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (optax.apply_updates(state.params, updates), opt_state,
            update_router_biases(state.router_state, aux, cfg.train.bias_update_gamma,
                                 cfg.model),
            delayed.update_tree(state.fp8_state, obs))

  # A branch, not a select: the common (finite) path writes the new state once.
  params, opt_state, router_state, fp8_state = jax.lax.cond(
      ok, update,
      lambda _: (state.params, state.opt_state, state.router_state, state.fp8_state), None)
  bad = (~ok).astype(jnp.int32)
  applied = state.step - state.bad_total    # updates taken so far = the optimizer's step count
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      router_state=router_state,
      fp8_state=fp8_state,
      data_position=state.data_position + 1,
      bad_streak=(state.bad_streak + 1) * bad,
      bad_total=state.bad_total + bad)
  metrics = {"loss": loss, "ce": aux["ce"], "mtp": aux["mtp"], "mtp_ce": aux["mtp_ce"],
             "balance": aux["balance"], "grad_norm": grad_norm,
             "lr": lr_schedule(cfg.train)(applied), "finite": ok,
             "bad_streak": new_state.bad_streak, "bad_total": new_state.bad_total}
  if "load" in aux:
    metrics["maxvio"] = router.max_violation(aux["load"])          # [L_moe]
  if "mtp_load" in aux:
    metrics["mtp_maxvio"] = router.max_violation(aux["mtp_load"])  # [D]
  return new_state, metrics


def eval_step(variables: dict, batch: Batch, *, model) -> jax.Array:
  """Mean next-token cross-entropy (nats) of one batch, main head only (`variables`:
  `state.model_variables(...)`)."""
  out = model.apply(variables, batch["tokens"], with_mtp=False)
  targets_BT = batch["targets"]
  return cross_entropy(out.logits_BTV, targets_BT, jnp.ones(targets_BT.shape, jnp.float32))


def bits_per_byte(nll_nats_per_token: float, tokens_per_byte: float) -> float:
  """Validation loss in bits per byte of text (tokenizer-independent)."""
  return nll_nats_per_token * tokens_per_byte / math.log(2)
