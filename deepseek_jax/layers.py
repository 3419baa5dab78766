"""Basic layers: RMSNorm, the parameter-holding Dense layer (the single FP8 seam) and SwiGLU MLP.

V3 report §2.1 (SwiGLU experts, RMSNorm everywhere). Every matmul against a parameter in the model
goes through `Dense`, and every `Dense` multiplies through one `dot_general`: the one chosen for its
module path by the FP8 policy (V3 report §3.3), or `jax.lax.dot_general` when there is none.
Parameters carry logical axis names only; `sharding/rules.py` maps them onto a mesh.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.fp8.dot import swiglu_dot

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


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def gather_specs(axes: Sequence[str]):
  """(whole, own): the PartitionSpecs of a kernel with logical axes `axes` without and with the
  mesh axes that split the batch (what FSDP gathers), or None when none of them splits it, there
  is no mesh, or inside `shard_map`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(t == jax.sharding.AxisType.Explicit or t == jax.sharding.AxisType.Manual
                       for t in mesh.axis_types):
    return None
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch = {a for a in _axes(nn.logical_to_mesh_axes(("act_batch",))[0]) if sizes.get(a, 1) > 1}
  spec = nn.logical_to_mesh_axes(tuple(axes))
  own = tuple(tuple(_axes(e)) or None for e in spec)
  whole = tuple(tuple(a for a in _axes(e) if a not in batch) or None for e in spec)
  if whole == own:
    return None
  return jax.sharding.PartitionSpec(*whole), jax.sharding.PartitionSpec(*own)


def gathered(kernel: jax.Array, axes: Sequence[str]) -> jax.Array:
  """`kernel` (logical axes `axes`) constrained whole along the mesh axes that split the batch:
  FSDP gathers it here, in its dtype now (the compute dtype), and not where sharding propagation
  would put the gather (after the FP8 path's f32 dequantisation: twice the bytes). Its gradient
  goes back sharded as the kernel is. A no-op where `gather_specs` is None."""
  specs = gather_specs(axes)
  return kernel if specs is None else _gather(kernel, *specs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(kernel, whole, own):
  return jax.lax.with_sharding_constraint(kernel, whole)


def _gather_fwd(kernel, whole, own):
  return _gather(kernel, whole, own), None


def _gather_bwd(whole, own, _, g):
  # The weight gradient goes back sharded as the kernel is: a reduce-scatter of the partial sums
  # (the transpose of the gather), not an all-reduce to every device. The sum runs in f32 and is
  # rounded once, as the unsharded matmul's f32 accumulation is.
  return (jax.lax.with_sharding_constraint(g.astype(jnp.float32), own).astype(g.dtype),)


_gather.defvjp(_gather_fwd, _gather_bwd)


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
  gather: bool = True      # False: the caller gathered the kernel already (`gathered`)

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

  def _operands(self, x: jax.Array):
    ins = tuple(self.in_features)
    if x.shape[x.ndim - len(ins):] != ins:
      raise ValueError(f"{module_path(self)}: input trailing shape {x.shape[x.ndim - len(ins):]} "
                       f"!= in_features {ins}")
    contract = (tuple(range(x.ndim - len(ins), x.ndim)), tuple(range(len(ins))))
    kernel = self.kernel.astype(self.dtype)
    kernel = gathered(kernel, self.axes) if self.gather else kernel
    return x.astype(self.dtype), kernel, (contract, ((), ()))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dot()(*self._operands(x))

  def swiglu(self, gate: jax.Array, up: jax.Array) -> jax.Array:
    """`self(silu(gate) * up)`; an FP8 dot whose spec has a SwiGLU cache keeps gate and up in FP8
    for the backward and recomputes the product there (V3 report §3.3.3)."""
    gate, kernel, dims = self._operands(gate)
    return swiglu_dot(self.dot(), gate, up.astype(self.dtype), kernel, dims)


class MLP(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x) (HF gate_proj = w1, up_proj = w3, down_proj = w2); no biases.

  With `fuse_gate_up` gate and up are one matmul against the two kernels stacked at call time
  (parameters and checkpoints unchanged), unless the FP8 policy quantises either: scales are
  per tensor, tile or block, so a joint operand would not quantise as the two apart. Outputs
  are tagged for remat policies: "mlp_wi" (gate and up), "mlp_wo" (down). The down projection
  takes gate and up (`Dense.swiglu`): V3's recipe caches them in FP8 and recomputes the product.
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
    y_BTD = Dense((F,), (D,), (self.hidden_axis, "embed"), name="down_proj", **kw).swiglu(
        gate_BTF, up_BTF)
    return checkpoint_name(y_BTD, "mlp_wo")
