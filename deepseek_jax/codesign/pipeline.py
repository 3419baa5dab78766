"""Pipeline bubbles and memory: 1F1B, ZB1P and DualPipe (V3 report §3.2.1, its Table 2).

F, B and W are the times of one chunk's forward, full backward and weight-gradient part (B - W is
the input-gradient part); F&B is a forward and a backward chunk executed together (DualPipe
overlaps them, so F&B <= F + B). With PP stages:

  1F1B      bubble (PP - 1)(F + B)             parameters 1x   activations PP
  ZB1P      bubble (PP - 1)(F + B - 2W)        parameters 1x   activations PP
  DualPipe  bubble (PP/2 - 1)(F&B + B - 3W)    parameters 2x   activations PP + 1

Activations are in micro-batches' worth of one stage's activations. DualPipe keeps two copies of
the parameters (each device holds a stage from each end of the pipeline) and needs an even PP.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.config import ConfigError, ModelConfig

SCHEDULES = ("1F1B", "ZB1P", "DualPipe")


def _check(pp, f, b, w, fb) -> None:
  if not isinstance(pp, int) or isinstance(pp, bool) or pp < 2:
    raise ConfigError(f"pp={pp!r}: must be an integer >= 2")
  for name, v in (("F", f), ("B", b), ("W", w), ("F&B", fb)):
    if not (isinstance(v, (int, float)) and v >= 0):
      raise ConfigError(f"{name}={v!r}: must be a number >= 0")
  if w > b:
    raise ConfigError(f"W={w!r}: the weight-gradient part cannot exceed B={b!r}")


def bubble(schedule: str, pp: int, f: float, b: float, w: float,
           fb: float | None = None) -> float:
  """Pipeline bubble of `schedule` (same units as F, B, W); F&B defaults to F + B (no gain from
  overlapping them, the pessimistic case for DualPipe)."""
  fb = f + b if fb is None else fb
  _check(pp, f, b, w, fb)
  if schedule == "1F1B":
    return (pp - 1) * (f + b)
  if schedule == "ZB1P":
    return (pp - 1) * (f + b - 2 * w)
  if schedule == "DualPipe":
    if pp % 2:
      raise ConfigError(f"pp={pp}: DualPipe needs an even number of stages")
    return (pp // 2 - 1) * (fb + b - 3 * w)
  raise ConfigError(f"schedule {schedule!r}: unknown (one of {', '.join(SCHEDULES)})")


def memory_factors(schedule: str, pp: int) -> tuple[int, int]:
  """(parameter copies, micro-batches of activations in flight) per device."""
  if not isinstance(pp, int) or pp < 2:
    raise ConfigError(f"pp={pp!r}: must be an integer >= 2")
  table = {"1F1B": (1, pp), "ZB1P": (1, pp), "DualPipe": (2, pp + 1)}
  if schedule not in table:
    raise ConfigError(f"schedule {schedule!r}: unknown (one of {', '.join(SCHEDULES)})")
  return table[schedule]


@dataclasses.dataclass(frozen=True)
class ScheduleRow:
  schedule: str
  bubble: float
  param_copies: int
  activation_microbatches: int
  params_per_device: float     # parameters one device holds (copies included)


def params_per_device(model: ModelConfig, pp: int, ep: int) -> float:
  """Parameters of one pipeline stage on one device: the routed experts split over `ep`
  devices, everything else whole (no TP, as in V3's training); the layers split evenly over
  `pp` stages (an average: 61 layers do not divide by 16)."""
  moe = model.num_layers - model.first_k_dense_replace
  routed = moe * model.n_routed_experts * 3 * model.d_model * model.moe_ffn_dim
  total = model.param_counts()["total"]
  return ((total - routed) + routed / ep) / pp


def schedule_table(pp: int, f: float, b: float, w: float, fb: float | None = None,
                   model: ModelConfig | None = None, ep: int = 64) -> list[ScheduleRow]:
  per = 0.0 if model is None else params_per_device(model, pp, ep)
  rows = []
  for s in SCHEDULES:
    copies, acts = memory_factors(s, pp)
    rows.append(ScheduleRow(s, bubble(s, pp, f, b, w, fb), copies, acts, copies * per))
  return rows
