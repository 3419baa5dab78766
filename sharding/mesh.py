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
import numpy as np
from jax.experimental import mesh_utils
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


def dcn_shape(mesh_cfg: MeshConfig) -> dict[str, int]:
  """Ways of each axis that cross nodes/slices (`mesh.dcn_*`), the outer factor of the axis."""
  return {a: getattr(mesh_cfg, f"dcn_{a}", 1) for a in AXES}


def node_ids(devices: Sequence) -> np.ndarray:
  """The node of each device, read from the topology: its TPU slice (`slice_index`) when the
  devices span several slices (multislice over DCN), else its host (`process_index`: a GPU node
  on InfiniBand, a TPU host in one slice). One process sees one node."""
  slices = {getattr(d, "slice_index", 0) for d in devices}
  attr = "slice_index" if len(slices) > 1 else "process_index"
  return np.array([getattr(d, attr, 0) for d in devices])


def _hybrid_devices(sizes: dict[str, int], dcn: dict[str, int], devices: list) -> np.ndarray:
  """Devices laid out so that each axis's outer `dcn` factor steps across nodes and its inner
  factor stays inside one node (`mesh_utils.create_hybrid_device_mesh`)."""
  nodes = node_ids(devices)
  want = math.prod(dcn.values())
  have = len(set(nodes.tolist()))
  shown = "x".join(str(dcn[a]) for a in AXES)
  if have != want:
    raise ConfigError(f"mesh.dcn_* (data x fsdp x expert x tensor = {shown}): product {want} != "
                      f"the {have} nodes (slices, or hosts) the {len(devices)} devices sit on; "
                      "make the product match the node count")
  ici = [sizes[a] // dcn[a] for a in AXES]
  by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
  try:
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, [dcn[a] for a in AXES], devices, process_is_granule=not by_slice,
        allow_split_physical_axes=True)
  except (ValueError, AssertionError, NotImplementedError) as e:
    raise ConfigError(f"mesh.dcn_* = {shown}: cannot lay the devices out with "
                      f"{'x'.join(map(str, ici))} inside each node ({str(e).splitlines()[0]})"
                      ) from None
  return grid


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A concrete mesh over `devices` (default: `jax.devices()`, every process's devices); with
  `mesh.dcn_*` set, a hybrid layout whose inner factors stay inside a node."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg)
  types = (AxisType.Auto,) * len(AXES)
  if math.prod(dcn.values()) > 1:
    for a in AXES:
      if sizes[a] % dcn[a]:
        raise ConfigError(f"mesh.dcn_{a}={dcn[a]}: must divide mesh.{a}={sizes[a]}")
    return Mesh(_hybrid_devices(sizes, dcn, devices), AXES, axis_types=types)
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=types, devices=devices)


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


def _first_seen(row) -> tuple[int, ...]:
  """Labels 0, 1, ... in order of first appearance: [7, 7, 3, 3] -> (0, 0, 1, 1)."""
  seen: dict = {}
  return tuple(seen.setdefault(v, len(seen)) for v in row.tolist())


def grid_shard_nodes(grid: np.ndarray, names: Sequence[str], axes: Sequence[str]
                     ) -> tuple[int, ...]:
  """Node labels (first seen = 0) of the shards along `axes` of a device `grid` whose dimensions
  are `names`; ConfigError unless every line along `axes` falls on nodes the same way."""
  names = list(names)
  order = [names.index(a) for a in names if a not in axes] + [names.index(a) for a in axes]
  p = math.prod(grid.shape[names.index(a)] for a in axes)
  ids = node_ids(list(grid.flat)).reshape(grid.shape).transpose(order)
  rows = {_first_seen(r) for r in ids.reshape(-1, p)}
  if len(rows) != 1:
    raise ConfigError(f"mesh: the {p} shards of {_axes_text(tuple(axes))} fall on nodes "
                      "differently along the other axes; lay the mesh out with mesh.dcn_* so "
                      "every line of shards has the same node structure")
  return rows.pop()


def expert_shard_nodes(model_cfg, mesh: AnyMesh,
                       rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> tuple[int, ...]:
  """The node (0..O-1) of each of the P expert shards, the nodes node-limited routing bounds.

  Read from the devices when the expert shards sit on several nodes (`node_ids`: GPU hosts,
  TPU slices); the grouping must be the same along every other mesh axis. Otherwise (an abstract
  mesh, or one host emulating a cluster) V3's convention: routing groups map onto consecutive
  runs of shards and a run is a node, min(G, P) of them (G | P: one group on P/G shards; P | G:
  G/P groups per shard). ConfigError when topology nodes and routing groups do not nest (every
  group inside one node, or every node a union of whole groups).
  """
  axes, p = _split(mesh, "experts", rules)
  G = max(1, model_cfg.n_group)
  emulated = tuple(i * min(G, p) // p for i in range(p))
  if isinstance(mesh, AbstractMesh) or p == 1:
    return emulated
  node_P = grid_shard_nodes(mesh.devices, mesh.axis_names, axes)
  if len(set(node_P)) == 1:
    return emulated
  group_P = [i * G // p for i in range(p)] if G <= p else list(range(p))
  by_group = {g: {n for q, n in zip(group_P, node_P) if q == g} for g in set(group_P)}
  by_node = {n: {g for q, g in zip(node_P, group_P) if q == n} for n in set(node_P)}
  nested = (all(len(v) == 1 for v in by_group.values())
            or all(all(by_group[g] == {n} for g in gs) for n, gs in by_node.items()))
  if not nested:
    raise ConfigError(f"model.n_group={G}: the routing groups and the {len(by_node)} nodes that "
                      f"the {p} expert shards ({_axes_text(axes)}) sit on do not nest, so "
                      "node-limited routing (topk_group) would not bound the nodes a token "
                      "reaches; make each group one node or each node whole groups (mesh.dcn_expert)")
  return tuple(node_P)


def expert_nodes(model_cfg, mesh: AnyMesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> int:
  """How many nodes the expert shards span (`expert_shard_nodes`): node-limited routing's N."""
  return len(set(expert_shard_nodes(model_cfg, mesh, rules)))


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
  if p > 1:
    expert_shard_nodes(model_cfg, mesh, rules)   # topology nodes and routing groups nest


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
