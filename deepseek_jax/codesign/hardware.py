"""Hardware presets for the co-design calculator ("Insights into DeepSeek-V3" §2.3.2, §4).

Each preset is data: peak dense matmul rates, HBM, and the scale-up (NVLink / ICI) and scale-out
(InfiniBand / DCN) tiers, bandwidths *unidirectional per device* in bytes/s (the quantity the paper
divides by); `*_achievable` fields hold the paper's usable figures. Every preset names its sources.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.config import ConfigError

GB = 1e9
TFLOPS = 1e12


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator and the two network tiers around it (all rates per device)."""
  name: str
  peak_bf16_flops: float                 # dense (no 2:4 sparsity), FLOP/s
  peak_fp8_flops: float | None           # dense, FLOP/s; None where there is no FP8 matmul rate
  hbm_bytes: float
  hbm_bandwidth: float                   # bytes/s
  scale_up_bandwidth: float              # bytes/s, unidirectional, inside the scale-up domain
  scale_up_domain: int                   # devices sharing the scale-up fabric
  scale_out_bandwidth: float             # bytes/s, unidirectional, between scale-up domains
  scale_up_achievable: float | None = None
  scale_out_achievable: float | None = None
  scale_up_latency: float | None = None    # seconds, one small message end to end (Table 5)
  scale_out_latency: float | None = None
  source: str = ""

  def ep_bandwidth(self, ep_size: int) -> float:
    """The bandwidth an all-to-all over `ep_size` devices is bound by (nominal)."""
    if not isinstance(ep_size, int) or ep_size < 1:
      raise ConfigError(f"ep_size={ep_size!r}: must be a positive integer")
    return self.scale_up_bandwidth if ep_size <= self.scale_up_domain else self.scale_out_bandwidth

  def ep_latency(self, ep_size: int) -> float:
    """The end-to-end latency of one all-to-all hop on the tier `ep_bandwidth` picks (0 if unknown)."""
    self.ep_bandwidth(ep_size)  # validates ep_size
    up = ep_size <= self.scale_up_domain
    return (self.scale_up_latency if up else self.scale_out_latency) or 0.0

  def scale_ratio(self, achievable: bool = False) -> float:
    """Scale-up : scale-out bandwidth (Insights §4.2's "about 4:1"); `achievable` uses the usable
    figures where the preset has them."""
    up = (self.scale_up_achievable or self.scale_up_bandwidth) if achievable else \
        self.scale_up_bandwidth
    out = (self.scale_out_achievable or self.scale_out_bandwidth) if achievable else \
        self.scale_out_bandwidth
    return up / out


# Insights Table 5: CPU-side end-to-end latency of a 64 B transfer, seconds (measured by the paper).
LATENCIES = {
    "IB same leaf": 2.8e-6,
    "IB cross leaf": 3.7e-6,
    "RoCE same leaf": 3.6e-6,
    "RoCE cross leaf": 5.6e-6,
    "NVLink": 3.33e-6,
}


PRESETS: dict[str, Hardware] = {
    "h800": Hardware(
        name="H800 SXM (DeepSeek-V3 cluster)",
        peak_bf16_flops=989 * TFLOPS, peak_fp8_flops=1979 * TFLOPS,
        hbm_bytes=80 * GB, hbm_bandwidth=3350 * GB,
        scale_up_bandwidth=200 * GB, scale_up_domain=8, scale_out_bandwidth=50 * GB,
        scale_up_achievable=160 * GB, scale_out_achievable=40 * GB,
        scale_up_latency=LATENCIES["NVLink"], scale_out_latency=LATENCIES["IB cross leaf"],
        source=("Insights §4.1-4.2 (NVLink 400 GB/s bidirectional, ~160 GB/s achievable; 8x 400G "
                "CX7 IB per node, ~40 GB/s effective); compute and HBM as H100 SXM (NVIDIA H100 "
                "datasheet); BF16 peak ~988 TFLOPS is also what Insights Table 4's MFU implies; "
                "latencies: Insights Table 5 (NVLink 3.33 us, IB cross leaf 3.7 us)")),
    "h100": Hardware(
        name="H100 SXM",
        peak_bf16_flops=989 * TFLOPS, peak_fp8_flops=1979 * TFLOPS,
        hbm_bytes=80 * GB, hbm_bandwidth=3350 * GB,
        scale_up_bandwidth=450 * GB, scale_up_domain=8, scale_out_bandwidth=50 * GB,
        source=("NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOPS BF16 / 1979 FP8 dense, "
                "80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s bidirectional); DGX H100: one 400 Gb/s "
                "ConnectX-7 per GPU")),
    "h200": Hardware(
        name="H200 SXM",
        peak_bf16_flops=989 * TFLOPS, peak_fp8_flops=1979 * TFLOPS,
        hbm_bytes=141 * GB, hbm_bandwidth=4800 * GB,
        scale_up_bandwidth=450 * GB, scale_up_domain=8, scale_out_bandwidth=50 * GB,
        source=("NVIDIA H200 datasheet (same GH100 compute as H100; 141 GB HBM3e at 4.8 TB/s; "
                "NVLink 4 900 GB/s bidirectional); HGX H200: one 400 Gb/s NIC per GPU")),
    "gb200_nvl72": Hardware(
        name="GB200 NVL72 (per Blackwell GPU)",
        peak_bf16_flops=2500 * TFLOPS, peak_fp8_flops=5000 * TFLOPS,
        hbm_bytes=186 * GB, hbm_bandwidth=8000 * GB,
        scale_up_bandwidth=900 * GB, scale_up_domain=72, scale_out_bandwidth=50 * GB,
        scale_up_latency=LATENCIES["NVLink"], scale_out_latency=LATENCIES["IB cross leaf"],
        source=("Insights §2.3.2 (900 GB/s unidirectional, 72 GPUs); NVIDIA GB200 NVL72 spec "
                "(rack: 360 PFLOPS BF16 / 720 PFLOPS FP8 with sparsity, i.e. 2.5 / 5 PFLOPS dense "
                "per GPU; 13.4 TB HBM3e, 8 TB/s per GPU; NVLink 5 1.8 TB/s bidirectional); "
                "scale-out assumed one 400 Gb/s NIC per GPU; latencies assumed those of H800's "
                "NVLink and IB in Insights Table 5")),
    "tpu_v5p": Hardware(
        name="TPU v5p (per chip)",
        peak_bf16_flops=459 * TFLOPS, peak_fp8_flops=None,
        hbm_bytes=95 * 2**30, hbm_bandwidth=2765 * GB,
        scale_up_bandwidth=600 * GB, scale_up_domain=8960, scale_out_bandwidth=50 / 8 * GB,
        source=("Google Cloud TPU v5p documentation (459 TFLOPS BF16, 95 GiB HBM2e at 2765 GB/s, "
                "ICI 1200 GB/s bidirectional per chip over a 3D torus, 8960-chip pod, DCN 50 Gb/s "
                "per chip). ICI is the per-chip injection rate summed over links: an all-to-all "
                "on a torus is bisection-bound and gets less")),
}


def get_hardware(name: str) -> Hardware:
  """Looks a preset up by name (case-insensitive, '-' or '_')."""
  key = name.strip().lower().replace("-", "_")
  if key not in PRESETS:
    raise ConfigError(f"hardware {name!r}: unknown (presets: {', '.join(PRESETS)})")
  return PRESETS[key]
