"""FP8 mixed precision: DeepSeek-V3's fine-grained recipe, emulated (V3 report §3.3, P1 §3).

`formats` (E4M3/E5M2 saturating casts, emulated E5M6), `scaling` (tile/block/axis/tensor scales,
the quantiser, `QArray`), `accumulate` (f32, promote(N_C), the Hopper tensor core's
accumulator: `blockfma`),
`dot` (`fp8_dot_general`, one custom_vjp for fprop/dgrad/wgrad), `delayed` (explicit amax
histories), `policy` (recipes and the layer-path map; `policy_from_config`), `comm` (FP8 dispatch,
BF16/LogFMT combine), `logfmt` (the LogFMT-nBit codec). Nothing here imports model code.
"""

from deepseek_jax.fp8.accumulate import F32, Accum, gemm, hopper, limited, promote
from deepseek_jax.fp8.dot import Fp8Dot, GemmSpec, Operand, fp8_dot_general
from deepseek_jax.fp8.formats import E4M3, E5M2, E5M6, Format
from deepseek_jax.fp8.policy import RECIPES, Policy, make_policy, policy_from_config
from deepseek_jax.fp8.scaling import QArray, Scaling, quantize

__all__ = [
    "Accum", "E4M3", "E5M2", "E5M6", "F32", "Format", "Fp8Dot", "GemmSpec", "Operand", "Policy",
    "QArray", "RECIPES", "Scaling", "fp8_dot_general", "gemm", "hopper", "limited", "make_policy",
    "policy_from_config", "promote", "quantize",
]
