"""The routed experts in a decode step, side by side in one run (V3 report §2.1.2; issue 18).

tiny.yaml's decode loop (`generate.decode_loop`, greedy) at a short context with the routed
experts run four ways: the block path as configured (at batch 2 its gathered form, 8 assignments
<= 16 experts), the block loop (rows per block 2: sorted blocks, one scan step each), the dense
oracle, and no routed experts at all (their output zero: the floor the experts sit on). Then,
with --profile, where a step's time goes: the XLA:CPU thunks of a traced run, their time summed
by the model part their HLO op names point to (exclusive; loops and calls not counted).

  python bench/bench_experts_decode.py [--batch 2] [--context 20] [--steps 64] [--profile]

Medians of --repeats interleaved runs; absolute times on a shared CPU mean little.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import pathlib
import re
import sys
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_decode import _state  # noqa: E402
from deepseek_jax import dispatch  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.generate import Sampling, decode_loop  # noqa: E402
from deepseek_jax.model import Transformer  # noqa: E402

# HLO op_name fragments -> model part (first match wins).
PARTS = [("/experts/", "routed experts"), ("shared_experts", "shared experts"),
         ("mlp/gate/", "router"), ("self_attn", "attention (MLA)"), ("layernorm", "norms"),
         ("norm", "norms"), ("lm_head", "output head"), ("embed", "embedding"),
         ("dense_blocks", "dense layer (MLP, slices)"),
         ("moe_blocks", "MoE layers' parameter slices and glue"), ("", "sampling, loop, other")]


@dataclasses.dataclass(frozen=True)
class NoRoutedExperts:
  """A runner whose routed experts output zeros: what the rest of the step costs."""

  def __call__(self, x_XD, *args, dots=None):
    return jnp.zeros_like(x_XD), None


def compiled_loop(cfg, variables, batch, context, steps, experts=None):
  """(compiled decode loop, run() -> seconds per step). `experts` overrides the runner."""
  if experts is not None:   # the decode loop builds Transformer(cfg): swap the config's runner
    original = dispatch.LocalExperts.from_config
    dispatch.LocalExperts.from_config = classmethod(lambda cls, c: experts)
  try:
    s, stop = Sampling().arrays(), jnp.full((8,), -1, jnp.int32)
    compiled = decode_loop.lower(cfg, variables, *_state(cfg, batch, context, steps), s, stop,
                                 jnp.int32(steps)).compile()
  finally:
    if experts is not None:
      dispatch.LocalExperts.from_config = original

  def run() -> float:
    state = jax.block_until_ready(_state(cfg, batch, context, steps))
    t = time.perf_counter()
    jax.block_until_ready(compiled(variables, *state, s, stop, jnp.int32(steps)))
    return (time.perf_counter() - t) / steps
  return compiled, run


def profile(compiled, run, steps: int, repeats: int = 3) -> None:
  """Exclusive thunk time per model part, from a jax.profiler trace of `repeats` runs."""
  names, kinds = {}, {}
  for line in compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      names[m.group(1)], kinds[m.group(1)] = (op.group(1) if op else ""), m.group(2)
  run()
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(repeats):
      run()
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(
        sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1])
  ns, count, ops = collections.Counter(), collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name not in kinds or kinds[ev.name] in ("while", "conditional", "call"):
          continue
        part = next(p for key, p in PARTS if key in names[ev.name])
        ns[part] += ev.duration_ns
        count[part] += 1
        ops[ev.name] += ev.duration_ns
  n, total = repeats * steps, sum(ns.values())
  print(f"  thunks: {total / 1e6 / n:.2f} ms per step, {sum(count.values()) / n:.0f} per step")
  for part, v in ns.most_common():
    print(f"  {v / 1e6 / n:7.3f} ms {v / total:6.1%}  {count[part] / n:6.1f} thunks  {part}")
  print("  largest ops:")
  for op, v in ops.most_common(6):
    print(f"  {v / 1e6 / n:7.3f} ms  {kinds[op]:8s} {op:32s} {names[op][-70:]}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--context", type=int, default=20)
  ap.add_argument("--steps", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--profile", action="store_true", help="also trace each variant's step")
  args = ap.parse_args(argv)
  cfg = load_config(args.config).model
  variables = flax.core.meta.unbox(
      Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  A, E = args.batch * cfg.num_experts_per_tok, cfg.n_routed_experts
  gathered = dispatch.gathers_experts(A, E, cfg.dropless_block)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch}, context "
        f"{args.context}, {args.steps} steps per loop; {A} assignments, {E} experts: the "
        f"configured block path is {'gathered' if gathered else 'the block loop'}; "
        f"load average {os.getloadavg()[0]:.1f}")
  variants = {
      "configured": compiled_loop(cfg, variables, args.batch, args.context, args.steps),
      "block loop (U=2)": compiled_loop(dataclasses.replace(cfg, dropless_block=2), variables,
                                        args.batch, args.context, args.steps),
      "dense oracle": compiled_loop(dataclasses.replace(cfg, moe_dispatch="dense"), variables,
                                    args.batch, args.context, args.steps),
      # Another static config (the runner ignores it), or jit would reuse the configured trace.
      "no routed experts": compiled_loop(dataclasses.replace(cfg, dropless_block=3), variables,
                                         args.batch, args.context, args.steps, NoRoutedExperts()),
  }
  times = {k: [] for k in variants}
  for _ in range(args.repeats):
    for k, (_, run) in variants.items():
      times[k].append(run())
  base = float(np.median(times["configured"]))
  for k, v in times.items():
    t = float(np.median(v))
    print(f"{k:18s} {t * 1e3:7.2f} ms per step ({args.batch / t:6.0f} tok/s), "
          f"{t / base:5.2f}x configured (runs: " + " ".join(f"{x * 1e3:.1f}" for x in v) + ")")
  print(f"load average {os.getloadavg()[0]:.1f}")
  if args.profile:
    for k, (compiled, run) in variants.items():
      print(f"# profile: {k}")
      profile(compiled, run, args.steps)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
