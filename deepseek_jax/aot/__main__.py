"""python -m deepseek_jax.aot: compile a config's training step (and a decode step) for an
accelerator that is not here, and report memory, FLOPs, kernels, collectives and an estimate.

    deepseek-jax aot --config configs/small.yaml --target h200:1
    deepseek-jax aot --config configs/small.yaml --target h200:1 --max-batch
    deepseek-jax aot --config configs/v5p_8.yaml --target tpu-v5p:2x2x1 --decode 64,4096
    deepseek-jax aot --target h100:8 model.num_layers=4 train.batch_size=16 --json out.json

Needs the target's compiler: pip install 'deepseek-jax[gpu]' (XLA:GPU, cuDNN) or '[tpu]' (libtpu).
Bad input exits 2 with one line.
"""

from __future__ import annotations

import os

# The plugins must not look for devices that are not here (the CUDA plugin's version check
# otherwise fails); set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compiling only: no chip to share

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from deepseek_jax.aot import crosscheck, programs, report, targets  # noqa: E402
from deepseek_jax.config import ConfigError, cli, load_config  # noqa: E402
from sharding import mesh as mesh_lib  # noqa: E402
from sharding import rules as rules_lib  # noqa: E402

DEFAULT_CONFIG = cli.config_path("small")


def parse_args(argv, prog: str = "python -m deepseek_jax.aot"):
  ap = cli.parser(prog, "Compile for an accelerator that is not here (see the module docstring).",
                  config="YAML config (default small.yaml)")
  ap.set_defaults(config=str(DEFAULT_CONFIG))
  ap.add_argument("--target", required=True,
                  help=f"NAME:SHAPE, NAME one of {', '.join(sorted(targets.CHIPS))}; e.g. h200:1, "
                  "h100:2x8, tpu-v5p:2x2x1")
  ap.add_argument("--batch", type=int, help="shorthand for train.batch_size=N")
  ap.add_argument("--seq", type=int, help="shorthand for train.seq_len=N")
  ap.add_argument("--decode", metavar="BATCH,CONTEXT",
                  help="also compile one decode step of BATCH rows over a CONTEXT-token cache")
  cli.add_flag(ap, "--no-train", action="store_true", help="skip the training step")
  cli.add_flag(ap, "--max-batch", action="store_true",
                  help="search the largest train.batch_size (multiples of the data-parallel "
                  "degree) whose step fits the memory JAX uses by default")
  ap.add_argument("--crosscheck", action="store_true",
                  help="check the train step against the co-design calculator and the paper: "
                  "memory term by term, FLOPs per token, collectives, a step-time estimate")
  ap.add_argument("--json", help="also write the reports to this file")
  ap.add_argument("--dump", help="also write each compiled module's optimized HLO text here (a "
                  "directory)")
  return ap.parse_intermixed_args(argv)


def _decode_arg(text: str) -> tuple[int, int]:
  try:
    batch, context = (int(v) for v in text.split(","))
  except ValueError:
    raise ConfigError(f"--decode={text!r}: must be BATCH,CONTEXT (two positive integers)") from None
  if batch <= 0 or context <= 0:
    raise ConfigError(f"--decode={text!r}: BATCH and CONTEXT must be positive")
  return batch, context


def compile_report(program: programs.Program, target, dump: str | None = None,
                   check: bool = False) -> report.Report:
  """Compiles `program`, prints its report (and with `check` the cross-checks of a train step
  against the calculator and the paper, `aot.crosscheck`) and returns the report."""
  t0 = time.perf_counter()
  compiled = program.lowered.compile()
  text = compiled.as_text()
  if dump:
    path = pathlib.Path(dump)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{program.what.split(',')[0].replace(' ', '_')}.hlo.txt").write_text(text)
  r = report.analyze(compiled, target, program.what, program.model_flops)
  print("\n".join(r.lines()) + f"\n  (compiled in {time.perf_counter() - t0:.0f} s)", flush=True)
  if check and program.built is not None:
    lines, r.crosscheck = crosscheck.crosscheck(program.built, target, r, text)
    print("\n".join(lines), flush=True)
  return r


