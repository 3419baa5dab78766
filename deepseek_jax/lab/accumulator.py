"""`python -m deepseek_jax.lab accumulator`: what the paper's "full-precision accumulation" buys
("Insights" §3.1.1, V3 report §3.3.2).

Trains configs/tiny.yaml in FP8 (the deepseek_v3 recipe's operands: E4M3, 1x128 / 128x128
power-of-two scales) with the GEMMs accumulated by the Hopper tensor core's block FMA
(`fp8/blockfma.py`) at 13 (H100/H200), 14, 16 and 22 fraction bits without promotion, and at 13
bits promoted to f32 every 32, 64 and 128 products (DeepGEMM's fix), against f32 accumulation:
same initialisation, same batches, only the accumulator differs. Without promotion the power-of-
two block scales are applied to the values inside the accumulator (as MX formats do): a tensor
core that could hold them. `--predict` prints the model's GEMM errors instead: the H200
measurement (bench/results/gpu_h200_fp8.log) and DeepSeek's "nearly 2%" at K = 4096.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.codesign import plots
from deepseek_jax.lab import study_main
from deepseek_jax.codesign.__main__ import _Parser, _positive_int
from deepseek_jax.config import ConfigError, load_config
from deepseek_jax.fp8 import accumulate
from deepseek_jax.fp8.formats import E4M3
from deepseek_jax.fp8.scaling import Scaling, quantize
from deepseek_jax.training import build as build_lib
from deepseek_jax.training import data as data_lib

FAST_COMPILE = {"xla_backend_optimization_level": 0}
# (label, fp8.* overrides); the first is the reference.
F32_RUN = ("f32", ["fp8.accumulator=f32"])
BITS = (13, 14, 16, 22)
PROMOTE = (32, 64, 128)


def runs(bits=BITS, promote=PROMOTE, grid: bool = False) -> list[tuple[str, list[str]]]:
  """The study's runs: f32, then each width without promotion, then 13 bits (or every width
  with `grid`) at each promotion interval."""
  out = [F32_RUN]
  for b in bits:
    out.append((f"{b}b none", ["fp8.accumulator=hopper", f"fp8.accumulator_bits={b}",
                               "fp8.accumulator_promote=0"]))
  for b in (bits if grid else [min(bits)]):
    for n in promote:
      out.append((f"{b}b /{n}", ["fp8.accumulator=hopper", f"fp8.accumulator_bits={b}",
                                 f"fp8.accumulator_promote={n}"]))
  return out


def study_config(overrides, batch: int, seq: int, steps: int):
  base = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
  return load_config(base, ["fp8.recipe=deepseek_v3", f"train.batch_size={batch}",
                            f"train.seq_len={seq}", f"train.steps={steps}",
                            f"train.warmup_steps={max(1, steps // 10)}", *overrides])


def train_run(cfg, devices=None, init=None) -> dict:
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
      if init is None:   # compilation dominates these short runs: no LLVM optimisations
        init = jax.jit(b.init_fn, out_shardings=b.state_sh).lower().compile(FAST_COMPILE)()
        init = nn.unbox(init)
      state = jax.tree.map(jnp.copy, init)          # the step donates its input
      first = put(data.train_batch(0))
      step = b.step_fn.lower(state, first).compile(compiler_options=FAST_COMPILE)
      for i in range(b.cfg.train.steps):
        state, m = step(state, first if i == 0 else put(data.train_batch(i)))
        losses.append(m["ce"])
      losses = [float(x) for x in jax.device_get(losses)]
  finally:
    data.close()
  return {"ce": losses, "init": init, "seconds": time.perf_counter() - t0}


# --- Predictions of the GEMM error (no training) ---------------------------------------------

H200_LOG = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_h200_fp8.log"
MODELS = {"hopper": accumulate.hopper(13, True, None),
          "limited": accumulate.limited(13, True, None),
          "hopper /128": accumulate.hopper(13, True, 128)}


def h200_measured(path=H200_LOG) -> float | None:
  """bench/gpu_fp8.py's 'fp8_gemm_f32out' error against the f32 emulator on an H200."""
  try:
    return json.loads(pathlib.Path(path).read_text().strip().splitlines()[-1])[
        "rel_err"]["fp8_gemm_f32out"]["vs_emulator"]
  except (OSError, ValueError, KeyError, IndexError):
    return None


