"""Optimized HLO text read and walked: its computations and instructions (`parse`), and every
instruction reachable from the entry with how often one step runs it (`instructions`): loops by
their trip counts (`trip_count`), calls and conditional branches once each, optionally into
fusions. The one reader of HLO text for the AOT report, its collectives and the crosscheck.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
          "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
          "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
          "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e4m3": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5,
          "token": 0}
ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")      # element type, dimensions
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
_CALLED = ("to_apply", "branch_computations", "true_computation", "false_computation")


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (a tuple counts its elements)."""
  return sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in ARRAY.findall(shape))


def arrays(shape: str) -> list[str]:
  """The arrays of a shape, a tuple's in order: '(bf16[2]{0}, s32[])' -> ['bf16[2]', 's32[]']."""
  return [m.group(0) for m in ARRAY.finditer(shape)]


def dims(shape: str) -> list[int]:
  """The dimensions of a shape's first array."""
  m = ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  args: str = ""           # the text between the opcode's parentheses (a constant's value)


@dataclasses.dataclass
class Computation:
  name: str
  params: dict[str, str]            # parameter name -> shape
  instrs: list[Instr]
  root: str = ""

  def shape_of(self, name: str) -> str:
    for i in self.instrs:
      if i.name == name:
        return i.shape
    return self.params.get(name, "")


def _split_shape(rest: str) -> tuple[str, str]:
  """'(s32[], f32[2]{0}) while(...' -> ('(s32[], f32[2]{0})', 'while(...')."""
  if rest.startswith("("):
    depth = 0
    for k, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:k + 1], rest[k + 1:].strip()
  shape, _, tail = rest.partition(" ")
  return shape, tail.strip()


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.groups()
  shape, tail = _split_shape(rest)
  op_end = tail.find("(")
  if op_end < 0:
    return None
  opcode = tail[:op_end].strip()
  depth, k = 0, op_end
  for k in range(op_end, len(tail)):
    depth += tail[k] == "("
    depth -= tail[k] == ")"
    if depth == 0:
      break
  operands = re.findall(r"%([\w.\-]+)", tail[op_end:k + 1])
  return Instr(name, shape, opcode, operands, tail[k + 1:], tail[op_end + 1:k])


def parse(text: str) -> tuple[dict[str, Computation], str]:
  """Computations by name and the entry computation's name."""
  comps, entry, cur = {}, "", None
  for line in text.splitlines():
    if cur is None:
      m = _HEADER.match(line.strip())
      if m and "=" not in line.split("(")[0]:
        name, params, _ = m.groups()
        ps = dict(re.findall(r"([\w.\-]+):\s*([^,()]+(?:\([^)]*\))?[^,]*)", params))
        cur = Computation(name, {k: v.strip() for k, v in ps.items()}, [])
        if line.startswith("ENTRY"):
          entry = name
      continue
    if line.rstrip() == "}" or line.startswith("}, execution_thread="):   # (XLA:TPU's SparseCore)
      comps[cur.name] = cur
      cur = None
      continue
    ins = _parse_instr(line)
    if ins is not None:
      cur.instrs.append(ins)
      if line.strip().startswith("ROOT"):
        cur.root = ins.name
  return comps, entry


def called(attrs: str, key: str) -> list[str]:
  """The computations an attribute names (`body=%b`, `branch_computations={%x, %y}`)."""
  m = re.search(key + r"=\{?([^}]*?)\}?(?:,\s*\w+=|$)", attrs)
  if not m:
    return []
  return re.findall(r"%?([\w.\-]+)", m.group(1))


def trip_count(attrs: str, comps: dict | None = None) -> int | None:
  """XLA's `known_trip_count`, else N from a condition `i < N` (i counting from 0 by 1, the form
  of every `scan`/`fori_loop`; XLA:TPU does not annotate the count)."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
  if m:
    return int(m.group(1))
  cond = comps.get((called(attrs, "condition") or [""])[0]) if comps else None
  if cond is None:
    return None
  root = next((i for i in cond.instrs if i.name == cond.root), None)
  if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
    return None
  const = next((i for i in cond.instrs if i.opcode == "constant" and len(root.operands) == 2
                and i.name == root.operands[1]), None)
  try:
    return int(const.args) if const is not None else None
  except ValueError:
    return None


def callees(ins: Instr, into_fusions: bool = False) -> list[str]:
  """What one execution of `ins` runs: a while loop's body (its condition is not counted), a
  call's or a conditional's computations, and with `into_fusions` a fusion's."""
  if ins.opcode == "while":
    return (called(ins.attrs, "body") or [""])[:1]
  if ins.opcode in ("call", "conditional") or (into_fusions and ins.opcode == "fusion"):
    return [c for key in _CALLED + (("calls",) if ins.opcode == "fusion" else ())
            for c in called(ins.attrs, key)]
  return []


def collective(ins: Instr) -> str | None:
  """The collective `ins` runs or starts (`all-gather` for all-gather-start); None otherwise, and
  for an async pair's -done (its -start counts)."""
  kind = ins.opcode.removesuffix("-start")
  return kind if kind in COLLECTIVES else None


def op_name(ins: Instr) -> str:
  m = _OP_NAME.search(ins.attrs)
  return m.group(1) if m else ""


def call_target(ins: Instr) -> str:
  """A custom call's target (the kernel: `__cudnn$fmha...`, `mosaic_gpu`, ...), else ""."""
  m = _TARGET.search(ins.attrs)
  return m.group(1) if m else ""


def instructions(comps: dict, entry: str, into_fusions: bool = False
                 ) -> Iterator[tuple[Computation, Instr, float, str]]:
  """(computation, instruction, executions per step, where in the program) for everything
  reachable from `entry`, each instruction before what it calls.

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
      n = (trip_count(ins.attrs, comps) or 1) if ins.opcode == "while" else 1
      for c in callees(ins, into_fusions):
        yield from go(c, mult * n, seen + (name,), here)

  yield from go(entry, 1.0, (), None)
