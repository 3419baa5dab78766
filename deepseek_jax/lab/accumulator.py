"""`python -m deepseek_jax.lab accumulator`: what the paper's "full-precision accumulation" buys
("Insights" §3.1.1, V3 report §3.3.2), in training.

Trains configs/tiny.yaml cut to the GEMMs where accumulation matters (`LONG_K`: one dense layer
whose MLP has K = 4096 in its down projection's forward and its gate/up's backward, the paper's
regime; FP8 only there) with the deepseek_v3 recipe's operands (E4M3, 1x128 / 128x128
power-of-two scales), the GEMMs accumulated by the Hopper tensor core's block FMA
(`fp8/blockfma.py`) at 13 (H100/H200), 14, 16 and 22 fraction bits never promoted, and at 13
bits promoted to f32 every 32, 64 and 128 products (DeepGEMM's fix), against f32 accumulation:
same initialisation, same batches, only the accumulator differs. Without promotion the power-of-
two block scales are applied to the values inside the accumulator (as MX formats do). The runs
whose accumulation errs at f32's round-off (an f32 control summed in another order, 22 bits) give
the trajectory's noise floor; the first step's loss (same weights and batch) is the forward
error alone, free of it. `--predict` prints the models' GEMM errors instead (`gemm_error.py`).
"""

from __future__ import annotations

import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import errors
from deepseek_jax.cli_args import ArgParser, int_list, output_dir, positive_int
from deepseek_jax.codesign import plots
from deepseek_jax.config import load_config
from deepseek_jax.lab import gemm_error, study_main
from deepseek_jax.training import build as build_lib
from deepseek_jax.training import data as data_lib

FAST_COMPILE = {"xla_backend_optimization_level": 0}
# The emulated accumulator is elementwise work XLA vectorises only when LLVM optimises: at -O0 a
# Hopper GEMM ran 7x slower (measured side by side), far more than the compile time it saves.
FULL_COMPILE: dict = {}
# (label, fp8.* overrides); the first is the reference.
F32_RUN = ("f32", ["fp8.accumulator=f32"])
# The noise floor: f32 accumulation in another order (f32 partial sums of 32 products), a change
# of f32 round-off only. Short runs are chaotic: any change of rounding moves them this much.
CONTROL_RUN = ("f32 /32", ["fp8.accumulator=promote", "fp8.accumulator_promote=32"])
BITS = (13, 14, 16, 22)
PROMOTE = (32, 64, 128)
# One dense layer (first_k_dense_replace = 1) with a 4096-wide MLP: K = 4096 in down_proj's
# forward and gate/up's dgrad, the regime where the block FMA errs (gemm_error.py); attention
# (K <= 256) stays high precision, so the study compiles and runs only the GEMMs that matter.
# Materialised attention and no layer scan: the same model, half the compile time.
LONG_K = ("model.num_layers=1", "model.num_mtp_layers=0", "model.attention_impl=materialized",
          "model.scan_layers=false", 'fp8.overrides=["*self_attn*=none"]')


def runs(bits=BITS, promote=PROMOTE, grid: bool = False) -> list[tuple[str, list[str]]]:
  """The study's runs: f32, the f32 control (noise floor), then each width without promotion,
  then 13 bits (or every width with `grid`) at each promotion interval."""
  out = [F32_RUN, CONTROL_RUN]
  for b in bits:
    out.append((f"{b}b none", ["fp8.accumulator=hopper", f"fp8.accumulator_bits={b}",
                               "fp8.accumulator_promote=0"]))
  for b in (bits if grid else [min(bits)]):
    for n in promote:
      out.append((f"{b}b /{n}", ["fp8.accumulator=hopper", f"fp8.accumulator_bits={b}",
                                 f"fp8.accumulator_promote={n}"]))
  return out


def study_config(overrides, batch: int, seq: int, steps: int, ffn: int = 4096,
                 model=LONG_K):
  base = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
  return load_config(base, ["fp8.recipe=deepseek_v3", f"train.batch_size={batch}",
                            f"train.seq_len={seq}", f"train.steps={steps}",
                            f"train.warmup_steps={max(1, steps // 10)}", f"model.ffn_dim={ffn}",
                            *model, *overrides])


