"""Dense GQA/MHA transformers the papers compare against ("Insights" Tables 1-2; V2's DeepSeek 67B).

Qwen-2.5 72B and LLaMA-3.1 405B are not DeepSeek models (no MLA, no MoE), so they are not
`ModelConfig`s; this small dataclass describes them from their published `config.json` values and
counts parameters, KV cache and training FLOPs by the same method `ModelConfig` uses, so the tables
compare like with like.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class DenseModel:
  """A pre-norm decoder with grouped-query attention (kv_heads == heads is MHA) and SwiGLU."""
  name: str
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  qkv_bias: bool = False
  tied_embeddings: bool = False
  source: str = ""

  def __post_init__(self):
    for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "ffn_dim"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{self.name}.{f}={v!r}: must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"{self.name}.num_kv_heads={self.num_kv_heads}: must divide "
                        f"num_heads={self.num_heads}")

  @property
  def cache_values_per_token(self) -> int:
    """K and V for every KV head of every layer: 2 * n_kv * d_h * L (V2 Table 1)."""
    return 2 * self.num_kv_heads * self.head_dim * self.num_layers

  def matmul_params_per_layer(self) -> int:
    """Projection weights of one block: Q, K, V, O and the SwiGLU FFN."""
    D, N, G, H = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
    attn = D * N * H + 2 * D * G * H + N * H * D
    return attn + 3 * D * self.ffn_dim

  def param_counts(self) -> dict[str, int]:
    """Total parameters (embedding, head, norms and biases included); dense, so active == total."""
    D, N, G, H = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
    bias = (N * H + 2 * G * H) if self.qkv_bias else 0
    layer = self.matmul_params_per_layer() + bias + 2 * D
    embed = self.vocab_size * D
    head = 0 if self.tied_embeddings else self.vocab_size * D
    total = embed + head + self.num_layers * layer + D
    return {"total": total, "active": total - embed, "active_with_embedding": total,
            "embedding": embed}

  def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token by `ModelConfig.flops_per_token`'s method.

    6 x (matmul weights a token passes through: every layer's projections and the output head; no
    embedding lookup, norms or biases) + 3 x forward attention 2 * n_h * (d_qk + d_v) * context per
    layer, with context seq_len/2 under a causal mask.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
      raise ConfigError(f"seq_len={seq_len!r}: must be a positive integer")
    matmul = self.num_layers * self.matmul_params_per_layer() + self.vocab_size * self.d_model
    ctx = seq_len / 2 if causal else seq_len
    attn = self.num_layers * 2 * self.num_heads * (2 * self.head_dim) * ctx
    return 6.0 * matmul + 3.0 * attn


QWEN2_5_72B = DenseModel(
    name="Qwen-2.5 72B", vocab_size=152064, d_model=8192, num_layers=80, num_heads=64,
    num_kv_heads=8, head_dim=128, ffn_dim=29568, qkv_bias=True,
    source="Qwen/Qwen2.5-72B config.json (72.7B parameters)")

LLAMA3_1_405B = DenseModel(
    name="LLaMA-3.1 405B", vocab_size=128256, d_model=16384, num_layers=126, num_heads=128,
    num_kv_heads=8, head_dim=128, ffn_dim=53248,
    source="meta-llama/Llama-3.1-405B config.json (405B parameters)")

DEEPSEEK_67B = DenseModel(
    name="DeepSeek LLM 67B", vocab_size=102400, d_model=8192, num_layers=95, num_heads=64,
    num_kv_heads=8, head_dim=128, ffn_dim=22016,
    source="deepseek-ai/deepseek-llm-67b-base config.json (LLaMA architecture, GQA 8 KV heads); "
           "V2's baseline in arXiv 2405.04434")

DENSE_MODELS: dict[str, DenseModel] = {"qwen2_5_72b": QWEN2_5_72B, "llama3_1_405b": LLAMA3_1_405B,
                                       "deepseek_67b": DEEPSEEK_67B}
