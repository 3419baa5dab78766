"""Expert-parallel inference bound on time per output token ("Insights into DeepSeek-V3" §2.3.2).

One expert per device, compute hidden behind communication (dual micro-batch): each layer's decode
step costs one dispatch and one combine all-to-all per micro-batch,
  t_step = (b_dispatch + b_combine) * tokens_per_device * experts_per_token * hidden / bandwidth,
  TPOT = t_step * micro_batches * layers.
"""

from __future__ import annotations

import dataclasses
import math

from deepseek_jax.codesign.hardware import Hardware
from deepseek_jax.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class EPBound:
  step_s: float          # dispatch + combine of one micro-batch in one layer
  layer_s: float         # all micro-batches of one layer
  tpot_s: float          # time per output token: every layer
  bytes_per_step: float  # bytes one device sends per step

  @property
  def tokens_per_s(self) -> float:
    return 1.0 / self.tpot_s


def _positive(name: str, v, integer: bool = False) -> None:
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
  if integer:
    ok = ok and float(v).is_integer()
  if not ok:
    kind = "a positive integer" if integer else "a positive finite number"
    raise ConfigError(f"{name}={v!r}: must be {kind}")


def ep_tpot_bound(bandwidth: float, tokens_per_device: int = 32, experts_per_token: int = 9,
                  hidden: int = 7000, dispatch_bytes: float = 1.0, combine_bytes: float = 2.0,
                  num_layers: int = 61, micro_batches: int = 2,
                  latency_s: float = 0.0) -> EPBound:
  """Communication-bound TPOT; `bandwidth` in bytes/s per device (unidirectional).

  Defaults are the paper's example (hidden 7000 gives its 120.96 us per step); `latency_s` is
  added per all-to-all, two per step (zero in the paper).
  """
  _positive("bandwidth", bandwidth)
  for n, v in (("tokens_per_device", tokens_per_device), ("experts_per_token", experts_per_token),
               ("hidden", hidden), ("num_layers", num_layers), ("micro_batches", micro_batches)):
    _positive(n, v, integer=True)
  _positive("dispatch_bytes", dispatch_bytes)
  _positive("combine_bytes", combine_bytes)
  if not (isinstance(latency_s, (int, float)) and math.isfinite(latency_s) and latency_s >= 0):
    raise ConfigError(f"latency_s={latency_s!r}: must be a finite number >= 0")
  nbytes = (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden
  step = nbytes / bandwidth + 2 * latency_s
  layer = step * micro_batches
  return EPBound(step_s=step, layer_s=layer, tpot_s=layer * num_layers, bytes_per_step=nbytes)


def ep_tpot_bound_for(model: ModelConfig, hardware: Hardware, ep_size: int | None = None,
                      tokens_per_device: int = 32, hidden: int | None = None,
                      bandwidth: float | None = None, **kw) -> EPBound:
  """The bound for a config on a hardware preset.

  Experts per token = routed K + shared experts (decode serves the shared expert like a routed
  one); hidden = d_model unless given; the bandwidth is the tier an all-to-all over `ep_size`
  devices runs on (default: one device per expert, routed + shared) unless given. All
  `num_layers` count, the dense ones too, as in the paper.
  """
  if ep_size is None:
    ep_size = model.n_routed_experts + model.n_shared_experts
  bw = hardware.ep_bandwidth(ep_size) if bandwidth is None else bandwidth
  return ep_tpot_bound(bw, tokens_per_device=tokens_per_device,
                       experts_per_token=model.num_experts_per_tok + model.n_shared_experts,
                       hidden=model.d_model if hidden is None else hidden,
                       num_layers=model.num_layers, **kw)
