"""Meshes from config, and every mesh/config mismatch raising its clear error."""

import jax
import pytest

from deepseek_jax.config import ConfigError, MeshConfig, load_config
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from tests.sharding import common


@pytest.mark.parametrize("cfg, shape", [
    (MeshConfig(), (8, 1, 1, 1)),
    (MeshConfig(data=2, fsdp=2, expert=2, tensor=1), (2, 2, 2, 1)),
    (MeshConfig(data=1, fsdp=2, expert=-1, tensor=1), (1, 2, 4, 1)),
    (MeshConfig(data=2, fsdp=1, expert=2, tensor=-1), (2, 1, 2, 2)),
])
def test_make_mesh_fills_and_orders_axes(cfg, shape):
  mesh = mesh_lib.make_mesh(cfg)
  assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
  assert tuple(mesh.axis_sizes) == shape
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_abstract_mesh_needs_no_devices():
  mesh = mesh_lib.make_abstract_mesh(MeshConfig(data=-1, fsdp=8, expert=64), 2048)
  assert mesh_lib.axis_sizes(mesh) == {"data": 4, "fsdp": 8, "expert": 64, "tensor": 1}


@pytest.mark.parametrize("cfg, match", [
    (MeshConfig(data=2, fsdp=2, expert=1, tensor=1), r"product 4 != 8 devices"),
    (MeshConfig(data=-1, fsdp=3), r"mesh.data=-1: the other axes .* must divide the 8 devices"),
])
def test_mesh_product_mismatch(cfg, match):
  with pytest.raises(ConfigError, match=match):
    mesh_lib.make_mesh(cfg)


@pytest.mark.parametrize("kw, match", [
    (dict(data=-1, fsdp=-1), r"at most one mesh axis may be -1"),
    (dict(expert=0), r"mesh.expert=0: must be > 0 or -1"),
    (dict(capacity_factor=0.0), r"mesh.capacity_factor=0.0"),
    (dict(alltoall="nccl"), r"mesh.alltoall='nccl'"),
    (dict(dispatch_dtype="float8"), r"mesh.dispatch_dtype='float8'"),
    (dict(rules=("embed",)), r"mesh.rules='embed'"),
])
def test_mesh_config_validation(kw, match):
  with pytest.raises(ConfigError, match=match):
    MeshConfig(**kw)


def test_mesh_config_from_yaml_overrides():
  cfg = load_config(common.TINY, ["mesh.expert=4", "mesh.data=-1", "mesh.capacity_factor=1.5"])
  assert (cfg.mesh.expert, cfg.mesh.capacity_factor) == (4, 1.5)


def _model(**kw):
  return common.small_cfg(**kw)


@pytest.mark.parametrize("shape, model_kw, match", [
    ((1, 1, 8, 1), dict(n_routed_experts=12, n_group=4, topk_group=2),
     r"model.n_routed_experts=12: must divide over the 8 expert shards \(mesh.expert\)"),
    ((2, 1, 1, 4), dict(num_heads=2),
     r"model.num_heads=2: must divide over mesh.tensor \(size 4\)"),
    ((1, 1, 8, 1), dict(n_routed_experts=24, n_group=3, topk_group=2),
     r"model.n_group=3: routing groups must map onto expert-parallel nodes"),
    ((1, 1, 4, 2), dict(moe_ffn_dim=21), r"model.moe_ffn_dim=21: must divide over mesh.tensor"),
    ((1, 8, 1, 1), dict(d_model=36, num_heads=4), r"model.d_model=36: must divide over mesh.fsdp"),
])
def test_model_mesh_mismatch(shape, model_kw, match):
  mesh = mesh_lib.make_mesh(MeshConfig(*shape))
  with pytest.raises(ConfigError, match=match):
    mesh_lib.check_model(_model(**model_kw), mesh)


def test_model_fits_good_meshes():
  cfg = _model()
  for shape in [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (2, 1, 2, 2), (1, 1, 8, 1)]:
    mesh_lib.check_model(cfg, mesh_lib.make_mesh(MeshConfig(*shape)))


def test_batch_mismatch():
  mesh = mesh_lib.make_mesh(MeshConfig(2, 2, 2, 1))
  mesh_lib.check_batch(16, mesh)
  with pytest.raises(ConfigError, match=r"train.batch_size=12: must be a multiple of 8 = "
                                        r"mesh.dataxmesh.fsdpxmesh.expert"):
    mesh_lib.check_batch(12, mesh)
  with pytest.raises(ConfigError, match=r"must be a multiple of the 3 processes"):
    mesh_lib.check_batch(8, mesh_lib.make_mesh(MeshConfig(8, 1, 1, 1)), process_count=3)


def test_batch_axes_follow_rules():
  mesh = mesh_lib.make_mesh(MeshConfig(2, 2, 2, 1))
  rules = rules_lib.with_overrides(rules_lib.DEFAULT_RULES, ["act_batch=data"])
  assert mesh_lib.batch_shards(mesh, rules) == 2
  mesh_lib.check_batch(6, mesh, rules)


def test_expert_nodes():
  cfg = _model()  # 16 experts in 4 groups
  nodes = {s: mesh_lib.expert_nodes(cfg, mesh_lib.make_mesh(MeshConfig(*s)))
           for s in [(8, 1, 1, 1), (4, 1, 2, 1), (2, 1, 4, 1), (1, 1, 8, 1)]}
  assert nodes == {(8, 1, 1, 1): 1, (4, 1, 2, 1): 2, (2, 1, 4, 1): 4, (1, 1, 8, 1): 4}
