"""PNG charts for the co-design calculator ("Insights into DeepSeek-V3" Table 1, §2.3.2, memory)
and the `lab` studies.

KV cache per token by model (Table 1), the EP communication bound on TPOT against interconnect
bandwidth with the hardware presets marked (§2.3.2), bytes per device by mesh (params, gradients,
optimizer state, activations stacked) against the hardware's HBM; for `lab bandwidth` the decode
bound and training step against bandwidth and latency, for `lab topology` cost per endpoint
against scale.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from deepseek_jax.codesign.ep import ep_tpot_bound
from deepseek_jax.codesign.hardware import PRESETS
from deepseek_jax.codesign.kv_cache import KVRow
from deepseek_jax.codesign.memory import MemoryPlan


def pyplot():
  """matplotlib's pyplot on the Agg backend (no display); imported on first use."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def plot_kv_cache(rows: Sequence[KVRow], path) -> pathlib.Path:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  names = [r.name for r in rows]
  kb = [r.kb for r in rows]
  bars = ax.bar(names, kb, color=["#1f77b4", "#aaaaaa", "#777777"][: len(rows)])
  for b, r in zip(bars, rows):
    ax.annotate(f"{r.kb:.3f} KB\n{r.ratio:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center", va="bottom", fontsize=8)
  ax.set_ylabel("KV cache per token (KB, BF16)")
  ax.set_title("KV cache per token (Insights Table 1)")
  ax.set_ylim(0, max(kb) * 1.25)
  ax.tick_params(axis="x", labelsize=8)
  return save(fig, path)


def plot_tpot_vs_bandwidth(path, hidden: int = 7000, experts_per_token: int = 9,
                           tokens_per_device: int = 32, num_layers: int = 61) -> pathlib.Path:
  plt = pyplot()
  marks: dict[float, dict[str, list[str]]] = {}
  for hw in PRESETS.values():
    for tier, bw in (("scale-out", hw.scale_out_bandwidth), ("scale-up", hw.scale_up_bandwidth)):
      short = hw.name.split(" (")[0].replace(" SXM", "")
      marks.setdefault(round(bw / 1e9, 2), {}).setdefault(tier, []).append(short)
  bw_gbs = np.geomspace(min(marks) / 1.5, max(marks) * 2, 200)
  tpot_ms = [ep_tpot_bound(b * 1e9, tokens_per_device, experts_per_token, hidden,
                           num_layers=num_layers).tpot_s * 1e3 for b in bw_gbs]
  fig, ax = plt.subplots(figsize=(7.0, 4.4))
  ax.loglog(bw_gbs, tpot_ms, color="#1f77b4")
  for i, (gbs, labels) in enumerate(sorted(marks.items())):
    t = ep_tpot_bound(gbs * 1e9, tokens_per_device, experts_per_token, hidden,
                      num_layers=num_layers).tpot_s * 1e3
    ax.plot([gbs], [t], "o", color="#d62728", ms=4)
    names = "; ".join(f"{'/'.join(hws)} {tier}" for tier, hws in labels.items())
    ax.annotate(f"{names}\n{t:.2f} ms, {1e3 / t:.0f} tok/s", (gbs, t), textcoords="offset points",
                xytext=(6, 4) if i % 2 == 0 else (-6, -18), ha="left" if i % 2 == 0 else "right",
                fontsize=6)
  ax.set_xlabel("all-to-all bandwidth per device (GB/s, unidirectional)")
  ax.set_ylabel("TPOT lower bound (ms)")
  ax.set_title(f"EP communication bound on TPOT ({tokens_per_device} tok/device, "
               f"{experts_per_token} experts, hidden {hidden}, {num_layers} layers)", fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  return save(fig, path)


def plot_memory_by_mesh(plans: Sequence[tuple[str, MemoryPlan]], path,
                        hbm_bytes: float | None = None, title: str = "") -> pathlib.Path:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7.0, 4.0))
  labels = [label for label, _ in plans]
  bottom = np.zeros(len(plans))
  for part, color in (("params", "#1f77b4"), ("gradients", "#ff7f0e"),
                      ("optimizer", "#2ca02c"), ("activations", "#9467bd")):
    vals = np.array([getattr(p, part) / 2**30 for _, p in plans])
    ax.bar(labels, vals, bottom=bottom, label=part, color=color)
    bottom += vals
  # Linear axis, clipped at 3x HBM so a replicated plan does not flatten the others; every bar
  # carries its total.
  top = float(bottom.max())
  if hbm_bytes:
    ax.axhline(hbm_bytes / 2**30, color="#d62728", ls="--", lw=1, label="HBM")
    top = min(top, 3 * hbm_bytes / 2**30)
  ax.set_ylim(0, top * 1.15)
  for i, total in enumerate(bottom):
    ax.annotate(f"{total:,.1f} GiB" + (" (clipped)" if total > top * 1.15 else ""),
                (i, min(total, top * 1.08)), ha="center", va="bottom", fontsize=7)
  ax.set_ylabel("GiB per device")
  ax.set_title(title or "Training memory per device by mesh", fontsize=9)
  ax.tick_params(axis="x", labelsize=7)
  ax.legend(fontsize=7)
  return save(fig, path)


