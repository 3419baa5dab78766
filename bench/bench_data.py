"""The data pipeline's speed against the training step's, measured side by side in one run.

    python bench/bench_data.py [--steps 30] [--batches 400] [--out bench/results/DATA.md]

Prepares the embedded corpus of configs/tiny.yaml (this Python's standard library) into ArrayRecord
(`training/sources.prepare`), then measures: prepare's tokens/s; the loader's tokens/s reading
`train.data=DIR` through `Data.train_batch` (grain, prefetch threads, 0 or 2 worker processes) and
the in-memory stdlib reader; the tiny.yaml train step's tokens/s on batches already in memory; and
the same steps fed by the loader, batch by batch as `training/loop.py` does. The ratio loader /
step says how far the data pipeline is from being the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

import train  # noqa: E402
from deepseek_jax import training  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.training import data as data_lib  # noqa: E402
from deepseek_jax.training import sources  # noqa: E402


def loader_tokens_per_s(data, batches: int, tokens_per_batch: int) -> float:
  data.train_batch(0)                     # starts the loader (and its workers)
  t0 = time.perf_counter()
  for i in range(1, batches + 1):
    data.train_batch(i)
  s = time.perf_counter() - t0
  data.close()
  return batches * tokens_per_batch / s


def step_tokens_per_s(cfg, steps: int, data) -> tuple[float, float]:
  """(tokens/s on pre-loaded batches, tokens/s with each batch read from `data` as the loop does)."""
  t = cfg.train
  b = train.build(cfg)
  state = training.init_state(b.init_fn, b.state_sh)
  step_fn = b.step_fn.lower(b.abstract, b.batch_abstract).compile()
  put = lambda batch: {k: jax.device_put(v, b.batch_sh) for k, v in batch.items()}
  batches = [put(data.train_batch(i)) for i in range(steps)]
  for i in range(2):
    state, m = step_fn(state, batches[i])
  jax.block_until_ready(m)
  tokens = t.batch_size * t.seq_len * steps
  t0 = time.perf_counter()
  for batch in batches:
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  preloaded = tokens / (time.perf_counter() - t0)
  data.train_batch(steps)
  t0 = time.perf_counter()
  for i in range(steps + 1, 2 * steps + 1):
    state, m = step_fn(state, put(data.train_batch(i)))
  jax.block_until_ready(m)
  return preloaded, tokens / (time.perf_counter() - t0)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--batches", type=int, default=400)
  p.add_argument("--out", default=str(REPO / "bench" / "results" / "DATA.md"))
  args = p.parse_args()
  cfg = load_config(args.config)
  t = cfg.train
  per_batch = t.batch_size * t.seq_len
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    links = pathlib.Path(tmp) / "corpus"           # the same files, named as text
    links.mkdir()
    for f in data_lib.stdlib_files():
      (links / (pathlib.Path(f).name + ".txt")).symlink_to(f)
    out = os.path.join(tmp, "prepared")
    t0 = time.perf_counter()
    index = sources.prepare([str(links)], out, "bytes", t.seq_len, t.val_fraction)
    prep_s = time.perf_counter() - t0
    n_tok = index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
    rows.append(("prepare (1 process, bytes tokenizer)", n_tok / prep_s))
    prepared = load_config(args.config, [f"train.data={out}"])
    for w in (0, 2):
      d = data_lib.make_data(prepared, workers=w)
      rows.append((f"loader, ArrayRecord, {w} worker processes",
                   loader_tokens_per_s(d, args.batches, per_batch)))
    rows.append(("loader, in-memory stdlib reader",
                 loader_tokens_per_s(data_lib.make_data(cfg), args.batches, per_batch)))
    pre, fed = step_tokens_per_s(cfg, args.steps, data_lib.make_data(prepared))
  rows += [("tiny.yaml train step, batches in memory", pre),
           ("tiny.yaml train step fed by the ArrayRecord loader", fed)]
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  worst_loader = min(r[1] for r in rows[1:3])
  lines = ["# Data pipeline vs train step (`python bench/bench_data.py`)", "",
           f"One run on {os.cpu_count()} shared CPU cores ({jax.devices()[0].device_kind}); "
           f"configs/tiny.yaml, batch {t.batch_size} x {t.seq_len}; corpus: the stdlib "
           f"({n_tok:,} tokens) prepared into ArrayRecord.", "",
           "| what | tokens/s |", "|---|---:|"]
  lines += [f"| {name} | {v:,.0f} |" for name, v in rows]
  lines += ["", f"Slowest loader / train step: {worst_loader / pre:.0f}x (the loader is "
            f"{'not ' if worst_loader > pre else ''}the bottleneck); fed / preloaded steps: "
            f"{fed / pre:.2f}. Peak RSS of the process: {peak:.0f} MB.", ""]
  text = "\n".join(lines)
  print(text)
  pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
