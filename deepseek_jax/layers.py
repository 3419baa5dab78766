"""Basic layers: RMSNorm, the parameter-holding Dense layer (the single FP8 seam) and SwiGLU MLP.

V3 report §2.1 (SwiGLU experts, RMSNorm everywhere). Every matmul against a parameter in the model
goes through `Dense`, and every `Dense` multiplies through one `dot_general`: the one chosen for its
module path by the FP8 policy (V3 report §3.3), or `jax.lax.dot_general` when there is none.
Parameters carry logical axis names only; `sharding/rules.py` maps them onto a mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
DotGeneral = Callable[..., jax.Array]

# Logical axes of the [B, T, D] residual stream between layers.
ACT_BTD = ("act_batch", "act_seq", "act_embed")


def dtype_of(name: str) -> Dtype:
  """The jnp dtype of a config dtype name; "auto" (a config not `resolved` for a platform)
  follows `jax.default_backend()`: bfloat16 on GPU/TPU, float32 on CPU."""
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def module_path(module: nn.Module) -> str:
  """'/'-joined module path (e.g. 'blocks/attn/wq_b'); stable under nn.scan and remat."""
  return "/".join(str(p) for p in module.scope.path) if module.scope is not None else ""


class RMSNorm(nn.Module):
  """y = w * cast(x * rsqrt(mean(x^2) + eps)): reduce in f32, cast to the input dtype, then weight."""
  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                   (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return w.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * y.astype(x.dtype)


class Dense(nn.Module):
  """y = x . W contracting the last `len(in_features)` axes of x with W's leading axes.

  W has shape `in_features + out_features` and logical axes `axes` (one name per dimension).
  The product runs through `fp8_policy.dot_general_for(path)` when a policy is set and selects
  this layer, else through `jax.lax.dot_general`: the one seam for mixed precision.
  """
  in_features: Sequence[int]
  out_features: Sequence[int]
  axes: Sequence[str]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  fp8_policy: Any = None

  def setup(self):
    ins, outs = tuple(self.in_features), tuple(self.out_features)
    if len(self.axes) != len(ins) + len(outs):
      raise ValueError(f"{module_path(self)}: {len(self.axes)} logical axes for a "
                       f"{len(ins) + len(outs)}-d kernel")
    init = nn.initializers.normal(self.init_std)
    # Read directly (not only through __call__) by MLA's absorbed decode.
    self.kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                             ins + outs, self.param_dtype)
    # FP8 hook: delayed scaling (deepseek_jax/fp8/delayed.py) keeps an explicit amax history per
    # layer in the 'fp8_state' collection (train state, checkpointed); stateless recipes add none.
    dot = None if self.fp8_policy is None else self.fp8_policy.dot_general_for(module_path(self))
    if getattr(dot, "init_fp8_state", None) is not None:
      self.variable("fp8_state", "amax_history", dot.init_fp8_state)

  def dot(self) -> DotGeneral:
    """The dot_general this layer multiplies through: the FP8 policy's for its path (with its
    delayed-scaling state bound), else `jax.lax.dot_general`."""
    dot = None if self.fp8_policy is None else self.fp8_policy.dot_general_for(module_path(self))
    if dot is None:
      return jax.lax.dot_general
    if getattr(dot, "init_fp8_state", None) is not None:  # FP8 hook: pass the amax history
      dot = dot.bind(self.get_variable("fp8_state", "amax_history"))
    return dot

  def __call__(self, x: jax.Array) -> jax.Array:
    ins = tuple(self.in_features)
    if x.shape[x.ndim - len(ins):] != ins:
      raise ValueError(f"{module_path(self)}: input trailing shape {x.shape[x.ndim - len(ins):]} "
                       f"!= in_features {ins}")
    contract = (tuple(range(x.ndim - len(ins), x.ndim)), tuple(range(len(ins))))
    return self.dot()(x.astype(self.dtype), self.kernel.astype(self.dtype), (contract, ((), ())))


class MLP(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x) (HF gate_proj = w1, up_proj = w3, down_proj = w2); no biases.

  With `fuse_gate_up` gate and up are one matmul against the two kernels stacked at call time
  (parameters and checkpoints unchanged), unless the FP8 policy quantises either: scales are
  per tensor, tile or block, so a joint operand would not quantise as the two apart. Outputs
  are tagged for remat policies: "mlp_wi" (gate and up), "mlp_wo" (down).
  """
  d_model: int
  hidden: int
  hidden_axis: str = "mlp"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  fp8_policy: Any = None
  fuse_gate_up: bool = True

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std,
              fp8_policy=self.fp8_policy)
    D, F = self.d_model, self.hidden
    gate = Dense((D,), (F,), ("embed", self.hidden_axis), name="gate_proj", **kw)
    up = Dense((D,), (F,), ("embed", self.hidden_axis), name="up_proj", **kw)
    plain = gate.dot() is jax.lax.dot_general and up.dot() is jax.lax.dot_general
    if self.fuse_gate_up and plain:
      # Stacked on a new axis, not concatenated along F: F keeps its sharding.
      w_D2F = jnp.stack([gate.kernel, up.kernel], axis=1).astype(self.dtype)
      gu_BT2F = checkpoint_name(jax.lax.dot_general(
          x_BTD.astype(self.dtype), w_D2F, (((x_BTD.ndim - 1,), (0,)), ((), ()))), "mlp_wi")
      gate_BTF, up_BTF = gu_BT2F[..., 0, :], gu_BT2F[..., 1, :]
    else:
      gate_BTF = checkpoint_name(gate(x_BTD), "mlp_wi")
      up_BTF = checkpoint_name(up(x_BTD), "mlp_wi")
    y_BTD = Dense((F,), (D,), (self.hidden_axis, "embed"), name="down_proj", **kw)(
        nn.silu(gate_BTF) * up_BTF)
    return checkpoint_name(y_BTD, "mlp_wo")
