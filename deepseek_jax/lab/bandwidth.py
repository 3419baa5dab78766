"""`python -m deepseek_jax.lab bandwidth`: the EP decode bound and the training step as the
interconnect's bandwidth and latency vary ("Insights" §2.3.2, §4, §5.2; estimates).

Two models from `codesign`, both estimates:
- decode: the EP bound on TPOT (`ep.ep_tpot_bound`, V3: 32 tokens per device, 8 routed + 1
  shared expert, FP8 dispatch + BF16 combine, 2 micro-batches x 61 layers), plus one end-to-end
  latency per all-to-all (the paper takes it as 0);
- training: `training_run.step_estimate`, Table 4's step moved to other bandwidths, latencies and
  peak FLOP rates (the all-to-all hides behind compute until it is longer than compute).
Fabrics: H800 (EP over IB at the nominal 50 or achievable 40 GB/s), GB200 NVL72 (V3's decode EP
of 257 GPUs spans racks, so its NICs; training's EP64 fits a rack) and an ideal unified fabric
(900 GB/s to every GPU at any EP size, the NVLink latency). The knee is where more bandwidth stops paying: in decode where the bandwidth
term meets the latency term, in training where the all-to-all fits under compute.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_jax import errors
from deepseek_jax.cli_args import ArgParser, float_list, output_dir, positive_int
from deepseek_jax.codesign import plots, training_run
from deepseek_jax.codesign.ep import ep_tpot_bound
from deepseek_jax.codesign.hardware import LATENCIES, get_hardware
from deepseek_jax.lab import study_main

LAYERS, MICRO_BATCHES, EXPERTS = 61, 2, 9     # V3 decode: 61 layers, dual micro-batch, 8+1 experts


@dataclasses.dataclass(frozen=True)
class Fabric:
  name: str
  decode_bw: float       # bytes/s per GPU on the tier V3's decode EP (257+ GPUs) runs on
  decode_lat: float      # seconds per all-to-all
  train_bw: float        # bytes/s per GPU on the tier the training EP64 runs on
  train_lat: float
  peak_flops: float
  note: str


def fabrics() -> list[Fabric]:
  h800, gb = get_hardware("h800"), get_hardware("gb200_nvl72")
  ib, nvl = LATENCIES["IB cross leaf"], LATENCIES["NVLink"]
  return [
      Fabric("H800, IB nominal", h800.scale_out_bandwidth, ib, h800.scale_out_bandwidth, ib,
             h800.peak_bf16_flops, "the paper's bound: EP leaves the 8-GPU node"),
      Fabric("H800, IB achievable", h800.scale_out_achievable, ib, h800.scale_out_achievable, ib,
             h800.peak_bf16_flops, "~40 GB/s of the 50 (hardware.py)"),
      Fabric("GB200 NVL72", gb.scale_out_bandwidth, ib, gb.scale_up_bandwidth, nvl,
             gb.peak_bf16_flops, "decode EP of 257 GPUs spans 4 racks (NICs); training EP64 "
             "fits one rack (NVLink)"),
      Fabric("ideal unified fabric", gb.scale_up_bandwidth, nvl, gb.scale_up_bandwidth, nvl,
             gb.peak_bf16_flops, "900 GB/s to every GPU at any EP size, NVLink latency (= "
             "NVL72 when the EP fits one rack)"),
  ]


def tpot(bw: float, lat: float, tokens: int, hidden: int) -> float:
  return ep_tpot_bound(bw, tokens, EXPERTS, hidden, num_layers=LAYERS,
                       micro_batches=MICRO_BATCHES, latency_s=lat).tpot_s


def decode_knee(lat: float, tokens: int, hidden: int) -> float:
  """Bandwidth at which the bytes term of a step equals its latency term (inf at latency 0)."""
  nbytes = ep_tpot_bound(1.0, tokens, EXPERTS, hidden).bytes_per_step
  return float("inf") if lat == 0 else nbytes / (2 * lat)


def fabric_rows(tokens: int, hidden: int) -> list[list[str]]:
  rows = []
  for f in fabrics():
    t0, t1 = tpot(f.decode_bw, 0.0, tokens, hidden), tpot(f.decode_bw, f.decode_lat, tokens, hidden)
    est = training_run.step_estimate(f.train_bw, f.train_lat, f.peak_flops)
    knee = training_run.knee_bandwidth(f.train_lat, f.peak_flops)
    rows.append([f.name, f"{f.decode_bw / 1e9:g}", f"{f.decode_lat * 1e6:g}",
                 f"{t0 * 1e3:.3f}", f"{t1 * 1e3:.3f}", f"{1 / t1:.0f}",
                 f"{decode_knee(f.decode_lat, tokens, hidden) / 1e9:.0f}",
                 f"{f.train_bw / 1e9:g}", f"{est.step_s:.2f}", f"{est.exposed_comm_s:.2f}",
                 f"{est.tokens_per_day / 1e9:.0f}", f"{knee / 1e9:.1f}"])
  return rows


def sweep(bandwidths, latencies, tokens: int, hidden: int) -> dict:
  """TPOT (ms) per latency and training step (s) on H800 and GB200 compute, per bandwidth."""
  h800, gb = get_hardware("h800").peak_bf16_flops, get_hardware("gb200_nvl72").peak_bf16_flops
  ib = LATENCIES["IB cross leaf"]
  return {
      "bandwidth_gbs": list(bandwidths),
      "tpot_ms": {lat: [tpot(b * 1e9, lat * 1e-6, tokens, hidden) * 1e3 for b in bandwidths]
                  for lat in latencies},
      "step_s": {name: [training_run.step_estimate(b * 1e9, ib, peak).step_s for b in bandwidths]
                 for name, peak in (("H800 compute", h800), ("GB200 compute", gb))},
      "train_knee_gbs": {name: training_run.knee_bandwidth(ib, peak) / 1e9
                         for name, peak in (("H800 compute", h800), ("GB200 compute", gb))},
      "decode_knee_gbs": {lat: decode_knee(lat * 1e-6, tokens, hidden) / 1e9 for lat in latencies},
  }


def _table(header, rows) -> list[str]:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  fmt = lambda r: "  " + "  ".join(f"{str(x):>{w}s}" for x, w in zip(r, widths))  # noqa: E731
  return [fmt(header)] + [fmt(r) for r in rows]


def summary(s: dict, tokens: int, hidden: int) -> list[str]:
  ib = LATENCIES["IB cross leaf"]
  floor = 2 * MICRO_BATCHES * LAYERS * ib * 1e3
  nvl = 2 * MICRO_BATCHES * LAYERS * LATENCIES["NVLink"] * 1e3
  k = s["train_knee_gbs"]
  return [
      "What it shows (estimates):",
      f"- Decode: TPOT falls as 1/bandwidth until the bytes term meets the latency term, at "
      f"~{decode_knee(ib, tokens, hidden) / 1e9:.0f} GB/s for IB's 3.7 us "
      f"(~{decode_knee(LATENCIES['NVLink'], tokens, hidden) / 1e9:.0f} GB/s for NVLink's 3.33 us). "
      f"Past the knee only lower latency helps: {2 * MICRO_BATCHES * LAYERS} all-to-alls per "
      f"token floor TPOT at {floor:.2f} ms (IB) / {nvl:.2f} ms (NVLink) however fast the links.",
      "- 900 GB/s sits right at that knee: the latency term equals the bytes term, so the paper's "
      "0.82 ms is ~1.6 ms with Table 5's latency, and the ideal fabric is latency-bound. A real "
      "NVL72 serving V3's 257-GPU EP crosses racks over its NICs and is no faster than H800.",
      f"- Training: the EP all-to-all hides behind compute above ~{k['H800 compute']:.0f} GB/s per "
      f"GPU on H800 compute (~{k['GB200 compute']:.0f} GB/s on GB200's 2.5x faster compute). "
      "H800's 40 GB/s IB is ~2.3x above its knee (Table 4's step is compute-bound); a GB200 "
      "running EP across racks at 40-50 GB/s would sit at its knee, inside the rack far above.",
      "- Latency barely matters to training (~"
      f"{training_run.StepModel().all_to_alls():.0f} all-to-alls per GPU per step, ms in total); "
      "it dominates decode at high bandwidth.",
  ]


def build_parser(prog: str) -> ArgParser:
  p = ArgParser(prog=prog, description="EP decode bound and training step estimate against "
                                     "interconnect bandwidth and latency (estimates).")
  p.add_argument("--tokens-per-device", type=positive_int, default=32,
                 help="decode tokens per device in the EP bound (32, the paper's)")
  p.add_argument("--hidden", type=positive_int, default=7168,
                 help="hidden size sent per token copy (7168, V3's d_model; the paper uses 7000)")
  p.add_argument("--latencies", default="0,1,3.33,3.7,10", metavar="US,...",
                 help="latencies per all-to-all in microseconds for the sweep (0,1,3.33,3.7,10)")
  p.add_argument("--bandwidths", default="10,20,40,50,100,200,400,900,1800,3600",
                 metavar="GB/s,...", help="bandwidths per GPU for the sweep table")
  p.add_argument("--plot", metavar="DIR", help="write bandwidth_latency.png into DIR")
  return p


def run(argv, prog: str) -> list[str]:
  args = build_parser(prog).parse_args(argv)
  lats = float_list("--latencies", args.latencies, allow_zero=True)
  bws = float_list("--bandwidths", args.bandwidths, allow_zero=False)
  plot_dir = output_dir("--plot", args.plot)
  tok, hid = args.tokens_per_device, args.hidden
  lines = [f"# bandwidth and latency (estimates): V3 decode EP bound ({tok} tok/device, "
           f"{EXPERTS} experts, hidden {hid}, {LAYERS} layers x {MICRO_BATCHES} micro-batches) "
           "and Table 4's training step",
           "== Fabrics: decode (TPOT without / with latency, its knee), then training (step, "
           "all-to-all not hidden, tokens/day, its knee) =="]
  lines += _table(["fabric", "decode GB/s", "lat us", "TPOT ms", "+lat ms", "tok/s", "knee GB/s",
                   "train GB/s", "step s", "exposed s", "Btok/day", "knee GB/s"],
                  fabric_rows(tok, hid))
  s = sweep(bws, lats, tok, hid)
  lines.append("== Sweep: decode TPOT (ms) by latency per all-to-all; training step (s) with "
               "3.7 us ==")
  header = ["GB/s"] + [f"{x:g} us" for x in lats] + list(s["step_s"])
  rows = [[f"{b:g}"] + [f"{s['tpot_ms'][x][i]:.3f}" for x in lats]
          + [f"{s['step_s'][n][i]:.2f}" for n in s["step_s"]] for i, b in enumerate(bws)]
  lines += _table(header, rows)
  lines.append("  decode knee (GB/s): " + ", ".join(
      f"{x:g} us -> {k:.0f}" if np.isfinite(k) else f"{x:g} us -> none"
      for x, k in s["decode_knee_gbs"].items()))
  lines.append("  training knee (GB/s): " + ", ".join(
      f"{n} -> {k:.1f}" for n, k in s["train_knee_gbs"].items()))
  lines += summary(s, tok, hid)
  if plot_dir is not None:
    fine = list(np.geomspace(5, 5000, 120))
    points = [(f.name, f.decode_bw / 1e9, tpot(f.decode_bw, f.decode_lat, tok, hid) * 1e3,
               f.train_bw / 1e9) for f in fabrics()]
    path = plots.plot_bandwidth_study(sweep(fine, lats, tok, hid), points,
                                      plot_dir / "bandwidth_latency.png", tok, hid)
    lines.append(f"plot: {path}")
  return lines


def main(argv=None, prog: str = "python -m deepseek_jax.lab bandwidth") -> int:
  return study_main(run, argv, prog)


if __name__ == "__main__":
  errors.leave(main())
