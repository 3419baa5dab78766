"""`layers.gathered`: under FSDP a weight is gathered where it is used, in the compute dtype, and its
gradient goes back constrained to the weight's own sharding (a reduce-scatter, not an all-reduce);
values and gradients are the unsharded layer's. XLA:CPU may move the cast across the gather, so
the compiled bytes are checked for a GPU (marked `aot`); the constraints themselves everywhere."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.config import MeshConfig
from deepseek_jax.layers import Dense, gather_specs
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from tests.helpers import HAS_GPU_COMPILER

D, F, B = 64, 96, 32


def _step(mesh):
  layer = Dense((D,), (F,), ("embed", "mlp"), dtype=jnp.bfloat16, param_dtype=jnp.float32)

  def loss(params, x):
    return jnp.sum(layer.apply({"params": params}, x).astype(jnp.float32) ** 2)

  w_sh = NamedSharding(mesh, P("fsdp", "tensor"))
  return jax.jit(jax.value_and_grad(loss), in_shardings=({"kernel": w_sh},
                                                         NamedSharding(mesh, P(("data", "fsdp")))),
                 out_shardings=(NamedSharding(mesh, P()), {"kernel": w_sh}))


def _abstract():
  return ({"kernel": jax.ShapeDtypeStruct((D, F), jnp.float32)},
          jax.ShapeDtypeStruct((B, D), jnp.float32))


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1, 1), (1, 4, 1, 2)])
def test_weight_gathered_in_compute_dtype_gradient_sharded_back(mesh_shape):
  mesh = mesh_lib.make_mesh(MeshConfig(*mesh_shape))
  kernel = jax.random.normal(jax.random.key(0), (D, F), jnp.float32) * 0.1
  x = jax.random.normal(jax.random.key(1), (B, D), jnp.float32)
  with mesh_lib.activate(mesh, rules_lib.DEFAULT_RULES):
    assert gather_specs(("embed", "mlp")) == (P(None, "tensor"), P("fsdp", "tensor"))
    f = _step(mesh)
    text = f.lower(*_abstract()).as_text()
    value, grads = f({"kernel": kernel}, x)
  constraints = re.findall(r"sdy.sharding_constraint %\w+ <@mesh, \[(.*?)\]> : tensor<(\w+)>", text)
  assert ('{}, {"tensor"}', f"{D}x{F}xbf16") in constraints, constraints        # gathered, bf16
  assert ('{"fsdp"}, {"tensor"}', f"{D}x{F}xf32") in constraints, constraints   # gradient, f32 sum
  # against the f32 layer: the shards' bf16 partial products differ from one bf16 matmul's
  ref_value, ref_grads = jax.value_and_grad(
      lambda p: jnp.sum(Dense((D,), (F,), ("embed", "mlp")).apply({"params": p}, x) ** 2))(
          {"kernel": kernel})
  np.testing.assert_allclose(value, ref_value, rtol=2e-2)
  err = np.linalg.norm(grads["kernel"] - ref_grads["kernel"]) / np.linalg.norm(ref_grads["kernel"])
  assert err < 2e-2, err


def test_no_gather_where_no_batch_axis_splits_the_weight():
  mesh = mesh_lib.make_mesh(MeshConfig(8, 1, 1, 1))
  with mesh_lib.activate(mesh, rules_lib.DEFAULT_RULES):
    assert gather_specs(("embed", "mlp")) is None      # data parallel: weights are whole already
  assert gather_specs(("embed", "mlp")) is None        # no mesh


@pytest.mark.aot
@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs the [gpu] extra (jax-cuda12-plugin)")
def test_gpu_gathers_bf16_and_reduce_scatters_the_gradient():
  from deepseek_jax.aot import collectives, targets  # noqa: PLC0415
  devices = targets.devices(targets.parse_target("h100:8"))
  mesh = mesh_lib.make_mesh(MeshConfig(2, 4, 1, 1), devices)
  with mesh_lib.activate(mesh, rules_lib.DEFAULT_RULES):
    text = _step(mesh).lower(*_abstract()).compile().as_text()
  got = collectives.analyze(text, mesh_lib.axis_sizes(mesh), np.zeros(8, int), 1.0, 1.0)
  gathers = [v for (kind, axes), v in got.items() if kind == "all-gather" and "fsdp" in axes]
  assert [g.bytes for g in gathers] == [D * F * 2], got                   # whole kernel, bf16
  assert any(kind == "reduce-scatter" and "fsdp" in axes for kind, axes in got), got
