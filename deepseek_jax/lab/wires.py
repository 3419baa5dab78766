"""`python -m deepseek_jax.lab wires`: wire formats of the expert-parallel all-to-all ("Insights"
§3.2, V3 report §3.3.3).

Two parts. `logfmt_claim()` tests the paper's LogFMT result ("LogFMT-8 beats E4M3 and E5M2;
LogFMT-10 is close to BF16") on the codecs themselves: the signal-to-quantisation-noise ratio of
each wire's round trip (`fp8.comm`: 1x128 tiles, E4M3/E5M2 with power-of-two scales, LogFMT with
f32 min/max per tile) on activation-like data. The paper's evidence is training accuracy of ~7B
models, which a CPU cannot repeat; the codec error is what it rests on. Then the study trains
configs/tiny.yaml with its routed experts split over 8 host devices (mesh.expert=8) and each
format on both directions (`mesh.dispatch_dtype`, `mesh.combine_dtype`; also V3's FP8 dispatch
with BF16 combine), same data and initialisation, and compares the loss with the bytes on the
wire per token.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import errors
from deepseek_jax.cli_args import ArgParser, output_dir, positive_int
from deepseek_jax.codesign import plots
from deepseek_jax.config import ConfigError, load_config
from deepseek_jax.fp8 import comm
from deepseek_jax.fp8.formats import E5M2
from deepseek_jax.lab import accumulator, study_main

CODECS = {"BF16": comm.BF16, "E4M3": comm.FP8_DISPATCH, "E5M2": comm.Codec("fp8", fmt=E5M2),
          "LogFMT-8": comm.LOGFMT8, "LogFMT-10": comm.LOGFMT10}
CLOSE_DB = 6.0   # "close to BF16": within one bit of SQNR (6.02 dB)


def activation_sets(tokens: int = 128, width: int = 1024, seed: int = 0) -> dict[str, np.ndarray]:
  """Activation-like `[tokens, width]` f32 data: a residual-branch output (Gaussian with per-
  channel scales spread over e^N(0,1) and 1% outlier channels x20), a SwiGLU output
  (silu(a) * b) and plain Gaussian."""
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.standard_normal(width)) * np.where(rng.random(width) < 0.01, 20.0, 1.0)
  a, b = rng.standard_normal((2, tokens, width))
  return {"residual": (rng.standard_normal((tokens, width)) * scale).astype(np.float32),
          "swiglu": (a / (1 + np.exp(-a)) * b).astype(np.float32),
          "gaussian": rng.standard_normal((tokens, width)).astype(np.float32)}


def sqnr_db(x: np.ndarray, codec: comm.Codec) -> float:
  """10 log10(sum x^2 / sum (x - decode(encode(x)))^2) of one round trip, in float64."""
  y = np.asarray(jax.jit(comm.roundtrip, static_argnums=1)(jnp.asarray(x), codec), np.float64)
  x = np.asarray(x, np.float64)
  return float(10 * np.log10(np.sum(x ** 2) / np.sum((x - y) ** 2)))


def codec_table(sets=None) -> dict[str, dict[str, float]]:
  """{data set: {codec: SQNR dB}}."""
  sets = activation_sets() if sets is None else sets
  return {name: {c: sqnr_db(x, codec) for c, codec in CODECS.items()} for name, x in sets.items()}


def logfmt_claim(table=None) -> list[tuple[str, str, str, str]]:
  """The paper's LogFMT claim against the codecs' round-trip error on activation-like data:
  rows of (claim, paper value, project value, status). A few seconds on CPU."""
  t = codec_table() if table is None else table
  sets = list(t)

  def beats(a, b):
    wins = [s for s in sets if t[s][a] > t[s][b]]
    value = ", ".join(f"{s} {t[s][a]:.1f} vs {t[s][b]:.1f} dB" for s in sets)
    status = ("reproduced" if len(wins) == len(sets) else
              "partly" if wins else "not reproduced")
    return value, f"{status} ({len(wins)}/{len(sets)} data sets)"

  rows = []
  for other in ("E4M3", "E5M2"):
    value, status = beats("LogFMT-8", other)
    rows.append((f"LogFMT-8 more accurate than {other}", "better training accuracy (7B, §3.2)",
                 "SQNR " + value, status))
  gaps = {s: t[s]["BF16"] - t[s]["LogFMT-10"] for s in sets}
  close = [s for s in sets if gaps[s] <= CLOSE_DB]
  status = "reproduced" if len(close) == len(sets) else "partly" if close else "not reproduced"
  rows.append(("LogFMT-10 close to BF16", "similar training accuracy (§3.2)",
               "SQNR " + ", ".join(f"{s} {t[s]['LogFMT-10']:.1f} vs {t[s]['BF16']:.1f} dB"
                                   for s in sets),
               f"{status} (within {CLOSE_DB:.0f} dB on {len(close)}/{len(sets)})"))
  for name in ("LogFMT-8", "LogFMT-10"):
    rows.append((f"{name} wire bytes per element", "n bits + metadata (not stated)",
                 f"{CODECS[name].bits_per_element() / 8:.3f} B (f32 min and max per 128)",
                 "derived"))
  return rows


# --- The training study ---------------------------------------------------------------------

# (label, mesh.dispatch_dtype, mesh.combine_dtype); the first is the reference.
RUNS = (("model (f32)", "model", "model"), ("BF16", "bfloat16", "bfloat16"),
        ("FP8", "fp8", "fp8"), ("LogFMT-8", "logfmt8", "logfmt8"),
        ("LogFMT-10", "logfmt10", "logfmt10"), ("V3: FP8 / BF16", "fp8", "bfloat16"))
WIRE_CODEC = {"bfloat16": comm.BF16, "fp8": comm.FP8_DISPATCH, "logfmt8": comm.LOGFMT8,
              "logfmt10": comm.LOGFMT10}
DEVICES = 8


def wire_bytes(wire: str, d_model: int, model_bits: int = 32) -> float:
  """Bytes one token's row costs on the wire in one direction (scales and metadata included)."""
  if wire == "model":
    return d_model * model_bits / 8
  return d_model * WIRE_CODEC[wire].bits_per_element() / 8


