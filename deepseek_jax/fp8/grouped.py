"""FP8 numerics of the routed experts' grouped GEMMs (V3 report §3.3; `dispatch.block_swiglu`).

`dispatch.py`'s block path runs the three expert projections of every 32-row block in one scan
with its own backward pass, so that operands are quantised once per array instead of once per
block and per use (the weights above all: `[E, D, M]` once per step, not once per block).
`ExpertNumerics(spec)` tells it how: each method returns f32 values on the FP8 grid
(`scaling.fake_quantize`, bitwise `quantize(...).dequantize()`), and `dot` accumulates per the
spec's `Accum` on those values. With power-of-two scales that equals the `QArray` GEMM of
`accumulate.gemm` (scales factor exactly out of every product and partial sum), so the block
path reproduces `fp8_dot_general` per block: same tiles, same weight blocks, same wgrad re-tiling
of the cached activation, same promotion.

Layouts: activations `[W, U, C]` (W blocks of U rows of one expert each), weights `[E, K, N]`.
Row tiles (contract=2) never cross rows; column tiles (contract=1, wgrad) run along U inside
one block, so a block's scales are those `fp8_dot_general` computes on that block alone.

`supports(spec)` says which specs qualify: emulate backend, current scaling at tile, block or
axis granularity (per-tensor and delayed scales would span blocks), and power-of-two scales
unless accumulation is plain f32. Others keep the generic per-block `fp8_dot_general` path.
"""

from __future__ import annotations

import dataclasses

import jax

from deepseek_jax.fp8.accumulate import gemm
from deepseek_jax.fp8.dot import Fp8Dot, GemmSpec, operand_values
from deepseek_jax.fp8.scaling import Scaling, fake_quantize, unquantized


def supports(spec: GemmSpec) -> bool:
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
  """Operand preparation and accumulation of one expert projection `[.., K] x [E, K, N]`."""
  spec: GemmSpec

  def __post_init__(self):
    if not supports(self.spec):
      raise ValueError(f"ExpertNumerics: spec {self.spec} needs per-block scales (tile, block "
                       "or axis; current; pow2 unless accum is f32) and backend='emulate'")

  def weight(self, w_EKN):
    """Weights as fprop uses them (blocks along K for the contraction)."""
    return operand_values(w_EKN, self.spec.fprop_w, 1)

  def dgrad_weight(self, w_EKN, w_fprop_EKN):
    """Weights as dgrad uses them (`g . w^T`, contracting N); fprop's copy when reusable."""
    return w_fprop_EKN if self.spec.reuse_weight else operand_values(w_EKN, self.spec.dgrad_w, 2)

  def fprop_x(self, x_WUK):
    return operand_values(x_WUK, self.spec.fprop_x, 2)

  def dgrad_g(self, g_WUN):
    return operand_values(g_WUN, self.spec.dgrad_g, 2)

  def cached_x(self, x_WUK, x_fprop_WUK):
    """What the backward keeps of x for wgrad (cf. `fp8_dot_general`'s `cache`)."""
    spec = self.spec
    if spec.cache == "fp8" and spec.cache_fmt is not None:
      return fake_quantize(x_WUK, spec.cache_fmt, Scaling("tile"), 2)
    return x_fprop_WUK if (spec.cache == "fp8" and spec.fprop_x is not None) else x_WUK

  def wgrad_x(self, x_cached_WUK):
    return operand_values(x_cached_WUK, self.spec.wgrad_x, 1)

  def wgrad_g(self, g_WUN):
    return operand_values(g_WUN, self.spec.wgrad_g, 1)

  def dot(self, a_RK, b_KN):
    """f32 `[R, N]` product of prepared operands under the spec's accumulation."""
    return gemm(unquantized(a_RK[None], 2), unquantized(b_KN[None], 1), self.spec.accum)[0]
