"""Device meshes from config: axes `data`, `fsdp`, `expert`, `tensor` (scaling-book `sharding.md`).

A mesh names the devices' layout; `rules.py` says which array dimensions split over which axis.
`make_mesh(cfg.mesh)` builds a concrete mesh over the visible devices (all processes in a
multi-controller run), `make_abstract_mesh(cfg.mesh, 2048)` one of any size for `eval_shape`
planning. Every axis is `AxisType.Auto`: the compiler propagates shardings from the logical
constraints, and only `expert_parallel.py` takes manual control inside `shard_map`.

Mismatches fail early with the field, the value and the rule: a product that does not match the
device count, experts or heads that do not divide over their axes, routing groups that cannot map
onto expert-parallel nodes (V3 report §3.2.2: one routing group = one node), and batches that do
not divide over the batch axes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

from deepseek_jax.config import ConfigError, MeshConfig
from sharding import rules as rules_lib

AXES = rules_lib.MESH_AXES
AnyMesh = Mesh | AbstractMesh


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes with the -1 axis filled; ConfigError when they cannot tile `num_devices`."""
  sizes = {a: getattr(mesh_cfg, a) for a in AXES}
  fixed = math.prod(v for v in sizes.values() if v != -1)
  fills = [a for a, v in sizes.items() if v == -1]
  shown = "x".join(str(sizes[a]) for a in AXES)
  if fills:
    if num_devices % fixed:
      raise ConfigError(f"mesh.{fills[0]}=-1: the other axes ({shown}, product {fixed}) must "
                        f"divide the {num_devices} devices; change the fixed axis sizes")
    sizes[fills[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"mesh (data x fsdp x expert x tensor = {shown}): product {fixed} != "
                      f"{num_devices} devices; make the product match or set one axis to -1")
  return sizes


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A concrete mesh over `devices` (default: `jax.devices()`, every process's devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def make_abstract_mesh(mesh_cfg: MeshConfig, num_devices: int) -> AbstractMesh:
  """A device-free mesh of `num_devices` for shape and memory planning (no allocation)."""
  sizes = mesh_shape(mesh_cfg, num_devices)
  return AbstractMesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def axis_sizes(mesh: AnyMesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def _split(mesh: AnyMesh, name: str, rules: rules_lib.Rules) -> tuple[tuple[str, ...], int]:
  sizes = axis_sizes(mesh)
  axes = tuple(a for a in rules_lib.mesh_axes_of(name, rules) if a in sizes)
  return axes, math.prod(sizes[a] for a in axes)


def _axes_text(axes: tuple[str, ...]) -> str:
  return "x".join(f"mesh.{a}" for a in axes)


def expert_nodes(model_cfg, mesh: AnyMesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> int:
  """Expert-parallel "nodes": routing groups map onto consecutive runs of expert shards.

  With P expert shards and G routing groups, min(G, P) nodes: G | P puts one group on P/G
  devices (V3 training: 8 groups on 64 GPUs = 8 nodes of 8), P | G puts G/P groups on each
  device (then a device is a node). Node-limited routing then bounds the nodes a token reaches.
  """
  _, p = _split(mesh, "experts", rules)
  return min(model_cfg.n_group, p)


def check_model(model_cfg, mesh: AnyMesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> None:
  """ConfigError when the model's experts, heads or routing groups do not fit the mesh.

  Other dimensions are checked leaf by leaf in `specs.check_divisible`.
  """
  axes, p = _split(mesh, "experts", rules)
  E, G = model_cfg.n_routed_experts, model_cfg.n_group
  if E % p:
    raise ConfigError(f"model.n_routed_experts={E}: must divide over the {p} expert shards "
                      f"({_axes_text(axes)}); change mesh.expert or the expert count")
  if p > 1 and G > 1 and (p % G and G % p):
    raise ConfigError(f"model.n_group={G}: routing groups must map onto expert-parallel nodes, so "
                      f"n_group and the {p} expert shards ({_axes_text(axes)}) must divide one "
                      "another (one group = one node, V3 report §3.2.2)")
  for name, field, value in (("heads", "model.num_heads", model_cfg.num_heads),
                             ("mlp", "model.ffn_dim", model_cfg.ffn_dim),
                             ("moe_mlp", "model.moe_ffn_dim", model_cfg.moe_ffn_dim),
                             ("vocab", "model.vocab_size", model_cfg.vocab_size),
                             ("embed", "model.d_model", model_cfg.d_model)):
    axes, n = _split(mesh, name, rules)
    if value % n:
      raise ConfigError(f"{field}={value}: must divide over {_axes_text(axes)} (size {n}), the "
                        f"axes that split logical {name!r}; change the mesh or mesh.rules")


def batch_shards(mesh: AnyMesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> int:
  """How many ways the batch is split (the product of the act_batch axes)."""
  return _split(mesh, "act_batch", rules)[1]


def check_batch(batch_size: int, mesh: AnyMesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES,
                field: str = "train.batch_size", process_count: int | None = None) -> None:
  """ConfigError unless `batch_size` splits evenly over the batch axes and over the processes."""
  axes, n = _split(mesh, "act_batch", rules)
  if batch_size % n:
    raise ConfigError(f"{field}={batch_size}: must be a multiple of {n} = {_axes_text(axes)}, the "
                      "axes that split the batch")
  procs = jax.process_count() if process_count is None else process_count
  if batch_size % procs:
    raise ConfigError(f"{field}={batch_size}: must be a multiple of the {procs} processes (each "
                      "feeds its own slice)")


@contextlib.contextmanager
def activate(mesh: AnyMesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES
             ) -> Iterator[AnyMesh]:
  """Context for tracing the model on `mesh`: the mesh and the logical rules.

  Trace (jit, eval_shape, init) inside it: flax resolves logical names through `rules`. It
  chooses no algorithm: expert parallelism is the runner passed to the model
  (`expert_parallel.runner`). Flax rules are not part of jit's cache key: keep one mesh/rules
  per jitted function.
  """
  rules = rules_lib.check_rules(rules)
  set_mesh = (jax.sharding.use_abstract_mesh if isinstance(mesh, AbstractMesh) else jax.set_mesh)
  with set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


def describe(mesh: AnyMesh) -> str:
  """'data=2 fsdp=2 expert=2 tensor=1 (8 devices)'."""
  sizes: Mapping[str, int] = axis_sizes(mesh)
  axes = " ".join(f"{a}={sizes[a]}" for a in mesh.axis_names)
  return f"{axes} ({math.prod(sizes.values())} devices)"
