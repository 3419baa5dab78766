"""Collectives read back from compiled HLO: which ones a mesh shape compiles to, and their bytes.

`collectives(compiled.as_text())` counts each kind (all-gather, reduce-scatter, all-reduce,
all-to-all, ...) in the per-device SPMD program with the bytes of its results, the data one device
receives per execution; a collective inside a loop body (a scanned layer stack) is counted once.
"""

from __future__ import annotations

import re
from typing import NamedTuple

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
         "collective-permute")

_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.+?) ("
                 + "|".join(sorted(KINDS, key=len, reverse=True)) + r")(-start)?\(")
_TYPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


class Collective(NamedTuple):
  count: int
  bytes: int      # summed result bytes per device


def _bytes(types: str) -> int:
  total = 0
  for dtype, dims in _TYPE.findall(types):
    bits = _BITS.get(dtype)
    if bits is None:
      m = re.match(r"f8|f4|f6", dtype)
      bits = int(dtype[1]) if m else 32
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * bits // 8
  return total


def collectives(hlo_text: str) -> dict[str, Collective]:
  """{kind: Collective(count, bytes)} for every collective kind present in the HLO text."""
  out: dict[str, list[int]] = {}
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    types, kind, start = m.groups()
    c = out.setdefault(kind, [0, 0])
    c[0] += 1
    if start and kind in ("all-gather", "collective-permute"):
      # async start returns (operand, result, ...): count the largest, the result
      c[1] += max(_bytes(f"{t}[{d}]") for t, d in _TYPE.findall(types))
    else:
      c[1] += _bytes(types)
  return {k: Collective(*v) for k, v in sorted(out.items())}