def plot_bandwidth_study(sweep: dict, points, path, tokens_per_device: int,
                         hidden: int) -> pathlib.Path:
  """`lab bandwidth`: decode TPOT bound against bandwidth for several latencies (left) and the
  training step estimate against the EP bandwidth (right), knees dotted. `points`: one
  (fabric, decode GB/s, its TPOT in ms with its latency, training GB/s) per fabric."""
  plt = pyplot()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.0, 4.4))
  bw = np.asarray(sweep["bandwidth_gbs"])
  for lat, ys in sweep["tpot_ms"].items():
    ax.loglog(bw, ys, label=f"latency {lat:g} us")
    knee = sweep["decode_knee_gbs"][lat]
    if np.isfinite(knee) and bw[0] <= knee <= bw[-1]:
      ax.axvline(knee, color=ax.lines[-1].get_color(), ls=":", lw=0.8)
  for (gbs, ms), names in _group([((g, round(t, 6)), n) for n, g, t, _ in points]).items():
    ax.plot([gbs], [ms], "ko", ms=3)
    ax.annotate(" / ".join(names), (gbs, ms), textcoords="offset points", xytext=(4, 4),
                fontsize=6)
  ax.set_xlabel("EP all-to-all bandwidth per GPU (GB/s)")
  ax.set_ylabel("decode TPOT bound (ms)")
  ax.set_title(f"V3 decode EP bound ({tokens_per_device} tok/device, hidden {hidden}); "
               "dotted: knees", fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  for name, ys in sweep["step_s"].items():
    bx.semilogx(bw, ys, label=name)
    bx.axvline(sweep["train_knee_gbs"][name], color=bx.lines[-1].get_color(), ls=":", lw=0.8)
  for gbs, names in _group([(g, n) for n, _, _, g in points]).items():
    bx.axvline(gbs, color="#999999", lw=0.5)
    bx.annotate(" / ".join(names), (gbs, bx.get_ylim()[1]), rotation=90, fontsize=6, va="top",
                ha="right")
  bx.set_xlabel("EP all-to-all bandwidth per GPU (GB/s), 3.7 us per all-to-all")
  bx.set_ylabel("training step estimate (s), 15360 x 4096 tokens")
  bx.set_title("Table 4's step moved to other fabrics (estimate); dotted: knees", fontsize=8)
  bx.grid(True, which="both", alpha=0.3)
  bx.legend(fontsize=7)
  return save(fig, path)


def _group(pairs) -> dict:
  """{key: [names]} keeping first-seen order: one label for points that coincide."""
  out: dict = {}
  for key, name in pairs:
    out.setdefault(key, []).append(name)
  return out


def plot_topology_study(curves: dict, path, radix: int, marks=()) -> pathlib.Path:
  """`lab topology`: cost per endpoint against endpoints, one curve per topology (the saw teeth
  are whole switches added), `marks` = (label, endpoints, $ per endpoint) for Table 3's rows."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7.4, 4.4))
  for name, (ns, costs) in curves.items():
    ax.semilogx(ns, np.asarray(costs) / 1e3, label=name, lw=1)
  for i, (label, n, c) in enumerate(marks):
    ax.plot([n], [c / 1e3], "ko", ms=3)
    ax.annotate(label, (n, c / 1e3), textcoords="offset points",
                xytext=(-4, 5 if i % 2 == 0 else -11), fontsize=6, ha="right")
  ax.set_xlabel("endpoints (GPUs)")
  ax.set_ylabel("network cost per endpoint (k$)")
  ax.set_title(f"Cost per endpoint against scale, {radix}-port switches (Insights Table 3 "
               "prices)", fontsize=9)
  ax.set_ylim(0, 15)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return save(fig, path)


def save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  import matplotlib.pyplot as plt  # noqa: PLC0415
  plt.close(fig)
  return path
