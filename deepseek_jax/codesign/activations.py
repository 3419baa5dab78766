"""Analytic activation memory for training (V3 report §3.2.3: what is recomputed; DESIGN.md).

Counts the tensors the backward pass needs, per token, in elements, for one block of each kind.
Letters follow the dimension key (D, N, H, R, J, Q, C, F, M, E, K; n_s shared experts, T the
attended length, which the expanded attention path materialises as a full [T, T] score matrix).

remat = "none" (everything the backward reads is kept):
  attention: 2D (block input, norm out) + 2Q (q_a out, its norm) + (C+R) + C (kv_a out, its norm)
             + 2N(H+R) (q, k after RoPE) + NJ (v) + NT (softmax probabilities) + NJ (attention out)
             + 2D (residual after attention, FFN norm out)
  dense FFN: 3F (gate out, up out, their product = down input)
  MoE:       E (router logits, f32) + K(D + 3M + D) (gathered input, gate/up/product, expert out
             for the combine weights) + 3 n_s M (shared expert)
remat = "dots" (`checkpoint_dots_with_no_batch_dims`: outputs of weight matmuls only):
  attention: D + Q + (C+R) + N(H+R) + N(H+J) + D;  dense FFN: 2F + D;
  MoE: E + K(2M + D) + n_s(2M) + D (the probabilities and elementwise results are recomputed)
remat = "full": D per layer (the block input) + one block's "none" set, live while it recomputes.
Outputs: per head (main + each MTP depth) 2V f32 values (logits, log-softmax) per token; MTP
depth k adds one MoE block and its 2D concatenated input.
Activations are in `model.dtype` except router logits and output logits (f32). XLA's temporaries,
fusion choices and the optimizer's own buffers are not modelled: this is a lower-level estimate.
"""

from __future__ import annotations

from deepseek_jax.config import ConfigError, ModelConfig

_BYTES = {"float32": 4, "bfloat16": 2, "auto": 2}   # plans are for accelerators: auto = bf16


def _attention(m: ModelConfig, t: int, remat: str, fused: bool = False) -> tuple[float, float]:
  """(elements in the activation dtype, elements in f32) per token for one attention half-block.
  `fused`: a flash-style kernel keeps one f32 log-sum-exp per head instead of N x T probabilities."""
  D, N, H, R, J, C = (m.d_model, m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim,
                      m.v_head_dim, m.kv_lora_rank)
  Q = m.q_lora_rank or 0
  if remat == "dots":
    q_dots = (Q + N * (H + R)) if Q else N * (H + R)
    return D + q_dots + (C + R) + N * (H + J) + D, 0.0
  scores = (0, N) if fused else (N * t, 0)
  return (2 * D + 2 * Q + (C + R) + C + 2 * N * (H + R) + N * J + scores[0] + N * J + 2 * D,
          float(scores[1]))


def _ffn(m: ModelConfig, moe: bool, remat: str) -> tuple[float, float]:
  D, F, M, E, K, S = (m.d_model, m.ffn_dim, m.moe_ffn_dim, m.n_routed_experts,
                      m.num_experts_per_tok, m.n_shared_experts)
  if not moe:
    return (2 * F + D, 0.0) if remat == "dots" else (3 * F, 0.0)
  if remat == "dots":
    return K * (2 * M + D) + S * 2 * M + D, float(E)
  return K * (D + 3 * M + D) + 3 * S * M, float(E)


def activation_elements_per_token(m: ModelConfig, seq_len: int, remat: str | None = None, *,
                                  fused_attention: bool = False, logits: bool = True) -> dict:
  """Saved elements per token: {'act': n (model.dtype), 'f32': n} plus the per-part breakdown.

  `fused_attention`: no [T, T] scores (flash-style kernels); `logits=False`: the loss is chunked
  (no per-token logits kept; the chunk is a temporary of its own, see `codesign.step_memory`)."""
  remat = m.remat if remat is None else remat
  if remat not in ("none", "dots", "full"):
    raise ConfigError(f"remat={remat!r}: must be 'none', 'dots' or 'full'")
  if not isinstance(seq_len, int) or seq_len <= 0:
    raise ConfigError(f"seq_len={seq_len!r}: must be a positive integer")
  inner = "none" if remat == "full" else remat
  a_attn, f_attn = _attention(m, seq_len, inner, fused_attention)
  a_dense, f_dense = _ffn(m, False, inner)
  a_moe, f_moe = _ffn(m, True, inner)
  dense_layer = (a_attn + a_dense, f_attn + f_dense)
  moe_layer = (a_attn + a_moe, f_attn + f_moe)
  nd, nm = m.first_k_dense_replace, m.num_moe_layers
  if remat == "full":
    biggest = max(dense_layer if nd else (0, 0), moe_layer if nm else (0, 0),
                  key=lambda x: x[0] + 2 * x[1])
    layers = (m.num_layers * m.d_model + biggest[0], biggest[1])
  else:
    layers = (nd * dense_layer[0] + nm * moe_layer[0], nd * dense_layer[1] + nm * moe_layer[1])
  heads = 1 + m.num_mtp_layers
  mtp = (m.num_mtp_layers * (moe_layer[0] + 2 * m.d_model), m.num_mtp_layers * moe_layer[1])
  logits_f32 = heads * 2 * m.vocab_size if logits else 0
  return {
      "act": layers[0] + mtp[0],
      "f32": layers[1] + mtp[1] + logits_f32,
      "per_dense_layer": dense_layer,
      "per_moe_layer": moe_layer,
      "logits_f32": logits_f32,
      "remat": remat,
  }


def activation_bytes_per_token(m: ModelConfig, seq_len: int, remat: str | None = None,
                               **kw) -> float:
  """Bytes of saved activations per token (see the module docstring for the formula); `kw`: as
  `activation_elements_per_token`."""
  e = activation_elements_per_token(m, seq_len, remat, **kw)
  return e["act"] * _BYTES[m.dtype] + e["f32"] * 4