def train_run(cfg, devices=None, init=None, compiler_options=FAST_COMPILE) -> dict:
  """Trains `cfg` for `cfg.train.steps` steps on its data, as train.py does (`training.build`
  over `devices`, default all: the mesh, shardings and jitted step), from `init` (a state of the
  same shapes: runs that differ only in numerics start alike) or its seed's initialisation.
  Returns the per-step cross-entropies (each batch is new to the model when it is scored: the
  held-out loss of that moment), the initial state and the seconds taken (compiling included)."""
  t0 = time.perf_counter()
  b = build_lib.build(cfg, devices)
  data = data_lib.make_data(b.cfg)
  put = lambda batch: {k: jax.device_put(jnp.asarray(v), b.batch_sh)  # noqa: E731
                       for k, v in batch.items()}
  losses = []
  try:
    with b.activate():
      if init is None:   # run once: no LLVM optimisations
        init = jax.jit(b.init_fn, out_shardings=b.state_sh).lower().compile(FAST_COMPILE)()
        init = nn.unbox(init)
      state = jax.tree.map(jnp.copy, init)          # the step donates its input
      first = put(data.train_batch(0))
      step = b.step_fn.lower(state, first).compile(compiler_options=compiler_options)
      for i in range(b.cfg.train.steps):
        state, m = step(state, first if i == 0 else put(data.train_batch(i)))
        losses.append(m["ce"])
      losses = [float(x) for x in jax.device_get(losses)]
  finally:
    data.close()
  return {"ce": losses, "init": init, "seconds": time.perf_counter() - t0}


