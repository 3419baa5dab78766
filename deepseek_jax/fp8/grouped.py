"""FP8 numerics of the routed experts' grouped GEMMs (V3 report §3.3; `dispatch.block_swiglu`).

`ExpertNumerics(spec)` prepares the operands of the block path's expert projections once per array
(f32 values on the FP8 grid, not once per block and use) and accumulates per the spec, reproducing
`fp8_dot_general` block by block; `supports(spec)` says which specs qualify. What the backward
keeps of an activation is FP8 bytes and scales (a `QArray`), never f32 copies of FP8 values.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.fp8.accumulate import gemm
from deepseek_jax.fp8.dot import Fp8Dot, GemmSpec, operand_values
from deepseek_jax.fp8.scaling import (QArray, Scaling, fp8_bytes, loop_bytes,  # noqa: F401
                                     quantize, quantize_with_values, unquantized)


def supports(spec: GemmSpec) -> bool:
  """Emulate backend, current scaling at tile, block or axis granularity (tensor and delayed
  scales would span blocks), power-of-two scales unless accumulation is f32."""
  if spec.backend != "emulate":
    return False
  for o in spec.operands():
    if o.scaling.mode != "current" or o.scaling.granularity == "tensor":
      return False
    if not o.scaling.pow2 and spec.accum.mode != "f32":
      return False
  return True


def expert_numerics(dot) -> "ExpertNumerics | None":
  """The grouped-GEMM numerics of an `Fp8Dot` for the block path, or None when its spec needs the
  generic per-block call (`supports`) or `dot` is another callable."""
  if isinstance(dot, Fp8Dot) and supports(dot.spec):
    return ExpertNumerics(dot.spec)
  return None


@dataclasses.dataclass(frozen=True)
class ExpertNumerics:
  """Operand preparation and accumulation of one expert projection.

  Activations `[W, U, d_in]` (W blocks of U rows of one expert each), weights `[E, d_in, d_out]`.
  Row tiles never cross rows; column tiles (wgrad) run along U inside one block, so a block's
  scales are those `fp8_dot_general` computes on that block alone.
  """
  spec: GemmSpec

  def __post_init__(self):
    if not supports(self.spec):
      raise ValueError(f"ExpertNumerics: spec {self.spec} needs per-block scales (tile, block "
                       "or axis; current; pow2 unless accum is f32) and backend='emulate'")

  def weight(self, w):
    """Weights as fprop uses them (blocks along d_in for the contraction)."""
    return operand_values(w, self.spec.fprop_w, 1)

  def dgrad_weight(self, w, w_fprop):
    """Weights as dgrad uses them (`g . w^T`, contracting d_out); fprop's copy when reusable."""
    return w_fprop if self.spec.reuse_weight else operand_values(w, self.spec.dgrad_w, 2)

  @property
  def swiglu_cache(self):
    """The format gate and up are cached in when this projection is a SwiGLU's down (or None)."""
    return self.spec.swiglu_cache

  def fprop_x(self, x):
    return operand_values(x, self.spec.fprop_x, 2)

  def dgrad_g(self, g):
    return operand_values(g, self.spec.dgrad_g, 2)

  def fprop_x_cached(self, x):
    """(cache, values): what the backward keeps of x for wgrad, as `fp8_dot_general`'s `cache`
    says (fprop's FP8 bytes and scales, an E5M6 copy, or x), and fprop's f32 values of x."""
    spec = self.spec
    if spec.cache == "fp8" and spec.cache_fmt is not None:
      return quantize(x, spec.cache_fmt, Scaling("tile"), 2), self.fprop_x(x)
    if spec.cache == "fp8" and spec.fprop_x is not None:
      return quantize_with_values(x, spec.fprop_x.fmt, spec.fprop_x.scaling, 2)
    return x, self.fprop_x(x)

  def wgrad_x(self, x_cached):
    x = x_cached.dequantize() if isinstance(x_cached, QArray) else x_cached
    return operand_values(x, self.spec.wgrad_x, 1)

  def wgrad_g(self, g):
    return operand_values(g, self.spec.wgrad_g, 1)

  def dot(self, a, b):
    """f32 `[rows, cols]` product of prepared `a [rows, k]` and `b [k, cols]` under the spec's
    accumulation."""
    return gemm(unquantized(a[None], 2), unquantized(b[None], 1), self.spec.accum)[0]
