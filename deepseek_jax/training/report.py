"""End-of-run report: loss and load-balance curves (PNG) and a README-style summary.

The table puts the run's numbers (tokens/s, MFU, validation bits per byte against the corpus's
unigram entropy, skipped steps) next to the trained config's sizes, including the KV-cache bytes
per token of its MLA latent cache against an MHA model of the same shape ("Insights into
DeepSeek-V3" §2.1.2, Table 1). Around the table, `summary.txt` says what was trained and gives
the commands that resume, generate from and evaluate the run.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import textwrap

from deepseek_jax.codesign.kv_cache import (kv_cache_bytes_per_token,
                                            mha_equivalent_bytes_per_token)
from deepseek_jax.config import ModelConfig
from deepseek_jax.training.checkpoint import CONFIG, LOG, TOKENIZER, write_atomic
from deepseek_jax.training.metrics import MetricsWriter
from deepseek_jax.training.state import param_count


def kv_cache_row(m: ModelConfig, bytes_per_element: int = 2) -> tuple[float, float]:
  """(MLA bytes per token, MHA bytes per token) in BF16: (C + R) * L vs 2 * N * H * L values."""
  return (kv_cache_bytes_per_token(m, bytes_per_element),
          mha_equivalent_bytes_per_token(m, bytes_per_element))


def plot_curves(rows: list[dict], path: pathlib.Path) -> pathlib.Path | None:
  """Two panels: train/validation loss and MaxVio per MoE layer, against the step."""
  import matplotlib  # noqa: PLC0415 (slow import; only at the end of a run)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  train = [r for r in rows if r.get("kind") == "train"]
  val = [r for r in rows if r.get("kind") == "eval"]
  if not train:
    return None
  fig, (ax_loss, ax_bal) = plt.subplots(1, 2, figsize=(11, 4))
  steps = [r["step"] for r in train]
  ax_loss.plot(steps, [r["ce"] for r in train], label="train CE")
  if any("mtp_ce" in r and r["mtp_ce"] for r in train):
    ax_loss.plot(steps, [r["mtp_ce"][0] for r in train], label="train MTP CE (depth 1)", alpha=0.7)
  if val:
    ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
  ax_loss.set(xlabel="step", ylabel="nats / token", title="loss")
  ax_loss.legend()
  layers = max((len(r.get("maxvio", [])) for r in train), default=0)
  for i in range(layers):
    ax_bal.plot(steps, [r["maxvio"][i] for r in train], label=f"MoE layer {i}")
  if any(r.get("mtp_maxvio") for r in train):
    ax_bal.plot(steps, [r["mtp_maxvio"][0] for r in train], "--", label="MTP depth 1")
  ax_bal.set(xlabel="step", ylabel="MaxVio (batch)", title="expert load balance")
  if layers:
    ax_bal.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def summary_table(items: list[tuple[str, str]]) -> str:
  width = max(len(k) for k, _ in items)
  rule = "-" * (width + 2 + max(len(v) for _, v in items))
  return "\n".join([rule] + [f"{k:<{width}}  {v}" for k, v in items] + [rule])


def usage(workdir: pathlib.Path, steps: int) -> str:
  """The commands that use a run (each takes the workdir alone)."""
  w = shlex.quote(str(workdir))
  return "\n".join([
      "Use it:",
      f"  python train.py --workdir {w} --resume --steps {2 * steps}   # continue (to step "
      f"{2 * steps})",
      f"  python -m deepseek_jax.generate --checkpoint {w} --prompt 'def '",
      f"  python -m deepseek_jax.evaluate --checkpoint {w} --data FILE.txt|FILE.jsonl"])


def write_summary(workdir: pathlib.Path, items: list[tuple[str, str]], extra: dict,
                  head: str = "", tail: str = "") -> str:
  text = "\n\n".join(x for x in (head, summary_table(items), tail) if x)
  write_atomic(workdir / "summary.txt", text + "\n")
  write_atomic(workdir / "summary.json", json.dumps(extra, indent=2) + "\n")
  return text


def finish_report(cfg, workdir: pathlib.Path, result, final_eval: dict, data, *,
                  compile_s: float, wall_s: float, peak: float, peak_src: str,
                  flops_per_token: float, start_step: int) -> str:
  """Writes curves.png, summary.txt and summary.json; returns the table to print."""
  t, m = cfg.train, cfg.model
  rows = MetricsWriter.read(workdir / "metrics.jsonl")
  png = plot_curves(rows, workdir / "curves.png")
  steps = int(result.state.step)
  tps = (result.timed_steps * t.batch_size * t.seq_len / result.train_seconds
         if result.train_seconds > 0 else float("nan"))
  mfu = tps * flops_per_token / peak
  last = result.last_train
  mla, mha = kv_cache_row(m)
  bpb, uni = final_eval.get("val_bpb"), data.unigram_bits
  items = [
      ("steps", f"{steps} ({steps - start_step} this run) x {t.batch_size} x {t.seq_len} tokens"),
      ("wall time", f"{wall_s:.0f} s (compile {compile_s:.0f} s)"),
      ("throughput", f"{tps:,.0f} tokens/s"),
      ("MFU", f"{mfu:.1%} of {peak / 1e9:,.1f} GFLOP/s ({peak_src}); "
              f"{flops_per_token / 1e6:.1f} MFLOP/token"),
      (f"train loss (last {t.log_every} steps)",
       f"{last.get('loss', float('nan')):.4f} (CE {last.get('ce', float('nan')):.4f})"
       if isinstance(last.get("loss"), float) else str(last.get("loss"))),
  ]
  if final_eval:
    items.append(("validation loss", f"{final_eval['val_loss']:.4f} nats/token at step "
                                     f"{final_eval.get('step', steps)}"))
  if bpb is not None:
    items.append(("validation bits/byte", f"{bpb:.3f} (unigram entropy of the split: {uni:.3f})"))
  if last.get("maxvio"):
    items.append(("MaxVio per MoE layer", " ".join(f"{v:.2f}" for v in last["maxvio"])
                  + (f" (MTP {' '.join(f'{v:.2f}' for v in last['mtp_maxvio'])})"
                     if last.get("mtp_maxvio") else "")))
  items += [
      ("non-finite steps", f"{int(result.state.bad_total)} skipped"),
      ("parameters", f"{param_count(result.state.params):,} "
                     f"({m.param_counts()['active']:,} active per token)"),
      ("KV cache / token", f"{mla:,.0f} B MLA vs {mha:,.0f} B MHA of the same shape "
                           f"({mha / mla:.1f}x smaller, BF16)"),
      ("outputs", f"{CONFIG}, {LOG}, metrics.jsonl, tb/, checkpoints/, summary.txt"
                  + (f", {TOKENIZER}" if t.tokenizer != "bytes" else "")
                  + (f", {png.name}" if png else "") + " (in the workdir)"),
  ]
  extra = {"steps": steps, "wall_s": wall_s, "compile_s": compile_s, "tokens_per_s": tps,
           "mfu": mfu, "peak_flops": peak, "peak_source": peak_src,
           "flops_per_token": flops_per_token, "val_loss": final_eval.get("val_loss"),
           "val_bpb": bpb, "unigram_bits": uni, "skipped_steps": int(result.state.bad_total),
           "kv_bytes_per_token_mla": mla, "kv_bytes_per_token_mha": mha,
           "maxvio": last.get("maxvio"), "stopped_by": result.stopped_by}
  tok = "UTF-8 bytes" if t.tokenizer == "bytes" else f"the HF tokenizer {workdir / TOKENIZER}"
  status = f"stopped by {result.stopped_by}" if result.stopped_by else "done"
  head = (f"DeepSeek-V3 run in {workdir} ({status}): "
          f"{param_count(result.state.params):,} parameters, {m.num_layers} layers "
          f"({m.n_routed_experts} experts top-{m.num_experts_per_tok}, MTP depth "
          f"{m.num_mtp_layers}), {steps} steps of {t.batch_size} x {t.seq_len} tokens; data: "
          f"{data.description}; tokenizer: {tok} ({m.vocab_size} ids). Config: "
          f"{workdir / CONFIG}.")
  return write_summary(workdir, items, extra, textwrap.fill(head, 100), usage(workdir, steps))
