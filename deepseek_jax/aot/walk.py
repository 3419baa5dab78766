"""Every instruction of an optimized HLO module with how often one step runs it: loops by their trip
counts (`hlo.trip_count`), calls and conditional branches once each, optionally into fusions."""

from __future__ import annotations

import re
from collections.abc import Iterator

from deepseek_jax.aot import hlo

_CALLED = ("to_apply", "branch_computations", "true_computation", "false_computation")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _callees(ins: hlo.Instr, into_fusions: bool) -> list[str]:
  if ins.opcode == "while":
    return (hlo._called(ins.attrs, "body") or [""])[:1]
  if ins.opcode in ("call", "conditional") or (into_fusions and ins.opcode == "fusion"):
    return [c for key in _CALLED + (("calls",) if ins.opcode == "fusion" else ())
            for c in hlo._called(ins.attrs, key)]
  return []


def op_name(ins: hlo.Instr) -> str:
  m = _OP_NAME.search(ins.attrs)
  return m.group(1) if m else ""


def instructions(comps: dict, entry: str, into_fusions: bool = False
                 ) -> Iterator[tuple[hlo.Computation, hlo.Instr, float, str]]:
  """(computation, instruction, executions per step, where in the program) for everything
  reachable from `entry`.

  "Where" is the instruction's op_name when it lies under its caller's, else the caller's: JAX
  traces identical functions once (the layers' expert loop and the MTP block's share one body), so
  a shared body's metadata names whichever caller was traced first, while each loop or call
  instruction still names its own place."""
  def go(name: str, mult: float, seen: tuple, where: str | None):
    comp = comps.get(name)
    if comp is None or name in seen:
      return
    for ins in comp.instrs:
      own = op_name(ins)
      here = own if where is None or own.startswith(where.rpartition("/")[0]) else where
      yield comp, ins, mult, here
      n = (hlo.trip_count(ins.attrs, comps) or 1) if ins.opcode == "while" else 1
      for c in _callees(ins, into_fusions):
        yield from go(c, mult * n, seen + (name,), here)

  yield from go(entry, 1.0, (), None)
