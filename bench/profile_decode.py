"""Where a decode step's time goes: the XLA ops of `decode_loop` summed per step (V3 report §2.1.1).

tiny.yaml by default, batch 8, context 8192, f32 cache, the CPU kernel where it is built (the
step `bench_decode.py --parts roofline` times). Runs --steps steps under `jax.profiler.trace`,
reads the trace back through `jax.profiler.ProfileData`, and prints the ops of the host planes
summed by name and divided by the steps, largest first, beside the step's wall time.

  python bench/profile_decode.py                 # context 8192
  python bench/profile_decode.py --context 64    # the step without its cache: weights only
"""

from __future__ import annotations

import argparse
import collections
import glob
import pathlib
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_decode import CACHE_DTYPES, loop_timer, random_model  # noqa: E402


def op_times(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
  """Seconds and events per op name over every event of the trace's host planes (XLA's thunks, the
  custom calls); the Python and runtime bookkeeping lines are left out."""
  files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  data = jax.profiler.ProfileData.from_file(files[0])
  total, count = collections.Counter(), collections.Counter()
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if line.name in ("python", "Python") or "Python" in line.name:
        continue
      for event in line.events:
        total[event.name] += event.duration_ns * 1e-9
        count[event.name] += 1
  return total, count


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--context", type=int, default=8192)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--cache-dtype", default="f32", choices=sorted(CACHE_DTYPES))
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args(argv)
  cfg, variables = random_model(args.config)
  run = loop_timer(cfg, variables, args.batch, args.context, args.steps,
                   dtype=CACHE_DTYPES[args.cache_dtype])
  run(), run()   # warm
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    with jax.profiler.trace(tmp):
      step = run()
    wall = time.perf_counter() - t
    times, counts = op_times(tmp)
  print(f"step {step * 1e3:.2f} ms ({args.steps} steps traced in {wall:.2f} s wall, batch "
        f"{args.batch}, context {args.context}, {args.cache_dtype} cache)")
  rows = sorted(times.items(), key=lambda kv: -kv[1])
  lines = [l for l in rows if not l[0].startswith(("ThunkExecutor", "PjRt", "Execute"))]
  print(f"{len(lines)} op names, {sum(counts[n] for n, _ in lines) / args.steps:.0f} op events per "
        "step (nested events, e.g. a loop and the ops in it, both count)")
  print(f"{'ms/step':>8} {'calls':>6}  op (host planes, summed over threads)")
  for name, sec in lines[:args.top]:
    print(f"{sec / args.steps * 1e3:8.3f} {counts[name] / args.steps:6.1f}  {name[:100]}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
