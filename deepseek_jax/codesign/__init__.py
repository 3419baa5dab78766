"""The co-design calculator: the quantitative arguments of "Insights into DeepSeek-V3"
(ISCA '25, §2-4) recomputed from configs and hardware descriptions.

KV cache per token (Table 1), training FLOPs per token (Table 2), parameters (total / active, by
arithmetic and by `eval_shape`), the expert-parallel TPOT bound (§2.3.2), node-limited routing
traffic (§4.3), per-device memory on abstract meshes, the roofline of our own compiled step, and
the paper's remaining numbers (`paper_report`: topology cost, the 2048-GPU run, latency, DualPipe,
MTP, V2 against 67B) beside the printed values with a status each (`claims`).
Command line: `python -m deepseek_jax.codesign --help`.
"""

from deepseek_jax.codesign.dense_models import DENSE_MODELS, LLAMA3_1_405B, QWEN2_5_72B, DenseModel
from deepseek_jax.codesign.ep import EPBound, ep_tpot_bound, ep_tpot_bound_for
from deepseek_jax.codesign.flops import table2, train_flops_per_token
from deepseek_jax.codesign.hardware import PRESETS, Hardware, get_hardware
from deepseek_jax.codesign.kv_cache import kv_cache_bytes_per_token, table1
from deepseek_jax.codesign.memory import PLANNING_RULES, MemoryPlan, memory_plan
from deepseek_jax.codesign.params import eval_shape_param_counts, param_counts

__all__ = [
    "DENSE_MODELS", "DenseModel", "EPBound", "Hardware", "LLAMA3_1_405B", "MemoryPlan",
    "PLANNING_RULES", "PRESETS", "QWEN2_5_72B", "ep_tpot_bound",
    "ep_tpot_bound_for", "eval_shape_param_counts", "get_hardware", "kv_cache_bytes_per_token",
    "memory_plan", "param_counts", "table1", "table2", "train_flops_per_token",
]
