"""MTP self-speculative vs plain decoding on a trained tiny model (V3 report §2.2, §5.4.3).

The paper reports 85-90% acceptance of the second token and 1.8x tokens/s at V3 scale. Here the
depth-1 MTP module of a tiny model trained by `train.py` drafts one token per step and the main
model verifies [pending, draft] in one pass; greedy outputs must equal plain greedy decoding.

  python bench/bench_speculative.py --checkpoint runs/tiny     # a train.py workdir or HF directory
  python bench/bench_speculative.py                             # first trains configs/tiny.yaml

Prompts are byte strings cut from held-out standard-library files (the training split's
validation files). Prints acceptance and tokens/s of both decoders side by side, per batch size.
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepseek_jax.generate import Sampling, generate  # noqa: E402
from deepseek_jax.generate import load_for_inference  # noqa: E402


def validation_documents() -> list[str]:
  """train.py's held-out documents of the stdlib corpus (every 20th file, from the 10th)."""
  try:
    from deepseek_jax.training.data import split_documents, stdlib_files  # noqa: PLC0415
    return split_documents(stdlib_files(), 0.05)[1]
  except ImportError:  # the training extras (grain) are absent: the same rule by hand
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return [pathlib.Path(f).read_text(encoding="utf-8", errors="replace") for f in files[10::20]]


def held_out_prompts(n: int, length: int, seed: int) -> list[list[int]]:
  val = validation_documents()
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    text = val[rng.integers(len(val))].encode("utf-8")  # validation documents
    if len(text) > length + 1:
      start = rng.integers(len(text) - length)
      out.append(list(text[start:start + length]))
  return out


def rate(g) -> float:
  return (sum(map(len, g.tokens)) - len(g.tokens)) / g.decode_s  # tokens after the prefill's


def measure(cfg, variables, groups, new: int, sampling: Sampling, repeats: int) -> dict:
  """Totals over prompt groups of the best (by decode tokens/s) of `repeats` runs per decoder.

  Runs alternate between plain and speculative decoding so that load changes on a shared
  machine hit both alike; each decoder is warmed up (compiled) first."""
  for spec in (False, True):
    generate(cfg, variables, groups[0], new, sampling, speculative=spec)
  tot = {k: {"tokens": 0, "seconds": 0.0, "steps": 0, "rows": 0} for k in (False, True)}
  tot["drafted"] = tot["accepted"] = 0
  same = True
  for prompts in groups:
    runs = {False: [], True: []}
    for r in range(repeats):
      for spec in (False, True):
        runs[spec].append(generate(cfg, variables, prompts, new, sampling, speculative=spec,
                                   seed=r))
    same &= runs[False][0].tokens == runs[True][0].tokens
    for spec in (False, True):
      g = max(runs[spec], key=rate)
      t = tot[spec]
      t["tokens"] += sum(map(len, g.tokens)) - len(g.tokens)
      t["seconds"] += g.decode_s
      t["steps"] += g.steps
      t["rows"] += len(prompts)
      if spec:
        tot["drafted"] += g.drafted
        tot["accepted"] += g.accepted
  tot["same"] = same
  return tot


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", help="train.py workdir or Hugging Face directory")
  ap.add_argument("--train-steps", type=int, default=300, help="when training first")
  ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench_speculative"))
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--batches", default="1,4")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--prompts", type=int, default=8, help="held-out prompts (split into batches)")
  args = ap.parse_args(argv)
  ckpt = args.checkpoint
  if ckpt is None:
    ckpt = args.workdir
    print(f"training configs/tiny.yaml for {args.train_steps} steps into {ckpt} ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config",
                    str(ROOT / "configs" / "tiny.yaml"), "--steps", str(args.train_steps),
                    "--workdir", ckpt], check=True)
  cfg, variables, info = load_for_inference(ckpt)
  print(f"model: {ckpt} ({info}), d_model {cfg.d_model}, {cfg.num_layers} layers, "
        f"{cfg.num_mtp_layers} MTP layer(s)")
  prompts = held_out_prompts(args.prompts, args.prompt_len, seed=0)
  for sampling in (Sampling(), Sampling(temperature=0.7)):
    for batch in (int(b) for b in args.batches.split(",")):
      groups = [prompts[i:i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
      t = measure(cfg, variables, groups, args.new_tokens, sampling, args.repeats)
      plain = t[False]["tokens"] / t[False]["seconds"]
      fast = t[True]["tokens"] / t[True]["seconds"]
      # Rows advance in lockstep: a batch runs until its slowest row is done.
      per_step = t[True]["tokens"] / t[True]["steps"] / batch
      mode = "greedy" if sampling.temperature == 0 else f"T={sampling.temperature}"
      print(f"{mode:7s} batch {batch} ({len(groups)} x {batch} prompts): acceptance "
            f"{t['accepted'] / max(t['drafted'], 1):6.1%}, {per_step:4.2f} tokens/row/step, "
            f"plain {plain:7.1f} tok/s, speculative {fast:7.1f} tok/s, "
            f"speed ratio {fast / plain:4.2f}x"
            + (f", outputs {'identical' if t['same'] else 'DIFFER'}" if mode == "greedy" else ""),
            flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
