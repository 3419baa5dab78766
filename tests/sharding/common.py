"""Shared pieces of the sharding tests: a small model, its loss, and a mesh-activated runner."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import MeshConfig, load_config
from deepseek_jax.model import Transformer, abstract_variables
from deepseek_jax.mtp import cross_entropy, mtp_loss
from sharding import expert_parallel
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding import specs

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BATCH, SEQ = 8, 16


def small_cfg(**overrides):
  """tiny.yaml trimmed for CPU tests: 1 dense + 2 MoE layers and one MTP depth."""
  over = [f"model.{k}={v}" for k, v in dict(dict(num_layers=3, d_model=64, ffn_dim=128,
                                                 moe_ffn_dim=32, q_lora_rank=32, kv_lora_rank=32,
                                                 vocab_size=128), **overrides).items()]
  return load_config(TINY, over).model


def tokens(cfg, batch=BATCH, seq=SEQ, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, cfg.vocab_size)


def loss_fn(params, router_state, tokens_BT, cfg, experts=None):
  """CE + MTP + balance loss of the whole model (the training objective, without the optimizer)."""
  out = Transformer(cfg, experts=experts).apply(
      {"params": params, "router_state": router_state}, tokens_BT[:, :-1],
      next_tokens_BT=tokens_BT[:, 1:])
  targets = tokens_BT[:, 1:]
  ce = cross_entropy(out.logits_BTV, targets, jnp.ones(targets.shape, jnp.float32))
  mtp, _ = mtp_loss(out.mtp_logits, targets)
  aux = out.aux
  return ce + mtp + aux["balance_loss"] + aux.get("mtp_balance_loss", 0.0)


def init_variables(cfg, seed=0):
  toks = tokens(cfg)[:, :-1]
  return specs.strip_boxes(jax.jit(Transformer(cfg).init)(jax.random.key(seed), toks))


@functools.lru_cache(maxsize=None)
def reference(cfg):
  """Single-device loss and gradients (the default runner: plain dropless dispatch)."""
  variables = init_variables(cfg)
  toks = tokens(cfg)
  loss, grads = jax.jit(jax.value_and_grad(functools.partial(loss_fn, cfg=cfg)))(
      variables["params"], variables["router_state"], toks)
  return variables, toks, float(loss), jax.tree.map(np.asarray, grads)


def sharded_loss_and_grads(cfg, shape, rules=rules_lib.DEFAULT_RULES, mesh_cfg=None):
  """Loss, grads, lowered StableHLO and placed variables on a (data, fsdp, expert, tensor) mesh."""
  variables, toks, _, _ = reference(cfg)
  mesh_cfg = mesh_cfg or MeshConfig(*shape)
  mesh = mesh_lib.make_mesh(mesh_cfg)
  mesh_lib.check_model(cfg, mesh, rules)
  mesh_lib.check_batch(toks.shape[0], mesh, rules)
  experts = expert_parallel.runner(cfg, mesh_cfg, mesh, rules)
  with mesh_lib.activate(mesh, rules):
    shardings = specs.state_shardings(abstract_variables(cfg), mesh, rules)
    placed = jax.device_put(variables, shardings)
    toks = jax.device_put(toks, specs.batch_sharding(mesh, rules))
    step = jax.jit(jax.value_and_grad(functools.partial(loss_fn, cfg=cfg, experts=experts)))
    lowered = step.lower(placed["params"], placed["router_state"], toks)
    loss, grads = lowered.compile()(placed["params"], placed["router_state"], toks)
  return float(loss), jax.tree.map(np.asarray, grads), lowered.as_text(), placed


def init_loss(cfg, shape, seed=0):
  """Loss of freshly initialised params, init and loss in one jit; each process feeds its rows."""
  from sharding import distributed  # noqa: PLC0415
  mesh_cfg = MeshConfig(*shape)
  mesh = mesh_lib.make_mesh(mesh_cfg)
  experts = expert_parallel.runner(cfg, mesh_cfg, mesh)
  toks = np.asarray(tokens(cfg))
  with mesh_lib.activate(mesh):
    batch = specs.batch_sharding(mesh)
    rows = distributed.local_batch_rows(batch, toks.shape)
    toks_global = distributed.to_global(toks[rows], batch, toks.shape)

    def f(rng, toks_BT):
      v = specs.strip_boxes(Transformer(cfg, experts=experts).init(rng, toks_BT[:, :-1]))
      return loss_fn(v["params"], v["router_state"], toks_BT, cfg, experts)

    loss = jax.jit(f, out_shardings=specs.replicated(mesh))(jax.random.key(seed), toks_global)
  return float(loss)