def study_config(dispatch: str, combine: str, batch: int, seq: int, steps: int):
  base = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
  return load_config(base, [f"mesh.expert={DEVICES}", "mesh.data=1",
                            f"mesh.dispatch_dtype={dispatch}", f"mesh.combine_dtype={combine}",
                            f"train.batch_size={batch}", f"train.seq_len={seq}",
                            f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                            "train.eval_batches=2"])


def study(steps: int, batch: int, seq: int, log=print) -> list:
  """[(label, dispatch, combine, result, bytes per token row both ways)] for each run."""
  if jax.device_count() < DEVICES:
    raise ConfigError(f"the wires study needs {DEVICES} devices for expert parallelism, "
                      f"{jax.device_count()} found (run it as its own process: it sets "
                      f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES})")
  out, init = [], None
  for label, dispatch, combine in RUNS:
    cfg = study_config(dispatch, combine, batch, seq, steps)
    r = accumulator.train_run(cfg, jax.devices()[:DEVICES], init)
    init = r.pop("init")
    r["final"] = accumulator.final_ce(r["ce"])
    d = cfg.model.d_model
    out.append((label, dispatch, combine, r, wire_bytes(dispatch, d) + wire_bytes(combine, d)))
    log(f"  ran {label:<15s} in {r['seconds']:.0f}s: final CE {r['final']:.4f}")
  return out


def _table(header, rows) -> list[str]:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  return ["  " + "  ".join(f"{str(x):>{w}s}" for x, w in zip(r, widths)) for r in [header, *rows]]


def run(argv, prog: str, log=print) -> list[str]:
  args = build_parser(prog).parse_args(argv)
  if args.batch % DEVICES:
    raise ConfigError(f"--batch {args.batch}: must be a multiple of {DEVICES} (the batch is "
                      "split over the expert-parallel devices)")
  plot_dir = output_dir("--plot", args.plot)
  table = codec_table()
  lines = ["== The LogFMT claim: round-trip SQNR (dB) of each wire on activation-like data "
           "(128 x 1024; 1x128 tiles) ==",
           *_table(["data", *CODECS], [[s, *(f"{v:.1f}" for v in row.values())]
                                       for s, row in table.items()]),
           *_table(["claim", "paper", "project", "status"], logfmt_claim(table))]
  if args.claim_only:
    return lines
  log(f"# tiny.yaml, routed experts over {DEVICES} host devices (mesh.expert={DEVICES}), batch "
      f"{args.batch} x {args.seq}, {args.steps} steps, f32 compute; each wire on both all-to-all "
      "directions")
  results = study(args.steps, args.batch, args.seq, log)
  ref, ref_bytes = results[0][3]["final"], results[1][4]
  rows = [[label, f"{r['final']:.4f}", f"{r['final'] - ref:+.4f}", f"{r['ce'][0]:.5f}",
           f"{b:,.0f}", f"{b / ref_bytes:.2f}x", f"{r['seconds']:.0f}"]
          for label, _, _, r, b in results]
  lines += ["== Loss (final CE: mean of the last tenth of the steps, each batch new to the model) "
            "and wire bytes per token row (dispatch + combine) ==",
            *_table(["wires", "final CE", "- f32", "first CE", "B/row", "vs BF16", "seconds"],
                    rows)]
  if plot_dir is not None:
    lines.append(f"plot: {plot(results, ref, plot_dir / 'wires.png')}")
  return lines


def plot(results, ref: float, path) -> pathlib.Path:
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 3.8))
  for label, _, _, r, b in results:
    ax.plot([b], [r["final"] - ref], "o")
    ax.annotate(label, (b, r["final"] - ref), textcoords="offset points", xytext=(4, 4),
                fontsize=7)
  ax.axhline(0, color="k", lw=0.8, ls="--")
  ax.set_xlabel("bytes per token row on the wire, dispatch + combine")
  ax.set_ylabel("final cross-entropy - f32 wires (nats)")
  ax.set_title("tiny.yaml, experts over 8 devices: loss against wire bytes", fontsize=9)
  return plots.save(fig, path)


def build_parser(prog: str) -> ArgParser:
  p = ArgParser(prog=prog, description="BF16, FP8, LogFMT-8/10 on the expert-parallel dispatch and "
                                     "combine: the LogFMT claim on codec error, then loss and "
                                     "wire bytes in training.")
  p.add_argument("--steps", type=positive_int, default=20, help="training steps per run (20)")
  p.add_argument("--batch", type=positive_int, default=8,
                 help="sequences per step, a multiple of 8 (8)")
  p.add_argument("--seq", type=positive_int, default=32, help="tokens per sequence (32)")
  p.add_argument("--plot", metavar="DIR", help="write wires.png into DIR")
  p.add_argument("--claim-only", action="store_true", help="only the LogFMT claim (seconds)")
  return p


def main(argv=None, prog: str = "python -m deepseek_jax.lab wires") -> int:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:   # before jax starts its backend
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
  return study_main(run, argv, prog)


if __name__ == "__main__":
  errors.leave(main())
