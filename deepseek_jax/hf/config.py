"""Hugging Face DeepSeek `config.json` <-> `ModelConfig` (semantics §1; V2, V2-Lite, V3 layouts).

Reads both rope forms: the legacy `rope_scaling: {type: yarn, ...}` with a top-level `rope_theta`
(the released configs) and transformers 5's `rope_parameters: {rope_type: yarn, rope_theta, ...}`.
Routing: V3's `topk_method: noaux_tc` (sigmoid, selection bias, top-2-sum group score) and V2's
`greedy` / `group_limited_greedy` (softmax, max-of-group). The YaRN temperature follows
transformers: cos/sin are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
both are set (else by mscale(factor, 1)), and the softmax by mscale(factor, mscale_all_dim)^2.
Anything this implementation cannot represent raises `HFConfigError` naming the field.
"""

from __future__ import annotations

from typing import Any

from deepseek_jax.config import ConfigError, ModelConfig, YarnConfig

SUPPORTED_TYPES = ("deepseek_v3", "deepseek_v2")


class HFConfigError(ValueError):
  """config.json describes something this implementation does not support or is malformed."""


def _get(d: dict, key: str, default=None, required: bool = False):
  if key in d and d[key] is not None:
    return d[key]
  if required:
    raise HFConfigError(f"config.json: missing required field {key!r}")
  return default


def _int(d: dict, key: str, default=None, required: bool = False):
  """`d[key]` as an int (an integral number), naming the field when it is not one."""
  v = _get(d, key, default, required)
  if v is None or (isinstance(v, int) and not isinstance(v, bool)):
    return v
  if isinstance(v, float) and v.is_integer():
    return int(v)
  raise HFConfigError(f"config.json: {key}={v!r}: must be an integer")


def _float(d: dict, key: str, default=None, required: bool = False):
  """`d[key]` as a float, naming the field when it is not a number."""
  v = _get(d, key, default, required)
  if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
    return None if v is None else float(v)
  raise HFConfigError(f"config.json: {key}={v!r}: must be a number")


