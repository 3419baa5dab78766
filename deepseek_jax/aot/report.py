"""What XLA made of a step compiled for a target: memory, FLOPs, kernels, collectives, and a
roofline step-time estimate (an estimate: nothing ran).

Memory is `compiled.memory_analysis()` per device: arguments + outputs - aliased (donated) +
temporaries. FLOPs are the matmul FLOPs of the optimized module with loops counted by their trip
counts (`aot.hlo`); kernels that XLA cannot see into (cuDNN attention, Pallas/Triton/Mosaic) are
listed by custom-call target and counted separately where their shapes give their FLOPs. The
estimate is max(FLOPs / peak, bytes / HBM bandwidth) + collective bytes / link bandwidth, with no
overlap: a bound to compare configurations, not a prediction of wall time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deepseek_jax.aot import hlo
from deepseek_jax.aot.targets import GiB, Target

# Custom-call targets by family, for the report's "kernels" line.
KERNEL_FAMILIES = {
    "cudnn": ("__cudnn$",),
    "cublas": ("__cublas$",),
    "pallas/mosaic-gpu": ("mosaic_gpu",),
    "pallas/triton": ("__gpu$xla.gpu.triton", "triton_kernel_call"),
    "pallas/mosaic-tpu": ("tpu_custom_call",),
}


# Custom calls that are the compiler's own bookkeeping, not kernels (XLA:TPU buffers, async calls).
INTERNAL = ("AllocateBuffer", "PrepareAsyncCallStart", "PrepareAsyncCallDone", "Sharding",
            "SPMDFullToShardShape", "SPMDShardToFullShape", "MoveToHost", "MoveToDevice")


def _flop(x: float) -> str:
  return f"{x / 1e12:.3f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms"


def kernel_family(target: str) -> str:
  for family, prefixes in KERNEL_FAMILIES.items():
    if any(target.startswith(p) or p in target for p in prefixes):
      return family
  return "other"


@dataclasses.dataclass
class Report:
  target: str
  what: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  host_temp_bytes: int
  hbm_bytes: int
  usable_bytes: int
  compiled_flops: float          # matmul FLOPs compiled (loops counted; kernels by shape), per device
  xla_flops: float               # of which XLA's own dots
  opaque_kernels: int            # kernels with no FLOP count (in neither figure)
  model_flops: float | None      # the model's own count for this step, per device
  kernel_bytes: float
  custom_calls: dict             # target -> calls per step
  collectives: dict              # kind -> (count, bytes) per step
  unknown_trip_loops: int
  top_bytes: list                # [(computation/instruction, bytes per step)], largest first
  peak_flops: float
  hbm_bw: float
  link_bw: float
  crosscheck: dict | None = None  # `aot.crosscheck` figures, when asked for

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.usable_bytes

  @property
  def estimate_s(self) -> dict:
    compute = self.compiled_flops / self.peak_flops
    memory = self.kernel_bytes / self.hbm_bw
    comm = sum(b for _, b in self.collectives.values()) / self.link_bw
    return {"compute": compute, "memory": memory, "collectives": comm,
            "step": max(compute, memory) + comm}

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(total_bytes=self.total_bytes, fits=self.fits, estimate_s=self.estimate_s)
    return d

  def lines(self) -> list[str]:
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    est = self.estimate_s
    out = [f"{self.what} on {self.target} (per device)",
           f"  memory: arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)} "
           f"(donated {g(self.alias_bytes)}), temporaries {g(self.temp_bytes)}; total "
           f"{g(self.total_bytes)} = {self.total_bytes / self.hbm_bytes:.0%} of {g(self.hbm_bytes)} "
           f"HBM, {self.total_bytes / self.usable_bytes:.0%} of the {g(self.usable_bytes)} JAX "
           f"uses by default: {'fits' if self.fits else 'DOES NOT FIT'}"
           + (f"; host {g(self.host_temp_bytes)}" if self.host_temp_bytes else "")]
    flops = f"  FLOPs: {_flop(self.compiled_flops)} of matmuls compiled"
    if self.model_flops:
      flops += (f", model {_flop(self.model_flops)}: "
                f"{self.compiled_flops / self.model_flops:.2f}x")
    if self.compiled_flops > self.xla_flops:
      flops += (f" ({_flop(self.compiled_flops - self.xla_flops)} in kernels, counted from their "
                "operand shapes)")
    if self.opaque_kernels:
      flops += f"; {self.opaque_kernels} kernel call site(s) not counted"
    if self.unknown_trip_loops:
      flops += f"; {self.unknown_trip_loops} loop(s) without a known trip count counted once"
    out.append(flops)
    kernels = ", ".join(f"{t} x{n:g} [{kernel_family(t)}]" for t, n in
                        sorted(self.custom_calls.items())) or "none (XLA fusions only)"
    out.append(f"  kernels: {kernels}")
    coll = ", ".join(f"{k} x{n:g} ({b / 2 ** 20:.1f} MiB)" for k, (n, b) in
                     sorted(self.collectives.items())) or "none"
    out.append(f"  collectives: {coll}")
    line = (f"  estimate (roofline, not measured): compute {_ms(est['compute'])}, memory "
            f"{_ms(est['memory'])}, collectives {_ms(est['collectives'])} -> step {_ms(est['step'])}")
    if self.model_flops:
      line += f", MFU {self.model_flops / self.peak_flops / est['step']:.0%}"
    out.append(line)
    if self.top_bytes and est["memory"] > est["compute"]:
      out.append("  most bytes: " + ", ".join(f"{k.rpartition('/')[2]} {b / 2 ** 30:.1f} GiB"
                                              for k, b in self.top_bytes[:3]))
    return out


def analyze(compiled, target: Target, what: str, model_flops: float | None = None) -> Report:
  """A `Report` of `compiled` (a `jax.stages.Compiled` for `target`'s devices)."""
  mem = compiled.memory_analysis()
  s = hlo.summarize(compiled.as_text())
  return Report(
      target=str(target), what=what,
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      host_temp_bytes=int(getattr(mem, "host_temp_size_in_bytes", 0) or 0),
      hbm_bytes=target.chip.hbm_bytes, usable_bytes=target.usable_bytes,
      compiled_flops=s.dot_flops + s.kernel_flops, xla_flops=s.dot_flops,
      opaque_kernels=s.opaque_kernels, model_flops=model_flops, kernel_bytes=s.kernel_bytes,
      custom_calls={k: v for k, v in s.custom_calls.items() if k not in INTERNAL},
      collectives={k: (v[0], v[1]) for k, v in s.collectives.items()},
      unknown_trip_loops=s.unknown_trip_loops, top_bytes=s.top_bytes(5), peak_flops=target.chip.peak_bf16,
      hbm_bw=target.chip.hbm_bw, link_bw=target.chip.link_bw)
