"""Per-device memory of the training step this project compiles, term by term (issue 14).

`memory.memory_plan` counts what any trainer must hold: parameters, one set of gradients, the
optimizer's moments, the saved activations. The step `training.step` compiles holds more, and
holds some of it differently; `step_plan` models that program from its config, so the compiler's
own figures (`python -m deepseek_jax.aot --crosscheck`) can be checked against it:

  arguments    parameters (f32 masters) + optimizer moments (`train.bf16_moments`) + the small
               router / FP8 / counter state; the state is donated, so outputs alias it
  gradients    with `train.grad_accum` > 1 an f32 accumulator the size of the parameters, plus
               one microbatch's gradients (f32: they are taken with respect to f32 masters)
  activations  saved per token for one microbatch (`activations.py`), with the attention the
               platform runs (fused kernels keep no [T, T] scores) and no logits (the loss is
               chunked)
  loss chunk   one chunk's f32 logits, their exponentials and their cotangent, vocabulary split
               as the rules split `vocab`
  gathered     one layer's weights gathered over the batch (FSDP) axes in the compute dtype, and
               that layer's weight gradient before its reduce-scatter
  head grads   the output head's weight gradient, gathered over the batch axes like its kernel
               (`layers.gathered`): an f32 sum across the loss chunks, and each loss's (main and
               every MTP depth) result in the compute dtype, held from its forward to its backward
  EP buffers   one MoE layer's all-to-all buffers (dispatch in `mesh.dispatch_dtype`, combine in
               `mesh.combine_dtype`, `capacity_factor` x the expected rows, sent and received)
               and its expert compute rows (`compute_capacity_factor` x tokens x K: input,
               gate/up/product, output), doubled for the backward's cotangents

What is not modelled: XLA's scheduling (two layers' gathers in flight when it prefetches), fusion
temporaries, and the backward of one block live beside its recomputed forward. The crosscheck
prints the remainder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from deepseek_jax.codesign import memory
from deepseek_jax.config import Config
from deepseek_jax.loss import chunk_positions
from deepseek_jax.model import abstract_variables
from sharding import rules as rules_lib
from sharding import specs

_WIRE = {"fp8": 1 + 4 / 128, "logfmt8": 1 + 4 / 128, "logfmt10": 1.25 + 4 / 128, "bfloat16": 2}
BATCH_AXES = ("data", "fsdp")       # the axes FSDP gathers weights over


@dataclasses.dataclass(frozen=True)
class StepPlan:
  params: float
  optimizer: float
  other_state: float
  grad_accumulator: float
  micro_gradients: float
  activations: float
  loss_chunk: float
  gathered_weights: float
  head_gradients: float
  ep_buffers: float
  tokens_per_device: float

  @property
  def arguments(self) -> float:
    return self.params + self.optimizer + self.other_state

  @property
  def temporaries(self) -> float:
    return (self.grad_accumulator + self.micro_gradients + self.activations + self.loss_chunk
            + self.gathered_weights + self.head_gradients + self.ep_buffers)

  @property
  def total(self) -> float:
    return self.arguments + self.temporaries

  def rows(self) -> list[tuple[str, float]]:
    return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
            if f.name != "tokens_per_device"]


def compute_bytes(dtype: str) -> int:
  return 4 if dtype == "float32" else 2


def wire_bytes(wire: str, compute_bytes: int) -> float:
  """Bytes per element of an all-to-all in `mesh.dispatch_dtype` / `combine_dtype` ("model": the
  compute dtype; FP8 and LogFMT carry one f32 scale per 128)."""
  return _WIRE.get(wire, compute_bytes)


def expert_rows(cfg: Config, rules: Sequence, sizes: Mapping[str, int]) -> tuple[float, float]:
  """(tokens per device of one microbatch, the rows one MoE layer sends: `capacity_factor` x
  tokens x K)."""
  m, t = cfg.model, cfg.train
  tokens = (t.batch_size // t.grad_accum) * t.seq_len / max(
      1, memory.batch_shards(rules, sizes, "act_tokens"))
  return tokens, (cfg.mesh.capacity_factor or 1.0) * tokens * m.num_experts_per_tok


def gathered_weights(variables, rules: Sequence, sizes: Mapping[str, int],
                     gather_axes: Sequence[str] = BATCH_AXES):
  """(path, shape, logical names, elements per device) of every weight of two dimensions or more
  (1-d ones stay in f32 and are tiny) once gathered over `gather_axes`, as FSDP gathers it: the
  other axes, expert and tensor, stay split."""
  kept = {a: (1 if a in gather_axes else n) for a, n in sizes.items()}
  for path, coll, shape, names in memory._logical_leaves(variables):
    if coll == "params" and len(shape) >= 2:
      n, _ = memory.shard_elements(shape, specs.mesh_spec(names, rules, sizes), kept)
      yield path, shape, names, n


def gathered_layer_bytes(variables, rules: Sequence, sizes: Mapping[str, int], nbytes: int,
                         gather_axes: Sequence[str] = BATCH_AXES) -> float:
  """The largest per-device bytes of one scanned layer's weights once gathered over
  `gather_axes` (`gathered_weights`)."""
  per_stack: dict[str, float] = {}
  for path, shape, names, n in gathered_weights(variables, rules, sizes, gather_axes):
    if "layers" in names and len(shape) >= 3:
      stack = path.split("/layers/")[0]
      per_stack[stack] = per_stack.get(stack, 0.0) + n / shape[names.index("layers")] * nbytes
  return max(per_stack.values(), default=0.0)


def step_plan(cfg: Config, sizes: Mapping[str, int], rules: Sequence | None = None,
              variables=None) -> StepPlan:
  """Per-device bytes of `cfg`'s compiled training step on a mesh of `sizes` (see the module
  docstring). `cfg.model` must be resolved for the platform (`ModelConfig.resolved`)."""
  m, t, mc = cfg.model, cfg.train, cfg.mesh
  rules = tuple(tuple(r) for r in (memory.project_rules(mc) if rules is None else rules))
  variables = abstract_variables(m) if variables is None else variables
  micro = t.batch_size // t.grad_accum
  fused = m.attention_impl == "fused"
  base = memory.memory_plan(m, sizes, rules, micro_batch=micro, seq_len=t.seq_len, grad_bytes=4,
                            moment_bytes=memory.moment_bytes(t), remat=m.remat,
                            variables=variables, fused_attention=fused, logits=False)
  trainable = base.gradients / 4 * memory._BYTES[m.param_dtype]
  other = base.params - trainable
  cb = compute_bytes(m.dtype)
  # loss chunk: rows and positions per device as `training.step` sizes them
  rows = max(1, math.ceil(micro / memory.batch_shards(rules, sizes, "act_batch")))
  positions = chunk_positions(t.loss_chunk, rows, t.seq_len, m.vocab_size, m.platform)
  vocab = math.ceil(m.vocab_size / memory.batch_shards(rules, sizes, "vocab"))
  chunk = 3 * rows * positions * vocab * 4
  gathered = 2 * gathered_layer_bytes(variables, rules, sizes, cb)
  batch_axes = set(rules_lib.as_axes(specs.mesh_spec(("act_batch",), rules, sizes)[0]))
  whole = {a: (1 if a in batch_axes else n) for a, n in sizes.items()}
  head, _ = memory.shard_elements((m.d_model, m.vocab_size),
                                  specs.mesh_spec(("embed", "vocab"), rules, sizes), whole)
  head_grads = head * (4 + (1 + m.num_mtp_layers) * cb)
  ep = 0.0
  if m.num_moe_layers:
    tokens, rows = expert_rows(cfg, rules, sizes)
    K, D, M = m.num_experts_per_tok, m.d_model, m.moe_ffn_dim
    cap = mc.capacity_factor or 1.0
    comm = 2 * rows * D * (wire_bytes(mc.dispatch_dtype, cb) + wire_bytes(mc.combine_dtype, cb))
    compute = (mc.compute_capacity_factor or cap) * tokens * K * (2 * D + 3 * M) * cb
    ep = 2 * (comm + compute)
  return StepPlan(params=trainable, optimizer=base.optimizer, other_state=other,
                  grad_accumulator=base.gradients if t.grad_accum > 1 else 0.0,
                  micro_gradients=base.gradients, activations=base.activations,
                  loss_chunk=float(chunk), gathered_weights=gathered,
                  head_gradients=float(head_grads), ep_buffers=ep,
                  tokens_per_device=base.tokens_per_device)
