"""PNG charts for the co-design calculator ("Insights into DeepSeek-V3" Table 1, §2.3.2, memory).

Three figures: KV cache per token by model (Table 1), the EP communication bound on TPOT against
interconnect bandwidth with the hardware presets marked (§2.3.2), and bytes per device by mesh
(params, gradients, optimizer state, activations stacked) against the hardware's HBM.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from deepseek_jax.codesign.ep import ep_tpot_bound
from deepseek_jax.codesign.hardware import PRESETS
from deepseek_jax.codesign.kv_cache import KVRow
from deepseek_jax.codesign.memory import MemoryPlan


def _pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def plot_kv_cache(rows: Sequence[KVRow], path) -> pathlib.Path:
  plt = _pyplot()
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
  return _save(fig, path)


def plot_tpot_vs_bandwidth(path, hidden: int = 7000, experts_per_token: int = 9,
                           tokens_per_device: int = 32, num_layers: int = 61) -> pathlib.Path:
  plt = _pyplot()
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
  return _save(fig, path)


def plot_memory_by_mesh(plans: Sequence[tuple[str, MemoryPlan]], path,
                        hbm_bytes: float | None = None, title: str = "") -> pathlib.Path:
  plt = _pyplot()
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
  return _save(fig, path)


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  import matplotlib.pyplot as plt  # noqa: PLC0415
  plt.close(fig)
  return path
