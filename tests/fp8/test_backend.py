"""`fp8.backend`: 'emulate' (FP8 values in f32 GEMMs) or 'native' (float8 operands to
`dot_general`). On CPU XLA upcasts FP8 operands, so native must equal the emulator; for an
H100/H200 target the compiled GEMM reads float8 (marked `aot`, needs the [gpu] extra)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.config import ConfigError, FP8Config, load_config
from deepseek_jax.fp8 import fp8_dot_general
from deepseek_jax.fp8.policy import make_policy, policy_from_config
from deepseek_jax.layers import MLP, Dense
from tests.helpers import HAS_GPU_COMPILER

DN = (((2,), (0,)), ((), ()))


def test_config_field_and_its_one_line_errors():
  assert FP8Config().backend == "emulate"
  cfg = load_config("configs/tiny.yaml", ["fp8.recipe=deepseek_v3", "fp8.backend=native"])
  policy = policy_from_config(cfg.fp8)
  specs = [s for _, s in policy.rules if s is not None] + [policy.default]
  assert specs and all(s.backend == "fp8" for s in specs)
  with pytest.raises(ConfigError, match=r"^fp8\.backend='gpu': must be one of") as e:
    load_config("configs/tiny.yaml", ["fp8.backend=gpu"])
  assert "\n" not in str(e.value)
  # the emulated Hopper accumulator has no native counterpart
  with pytest.raises(ConfigError, match="fp8.backend='emulate'") as e:
    policy_from_config(FP8Config(recipe="deepseek_v3_hopper", backend="native"))
  assert "\n" not in str(e.value)


def _fwd_bwd(spec, x, w, ct):
  y, vjp = jax.vjp(lambda x, w: fp8_dot_general(x, w, DN, spec=spec), x, w)
  return (y,) + vjp(ct)


_compiled = jax.jit(_fwd_bwd, static_argnums=0)


@settings(max_examples=5, deadline=None)
@given(name=st.sampled_from(["deepseek_v3", "deepseek_v3_fused", "tensor_current", "rowwise"]),
       rows=st.integers(1, 48), K=st.sampled_from([64, 300, 512]), N=st.sampled_from([16, 72]),
       seed=st.integers(0, 2 ** 31))
def test_native_equals_the_emulator_on_cpu(name, rows, K, N, seed):
  """XLA:CPU multiplies FP8 operands exactly in f32: with power-of-two scales per K slice
  (deepseek_v3, rowwise) native is the emulator bit for bit; otherwise f32 summation order and
  per-tensor rescaling of the output move the last bits only."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, rows, K)) * np.exp(rng.standard_normal((2, rows, 1))),
                  jnp.float32)
  w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((2, rows, N)), jnp.float32)
  emulated = _compiled(make_policy(name).default, x, w, ct)
  native = _compiled(make_policy(name, backend="native").default, x, w, ct)
  for what, a, b in zip(("y", "dx", "dw"), native, emulated):
    a, b = np.asarray(a), np.asarray(b)
    if name in ("deepseek_v3", "rowwise"):
      np.testing.assert_array_equal(a, b, err_msg=what)
    else:
      np.testing.assert_allclose(a, b, rtol=0, atol=4e-6 * np.abs(b).max(), err_msg=what)


def test_native_mlp_with_the_swiglu_cache_follows_the_emulator():
  """The dense MLP on the native backend (gate, up, the SwiGLU cache, down): values and
  gradients equal the emulator's on CPU."""
  x = jax.random.normal(jax.random.key(1), (2, 24, 128))
  out = {}
  for backend in ("emulate", "native"):
    model = MLP(128, 256, fp8_policy=make_policy("deepseek_v3", backend=backend))
    variables = jax.jit(model.init)(jax.random.key(0), x)   # one program, not eager FP8 ops
    out[backend] = jax.jit(jax.value_and_grad(
        lambda v, x, model=model: jnp.sum(jnp.sin(model.apply(v, x))), argnums=(0, 1)))(
            variables, x)
  for a, b in zip(jax.tree.leaves(out["native"]), jax.tree.leaves(out["emulate"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _gemm_operand_types(hlo: str) -> list[set[str]]:
  """Element types of the two operands of every GEMM in optimized XLA:GPU HLO: dots (also those
  inside Triton gemm fusions) and cuBLAS custom calls, looked up by operand name."""
  defs = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  found = []
  for line in hlo.splitlines():
    op = " dot(" if " dot(" in line else "custom-call(" if "\"__cublas$" in line else None
    if op is not None:
      names = re.findall(r"%([\w.\-]+)", line.split(op, 1)[1].split(")")[0])[:2]
      found.append({defs.get(n, "?") for n in names})
  return found


@pytest.mark.aot
@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs the [gpu] extra (jax-cuda12-plugin)")
def test_native_dense_compiles_to_fp8_gemms_for_h200():
  """A bf16 FP8 Dense compiled for an H200: on the native backend every GEMM of the forward
  pass reads float8 operands; the emulator's GEMMs read none."""
  from deepseek_jax.aot import targets  # noqa: PLC0415  (needs the GPU plugin)
  device = targets.devices(targets.parse_target("h200:1"))[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=sharding)
  types = {}
  for backend in ("native", "emulate"):
    dense = Dense((512,), (256,), ("embed", "mlp"), dtype=jnp.bfloat16,
                  fp8_policy=make_policy("deepseek_v3", backend=backend), name="up_proj")
    params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        nn.unbox(jax.eval_shape(dense.init, jax.random.key(0), x)))
    hlo = jax.jit(dense.apply).lower(params, x).compile().as_text()
    types[backend] = _gemm_operand_types(hlo)
  assert types["native"] and all(t and all(e.startswith("f8e4m3") for e in t)
                                 for t in types["native"]), types["native"]
  assert types["emulate"] and not any(e.startswith("f8") for t in types["emulate"] for e in t)
