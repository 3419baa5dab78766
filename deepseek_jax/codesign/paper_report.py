"""The paper's remaining numbers as report sections: Tables 3-5, the 4:1 ratio, DualPipe, MTP and
V2 against DeepSeek 67B, each row printed beside the paper's value with a status (`claims`).

`paper_sections` returns [(title, derivation lines, claims)]; `section_lines` formats them like
the other report sections; `markdown` writes the same as a Markdown table. `EXTRA_GROUPS` is the
hook for more row groups (e.g. the LogFMT claim of `lab wires`): a list of (title, callable
returning rows of (claim, paper value, project value, status)).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from deepseek_jax.codesign import claims, topology
from deepseek_jax.codesign.claims import Claim
from deepseek_jax.codesign.hardware import Hardware, get_hardware
from deepseek_jax.config import ModelConfig

Section = tuple[str, list[str], list[Claim]]

# Hook: more row groups, each (title, function returning [(claim, paper, ours, status), ...]).
EXTRA_GROUPS: list[tuple[str, Callable[[], list[tuple]]]] = []


def logfmt_group() -> tuple[str, Callable[[], list[tuple]]] | None:
  """The LogFMT claim (Insights §3.2) from `deepseek_jax.lab.wires.logfmt_claim`, if present."""
  try:
    wires = importlib.import_module("deepseek_jax.lab.wires")
  except ModuleNotFoundError as e:
    if e.name != "deepseek_jax.lab.wires":
      raise
    return None
  fn = getattr(wires, "logfmt_claim", None)
  return None if fn is None else ("LogFMT: LogFMT-8 beats E4M3, LogFMT-10 ~ BF16 (Insights §3.2)",
                                  fn)


# Status words other row groups use, as `claims.STATUSES` (their text stays in the note).
ALIASES = {"not reproduced": "differs", "partly": "differs", "derived": "new"}


def _rows_to_claims(rows) -> list[Claim]:
  """(claim, paper value, project value, status[: reason][, more notes]) rows as Claims; a
  status word outside `claims.STATUSES` is kept in the note under 'new'."""
  out = []
  for quantity, paper, ours, status, *more in rows:
    text = str(status).strip()
    word = next((w for w in (*claims.STATUSES, *ALIASES) if text.startswith(w)), None)
    known = word is not None
    rest = text[len(word):].lstrip(" :") if known else text
    if word in ALIASES:
      word, rest = ALIASES[word], text
    note = "; ".join([rest, *map(str, more)]).strip("; ")
    out.append(Claim(str(quantity), str(paper), str(ours), word if known else "new", note))
  return out


def paper_sections(v2: ModelConfig, v3: ModelConfig, tokens_per_step: int,
                   hw: Hardware | None = None, extra=()) -> list[Section]:
  hw = get_hardware("h800") if hw is None else hw
  gb200 = get_hardware("gb200_nvl72")
  port, link = topology.prices_from_paper()
  sections: list[Section] = [
      ("Table 3: topology cost, 64-port switches (Insights §5.1)",
       [f"formulas by radix k (FT2 k^2/2, FT3 k^3/4, Slim Fly MMS, balanced Dragonfly); cost = "
        f"switches x 64 x {port:,.0f} $ + links x {link:,.0f} $"], claims.table3_claims()),
      ("Table 4: V3 on 2048 H800s, MPFT vs MRFT (Insights §5.1.2)",
       [f"{tokens_per_step:,} tokens/step (configs/deepseek_v3_h800_2048.yaml: 15360 x 4096); "
        f"MFU of {hw.name}'s {hw.peak_bf16_flops / 1e12:.0f} TFLOPS BF16"],
       claims.table4_claims(v3, tokens_per_step, hw.peak_bf16_flops)),
      ("Table 5: latency, and the latency term of the EP bound (Insights §5.2, §2.3.2)",
       ["bound + 2 all-to-alls x 2 micro-batches x 61 layers x one end-to-end latency (IB cross "
        "leaf on H800, NVLink on NVL72)"], claims.latency_claims(hw, gb200)),
      ("Scale-up : scale-out, from hardware.py (Insights §4.2, V3 §3.2.2)", [],
       claims.ratio_claims(hw)),
      ("DualPipe vs 1F1B and ZB1P (V3 report §3.2.1, Table 2)",
       ["bubble in units of F; params per device (EP 64, no TP) x copies / activations in "
        "micro-batches"], claims.dualpipe_claims(v3)),
      ("MTP speculative decoding (Insights §2.3.3, V3 §5.4.3)",
       ["tokens per step = 1 + p for one draft token accepted with probability p"],
       claims.mtp_claims()),
      ("DeepSeek-V2 against DeepSeek 67B (V2 abstract, §3.2.3)",
       ["67B: deepseek-llm-67b config (95 layers, GQA 8 KV heads); V2: configs/deepseek_v2_236b"
        ".yaml; training FLOPs at seq 4096"],
       claims.v2_vs_67b_claims(v2, hw.peak_bf16_flops)),
  ]
  for title, fn in [*EXTRA_GROUPS, *extra]:
    sections.append((title, [], _rows_to_claims(fn())))
  return sections


def section_lines(sections: list[Section]) -> list[str]:
  out = []
  for title, notes, rows in sections:
    out.append(f"== {title} ==")
    out += [f"  {n}" for n in notes]
    w = max(len(c.quantity) for c in rows) if rows else 0
    out.append(f"  {'':{w}s} {'paper':>16s} {'ours':>20s}  status")
    for c in rows:
      out.append(f"  {c.quantity:{w}s} {c.paper:>16s} {c.ours:>20s}  {c.status}"
                 + (f": {c.note}" if c.note else ""))
  return out


def markdown(sections: list[Section]) -> str:
  out = []
  for title, notes, rows in sections:
    out += [f"### {title}", ""] + [f"{n}" for n in notes] + ([""] if notes else [])
    out += ["| Quantity | Paper | Project | Status | Note |", "|---|---|---|---|---|"]
    out += [f"| {c.quantity} | {c.paper} | {c.ours} | {c.status} | {c.note} |" for c in rows]
    out.append("")
  return "\n".join(out)


def status_counts(sections: list[Section]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for _, _, rows in sections:
    for c in rows:
      counts[c.status] = counts.get(c.status, 0) + 1
  return counts
