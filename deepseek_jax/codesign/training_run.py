"""V3's training run on 2048 H800s ("Insights into DeepSeek-V3" §5.1.2, Table 4) and a step-time
estimate that lets the interconnect vary (the `lab bandwidth` study).

Table 4 measures one step of 15360 x 4096 tokens: 19.926 s on the multi-plane fat-tree (MPFT),
19.946 s on a multi-rail one (MRFT). From the step time, the tokens per step and the model's
FLOPs per token follow tokens/day, TFLOPS per GPU and MFU; the paper's 385 TFLOPS is the causal
count (FLOPs per token without MTP, `flops.train_flops_per_token`), 432 the non-causal one.

`step_estimate` is an estimate, calibrated on Table 4: the measured compute phases (1F, 1B, 1W,
1F1B) and the fixed ones (bubble, optimizer) scale with the peak FLOP rate, and the expert
all-to-all of a step is hidden behind compute up to the compute time (DualPipe overlap):

  step = (measured - compute) s + max(compute s, bytes / bandwidth + all-to-alls x latency),

with s = H800 peak / this peak, bytes = tokens x MoE layers x nodes x d_model x 6 / GPUs: each
token reaches M nodes once per direction (node-limited routing, NVLink forwards inside the node),
FP8 (1 B) and BF16 (2 B) each way, forward and backward.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.config import ConfigError

# Insights Table 4 as printed.
PAPER_TABLE4 = {
    "MPFT": dict(tokens_per_day=272.80e9, step_s=19.926, f=1.13, bubble=2.06, b=1.99, w=0.48,
                 one_f_one_b=13.95, optimizer=0.29, tflops=(432, 385), mfu=(43.73, 38.94)),
    "MRFT": dict(tokens_per_day=272.52e9, step_s=19.946, f=1.13, bubble=2.03, b=1.99, w=0.48,
                 one_f_one_b=14.00, optimizer=0.31, tflops=(432, 385), mfu=(43.68, 38.90)),
}
GPUS = 2048
# The paper's cross-check: 385 TFLOPS x 2048 GPUs / 3.157M tokens/s ~ 250 GFLOPs per token.
PAPER_TOKENS_PER_S = 3.157e6


@dataclasses.dataclass(frozen=True)
class RunMetrics:
  tokens_per_s: float
  tokens_per_day: float
  flops_per_gpu: float   # model FLOP/s per GPU
  mfu: float             # of the BF16 peak


def run_metrics(step_s: float, tokens_per_step: int, gpus: int, flops_per_token: float,
                peak_flops: float) -> RunMetrics:
  """Throughput and MFU of a run that takes `step_s` per step of `tokens_per_step` tokens."""
  for name, v in (("step_s", step_s), ("tokens_per_step", tokens_per_step), ("gpus", gpus),
                  ("flops_per_token", flops_per_token), ("peak_flops", peak_flops)):
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
      raise ConfigError(f"{name}={v!r}: must be a positive number")
  tps = tokens_per_step / step_s
  per_gpu = tps * flops_per_token / gpus
  return RunMetrics(tps, tps * 86400, per_gpu, per_gpu / peak_flops)


def phases_sum(fabric: str = "MPFT") -> float:
  """1F + bubble + 1B + 1W + 1F1B + optimizer: what Table 4's phases add up to."""
  r = PAPER_TABLE4[fabric]
  return r["f"] + r["bubble"] + r["b"] + r["w"] + r["one_f_one_b"] + r["optimizer"]


@dataclasses.dataclass(frozen=True)
class StepModel:
  """The step of V3's run, to be moved to other hardware (defaults: Table 4's MPFT column)."""
  compute_s: float = PAPER_TABLE4["MPFT"]["f"] + PAPER_TABLE4["MPFT"]["b"] + \
      PAPER_TABLE4["MPFT"]["w"] + PAPER_TABLE4["MPFT"]["one_f_one_b"]
  measured_s: float = PAPER_TABLE4["MPFT"]["step_s"]
  peak_flops: float = 989e12          # the H800 the phases were measured on
  tokens_per_step: int = 15360 * 4096
  gpus: int = GPUS
  moe_layers: int = 58
  d_model: int = 7168
  nodes_per_token: float = 4          # node-limited routing, M
  bytes_per_element: float = 6        # 1 + 2 forward, 1 + 2 backward (FP8 and BF16 legs)
  micro_batches: int = 15             # per step, per device (the 2048-GPU config's grad_accum)

  @property
  def fixed_s(self) -> float:
    """Bubble + optimizer (+ the 0.026 s the rounded phases leave out): the step's non-overlapped
    rest, so that the estimate at Table 4's own hardware is its measured step."""
    return self.measured_s - self.compute_s

  def comm_bytes_per_gpu(self) -> float:
    return (self.tokens_per_step * self.moe_layers * self.nodes_per_token * self.d_model
            * self.bytes_per_element / self.gpus)

  def all_to_alls(self, pipeline_stages: int = 16) -> float:
    """All-to-alls one GPU waits on per step: 4 per MoE layer it holds per micro-batch."""
    return 4 * self.micro_batches * self.moe_layers / pipeline_stages


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  step_s: float
  compute_s: float
  comm_s: float
  exposed_comm_s: float
  tokens_per_day: float


def step_estimate(bandwidth: float, latency_s: float = 0.0, peak_flops: float | None = None,
                  model: StepModel = StepModel()) -> StepEstimate:
  """Estimated step time with an EP all-to-all at `bandwidth` bytes/s per GPU (and `latency_s`
  per all-to-all) on a GPU of `peak_flops` (default: the H800 of Table 4)."""
  if not bandwidth > 0:
    raise ConfigError(f"bandwidth={bandwidth!r}: must be > 0")
  if not latency_s >= 0:
    raise ConfigError(f"latency_s={latency_s!r}: must be >= 0")
  s = model.peak_flops / (model.peak_flops if peak_flops is None else peak_flops)
  compute = model.compute_s * s
  comm = model.comm_bytes_per_gpu() / bandwidth + model.all_to_alls() * latency_s
  step = model.fixed_s * s + max(compute, comm)
  return StepEstimate(step, compute, comm, max(0.0, comm - compute),
                      model.tokens_per_step * 86400 / step)


def knee_bandwidth(latency_s: float = 0.0, peak_flops: float | None = None,
                   model: StepModel = StepModel()) -> float:
  """The bandwidth below which the all-to-all stops hiding behind compute (inf if latency alone
  exceeds the compute time)."""
  s = model.peak_flops / (model.peak_flops if peak_flops is None else peak_flops)
  room = model.compute_s * s - model.all_to_alls() * latency_s
  return float("inf") if room <= 0 else model.comm_bytes_per_gpu() / room