def final_ce(ce: list[float]) -> float:
  """Mean cross-entropy over the last tenth of the steps (at least one)."""
  return float(np.mean(ce[-max(1, len(ce) // 10):]))


def study(labelled, steps: int, batch: int, seq: int, ffn: int = 4096, extra=(),
          log=print) -> list:
  """[(label, fp8 overrides, result)] for each run, on one device; `extra`: more overrides.
  Each result adds `final` and, against the first run's, `step0` (the first step's CE gap: same
  weights and batch, so only the forward GEMMs' accumulation differs), `mean_gap` (over all
  steps) and `final_gap`."""
  out, init = [], None
  for label, overrides in labelled:
    cfg = study_config([*overrides, *extra], batch, seq, steps, ffn)
    r = train_run(cfg, jax.devices()[:1], init, FULL_COMPILE)
    init = r.pop("init")
    r["final"] = final_ce(r["ce"])
    ref = out[0][2] if out else r
    r["step0"] = r["ce"][0] - ref["ce"][0]
    r["mean_gap"] = float(np.mean(np.subtract(r["ce"], ref["ce"])))
    r["final_gap"] = r["final"] - ref["final"]
    log(f"  ran {label:<10s} in {r['seconds']:.0f}s: final CE {r['final']:.4f}")
    out.append((label, overrides, r))
  return out


def table_lines(results) -> list[str]:
  lines = [f"  {'accumulator':<12s} {'step-0 gap':>11s} {'mean gap':>9s} {'final CE':>9s} "
           f"{'final gap':>10s} {'seconds':>8s}"]
  for label, _, r in results:
    lines.append(f"  {label:<12s} {r['step0']:+11.5f} {r['mean_gap']:+9.4f} {r['final']:9.4f} "
                 f"{r['final_gap']:+10.4f} {r['seconds']:8.0f}")
  return lines


def _bits(label: str) -> int | None:
  """The accumulator width of a Hopper run's label ('13b none', '13b /128'), else None."""
  return int(label.split("b")[0]) if label[0].isdigit() else None


def _noise(results) -> tuple[str, float, float] | None:
  """The noise floor: the largest |gap| among the runs whose accumulation errs at f32's round-off
  (the f32 control, and Hopper widths >= 20 bits never promoted), as (their labels, mean gap,
  final gap). One such run underestimates a chaotic trajectory's spread; all of them less so."""
  quiet = [(lab, r) for lab, _, r in results[1:]
           if lab == CONTROL_RUN[0] or ((_bits(lab) or 0) >= 20 and lab.endswith("none"))]
  if not quiet:
    return None
  return (", ".join(lab for lab, _ in quiet), max(abs(r["mean_gap"]) for _, r in quiet),
          max(abs(r["final_gap"]) for _, r in quiet))


def summary_lines(results) -> list[str]:
  """What the table shows, in words computed from it."""
  gaps = {lab: r for lab, _, r in results[1:]}
  noise = _noise(results)
  lines = ["What it shows (gaps: CE minus the f32-accumulation run's, same data and "
           "initialisation; step-0 gap: the first step, where only the forward GEMMs differ; "
           "mean gap: over all steps):"]
  if noise is not None:
    lab, mean_noise, final_noise = noise
    lines.append(f"- Noise floor ({lab}: accumulation at f32's round-off): up to "
                 f"{mean_noise:.4f} (mean gap) / {final_noise:.4f} (final gap); any change of "
                 "rounding sends a short run elsewhere by this much.")
    above = [lab for lab, r in gaps.items() if lab not in noise[0].split(", ")
             and abs(r["mean_gap"]) > 2 * max(mean_noise, 1e-4)]
    lines.append("- Beyond twice the noise floor (mean gap): "
                 + (", ".join(above) if above else "none") + ".")
  none = {lab: r for lab, r in gaps.items() if _bits(lab) and lab.endswith("none")}
  if none:
    lines.append("- Never promoted, step-0 gap by width: " + ", ".join(
        f"{lab.split()[0]} {r['step0']:+.5f}" for lab, r in none.items())
        + " (the forward error alone, without a trajectory's noise).")
  promoted = {lab: r for lab, r in gaps.items() if _bits(lab) and "/" in lab}
  if promoted:
    lines.append("- Promoted to f32 (DeepGEMM's fix; what 'full-precision accumulation' in the "
                 "tensor core would make free), mean gap: " + ", ".join(
                     f"{lab} {r['mean_gap']:+.4f}" for lab, r in promoted.items()) + ".")
  lines.append("- The GEMM error behind it (--predict): the 13-bit block FMA errs ~1e-3 "
               "(relative, zero-mean data) to several % (same-sign data) at K = 4096; promotion "
               "every 128 cuts it 10-100x.")
  return lines


def plot(results, path, ffn: int = 4096) -> pathlib.Path:
  """Three panels: the step-0 gap against bits (the forward error alone, deterministic), the mean
  and final gaps against bits, and the mean gap against the promotion interval; the noise
  floor shaded."""
  plt = plots.pyplot()
  fig, (first, left, right) = plt.subplots(1, 3, figsize=(12.0, 3.6))
  noise = _noise(results)
  for ax in (first, left, right):
    ax.axhline(0, color="k", ls="--", lw=1, label="f32 accumulation")
  for ax in (left, right):
    if noise is not None:
      ax.axhspan(-noise[1], noise[1], color="0.85", label="noise floor (mean gap)")
  none = sorted((_bits(lab), r) for lab, _, r in results if _bits(lab) and lab.endswith("none"))
  promoted = [(lab, r) for lab, _, r in results if _bits(lab) and "/" in lab]
  if none:
    bits = [b for b, _ in none]
    first.plot(bits, [r["step0"] for _, r in none], "^-", color="C2", label="never promoted")
    left.plot(bits, [r["mean_gap"] for _, r in none], "o-", label="mean gap, all steps")
    left.plot(bits, [r["final_gap"] for _, r in none], "s:", label="final gap")
  for i, (lab, r) in enumerate(promoted):
    first.plot([_bits(lab)], [r["step0"]], "x", color=f"C{3 + i}", label=lab)
  first.set_xlabel("accumulator fraction bits")
  first.set_ylabel("CE minus f32 accumulation (nats)")
  first.set_title("step 0: same weights and batch (forward only)", fontsize=8)
  left.set_xlabel("accumulator fraction bits (never promoted)")
  left.set_title(f"over {len(results[0][2]['ce'])} training steps", fontsize=8)
  for ax in (first, left):
    ax.legend(fontsize=7)
  for bits in sorted({_bits(lab) for lab, _ in promoted}):
    pts = sorted((int(lab.split("/")[1]), r["mean_gap"]) for lab, r in promoted
                 if _bits(lab) == bits)
    right.semilogx(*zip(*pts), "o-", base=2, label=f"{bits} bits, mean gap")
    never = [r["mean_gap"] for lab, _, r in results if lab == f"{bits}b none"]
    if never:
      right.axhline(never[0], color="C3", lw=1, ls=":", label=f"{bits} bits never promoted")
  right.set_xlabel("promotion interval N_C (products)")
  right.legend(fontsize=7)
  fig.suptitle(f"FP8 training (K = {ffn} MLP): loss against the tensor core's accumulator",
               fontsize=9)
  return plots.save(fig, path)


def save_results(results, path) -> pathlib.Path:
  """The runs' labels, overrides and per-step CE as JSON (to plot again without training)."""
  rows = [{"label": lab, "overrides": ov, **{k: v for k, v in r.items() if k != "init"}}
          for lab, ov, r in results]
  path.write_text(json.dumps(rows, indent=1) + "\n")
  return path


def build_parser(prog: str) -> ArgParser:
  p = ArgParser(prog=prog, description="Train a tiny.yaml layer in FP8 with the Hopper "
                                       "accumulator at several widths and promotion intervals "
                                       "against f32.")
  p.add_argument("--steps", type=positive_int, default=20, help="training steps per run (20)")
  p.add_argument("--batch", type=positive_int, default=2, help="sequences per step (2)")
  p.add_argument("--seq", type=positive_int, default=32, help="tokens per sequence (32)")
  p.add_argument("--ffn", type=positive_int, default=4096,
                 help="model.ffn_dim: the MLP's K in down_proj's forward (4096)")
  p.add_argument("--bits", default=",".join(map(str, BITS)), metavar="B,...",
                 help="accumulator widths, 1-23 (13,14,16,22)")
  p.add_argument("--promote", default=",".join(map(str, PROMOTE)), metavar="N,...",
                 help="promotion intervals, multiples of 32 (32,64,128)")
  p.add_argument("--grid", action="store_true", help="every width at every interval")
  p.add_argument("--plot", metavar="DIR", help="write accumulator.png into DIR")
  p.add_argument("--predict", action="store_true",
                 help="only the GEMM-error predictions (H200 measurement, 'nearly 2%%')")
  p.add_argument("--rows", type=positive_int, default=32, help="--predict: output rows (32)")
  return p


def run(argv, prog: str, log=print) -> list[str]:
  args = build_parser(prog).parse_args(argv)
  if args.predict:
    return gemm_error.predict_lines(args.rows)
  bits = int_list("--bits", args.bits, 1, 23)
  promote = int_list("--promote", args.promote, 32, 1 << 20, 32)
  plot_dir = output_dir("--plot", args.plot)
  labelled = runs(bits, promote, args.grid)
  log(f"# tiny.yaml, one dense layer, MLP {args.ffn} wide in FP8 (attention high precision), "
      f"batch {args.batch} x {args.seq} tokens, {args.steps} steps, {len(labelled)} runs; "
      "accumulators: f32, or the Hopper block FMA (13 bits = H100/H200) never promoted "
      "('none') or promoted to f32 every N_C products ('/N_C')")
  results = study(labelled, args.steps, args.batch, args.seq, args.ffn, log=log)
  lines = ["== Loss against the accumulator ==", *table_lines(results), *summary_lines(results)]
  if plot_dir is not None:
    lines.append(f"plot: {plot(results, plot_dir / 'accumulator.png', args.ffn)}")
    lines.append(f"runs: {save_results(results, plot_dir / 'accumulator.json')}")
  return lines


def main(argv=None, prog: str = "python -m deepseek_jax.lab accumulator") -> int:
  return study_main(run, argv, prog)


if __name__ == "__main__":
  errors.leave(main())