def search_batch(total, limit: int, step: int, start: int, max_batch: int = 1 << 16,
                 known: dict[int, int] | None = None) -> int:
  """The largest multiple of `step` whose `total(batch)` (bytes, or None where the batch cannot be
  built) is <= `limit`; 0 if not even `step` fits. Memory is near-affine in the batch, so each guess
  extrapolates the line through the nearest measured points below and above the limit (a secant):
  three or four compiles instead of a doubling-and-bisection's eight or nine. `known`: totals
  already compiled."""
  seen: dict[int, int | None] = dict(known or {})

  def measure(b: int):
    if b not in seen:
      seen[b] = total(b)
    return seen[b]

  def ok(b):
    t = measure(b)
    return t is not None and t <= limit

  lo, hi = 0, None                      # lo fits (0 trivially); hi does not
  b = max(step, start // step * step)
  while hi is None or hi - lo > step:
    (lo, hi) = (b, hi) if ok(b) else (lo, b)
    if hi is not None and hi - lo <= step:
      break
    measured = sorted(x for x in seen if seen[x] is not None)
    below = [x for x in measured if seen[x] <= limit]
    above = [x for x in measured if seen[x] > limit]
    guess = None
    if below and (above or len(below) >= 2):   # the line through the two points nearest the limit
      x0, x1 = (below[-1], above[0]) if above else (below[-2], below[-1])
      slope = (seen[x1] - seen[x0]) / (x1 - x0)
      if slope > 0:
        guess = x0 + (limit - seen[x0]) / slope
    if guess is None and measured and seen[measured[0]] > 0:
      # Memory proportional to the batch through the smallest point: from above the limit this
      # undershoots (the arguments do not shrink), so the next guess fits; near the limit XLA's own
      # rematerialisation flattens the curve, which a secant across the limit would overshoot.
      x0 = below[-1] if below else measured[0]
      guess = x0 * limit / seen[x0] if below else min(x0 * limit / seen[x0], 0.75 * x0)
    if guess is None:
      guess = lo * 2 if hi is None else (lo + hi) / 2
    nxt = int(guess) // step * step
    if hi is None:
      nxt = min(max(nxt, lo + step), max_batch)
      if nxt <= lo:                     # reached max_batch
        return lo
    else:
      nxt = min(max(nxt, lo + step), hi - step)
      if nxt in seen:                   # the line's guess is measured: bisect instead
        nxt = max(lo + step, (lo + hi) // 2 // step * step)
        if nxt in seen:
          nxt = lo + step
    b = nxt
  return lo


def largest_batch(cfg, devices, target, known: dict[int, int] | None = None) -> int:
  """The largest train.batch_size (a multiple of the batch-splitting degree and the microbatches)
  whose step fits the memory JAX uses by default, found by compiling (`search_batch`)."""
  def total(batch: int):
    c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    try:
      r = report.analyze(programs.train_program(c, devices).lowered.compile(), target, "")
    except ConfigError:   # e.g. a batch the mesh cannot split
      return None
    print(f"  batch {batch}: {r.total_bytes / targets.GiB:.1f} GiB "
          f"({'fits' if r.fits else 'too big'})", flush=True)
    return r.total_bytes
  sizes = mesh_lib.mesh_shape(cfg.mesh, len(devices))
  split = math.prod(sizes[a] for a in rules_lib.mesh_axes_of(
      "act_batch", rules_lib.rules_from_config(cfg.mesh)))
  step = cfg.train.grad_accum * split      # batches the mesh and the microbatches divide
  return search_batch(total, target.usable_bytes, step, cfg.train.batch_size, known=known)


def main(argv=None, prog: str = "python -m deepseek_jax.aot") -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv, prog)
  try:
    target = targets.parse_target(args.target)
    overrides = list(args.overrides)
    if args.batch is not None:
      overrides.append(f"train.batch_size={args.batch}")
    if args.seq is not None:
      overrides.append(f"train.seq_len={args.seq}")
    cfg = load_config(args.config, overrides)
    decode = _decode_arg(args.decode) if args.decode else None
    if args.crosscheck and args.no_train:
      raise ConfigError("--crosscheck checks the training step: drop --no-train")
    if args.no_train and not decode and not args.max_batch:
      raise ConfigError("--no-train: nothing left to compile (add --decode BATCH,CONTEXT)")
    if args.dump:
      try:
        pathlib.Path(args.dump).mkdir(parents=True, exist_ok=True)
      except OSError as e:
        raise ConfigError(f"--dump={args.dump!r}: cannot create the directory "
                          f"({e.strerror or e})") from None
    if args.json and not pathlib.Path(args.json).resolve().parent.is_dir():
      raise ConfigError(f"--json={args.json!r}: the directory {str(pathlib.Path(args.json).parent)!r} "
                        "does not exist")
    devices = targets.devices(target)
    print(f"aot: {args.config} for {target} ({target.num_devices} x {target.chip.name}, "
          f"{target.chip.hbm_bytes / targets.GiB:.0f} GiB each); compiling on this host, "
          "nothing runs", flush=True)
    reports = []
    if not args.no_train:
      reports.append(compile_report(programs.train_program(cfg, devices), target, args.dump,
                                    check=args.crosscheck))
    if decode:
      reports.append(compile_report(programs.decode_program(cfg, devices, *decode), target, args.dump))
    if args.max_batch:
      known = {cfg.train.batch_size: reports[0].total_bytes} if not args.no_train else None
      best = largest_batch(cfg, devices, target, known)
      print(f"largest train.batch_size that fits {target}: {best} (x {cfg.train.seq_len} tokens)")
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps([r.to_dict() for r in reports], indent=1))
    return 0
  except (ConfigError, targets.TargetError) as e:
    print(f"aot: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
