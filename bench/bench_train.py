"""Training speed of a config (default configs/tiny.yaml) and the main job end to end.

    python bench/bench_train.py              # compile time, tokens/s, MFU vs an f32 matmul peak
    python bench/bench_train.py --e2e        # also `python train.py` wall time and val bits/byte

MFU = model FLOPs per token (`ModelConfig.flops_per_token(mtp=True)`: the "Insights" Table 2 method
plus the MTP modules) x tokens/s / peak. The peak is measured in this process, in every round right
before that round's steps, so a machine shared with other work slows both sides of the ratio alike;
the median over rounds is reported. `--e2e` runs `python train.py` in a fresh process with an empty
compilation cache (a fresh machine) and reports its wall and CPU time, the validation bits per byte
it reaches and the corpus's unigram entropy.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

import train  # noqa: E402
from deepseek_jax import training  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.training.metrics import measure_matmul_peak  # noqa: E402


def bench_steps(cfg, rounds: int, steps: int) -> dict:
  t = cfg.train
  b = train.build(cfg)
  data = training.make_data(cfg)
  state = training.init_state(b.init_fn, b.state_sh)
  t0 = time.perf_counter()
  step_fn = b.step_fn.lower(b.abstract, b.batch_abstract).compile()
  compile_s = time.perf_counter() - t0
  batches = [{k: jax.device_put(v, b.batch_sh) for k, v in data.train_batch(i).items()}
             for i in range(steps)]
  for i in range(2):                                     # warm up
    state, m = step_fn(state, batches[i])
  jax.block_until_ready(m)
  fpt = cfg.model.flops_per_token(t.seq_len, mtp=True)
  tokens = t.batch_size * t.seq_len * steps
  rows = []
  for _ in range(rounds):
    peak = measure_matmul_peak()
    w0, c0 = time.perf_counter(), time.process_time()
    for batch in batches:
      state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    rows.append({"peak": peak, "tokens_per_s": tokens / wall, "mfu": fpt * tokens / wall / peak,
                 "cpu_per_step": cpu / steps, "wall_per_step": wall / steps})
  med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
  return {"compile_s": compile_s, "flops_per_token": fpt, "rounds": rows, **med}


def bench_e2e(config: str, overrides: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "xla"),
           "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", config,
                           "--workdir", os.path.join(tmp, "run"), *overrides], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
      sys.exit(f"bench: train.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads(pathlib.Path(tmp, "run", "summary.json").read_text())
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {"wall_s": wall, "cpu_s": cpu, **summary}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
  ap.add_argument("--e2e", action="store_true", help="also time `python train.py` end to end")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  cfg = load_config(args.config, args.overrides)
  print(f"{args.config} {' '.join(args.overrides)}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; {jax.devices()[0].device_kind}", flush=True)
  r = bench_steps(cfg, args.rounds, args.steps)
  tok = cfg.train.batch_size * cfg.train.seq_len
  print(f"compile (train step)   {r['compile_s']:.1f} s")
  print(f"model FLOPs per token  {r['flops_per_token'] / 1e6:.2f} M  ({tok} tokens per step)")
  for i, row in enumerate(r["rounds"]):
    print(f"  round {i}: peak {row['peak'] / 1e9:6.1f} GFLOP/s  step {row['wall_per_step']:.3f} s"
          f" (cpu {row['cpu_per_step']:.3f} s)  {row['tokens_per_s']:7.0f} tok/s  "
          f"MFU {row['mfu']:.1%}")
  print(f"median: {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%} of "
        f"{r['peak'] / 1e9:.1f} GFLOP/s", flush=True)
  if args.e2e:
    e = bench_e2e(args.config, args.overrides)
    print(f"python train.py: wall {e['wall_s']:.0f} s (cpu {e['cpu_s']:.0f} s, compile "
          f"{e['compile_s']:.0f} s), {e['steps']} steps, {e['tokens_per_s']:.0f} tokens/s, MFU "
          f"{e['mfu']:.1%}; validation {e['val_bpb']:.3f} bits/byte vs unigram entropy "
          f"{e['unigram_bits']:.3f}")


if __name__ == "__main__":
  main()
