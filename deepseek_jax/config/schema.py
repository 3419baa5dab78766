"""Typed, frozen, self-validating configuration (DeepSeek-V3 `config.json` fields, V3 report §4.2).

`Config` sections: `model` (every HF DeepSeek-V3 `config.json` field, short names; counts its own
parameters and FLOPs), `train`, `mesh`, `fp8`. YAML is loaded strictly by `config.io`: bad keys,
types and values raise `ConfigError` naming the field, the value and the rule."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from deepseek_jax.config import counts
from deepseek_jax.config.base import ConfigError, _check, _f, _positive  # noqa: F401 (ConfigError re-exported)
from deepseek_jax.config.numerics import FP8Config


PLATFORMS = ("cpu", "gpu", "tpu")
# Model fields that choose how the same function is computed, not which parameters it has: a
# checkpoint resumes across them (another platform, kernel, remat policy or compute dtype).
IMPLEMENTATION_FIELDS = ("dtype", "platform", "remat", "attention_impl", "attention_block",
                         "dropless_impl", "dropless_block", "fuse_gate_up", "moe_dispatch")
REMAT_POLICIES = ("none", "full", "dots", "projections", "projections_offload")


@dataclasses.dataclass(frozen=True)
class YarnConfig:
  """YaRN context extension (HF `rope_scaling` with type yarn)."""
  factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0

  def __post_init__(self):
    _check(self.factor >= 1.0, "model.yarn.factor", self.factor, "must be >= 1")
    _positive("model.yarn", self, "original_max_position_embeddings")
    _check(self.beta_fast > self.beta_slow > 0, "model.yarn.beta_fast", self.beta_fast,
           f"must exceed beta_slow ({self.beta_slow}) and both must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V3 architecture. Defaults are the 671B model; YAML files override them."""
  vocab_size: int = 129280
  d_model: int = 7168
  num_layers: int = 61
  num_heads: int = 128
  q_lora_rank: int | None = _f(1536, "query latent rank; null: plain projection (V2-Lite)")
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  ffn_dim: int = _f(18432, "dense MLP hidden (HF intermediate_size)")
  first_k_dense_replace: int = _f(3, "the first layers are dense, the rest MoE")
  # DeepSeekMoE (V3 §2.1.2)
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  num_experts_per_tok: int = 8
  moe_ffn_dim: int = _f(2048, "per expert (HF moe_intermediate_size)")
  n_group: int = 8
  topk_group: int = 4
  scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
  routing_bias: bool = _f(True, "e_score_correction_bias (aux-loss-free balancing)")
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  balance_loss_alpha: float = _f(1e-4, "sequence-wise balance loss weight (V3 Eq. 17-20)")
  moe_dispatch: Literal["dense", "dropless"] = _f("dropless", "dense: every expert (the oracle)")
  dropless_impl: Literal["auto", "block", "ragged", "gmm"] = _f("auto", "gmm on GPU/TPU, or block")
  dropless_block: int | None = _f(None, "rows per block of the block path (null: automatic)")
  # Positions
  rope_theta: float = 10000.0
  yarn: YarnConfig | None = dataclasses.field(default_factory=YarnConfig)
  max_position_embeddings: int = 163840
  rms_norm_eps: float = 1e-6
  # Multi-token prediction (V3 §2.2)
  num_mtp_layers: int = _f(1, "multi-token prediction depth (0: none)")
  # Numerics and implementation. "auto" resolves by the platform the step is built for
  # (`resolved(platform)`; the target, not the host: `python -m deepseek_jax.aot` builds for
  # GPUs/TPUs on a CPU host; unresolved, the model resolves by `jax.default_backend()`).
  dtype: Literal["auto", "float32", "bfloat16"] = _f("auto", "bfloat16 on GPU/TPU, float32 on CPU")
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  init_std: float = 0.006
  scan_layers: bool = True
  remat: Literal["none", "full", "dots", "projections", "projections_offload"] = _f("none", (
      "none: keep activations; full: recompute each block; dots: save matmul outputs; "
      "projections: save the tagged projections; projections_offload: those in host memory"))
  platform: Literal["auto", "cpu", "gpu", "tpu"] = _f("auto", "built for; jax.default_backend()")
  attention_impl: Literal["auto", "materialized", "blockwise", "fused"] = _f("auto", (
      "auto: fused (cuDNN, splash) on GPU/TPU; on CPU blockwise (online softmax, never "
      "[B, N, T, S]) when T > attention_block, else materialized (the reference)"))
  attention_block: int = _f(512, "keys (and queries) per block of blockwise")
  fuse_gate_up: bool = _f(True, "gate_proj and up_proj as one matmul (same params)")

  def __post_init__(self):
    _positive("model", self, "vocab_size", "d_model", "num_layers", "num_heads", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_dim",
              "n_routed_experts", "num_experts_per_tok", "moe_ffn_dim", "n_group", "topk_group",
              "max_position_embeddings")
    _check(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
           "model.q_lora_rank", self.q_lora_rank, "must be a positive integer or null (plain query)")
    _check(self.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", self.qk_rope_head_dim,
           "must be even (RoPE rotates pairs)")
    _check(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
           "model.n_shared_experts", self.n_shared_experts, "must be an integer >= 0")
    _check(0 <= self.first_k_dense_replace <= self.num_layers, "model.first_k_dense_replace",
           self.first_k_dense_replace, f"must lie in [0, num_layers={self.num_layers}]")
    _check(self.num_experts_per_tok <= self.n_routed_experts, "model.num_experts_per_tok",
           self.num_experts_per_tok, f"must be <= n_routed_experts={self.n_routed_experts}")
    _check(self.n_routed_experts % self.n_group == 0, "model.n_group", self.n_group,
           f"must divide n_routed_experts={self.n_routed_experts}")
    _check(self.topk_group <= self.n_group, "model.topk_group", self.topk_group,
           f"must be <= n_group={self.n_group}")
    per_group = self.n_routed_experts // self.n_group
    _check(self.topk_group * per_group >= self.num_experts_per_tok, "model.topk_group",
           self.topk_group, f"kept groups hold {self.topk_group}*{per_group} experts, fewer than "
           f"num_experts_per_tok={self.num_experts_per_tok}")
    _check(self.n_group == 1 or per_group >= 2 or not self.routing_bias, "model.n_group",
           self.n_group, "with routing_bias each group needs >= 2 experts (group score = top-2 sum)")
    _check(self.scoring_func in ("sigmoid", "softmax"), "model.scoring_func", self.scoring_func,
           "must be 'sigmoid' (V3) or 'softmax' (V2)")
    _check(self.moe_dispatch in ("dense", "dropless"), "model.moe_dispatch", self.moe_dispatch,
           "must be 'dense' (every expert on every token, the oracle) or 'dropless' (sorted "
           "grouped matmul; expert-parallel when the caller passes a runner for a mesh that "
           "splits the experts)")
    _check(self.dropless_impl in ("auto", "block", "ragged", "gmm"), "model.dropless_impl",
           self.dropless_impl, "must be 'auto' (gmm on GPU/TPU, block on CPU), 'block', 'ragged' "
           "(jax.lax.ragged_dot) or 'gmm' (grouped-matmul kernel, XLA blocks where none)")
    _check(self.dropless_block is None or (isinstance(self.dropless_block, int)
                                           and not isinstance(self.dropless_block, bool)
                                           and self.dropless_block > 0),
           "model.dropless_block", self.dropless_block,
           "must be a positive integer (rows per block) or null (automatic)")
    _check(self.routed_scaling_factor > 0, "model.routed_scaling_factor",
           self.routed_scaling_factor, "must be > 0")
    _check(self.balance_loss_alpha >= 0, "model.balance_loss_alpha", self.balance_loss_alpha,
           "must be >= 0")
    _check(self.rope_theta > 1, "model.rope_theta", self.rope_theta, "must be > 1")
    _check(0 < self.rms_norm_eps < 1, "model.rms_norm_eps", self.rms_norm_eps,
           "must lie in (0, 1)")
    _check(isinstance(self.num_mtp_layers, int) and self.num_mtp_layers >= 0,
           "model.num_mtp_layers", self.num_mtp_layers, "must be an integer >= 0")
    _check(self.dtype in ("auto", "float32", "bfloat16"), "model.dtype", self.dtype,
           "must be 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'")
    _check(self.param_dtype in ("float32", "bfloat16"), "model.param_dtype", self.param_dtype,
           "must be 'float32' or 'bfloat16'")
    _check(self.remat in REMAT_POLICIES, "model.remat", self.remat,
           f"must be one of {', '.join(map(repr, REMAT_POLICIES))}")
    _check(self.platform in ("auto",) + PLATFORMS, "model.platform", self.platform,
           "must be 'auto' (jax.default_backend()), 'cpu', 'gpu' or 'tpu'")
    _check(self.attention_impl in ("auto", "materialized", "blockwise", "fused"),
           "model.attention_impl", self.attention_impl,
           "must be 'auto', 'materialized', 'blockwise' or 'fused'")
    _positive("model", self, "attention_block")
    _check(isinstance(self.fuse_gate_up, bool), "model.fuse_gate_up", self.fuse_gate_up,
           "must be true or false")
    _check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")

  def resolved(self, platform: str) -> "ModelConfig":
    """This config with every "auto" choice made for `platform` ("cpu", "gpu" or "tpu")."""
    _check(platform in PLATFORMS, "platform", platform, f"must be one of {PLATFORMS}")
    accel = platform != "cpu"
    return dataclasses.replace(
        self, platform=platform,
        dtype=("bfloat16" if accel else "float32") if self.dtype == "auto" else self.dtype,
        dropless_impl=(("gmm" if accel else "block") if self.dropless_impl == "auto"
                       else self.dropless_impl),
        attention_impl=("fused" if accel else "auto") if self.attention_impl == "auto"
        else self.attention_impl)

  # ---- derived sizes ----
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.first_k_dense_replace

  @property
  def cache_values_per_token(self) -> int:
    """Latent cache width: (C + R) * L values per token (V3: 576 * 61)."""
    return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_layers

  def param_counts(self) -> dict[str, int]:
    """Parameter counts from the shapes (`config.counts.param_counts`)."""
    return counts.param_counts(self)

  def flops_per_token(self, seq_len: int, *, mtp: bool, causal: bool = True) -> float:
    """Training FLOPs per token, forward + backward (`config.counts.flops_per_token`)."""
    _check(isinstance(seq_len, int) and seq_len > 0, "seq_len", seq_len, "must be a positive integer")
    _check(isinstance(mtp, bool), "mtp", mtp, "must be True or False")
    return counts.flops_per_token(self, seq_len, mtp=mtp, causal=causal)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training run: optimisation (V3 report §4.2), data, evaluation, checkpoints and logging."""
  steps: int = 300
  batch_size: int = _f(8, "sequences per optimizer step (all microbatches)")
  seq_len: int = 128
  # AdamW + schedule: warmup, constant, cosine to min_lr_ratio * lr, constant tail (V3 shape)
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 30
  decay_start_frac: float = _f(0.676, "cosine starts here (V3: 10T of 14.8T tokens)")
  decay_end_frac: float = _f(0.966, "and ends here (V3: 14.3T of 14.8T tokens)")
  weight_decay: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  grad_clip: float = 1.0
  bf16_moments: bool = _f(False, "Adam moments stored in BF16 (V3 §3.3.4)")
  grad_accum: int = _f(1, "microbatches per step (divides batch_size)")
  mtp_loss_weight: float = _f(0.3, "lambda (V3: 0.3, later 0.1)")
  bias_update_gamma: float = _f(1e-3, "aux-loss-free balancing speed (V3: 0.001)")
  seed: int = 0
  data: str = _f("stdlib", "stdlib (this Python's standard library) | synthetic | .txt/.jsonl/"
                 ".parquet files, a directory or glob | a prepared directory")
  data_workers: int = _f(0, "data loader worker processes (0: prefetch threads only)")
  tokenizer: str = _f("bytes", "bytes | path to a HF tokenizer.json")
  val_fraction: float = _f(0.05, "share of files (documents for one file) held out")
  eval_every: int = _f(50, "steps between validation evaluations")
  eval_batches: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  export_every: int = _f(0, "steps between HF checkpoint exports to <workdir>/hf/step_N (0: off)")
  async_checkpoint: bool = True
  max_bad_steps: int = _f(5, "consecutive non-finite steps that stop the run")
  log_every: int = 10
  peak_flops: float = _f(0.0, "FLOP/s for MFU; 0: declared per accelerator, or measured")
  loss_chunk: int = _f(0, "tokens per cross-entropy chunk (no f32 [B, T, V]); 0: auto")

  def __post_init__(self):
    _positive("train", self, "steps", "batch_size", "seq_len", "grad_accum", "eval_every",
              "eval_batches", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "log_every")
    _check(math.isfinite(self.learning_rate) and self.learning_rate > 0, "train.learning_rate",
           self.learning_rate, "must be a finite number > 0")
    _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio,
           "must lie in [0, 1]")
    _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "train.warmup_steps",
           self.warmup_steps, "must be an integer >= 0")
    _check(0 <= self.decay_start_frac <= self.decay_end_frac <= 1, "train.decay_start_frac",
           self.decay_start_frac, f"must satisfy 0 <= decay_start_frac <= decay_end_frac "
           f"({self.decay_end_frac}) <= 1")
    _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
    for n in ("adam_b1", "adam_b2"):
      v = getattr(self, n)
      _check(0 <= v < 1, f"train.{n}", v, "must lie in [0, 1)")
    _check(self.adam_eps > 0, "train.adam_eps", self.adam_eps, "must be > 0")
    _check(self.grad_clip > 0, "train.grad_clip", self.grad_clip, "must be > 0")
    _check(self.mtp_loss_weight >= 0, "train.mtp_loss_weight", self.mtp_loss_weight, "must be >= 0")
    _check(self.bias_update_gamma >= 0, "train.bias_update_gamma", self.bias_update_gamma,
           "must be >= 0")
    _check(self.batch_size % self.grad_accum == 0, "train.grad_accum", self.grad_accum,
           f"must divide batch_size={self.batch_size}")
    _check(self.seq_len >= 2, "train.seq_len", self.seq_len, "must be >= 2")
    _check(isinstance(self.seed, int) and self.seed >= 0, "train.seed", self.seed,
           "must be an integer >= 0")
    _check(bool(self.data), "train.data", self.data,
           "must be 'stdlib', 'synthetic' or a path to .txt/.jsonl files")
    _check(bool(self.tokenizer), "train.tokenizer", self.tokenizer,
           "must be 'bytes' or a path to a HF tokenizer.json")
    _check(0 < self.val_fraction < 1, "train.val_fraction", self.val_fraction,
           "must lie in (0, 1)")
    for name in ("data_workers", "export_every"):
      v = getattr(self, name)
      _check(isinstance(v, int) and v >= 0, f"train.{name}", v, "must be an integer >= 0 (0: off)")
    _check(isinstance(self.loss_chunk, int) and self.loss_chunk >= 0, "train.loss_chunk",
           self.loss_chunk, "must be an integer >= 0 (0: automatic)")
    _check(self.peak_flops >= 0, "train.peak_flops", self.peak_flops,
           "must be >= 0 (0: declared per accelerator, or measured at start)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh and expert-parallel dispatch (`sharding/mesh.py`, `sharding/expert_parallel.py`).

  Axis sizes `data`, `fsdp`, `expert`, `tensor`; one may be -1 (fill with the remaining devices).
  `rules` overrides single entries of `sharding.rules.DEFAULT_RULES`, each "logical=axis[,axis]"
  ("logical=" replicates). The expert-parallel MoE (used when the mesh splits the experts) sends
  each token once per destination shard into fixed buffers of `capacity_factor` x the expected
  rows (null: room for every local token, exact and never dropping). Each received row carries up
  to min(K, local experts) expert slots, mostly empty; `compute_capacity_factor` packs the filled
  slots into factor x the expected (local tokens x K) rows before the experts run, so expert
  memory and padded-block FLOPs follow the real assignments (null: every slot). `alltoall` picks the
  collective ("auto": ragged where the backend has it, i.e. not XLA:CPU); `dispatch_dtype` and
  `combine_dtype` set the wire format of the two all-to-all directions, token-to-expert and
  back, in both passes: "model" (the compute dtype), "bfloat16", "fp8" (E4M3 with 1x128
  power-of-two scales) or "logfmt8"/"logfmt10". V3 (§3.3.3): dispatch fp8, combine bfloat16.
  """
  data: int = _f(-1, "mesh axis size; one axis may be -1 (the remaining devices)")
  fsdp: int = _f(1, "mesh axis size (parameters and optimizer state sharded)")
  expert: int = _f(1, "mesh axis size (routed experts sharded: expert parallelism)")
  tensor: int = _f(1, "mesh axis size")
  rules: tuple[str, ...] = _f((), "overrides of sharding.rules: 'logical=axis[,axis]'")
  capacity_factor: float | None = _f(None, "EP buffers x expected rows (null: exact)")
  compute_capacity_factor: float | None = _f(None, "filled slots packed (null: every slot)")
  alltoall: Literal["auto", "dense", "ragged"] = _f("auto", "auto: ragged unless XLA:CPU")
  dispatch_dtype: Literal["model", "bfloat16", "fp8", "logfmt8", "logfmt10"] = "model"
  combine_dtype: Literal["model", "bfloat16", "fp8", "logfmt8", "logfmt10"] = "model"
  # How many ways of each axis cross nodes (GPU hosts on IB) or slices (TPU multislice, DCN): the
  # outer factor of the axis; the rest stays on NVLink / ICI. All 1: one node's fabric, or let
  # the device order decide (`sharding/mesh.py`).
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_expert: int = 1
  dcn_tensor: int = 1
  WIRES = ("model", "bfloat16", "fp8", "logfmt8", "logfmt10")

  def __post_init__(self):
    sizes = {n: getattr(self, n) for n in ("data", "fsdp", "expert", "tensor")}
    for n, v in sizes.items():
      _check(isinstance(v, int) and not isinstance(v, bool) and (v > 0 or v == -1), f"mesh.{n}", v,
             "must be > 0 or -1 (fill)")
    fills = [n for n, v in sizes.items() if v == -1]
    _check(len(fills) <= 1, f"mesh.{fills[-1] if fills else 'data'}", -1,
           "at most one mesh axis may be -1")
    for n, v in sizes.items():
      d = getattr(self, f"dcn_{n}")
      _check(isinstance(d, int) and not isinstance(d, bool) and d > 0, f"mesh.dcn_{n}", d,
             "must be a positive integer (the ways of the axis that cross nodes)")
      _check(v == -1 or v % d == 0, f"mesh.dcn_{n}", d, f"must divide mesh.{n}={v}")
    for r in self.rules:
      _check(isinstance(r, str) and r.count("=") == 1 and r.split("=")[0].strip() != "",
             "mesh.rules", r, "each entry must read 'logical_name=mesh_axis[,mesh_axis]' or "
             "'logical_name=' (replicated)")
    _check(self.capacity_factor is None or self.capacity_factor > 0, "mesh.capacity_factor",
           self.capacity_factor, "must be > 0, or null for exact (never-dropping) buffers")
    _check(self.compute_capacity_factor is None or self.compute_capacity_factor > 0,
           "mesh.compute_capacity_factor", self.compute_capacity_factor,
           "must be > 0, or null for every buffer slot (exact)")
    _check(self.alltoall in ("auto", "dense", "ragged"), "mesh.alltoall", self.alltoall,
           "must be 'auto', 'dense' or 'ragged'")
    for n in ("dispatch_dtype", "combine_dtype"):
      v = getattr(self, n)
      _check(v in self.WIRES, f"mesh.{n}", v, f"must be one of {', '.join(self.WIRES)}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  fp8: FP8Config = dataclasses.field(default_factory=FP8Config)

  def __post_init__(self):
    m, t = self.model, self.train
    _check(t.seq_len <= m.max_position_embeddings, "train.seq_len", t.seq_len,
           f"must be <= model.max_position_embeddings={m.max_position_embeddings}")


def yarn_mscale(scale: float, mscale: float) -> float:
  """YaRN attention temperature m = 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