def _yarn(d: dict) -> tuple[float, YarnConfig | None]:
  """(rope_theta, YarnConfig or None) from either rope form."""
  params = d.get("rope_parameters") or d.get("rope_scaling") or {}
  if not isinstance(params, dict):
    raise HFConfigError(f"config.json: rope_scaling/rope_parameters={params!r} must be a mapping")
  theta = float(params.get("rope_theta", _get(d, "rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind in (None, "default"):
    return theta, None
  if kind != "yarn":
    raise HFConfigError(f"config.json: rope type {kind!r} is not supported (only 'yarn' or none)")
  if params.get("attention_factor") is not None:
    raise HFConfigError("config.json: rope attention_factor is not supported; give mscale and "
                        "mscale_all_dim instead")
  if params.get("truncate", True) is False:
    raise HFConfigError("config.json: rope truncate=false is not supported (DeepSeek floors/ceils "
                        "the YaRN correction range)")
  orig = int(_get(params, "original_max_position_embeddings", required=True))
  factor = params.get("factor")
  if factor is None:
    factor = _get(d, "max_position_embeddings", required=True) / orig
  mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
  if mscale and mscale_all_dim:
    m, mad = float(mscale), float(mscale_all_dim)
  elif not mscale_all_dim:
    m, mad = 1.0, 0.0  # transformers: cos/sin times mscale(factor, 1), softmax unscaled
  else:
    raise HFConfigError("config.json: rope mscale_all_dim without mscale is not supported "
                        "(transformers then scales cos/sin by mscale(factor, 1)); set both")
  try:
    yarn = YarnConfig(factor=float(factor), original_max_position_embeddings=orig,
                      beta_fast=float(params.get("beta_fast", 32.0)),
                      beta_slow=float(params.get("beta_slow", 1.0)), mscale=m, mscale_all_dim=mad)
  except ConfigError as e:
    raise HFConfigError(f"config.json rope: {e}") from None
  return theta, yarn


def from_hf_config(d: dict[str, Any], dtype: str = "float32",
                   num_mtp_layers: int | None = None) -> ModelConfig:
  """A `ModelConfig` from a parsed HF config.json. `num_mtp_layers` overrides
  `num_nextn_predict_layers` (the loader passes how many MTP layers the weights hold)."""
  if not isinstance(d, dict):
    raise HFConfigError(f"config.json: holds {type(d).__name__} {str(d)[:40]!r}, not a JSON "
                        "object of model fields")
  model_type = d.get("model_type")
  if model_type not in SUPPORTED_TYPES:
    raise HFConfigError(f"config.json: model_type={model_type!r} is not supported "
                        f"(expected one of {SUPPORTED_TYPES})")
  v3 = model_type == "deepseek_v3"
  for key, ok, rule in (
      ("tie_word_embeddings", lambda v: not v, "tied embeddings are not supported"),
      ("moe_layer_freq", lambda v: v == 1, "only every layer after first_k_dense_replace is MoE"),
      ("hidden_act", lambda v: v == "silu", "only SwiGLU (silu) is supported"),
      ("attention_bias", lambda v: not v, "attention biases are not supported"),
      ("rope_interleave", lambda v: v, "only the interleaved RoPE layout of the released "
                                       "weights is supported")):
    if key in d and d[key] is not None and not ok(d[key]):
      raise HFConfigError(f"config.json: {key}={d[key]!r}: {rule}")
  method = _get(d, "topk_method", "noaux_tc" if v3 else "greedy")
  scoring = _get(d, "scoring_func", "sigmoid" if v3 else "softmax")
  if v3 and (method != "noaux_tc" or scoring != "sigmoid"):
    raise HFConfigError(f"config.json: deepseek_v3 routing is sigmoid + noaux_tc, got "
                        f"scoring_func={scoring!r}, topk_method={method!r}")
  if method not in ("noaux_tc", "greedy", "group_limited_greedy"):
    raise HFConfigError(f"config.json: topk_method={method!r} is not supported")
  n_group, topk_group = _int(d, "n_group", 1), _int(d, "topk_group", 1)
  if method == "greedy":
    n_group = topk_group = 1
  layers = _int(d, "num_hidden_layers", required=True)
  try:
    theta, yarn = _yarn(d)
  except HFConfigError:
    raise
  except (TypeError, ValueError, ZeroDivisionError) as e:   # a field of the wrong type
    raise HFConfigError(f"config.json: rope_theta/rope_scaling: {e}") from None
  mtp = num_mtp_layers
  if mtp is None:
    mtp = _int(d, "num_nextn_predict_layers", _int(d, "num_mtp_layers", 0))
  try:
    return ModelConfig(
        vocab_size=_int(d, "vocab_size", required=True),
        d_model=_int(d, "hidden_size", required=True),
        num_layers=layers,
        num_heads=_int(d, "num_attention_heads", required=True),
        q_lora_rank=_int(d, "q_lora_rank", None),
        kv_lora_rank=_int(d, "kv_lora_rank", required=True),
        qk_nope_head_dim=_int(d, "qk_nope_head_dim", required=True),
        qk_rope_head_dim=_int(d, "qk_rope_head_dim", required=True),
        v_head_dim=_int(d, "v_head_dim", required=True),
        ffn_dim=_int(d, "intermediate_size", required=True),
        first_k_dense_replace=min(_int(d, "first_k_dense_replace", 0), layers),
        n_routed_experts=_int(d, "n_routed_experts", required=True),
        n_shared_experts=_int(d, "n_shared_experts", 0),
        num_experts_per_tok=_int(d, "num_experts_per_tok", required=True),
        moe_ffn_dim=_int(d, "moe_intermediate_size", required=True),
        n_group=n_group, topk_group=topk_group, scoring_func=scoring,
        routing_bias=method == "noaux_tc",
        norm_topk_prob=bool(_get(d, "norm_topk_prob", v3)),
        routed_scaling_factor=_float(d, "routed_scaling_factor", 1.0),
        rope_theta=theta, yarn=yarn,
        max_position_embeddings=_int(d, "max_position_embeddings", required=True),
        rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
        num_mtp_layers=mtp, dtype=dtype, param_dtype=dtype,
        init_std=_float(d, "initializer_range", 0.006))
  except ConfigError as e:
    raise HFConfigError(f"config.json does not give a valid model: {e}") from None


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "float32",
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The config.json of `cfg`, in the released form (legacy rope_scaling, top-level rope_theta).

  Softmax-routed models are written as deepseek_v2 (transformers' V3 code is sigmoid-only)."""
  v3 = cfg.scoring_func == "sigmoid"
  if v3 and not cfg.routing_bias and cfg.n_group > 1:
    raise HFConfigError("a sigmoid model without routing_bias uses the max-of-group rule, which "
                        "deepseek_v3 checkpoints cannot express")
  if v3:
    method = "noaux_tc"
  else:
    method = "greedy" if cfg.n_group == 1 else "group_limited_greedy"
  out: dict[str, Any] = {
      "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
      "model_type": "deepseek_v3" if v3 else "deepseek_v2",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
      "moe_intermediate_size": cfg.moe_ffn_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
      "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.n_routed_experts,
      "num_experts_per_tok": cfg.num_experts_per_tok, "n_group": cfg.n_group,
      "topk_group": cfg.topk_group, "topk_method": method, "scoring_func": cfg.scoring_func,
      "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor,
      "first_k_dense_replace": cfg.first_k_dense_replace, "moe_layer_freq": 1,
      "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
      "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
      "v_head_dim": cfg.v_head_dim, "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
      "num_nextn_predict_layers": cfg.num_mtp_layers, "tie_word_embeddings": False,
      "hidden_act": "silu", "attention_bias": False, "initializer_range": cfg.init_std,
      "torch_dtype": torch_dtype,
  }
  if cfg.yarn is not None:
    y = cfg.yarn
    out["rope_scaling"] = {"type": "yarn", "factor": y.factor,
                           "original_max_position_embeddings": y.original_max_position_embeddings,
                           "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                           "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim}
  else:
    out["rope_scaling"] = None
  for k, v in (extra or {}).items():
    out.setdefault(k, v)
  return out
