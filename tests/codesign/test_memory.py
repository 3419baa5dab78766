"""Memory plans on abstract meshes: exact bytes on a toy module, scaling on real models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.codesign import activations, memory
from deepseek_jax.codesign.report import reference_model
from deepseek_jax.config import ConfigError, MeshConfig
from deepseek_jax.model import abstract_variables
from sharding.mesh import make_abstract_mesh

TINY = reference_model("tiny")
V3 = reference_model("deepseek_v3_671b")


class Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp")),
                   (64, 96))
    e = self.param("e", nn.with_logical_partitioning(nn.initializers.zeros,
                                                     ("experts", "embed", "moe_mlp")), (8, 64, 16))
    b = self.param("b", nn.initializers.zeros, (10,))   # no logical names: replicated
    return x @ w, e, b


def _toy_vars():
  return jax.eval_shape(Toy().init, jax.random.PRNGKey(0), jnp.zeros((1, 64)))


def test_toy_bytes_are_exact():
  rules = (("act_batch", ("data", "fsdp")), ("experts", "expert"), ("embed", "fsdp"),
           ("mlp", "tensor"))
  mesh = make_abstract_mesh(MeshConfig(data=2, fsdp=4, expert=2, tensor=3), 48)
  p = memory.memory_plan(TINY, mesh, rules, micro_batch=8, seq_len=16, variables=_toy_vars(),
                         opt_shard_axes=("data",))
  # w: 64/4 x 96/3 = 512; e: 8/2 x 64/4 x 16 = 1024; b: 10 (replicated)
  assert p.param_elements == 512 + 1024 + 10
  assert p.params == 4 * (512 + 1024 + 10) == p.gradients
  assert p.optimizer == 2 * 4 * (512 + 1024 + 10) / 2     # ZeRO-1 halves it over data
  assert p.tokens_per_device == 8 // 8 * 16
  assert p.activations == 16 * activations.activation_bytes_per_token(TINY, 16)
  assert p.uneven == ()


def test_uneven_shards_are_reported_and_padded():
  mesh = {"fsdp": 3}
  p = memory.memory_plan(TINY, mesh, (("embed", "fsdp"),), micro_batch=1, seq_len=4,
                         variables=_toy_vars())
  assert set(p.uneven) == {"params/w", "params/e"}
  assert p.param_elements == 22 * 96 + 8 * 22 * 16 + 10      # ceil(64 / 3) = 22


@settings(max_examples=6, deadline=None)
@given(fsdp=st.sampled_from([1, 2, 4, 8]), expert=st.sampled_from([1, 2, 4, 8, 16]))
def test_params_shrink_as_the_mesh_grows(fsdp, expert):
  variables = _tiny_vars()
  small = memory.memory_plan(TINY, {"data": 1, "fsdp": fsdp, "expert": expert, "tensor": 1},
                             micro_batch=2 * fsdp * expert, seq_len=32, variables=variables)
  big = memory.memory_plan(TINY, {"data": 1, "fsdp": 2 * fsdp, "expert": expert, "tensor": 1},
                           micro_batch=2 * fsdp * expert, seq_len=32, variables=variables)
  assert big.params <= small.params and big.params >= small.params / 2
  assert big.activations == small.activations / 2     # batch over fsdp: half the tokens


_CACHE = {}


def _tiny_vars():
  if "tiny" not in _CACHE:
    _CACHE["tiny"] = abstract_variables(TINY)
  return _CACHE["tiny"]


def test_v3_on_2048_devices_with_the_planning_rules():
  rules = memory.PLANNING_RULES
  mesh = memory.auto_mesh(V3, 2048, rules)
  assert mesh == {"data": 2, "fsdp": 16, "expert": 64, "tensor": 1}
  p = memory.memory_plan(V3, mesh, rules, micro_batch=2048, seq_len=4096, opt_shard_axes=("data",),
                         remat="full")
  total = 671.03e9 + 11.61e9            # main model + MTP, f32 master weights
  # Every weight is sharded at least over fsdp x expert (1024); a few narrow ones replicate a bit.
  assert total * 4 / 2048 < p.params < 1.05 * total * 4 / 1024
  # Router biases (router_state, f32, sharded over expert) have no gradient or optimizer state.
  assert p.params - p.gradients == 4 * (58 * 256 + 256) / 64
  assert p.optimizer == pytest.approx(p.gradients, rel=1e-3)   # 8 B/param, halved by ZeRO-1
  assert p.uneven == () and p.tokens_per_device == 4096
  assert p.total < 80e9                  # fits an H800 with full remat


def test_v3_on_2048_devices_with_the_project_rules_fits_an_h800():
  rules = memory.project_rules()
  mesh = memory.auto_mesh(V3, 2048, rules)
  p = memory.memory_plan(V3, mesh, rules, micro_batch=2048, seq_len=4096, remat="full")
  assert p.uneven == () and p.total < 80e9


def test_activation_estimate_orders_remat_levels_and_is_linear_in_tokens():
  n = activations.activation_bytes_per_token
  assert n(V3, 4096, "full") < n(V3, 4096, "dots") < n(V3, 4096, "none")
  p1 = memory.memory_plan(TINY, {"data": 2}, (("act_batch", "data"),), micro_batch=2,
                          seq_len=64, variables=_toy_vars())
  p4 = memory.memory_plan(TINY, {"data": 2}, (("act_batch", "data"),), micro_batch=8,
                          seq_len=64, variables=_toy_vars())
  assert p4.activations == 4 * p1.activations


@pytest.mark.parametrize("text", ["", "data", "data=0", "data=2,data=4", "data=x"])
def test_bad_mesh_strings_are_user_errors(text):
  with pytest.raises(ConfigError, match="mesh"):
    memory.parse_mesh(text)


def test_rules_naming_a_missing_axis_are_user_errors():
  with pytest.raises(ConfigError, match="not in the mesh"):
    memory.memory_plan(TINY, {"data": 2}, (("embed", "fsdp"),), micro_batch=2, seq_len=8,
                       variables=_toy_vars())
  assert memory.parse_mesh("fsdp=16,data=2") == {"data": 2, "fsdp": 16, "expert": 1, "tensor": 1}
  assert memory.parse_mesh("data=2,pipe=4", axes=None) == {"data": 2, "pipe": 4}
  with pytest.raises(ConfigError, match="'pipe' is not one of"):
    memory.parse_mesh("data=2,pipe=4")
