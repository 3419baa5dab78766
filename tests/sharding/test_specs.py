"""State shardings: golden parameter specs, optimizer state, sharded init, 671B on 2048 devices."""

import json
import os

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ConfigError, MeshConfig, load_config
from deepseek_jax.model import Transformer, abstract_variables
from sharding import expert_parallel
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding import specs
from tests.sharding import common

GOLDEN = common.ROOT / "tests" / "sharding" / "golden"
GOLDEN_MESHES = {"tiny_2x2x2x1.json": (2, 2, 2, 1), "tiny_1x2x2x2.json": (1, 2, 2, 2)}


def _tiny_abstract():
  return abstract_variables(load_config(common.TINY).model)


@pytest.mark.parametrize("name", sorted(GOLDEN_MESHES))
def test_golden_param_specs(name):
  """Every parameter's PartitionSpec for tiny.yaml; UPDATE_GOLDEN=1 rewrites the file."""
  mesh = mesh_lib.make_mesh(MeshConfig(*GOLDEN_MESHES[name]))
  got = {"mesh": mesh_lib.axis_sizes(mesh), "specs": specs.spec_table(_tiny_abstract(), mesh)}
  path = GOLDEN / name
  if os.environ.get("UPDATE_GOLDEN"):
    path.write_text(json.dumps(got, indent=1) + "\n")
  want = json.loads(path.read_text())
  assert got["mesh"] == want["mesh"]
  diff = {k: (want["specs"].get(k), got["specs"].get(k))
          for k in set(want["specs"]) | set(got["specs"])
          if want["specs"].get(k) != got["specs"].get(k)}
  assert not diff, f"PartitionSpecs differ from {path.name} (want, got): {diff}"


def test_golden_meshes_differ_where_axes_do():
  a, b = (json.loads((GOLDEN / n).read_text())["specs"] for n in sorted(GOLDEN_MESHES))
  key = "params/moe_blocks/layers/mlp/experts/gate_proj"
  assert a[key] == [None, "expert", "fsdp", "tensor"] and b[key] == [None, "expert", "fsdp", None] \
      or b[key] == [None, "expert", "fsdp", "tensor"] and a[key] == [None, "expert", "fsdp", None]


def _expected(spec_names, mesh, rules=rules_lib.DEFAULT_RULES):
  return specs.mesh_spec(spec_names, rules, mesh_lib.axis_sizes(mesh))


@pytest.mark.parametrize("boxed", [True, False])
def test_optimizer_state_follows_params(boxed):
  mesh = mesh_lib.make_mesh(MeshConfig(1, 2, 2, 2))
  cfg = common.small_cfg()
  abstract_vars = common.abstract_variables(cfg)
  params = abstract_vars["params"] if boxed else specs.strip_boxes(abstract_vars["params"])
  tx = optax.adamw(1e-3)
  state = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                    "opt_state": tx.init(p)}, params)
  sh = specs.state_shardings(state, mesh, logical=None if boxed else abstract_vars)
  names = specs.logical_table(abstract_vars)[
      ("params", "moe_blocks", "layers", "mlp", "experts", "gate_proj")]
  want = _expected(names, mesh)
  assert want == P(None, "expert", "fsdp", "tensor")
  adam = sh["opt_state"][0]
  assert sh["params"]["moe_blocks"]["layers"]["mlp"]["experts"]["gate_proj"].spec == want
  for moment in (adam.mu, adam.nu):
    assert moment["moe_blocks"]["layers"]["mlp"]["experts"]["gate_proj"].spec == want
    assert moment["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
  assert adam.count.spec == P() and sh["step"].spec == P()


def test_init_sharded_never_whole():
  mesh = mesh_lib.make_mesh(MeshConfig(1, 2, 2, 2))
  cfg = common.small_cfg()
  toks = jnp.zeros((8, 16), jnp.int32)
  init = Transformer(cfg).init
  compiled, sh = specs.compile_init(init, jax.random.key(0), toks, mesh=mesh)
  variables = compiled(jax.random.key(0), toks)
  flat = jax.tree.leaves(specs.strip_boxes(variables))
  flat_sh = jax.tree.leaves(sh, is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))
  assert len(flat) == len(flat_sh)
  split = 0
  for x, s in zip(flat, flat_sh):
    assert x.sharding.is_equivalent_to(s, x.ndim)
    assert x.addressable_shards[0].data.shape == s.shard_shape(x.shape)
    split += s.shard_shape(x.shape) != x.shape
  assert split > len(flat) // 2
  abstract = jax.eval_shape(init, jax.random.key(0), toks)
  total, per_device = specs.total_bytes(abstract), specs.bytes_per_device(abstract, sh)
  mem = compiled.memory_analysis()
  assert per_device < total / 3
  assert mem.output_size_in_bytes <= per_device + 1024
  # Nothing whole on any device, not even transiently (the RNG draws are partitioned too).
  assert mem.output_size_in_bytes + mem.temp_size_in_bytes < total


def test_indivisible_dimension_names_the_leaf():
  mesh = mesh_lib.make_mesh(MeshConfig(1, 2, 2, 2))
  rules = rules_lib.with_overrides(rules_lib.DEFAULT_RULES, ["layers=expert"])
  match = (r"params/dense_blocks/layers/.*: dimension 0 \('layers'\) has size 1, which does not "
           r"divide over 'expert' \(size 2\)")
  with pytest.raises(ConfigError, match=match):
    specs.state_shardings(common.abstract_variables(common.small_cfg()), mesh, rules)


def test_v3_671b_on_2048_devices_abstract():
  """eval_shape only: 671B parameters on an abstract 32 (fsdp) x 64 (expert) mesh."""
  cfg = load_config(str(common.ROOT / "configs" / "deepseek_v3_671b.yaml")).model
  mesh_cfg = MeshConfig(data=-1, fsdp=32, expert=64)
  mesh = mesh_lib.make_abstract_mesh(mesh_cfg, 2048)
  mesh_lib.check_model(cfg, mesh)
  experts = expert_parallel.runner(cfg, mesh_cfg, mesh)
  assert isinstance(experts, expert_parallel.ExpertParallel)
  with mesh_lib.activate(mesh):
    abstract = jax.eval_shape(Transformer(cfg, experts=experts).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((2048, 8), jnp.int32))
  sh = specs.state_shardings(abstract, mesh)
  n = sum(x.size for x in jax.tree.leaves(specs.strip_boxes(abstract)))
  counts = cfg.param_counts()
  assert n == counts["total"] + counts["mtp_total"]
  total, per_device = specs.total_bytes(abstract), specs.bytes_per_device(abstract, sh)
  assert total == 4 * n
  # Routed experts split 2048 ways; attention only over fsdp (32): between 1x and 3x of total/2048.
  assert total / 2048 < per_device < 3 * total / 2048
  experts = sh["params"]["moe_blocks"]["layers"]["mlp"]["experts"]["gate_proj"]
  assert experts.spec == P(None, "expert", "fsdp", None)
