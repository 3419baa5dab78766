"""KV cache per token: MLA vs GQA vs MHA ("Insights into DeepSeek-V3" §2.1.2, Table 1; V2 Table 1).

MLA caches the compressed latent and the shared RoPE key, (d_c + d_h^R) * L values per token; GQA
caches K and V for each KV head, 2 * n_kv * d_h * L; MHA is GQA with n_kv = n_h. Table 1 is in BF16
with KB = 1000 bytes. The paper prints LLaMA's ratio as 7.28x; its own numbers give 7.34x.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.codesign.dense_models import LLAMA3_1_405B, QWEN2_5_72B, DenseModel
from deepseek_jax.config import ConfigError, ModelConfig

# Insights Table 1, as printed: (KB per token in BF16, ratio to DeepSeek-V3).
PAPER_TABLE1 = {
    "DeepSeek-V3 (MLA)": (70.272, 1.00),
    "Qwen-2.5 72B (GQA)": (327.680, 4.66),
    "LLaMA-3.1 405B (GQA)": (516.096, 7.28),
}


def kv_cache_bytes_per_token(model: ModelConfig | DenseModel,
                             bytes_per_element: float = 2) -> float:
  """Bytes of KV cache one token occupies across all layers (BF16 by default)."""
  if not bytes_per_element > 0:
    raise ConfigError(f"bytes_per_element={bytes_per_element!r}: must be > 0")
  if not isinstance(model, (ModelConfig, DenseModel)):
    raise TypeError(f"expected a ModelConfig or DenseModel, got {type(model).__name__}")
  values = model.cache_values_per_token
  return values * bytes_per_element


def mha_equivalent_bytes_per_token(model: ModelConfig, bytes_per_element: float = 2) -> float:
  """What the same MLA model would cache as MHA, 2 * n_h * d_h * L (V2 Table 1, d_h = qk_nope)."""
  return 2 * model.num_heads * model.qk_nope_head_dim * model.num_layers * bytes_per_element


@dataclasses.dataclass(frozen=True)
class KVRow:
  name: str
  bytes_per_token: float
  ratio: float                       # to the first row (DeepSeek-V3)
  paper_kb: float | None
  paper_ratio: float | None

  @property
  def kb(self) -> float:
    return self.bytes_per_token / 1000


def table1(v3: ModelConfig, bytes_per_element: float = 2) -> list[KVRow]:
  """Insights Table 1 recomputed from `v3` and the published Qwen/LLaMA configurations."""
  models = [("DeepSeek-V3 (MLA)", v3), ("Qwen-2.5 72B (GQA)", QWEN2_5_72B),
            ("LLaMA-3.1 405B (GQA)", LLAMA3_1_405B)]
  base = kv_cache_bytes_per_token(v3, bytes_per_element)
  rows = []
  for name, m in models:
    b = kv_cache_bytes_per_token(m, bytes_per_element)
    kb, ratio = PAPER_TABLE1[name]
    rows.append(KVRow(name, b, b / base, kb, ratio))
  return rows