def _errors(qa, qb, models) -> dict[str, tuple[float, float]]:
  """{model: (relative Frobenius error, max |error| / max |exact|)} against float64."""
  exact = np.asarray(qa.dequantize(), np.float64)[0] @ np.asarray(qb.dequantize(), np.float64)[0]
  out = {}
  for name in models:
    y = np.asarray(_gemm(qa, qb, MODELS[name])[0], np.float64)
    out[name] = (float(np.linalg.norm(y - exact) / np.linalg.norm(exact)),
                 float(np.max(np.abs(y - exact)) / np.max(np.abs(exact))))
  return out


_gemm = jax.jit(accumulate.gemm, static_argnums=2)


def _per_tensor(x, contract):
  return quantize(x[None], E4M3, Scaling("tensor", pow2=False), contract)


def h200_prediction(rows: int = 32) -> dict[str, tuple[float, float]]:
  """bench/gpu_fp8.py's operands exactly (x 2048x4096 ~ N(0,1), w ~ N(0,1)/sqrt(4096), bf16,
  per-tensor E4M3 scales, seed 0) through each model; `rows` of the 2048 output rows (the error
  is a mean over independent elements: 32 rows hold 65,536 of them)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2048, 4096)), jnp.float32).astype(jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((4096, 2048)) / np.sqrt(4096), jnp.float32)
  qx, qw = _per_tensor(x, 2), _per_tensor(w.astype(jnp.bfloat16), 1)
  qx = dataclasses.replace(qx, data=qx.data[:, :rows])
  return _errors(qx, qw, ("hopper", "limited"))


DISTRIBUTIONS = {"N(0,1)": lambda rng, s: rng.standard_normal(s),
                 "N(0.5,1)": lambda rng, s: rng.normal(0.5, 1.0, s),
                 "N(1,1)": lambda rng, s: rng.normal(1.0, 1.0, s),
                 "U(0,1)": lambda rng, s: rng.random(s)}


def k_sweep(ks=(4096, 8192), rows: int = 32, cols: int = 256, seed: int = 0,
            dists=tuple(DISTRIBUTIONS)) -> list:
  """[(distribution, K, {model: (frobenius, max-relative)})]: both operands drawn from the
  distribution, per-tensor E4M3, no promotion (and /128 for the fix)."""
  out = []
  for name in dists:
    draw = DISTRIBUTIONS[name]
    for k in ks:
      rng = np.random.default_rng(seed)
      a = jnp.asarray(draw(rng, (rows, k)), jnp.float32)
      b = jnp.asarray(draw(rng, (k, cols)), jnp.float32)
      out.append((name, k, _errors(_per_tensor(a, 2), _per_tensor(b, 1), tuple(MODELS))))
  return out


def predict_lines(rows: int = 32) -> list[str]:
  measured = h200_measured()
  h = h200_prediction(rows)
  lines = ["== The H200 measurement (bench/gpu_fp8.py 'fp8_gemm_f32out': 2048x4096x2048, N(0,1), "
           "per-tensor E4M3, cuBLASLt FP8 GEMM vs the f32 emulator; relative Frobenius) ==",
           f"  measured on H200        {measured:.3e}" if measured is not None else
           "  measured on H200        (bench/results/gpu_h200_fp8.log not found)"]
  for name, (fro, _) in h.items():
    ratio = f"  ({fro / measured:.2f}x the measurement)" if measured else ""
    lines.append(f"  model {name:<17s} {fro:.3e}{ratio}")
  lines += ["== 'Nearly 2%' at K = 4096 (V3 report §3.3.2): both operands from the distribution, "
            "per-tensor E4M3, no promotion unless '/128'; Frobenius / max-relative ==",
            "  distribution      K   " + "  ".join(f"{m:>19s}" for m in MODELS)]
  for dist, k, errs in k_sweep(rows=rows):
    lines.append(f"  {dist:<10s} {k:>6d}   " + "  ".join(
        f"{100 * f:8.3f}% /{100 * m:7.3f}%" for f, m in errs.values()))
  return lines


# --- The training study -----------------------------------------------------------------------

def _final(ce: list[float]) -> float:
  """Mean cross-entropy over the last tenth of the steps (at least one)."""
  return float(np.mean(ce[-max(1, len(ce) // 10):]))


def study(labelled, steps: int, batch: int, seq: int, extra=(), log=print) -> list:
  """[(label, fp8 overrides, result)] for each run, on one device; `extra`: more overrides."""
  extra = list(extra)
  out, init = [], None
  for label, overrides in labelled:
    r = train_run(study_config(overrides + extra, batch, seq, steps), jax.devices()[:1], init)
    init = r.pop("init")
    r["final"] = _final(r["ce"])
    log(f"  ran {label:<10s} in {r['seconds']:.0f}s: final CE {_final(r['ce']):.4f}")
    out.append((label, overrides, r))
  return out


def table_lines(results) -> list[str]:
  ref = results[0][2]["final"]
  lines = [f"  {'accumulator':<12s} {'final CE':>9s} {'- f32':>8s} {'mean CE':>8s} "
           f"{'first CE':>9s} {'seconds':>8s}"]
  for label, _, r in results:
    lines.append(f"  {label:<12s} {r['final']:9.4f} {r['final'] - ref:+8.4f} "
                 f"{np.mean(r['ce']):8.4f} {r['ce'][0]:9.5f} {r['seconds']:8.0f}")
  return lines


def summary_lines(results) -> list[str]:
  ref = results[0][2]["final"]
  gap = {label: r["final"] - ref for label, _, r in results[1:]}
  none = {lab: g for lab, g in gap.items() if lab.endswith("none")}
  promoted = {lab: g for lab, g in gap.items() if "/" in lab}
  lines = ["What it shows (final CE = mean over the last tenth of the steps, each batch new to the "
           "model; minus the f32-accumulation run's; same data and initialisation; short runs, so "
           "gaps of a few 1e-3 are within what one changed rounding does to a trajectory):"]
  if none:
    worst = max(none, key=lambda k: abs(none[k]))
    lines.append("- Never promoted: " + ", ".join(f"{k.split()[0]} {v:+.4f}"
                                                   for k, v in none.items())
                 + f"; the largest gap is at {worst.split()[0]}.")
  if promoted:
    lines.append("- Promoted to f32 (DeepGEMM's fix; what 'full-precision accumulation' in the "
                 "tensor core would make free): " + ", ".join(f"{k} {v:+.4f}"
                                                             for k, v in promoted.items()) + ".")
  lines.append("- The GEMM error behind it (--predict): 13-bit Hopper accumulation without "
               "promotion errs ~1e-3 (relative, zero-mean data) to several % (same-sign data) "
               "at K = 4096; promotion every 128 cuts it 10-100x. This model's GEMMs are short "
               "(K <= 768), where even 13 bits err little.")
  return lines


def plot(results, path) -> pathlib.Path:
  plt = plots._pyplot()
  ref = results[0][2]["final"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.4), sharey=True)
  none = [(int(lab.split("b")[0]), r["final"]) for lab, _, r in results if lab.endswith("none")]
  if none:
    left.plot(*zip(*sorted(none)), "o-", label="Hopper block FMA, never promoted")
  left.axhline(ref, color="k", ls="--", lw=1, label="f32 accumulation")
  left.set_xlabel("accumulator fraction bits")
  left.set_ylabel("final cross-entropy (nats)")
  left.legend(fontsize=7)
  for bits in sorted({int(lab.split("b")[0]) for lab, _, _ in results if "/" in lab}):
    pts = [(int(lab.split("/")[1]), r["final"]) for lab, _, r in results
           if "/" in lab and lab.startswith(f"{bits}b")]
    right.semilogx(*zip(*sorted(pts)), "o-", base=2, label=f"{bits} bits, promoted")
  right.axhline(ref, color="k", ls="--", lw=1, label="f32 accumulation")
  right.set_xlabel("promotion interval N_C (products)")
  right.legend(fontsize=7)
  fig.suptitle("tiny.yaml in FP8: loss against the tensor core's accumulator", fontsize=9)
  return plots._save(fig, path)


def build_parser(prog: str) -> _Parser:
  p = _Parser(prog=prog, description="Train tiny.yaml in FP8 with the Hopper accumulator at "
                                     "several widths and promotion intervals against f32.")
  p.add_argument("--steps", type=_positive_int, default=20, help="training steps per run (20)")
  p.add_argument("--batch", type=_positive_int, default=2, help="sequences per step (2)")
  p.add_argument("--seq", type=_positive_int, default=64, help="tokens per sequence (64)")
  p.add_argument("--layers", type=_positive_int, default=2,
                 help="model.num_layers (tiny.yaml: 4; default 2 for time)")
  p.add_argument("--bits", default=",".join(map(str, BITS)), metavar="B,...",
                 help="accumulator widths (13,14,16,22)")
  p.add_argument("--promote", default=",".join(map(str, PROMOTE)), metavar="N,...",
                 help="promotion intervals, multiples of 32 (32,64,128)")
  p.add_argument("--grid", action="store_true", help="every width at every interval")
  p.add_argument("--plot", metavar="DIR", help="write accumulator.png into DIR")
  p.add_argument("--predict", action="store_true",
                 help="only the GEMM-error predictions (H200 measurement, 'nearly 2%%')")
  p.add_argument("--rows", type=_positive_int, default=32, help="--predict: output rows (32)")
  return p


def _ints(flag: str, text: str, lo: int, hi: int, step: int = 1) -> list[int]:
  out = []
  for part in text.split(","):
    try:
      v = int(part)
    except ValueError:
      raise ConfigError(f"{flag} {text!r}: {part!r} is not an integer") from None
    if not (lo <= v <= hi and v % step == 0):
      raise ConfigError(f"{flag} {text!r}: {part!r} must lie in [{lo}, {hi}]"
                        + (f" and be a multiple of {step}" if step > 1 else ""))
    out.append(v)
  return out


def run(argv, prog: str, log=print) -> list[str]:
  args = build_parser(prog).parse_args(argv)
  if args.predict:
    return predict_lines(args.rows)
  bits = _ints("--bits", args.bits, 1, 23)
  promote = _ints("--promote", args.promote, 32, 1 << 20, 32)
  plot_dir = pathlib.Path(args.plot) if args.plot else None
  if plot_dir is not None and plot_dir.exists() and not plot_dir.is_dir():
    raise ConfigError(f"--plot {args.plot!r}: exists and is not a directory")
  labelled = runs(bits, promote, args.grid)
  log(f"# tiny.yaml (num_layers={args.layers}), batch {args.batch} x {args.seq} tokens, "
      f"{args.steps} steps, {len(labelled)} runs, FP8 deepseek_v3 operands; accumulators: "
      "f32, or the Hopper block FMA (13 bits = H100/H200) never promoted ('none') or promoted "
      "to f32 every N_C products ('/N_C')")
  results = study(labelled, args.steps, args.batch, args.seq, [f"model.num_layers={args.layers}"],
                  log)
  lines = ["== Loss against the accumulator ==", *table_lines(results), *summary_lines(results)]
  if plot_dir is not None:
    lines.append(f"plot: {plot(results, plot_dir / 'accumulator.png')}")
  return lines


def main(argv=None, prog: str = "python -m deepseek_jax.lab accumulator") -> int:
  return study_main(run, argv, prog)


if __name__ == "__main__":
  sys.exit(main())
