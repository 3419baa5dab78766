"""Meshes that know nodes: hybrid ICI x DCN layouts (`mesh.dcn_*`) and node-limited routing's
"node" read from the devices (GPU host, TPU slice), not from device ids."""

import dataclasses
import math
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.config import ConfigError, MeshConfig
from sharding import mesh as mesh_lib
from tests.helpers import HAS_GPU_COMPILER, HAS_TPU_COMPILER
from tests.sharding import common

AXES = mesh_lib.AXES


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  slice_index: int = 0
  platform: str = "gpu"
  device_kind: str = "fake"


def _hosts(nodes: int, per_node: int, shuffle_seed: int | None = None) -> list[FakeDevice]:
  devs = [FakeDevice(i, i // per_node) for i in range(nodes * per_node)]
  if shuffle_seed is not None:   # device ids need not follow hosts
    np.random.default_rng(shuffle_seed).shuffle(devs)
  return devs


@st.composite
def _layouts(draw):
  """Axis sizes split into an outer (node) and inner (in-node) factor, powers of two."""
  dcn = {a: 2 ** draw(st.integers(0, 2)) for a in AXES}
  ici = {a: 2 ** draw(st.integers(0, 2)) for a in AXES}
  return dcn, ici, draw(st.integers(0, 2 ** 16))


@settings(max_examples=25, deadline=None)
@given(_layouts())
def test_hybrid_mesh_keeps_inner_factors_inside_a_node(layout):
  dcn, ici, seed = layout
  nodes, per_node = math.prod(dcn.values()), math.prod(ici.values())
  sizes = {a: dcn[a] * ici[a] for a in AXES}
  grid = mesh_lib._hybrid_devices(sizes, dcn, _hosts(nodes, per_node, seed))
  assert grid.shape == tuple(sizes[a] for a in AXES)
  node_of = {}
  for coords in np.ndindex(grid.shape):
    outer = tuple(c // ici[a] for c, a in zip(coords, AXES))
    node_of.setdefault(outer, set()).add(grid[coords].process_index)
  assert all(len(v) == 1 for v in node_of.values())           # one outer position: one node
  assert len({n for v in node_of.values() for n in v}) == nodes  # each outer position its own


def test_slices_are_the_nodes_when_there_are_several():
  devs = [FakeDevice(i, process_index=i // 2, slice_index=i // 4, platform="tpu")
          for i in range(8)]
  assert mesh_lib.node_ids(devs).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
  one_slice = [dataclasses.replace(d, slice_index=0) for d in devs]
  assert mesh_lib.node_ids(one_slice).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]   # hosts


def test_dcn_product_must_match_the_nodes():
  sizes = {"data": 1, "fsdp": 2, "expert": 8, "tensor": 1}
  dcn = {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
  with pytest.raises(ConfigError, match=r"product 8 != the 4 nodes"):
    mesh_lib._hybrid_devices(sizes, dcn, _hosts(4, 4))


def test_dcn_must_divide_its_axis():
  with pytest.raises(ConfigError, match=r"mesh.dcn_expert=3: must divide mesh.expert=4"):
    MeshConfig(expert=4, dcn_expert=3)
  with pytest.raises(ConfigError, match=r"mesh.dcn_fsdp=0: must be a positive integer"):
    MeshConfig(fsdp=2, dcn_fsdp=0)


def _fake_mesh(grid):
  return types.SimpleNamespace(devices=grid, axis_names=AXES, axis_sizes=grid.shape)


def _grid(dcn, ici, seed=None):
  sizes = {a: dcn.get(a, 1) * ici.get(a, 1) for a in AXES}
  full_dcn = {a: dcn.get(a, 1) for a in AXES}
  return mesh_lib._hybrid_devices(sizes, full_dcn, _hosts(math.prod(full_dcn.values()),
                                                          math.prod(ici.values()), seed))


def test_expert_nodes_come_from_the_hosts_not_the_ids():
  """EP 16 = 2 nodes x 8, device ids shuffled across hosts: shards 0-7 on one node."""
  cfg = common.small_cfg(n_routed_experts=16, n_group=2, topk_group=1)
  mesh = _fake_mesh(_grid({"expert": 2, "fsdp": 2}, {"expert": 8}, seed=3))
  assert mesh_lib.expert_shard_nodes(cfg, mesh) == (0,) * 8 + (1,) * 8
  assert mesh_lib.expert_nodes(cfg, mesh) == 2
  # 4 groups of 4 shards: two groups per node nest
  cfg4 = common.small_cfg(n_routed_experts=16, n_group=4, topk_group=2)
  assert mesh_lib.expert_nodes(cfg4, mesh) == 2


def test_groups_that_straddle_nodes_are_refused():
  """6 shards on 3 nodes of 2, 2 routing groups of 3 shards: group 0 straddles nodes 0 and 1."""
  cfg = common.small_cfg(n_routed_experts=12, n_group=2, topk_group=1)
  mesh = _fake_mesh(_grid({"expert": 3}, {"expert": 2}))
  with pytest.raises(ConfigError, match=r"model.n_group=2: the routing groups and the 3 nodes"):
    mesh_lib.expert_shard_nodes(cfg, mesh)


def test_lines_with_different_node_structure_are_refused():
  grid = np.array([FakeDevice(i, p) for i, p in enumerate([0, 0, 1, 1, 2, 3, 3, 3])],
                  dtype=object).reshape(1, 2, 4, 1)
  with pytest.raises(ConfigError, match=r"fall on nodes differently"):
    mesh_lib.grid_shard_nodes(grid, AXES, ("expert",))


def test_one_host_emulates_nodes_by_routing_group():
  cfg = common.small_cfg()   # 16 experts in 4 groups
  mesh = mesh_lib.make_mesh(MeshConfig(1, 1, 8, 1))
  assert mesh_lib.expert_shard_nodes(cfg, mesh) == (0, 0, 1, 1, 2, 2, 3, 3)


@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs the [gpu] extra (XLA:GPU topology)")
def test_gpu_nodes_from_the_compile_topology():
  from deepseek_jax.aot import targets
  from sharding import expert_parallel
  devices = targets.devices(targets.parse_target("h800:4x8"))
  cfg = MeshConfig(data=1, fsdp=2, expert=16, tensor=1, dcn_fsdp=2, dcn_expert=2)
  mesh = mesh_lib.make_mesh(cfg, devices)
  model = common.small_cfg(n_routed_experts=16, n_group=2, topk_group=1, moe_dispatch="dropless")
  assert mesh_lib.expert_shard_nodes(model, mesh) == (0,) * 8 + (1,) * 8
  ep = expert_parallel.runner(model, cfg, mesh)
  assert ep.node_P == (0,) * 8 + (1,) * 8
  # without dcn_*, the default layout puts the 16 expert shards on 2 hosts as well
  flat = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=2, expert=16, tensor=1), devices)
  assert mesh_lib.expert_nodes(model, flat) == 2


@pytest.mark.skipif(not HAS_TPU_COMPILER, reason="needs the [tpu] extra (libtpu topology)")
def test_tpu_multislice_nodes_are_slices():
  from deepseek_jax.aot import targets
  target = targets.parse_target("tpu-v5p:2x2x1/2")
  devices = targets.devices(target)
  assert target.num_devices == len(devices) == 8 and target.nodes == 2
  mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=2, expert=4, dcn_expert=2), devices)
  model = common.small_cfg(n_routed_experts=8, n_group=2, topk_group=1)
  assert mesh_lib.expert_shard_nodes(model, mesh) == (0, 0, 1, 1)
