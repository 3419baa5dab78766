"""Compiles the issue-13 matrix for an H200 and a TPU v5p-8 on this CPU host and writes
bench/results/AOT_MATRIX.md (+ .json): the landed MoE/attention paths against the kernels, memory against
HBM and JAX's default preallocation, compiled FLOPs against the model's, and roofline estimates.

    python bench/bench_aot.py            # about 20 minutes on 2 cores; needs the [gpu] and [tpu] extras
    python bench/bench_aot.py --quick    # the two headline rows only

Everything here is compiled, nothing runs: memory and FLOPs are XLA's, times are estimates.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD = ["model.dropless_impl=ragged", "model.attention_impl=materialized"]   # before issue 13

JOBS = [
    # name, config, target, extra args
    ("small 8x2048, before (ragged_dot, materialized attention)", "configs/small.yaml", "h200:1",
     ["--batch", "8", "--seq", "2048", *OLD]),
    ("small 8x2048, XLA block fallback", "configs/small.yaml", "h200:1",
     ["--batch", "8", "--seq", "2048", "model.dropless_impl=block"]),
    ("small 8x2048, defaults (gmm kernel, fused attention)", "configs/small.yaml", "h200:1",
     ["--batch", "8", "--seq", "2048", "--decode", "64,4096"]),
    ("small 16x2048 (the config), defaults", "configs/small.yaml", "h200:1", []),
    ("v5p_8 (the config)", "configs/v5p_8.yaml", "tpu-v5p:2x2x1", ["--decode", "64,4096"]),
]


def run(name, config, target, extra, out_dir):
  out = out_dir / (name.split(",")[0].replace(" ", "_") + f"_{len(extra)}.json")
  cmd = [sys.executable, "-m", "deepseek_jax.aot", "--config", config, "--target", target,
         "--json", str(out), *extra]
  t0 = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  print(f"== {name}: {' '.join(cmd[3:])} ({time.perf_counter() - t0:.0f} s)")
  print("\n".join(l for l in r.stdout.splitlines() if l.startswith(("  ", "train", "decode"))))
  if r.returncode:
    print(r.stderr[-1500:])
    return None
  return json.loads(out.read_text())


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "AOT"))
  args = ap.parse_args()
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  jobs = [JOBS[0], JOBS[2]] if args.quick else JOBS
  rows = []
  for job in jobs:
    reports = run(*job, out_dir)
    for r in reports or []:
      est = r["estimate_s"]
      rows.append(f"| {job[0]} | {job[2]} | {r['what'].split(' (')[0]} | "
                  f"{r['total_bytes'] / 2**30:.1f} GiB ({r['total_bytes'] / r['usable_bytes']:.0%} "
                  f"of usable) | {r['compiled_flops'] / r['model_flops']:.2f}x | "
                  f"{', '.join(sorted(r['custom_calls'])) or '-'} | {est['step'] * 1e3:.3g} ms, "
                  f"MFU {r['model_flops'] / r['peak_flops'] / est['step']:.0%} |")
  table = ["| run | target | step | memory per device | compiled/model FLOPs | kernels | "
           "roofline estimate |", "|---|---|---|---|---|---|---|", *rows]
  (out_dir.parent / "AOT_MATRIX.md").write_text(
      "# Compiled for H200 and TPU v5p on a CPU host (nothing ran; times are estimates)\n\n"
      "`python bench/bench_aot.py` (see AOT.md for the MoE layer and the batch sizing)\n\n"
      + "\n".join(table) + "\n")
  print("\n".join(table))
  return 0


if __name__ == "__main__":
  sys.exit(main())
