"""The sharded training program of a config: mesh, model, optimizer, state shardings and the jitted
steps, built over any devices: this host's (`train.py`) or a target's that is not here
(`python -m deepseek_jax.aot` passes the devices of a GPU or TPU topology).

The model config is `resolved` for the devices' platform first, so every "auto" choice (compute
dtype, grouped-matmul and attention kernels) is made for where the step will run, not for the host
that traces it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from deepseek_jax.config import Config, ConfigError
from deepseek_jax.fp8 import policy_from_config
from deepseek_jax.model import Transformer
from deepseek_jax.training.optimizer import make_optimizer
from deepseek_jax.training.state import abstract_state, make_init_fn, variables_of
from deepseek_jax.training.step import eval_step, train_step
from sharding import expert_parallel, specs
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib


class Built(NamedTuple):
  """The run's static pieces: model, optimizer, init, mesh, shardings and the jitted steps.

  Trace under `activate()` (init, lowering): flax then resolves logical axes through the rules.
  """
  cfg: Config              # with the model config resolved for the devices' platform
  model: Any
  tx: Any
  init_fn: Callable
  mesh: Mesh
  activate: Callable
  state_sh: Any            # TrainState of NamedShardings
  batch_sh: NamedSharding
  abstract: Any            # TrainState of ShapeDtypeStructs with shardings
  batch_abstract: dict
  step_fn: Any             # jitted (state, batch) -> (state, metrics), state donated
  eval_fn: Any             # jitted (model variables, batch) -> mean CE


def platform_of(devices: Sequence[jax.Device]) -> str:
  """'cpu', 'gpu' or 'tpu' for the devices (CUDA and ROCm devices report 'gpu')."""
  return {"cuda": "gpu", "rocm": "gpu"}.get(devices[0].platform, devices[0].platform)


def resolve(cfg: Config, devices: Sequence[jax.Device]) -> Config:
  """`cfg` with the model config's "auto" choices made for the devices' platform."""
  return dataclasses.replace(cfg, model=cfg.model.resolved(platform_of(devices)))


def make_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None):
  """The mesh and logical rules of `cfg.mesh` (sharding/), checked against the model and batch."""
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  rules = rules_lib.rules_from_config(cfg.mesh)
  mesh_lib.check_model(cfg.model, mesh, rules)
  mesh_lib.check_batch(cfg.train.batch_size // cfg.train.grad_accum, mesh, rules,
                       field="train.batch_size / train.grad_accum")
  return mesh, rules


def build(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Built:
  """Everything `train.py` runs, over `devices` (default `jax.devices()`); nothing allocated."""
  devices = list(jax.devices() if devices is None else devices)
  cfg = resolve(cfg, devices)
  t = cfg.train
  mesh, rules = make_mesh(cfg, devices)
  activate = functools.partial(mesh_lib.activate, mesh, rules)
  model = Transformer(cfg.model, fp8_policy=policy_from_config(cfg.fp8),
                      experts=expert_parallel.runner(cfg.model, cfg.mesh, mesh, rules))
  tx = make_optimizer(t)
  init_fn = make_init_fn(model, tx, (t.batch_size, t.seq_len), t.seed)
  with activate():
    boxed = abstract_state(init_fn)   # leaves boxed with their logical axis names
  state_sh = specs.state_shardings(boxed, mesh, rules)
  batch_sh = specs.batch_sharding(mesh, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.unbox(boxed), state_sh)
  batch_abstract = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.int32, sharding=batch_sh)
                    for k in ("tokens", "targets")}
  replicated = specs.replicated(mesh)
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, cfg=cfg),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                    donate_argnames=("state",))
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(variables_of(state_sh), batch_sh),
                    out_shardings=replicated)
  return Built(cfg, model, tx, init_fn, mesh, activate, state_sh, batch_sh, abstract,
               batch_abstract, step_fn, eval_fn)


def _host_memory() -> int | None:
  """Bytes of host RAM this process may still use (MemAvailable), None where unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  except (ValueError, OSError):
    return None


def device_bytes(abstract, devices: Sequence[jax.Device]) -> dict:
  """{device: bytes of the state it holds} (each leaf's shard, from its sharding)."""
  out = dict.fromkeys(devices, 0)
  for leaf in jax.tree.leaves(abstract):
    size = np.dtype(leaf.dtype).itemsize
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      for d in out:
        out[d] += size * int(np.prod(leaf.shape))
      continue
    for d, index in sharding.devices_indices_map(leaf.shape).items():
      if d in out:
        out[d] += size * int(np.prod([len(range(*s.indices(n))) for s, n in zip(index, leaf.shape)]))
  return out


def check_memory(b: Built) -> None:
  """ConfigError before anything is allocated when the training state (parameters, optimizer
  moments) cannot fit: per device against its memory limit, or, for CPU devices (they share the
  host), their sum against the host's available RAM. The step's gradients and activations need
  more besides: passing this check does not promise the step fits."""
  mine = [d for d in b.mesh.devices.flat if d.process_index == jax.process_index()]
  per_device = device_bytes(b.abstract, mine)
  gib = 1024 ** 3
  limits = {}
  for d in per_device:
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 (a backend without memory statistics)
      stats = None
    if stats and stats.get("bytes_limit"):
      limits[d] = int(stats["bytes_limit"])
  if limits:
    d, need = max(((d, per_device[d] - limits[d]) for d in limits), key=lambda x: x[1])
    if need > 0:
      raise ConfigError(f"the training state needs {per_device[d] / gib:.2f} GiB on {d} (its "
                        f"parameters and optimizer moments), more than its "
                        f"{limits[d] / gib:.2f} GiB; choose a smaller model or shard it over more "
                        "devices (mesh.*)")
    return
  total, host = sum(per_device.values()), _host_memory()
  if host is not None and total > host:
    raise ConfigError(f"the training state needs {total / gib:.2f} GiB (its parameters and "
                      f"optimizer moments), more than this host's {host / gib:.2f} GiB of "
                      "available memory; choose a smaller model (model.vocab_size, model.d_model, "
                      "model.num_layers, ...)")
