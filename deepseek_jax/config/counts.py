"""Parameter and FLOP counts of a `ModelConfig`, from its shapes alone (V3 report Table 2 method).

`ModelConfig.param_counts()` and `ModelConfig.flops_per_token()` call these (they validate the
arguments); this module imports nothing from the package.
"""

from __future__ import annotations

import dataclasses


def param_counts(cfg) -> dict[str, int]:
  """Parameter counts from the shapes (norm weights and router biases included).

  `active` counts what one token touches through matmuls: attention, dense FFNs, the shared and
  K routed experts, the router and the output head, *without* the embedding lookup (V3 report's
  "37B" is 36.6B this way); `active_with_embedding` adds the lookup table (37.5B).
  """
  D, N, C, R = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
  H, J, E = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.n_routed_experts
  if cfg.q_lora_rank is None:
    q = D * N * (H + R)
  else:
    q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * N * (H + R)
  attn = q + D * (C + R) + C + C * N * (H + J) + N * J * D
  norms = 2 * D
  dense_ffn = 3 * D * cfg.ffn_dim
  expert = 3 * D * cfg.moe_ffn_dim
  router = E * D + (E if cfg.routing_bias else 0)
  moe_total = E * expert + cfg.n_shared_experts * expert + router
  moe_active = (cfg.num_experts_per_tok + cfg.n_shared_experts) * expert + router
  embed = cfg.vocab_size * D
  head = cfg.vocab_size * D + D  # lm_head + final norm
  dense_layer = attn + norms + dense_ffn
  moe_layer_total = attn + norms + moe_total
  moe_layer_active = attn + norms + moe_active
  nd, nm = cfg.first_k_dense_replace, cfg.num_moe_layers
  total = embed + head + nd * dense_layer + nm * moe_layer_total
  active = head + nd * dense_layer + nm * moe_layer_active
  mtp_one = 2 * D * D + 2 * D + moe_layer_total  # eh_proj, enorm, hnorm, block (MoE), shared norm
  mtp_one += D
  return {
      "total": total,
      "active": active,
      "active_with_embedding": active + embed,
      "embedding": embed,
      "mtp_total": cfg.num_mtp_layers * mtp_one,
      "mtp_active": cfg.num_mtp_layers * (mtp_one - moe_layer_total + moe_layer_active),
  }

def flops_per_token(cfg, seq_len: int, *, mtp: bool, causal: bool = True) -> float:
  """Training FLOPs per token (forward + backward = 3x forward); the one FLOP count.

  Matmuls: 6 * (active matmul parameters without the embedding lookup). Attention: per layer the
  score (H+R per head) and value (J per head) products over the visible context, which averages
  seq_len/2 under a causal mask; 2 FLOPs per MAC, times 3 for the backward. With `mtp=False`
  this is the method that gives the paper's Table 2 (V3: 250 GFLOPs at 4096; the co-design
  tables). `mtp=True` adds what a training run also computes (V3 report §2.2), per MTP depth one
  MoE block, eh_proj [2D, D] and the shared output head (train.py's MFU).
  """
  p = cfg.param_counts()
  norm_params = cfg.num_layers * 2 * cfg.d_model + cfg.d_model
  if cfg.q_lora_rank is not None:
    norm_params += cfg.num_layers * cfg.q_lora_rank
  norm_params += cfg.num_layers * cfg.kv_lora_rank
  bias = cfg.num_moe_layers * cfg.n_routed_experts if cfg.routing_bias else 0
  matmul = p["active"] - norm_params - bias
  ctx = seq_len / 2 if causal else seq_len
  attn = cfg.num_layers * 2 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * ctx
  flops = 6.0 * matmul + 3.0 * attn
  if not mtp or cfg.num_mtp_layers == 0:
    return flops
  # A 1-layer MoE model counts that layer + the output head: what an MTP depth multiplies through.
  one_moe_layer = dataclasses.replace(cfg, num_layers=1, first_k_dense_replace=0,
                                      num_mtp_layers=0)
  per_depth = (flops_per_token(one_moe_layer, seq_len, mtp=False, causal=causal)
               + 6.0 * 2 * cfg.d_model * cfg.d_model)
  return flops + cfg.num_mtp_layers * per_depth
