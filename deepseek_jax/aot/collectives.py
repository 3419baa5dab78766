"""The collectives of a compiled step, each with the mesh axes its groups span and whether they
cross nodes, and their time at given in-node and cross-node bandwidths.

Replica groups are read in XLA's three spellings: explicit (`{{0,1},{2,3}}`), iota
(`[2,1024]<=[1024,2]T(1,0)`) and mesh (`mesh['axis_0'=2,...] {'axis_1'}`). Partition ids are
positions in the mesh's flattened device order (SPMD's device assignment), so each group maps to
mesh coordinates (which axes vary) and to nodes (`sharding.mesh.node_ids`). Times are ring
algorithms without latency: all-gather and reduce-scatter move (S-1)/S of the full array per
device, all-reduce twice that, all-to-all (S-1)/S of its buffer, a permute its buffer; traffic to
peers on other nodes goes at the cross-node bandwidth, the rest at the in-node one, concurrently.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

from deepseek_jax.aot import walk

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
         "ragged-all-to-all")


@dataclasses.dataclass
class Traffic:
  count: float = 0.0          # per step (loops counted)
  bytes: float = 0.0          # full-array bytes per device per step (all-gather: the result)
  in_node_s: float = 0.0
  cross_node_s: float = 0.0
  cross_fraction: float = 0.0  # share of peers on other nodes

  @property
  def seconds(self) -> float:
    return max(self.in_node_s, self.cross_node_s)


def _iota_groups(text: str) -> np.ndarray | None:
  m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if not m:
    return None
  g, s = int(m.group(1)), int(m.group(2))
  dims = [int(d) for d in m.group(3).split(",")]
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  if m.group(4):
    ids = ids.transpose([int(p) for p in m.group(4).split(",")])
  return ids.reshape(g, s)


def _mesh_groups(text: str) -> np.ndarray | None:
  m = re.match(r"mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
  if not m:
    return None
  axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
  names, dims = [a for a, _ in axes], [int(d) for _, d in axes]
  vary = re.findall(r"'(\w+)'", m.group(2))
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  order = [i for i, n in enumerate(names) if n not in vary] + [names.index(v) for v in vary]
  size = int(np.prod([dims[names.index(v)] for v in vary])) if vary else 1
  return ids.transpose(order).reshape(-1, size)


def replica_groups(attrs: str, num_partitions: int) -> np.ndarray:
  """[groups, size] partition ids of a collective; pairs for a permute; all when unspecified."""
  pairs = re.search(r"source_target_pairs=\{([^}]*(?:\}[^}]*)*)\}", attrs)
  if pairs:
    found = re.findall(r"\{(\d+),(\d+)\}", pairs.group(0))
    return np.array([[int(a), int(b)] for a, b in found]) if found else np.zeros((0, 2), int)
  m = re.search(r"replica_groups=(\{\{[^=]*?\}\}|\[[^ ]*|mesh\[[^\]]*\]\s*\{[^}]*\})", attrs)
  if not m or m.group(1) in ("{}",):
    return np.arange(num_partitions)[None]
  text = m.group(1)
  for parse in (_iota_groups, _mesh_groups):
    groups = parse(text)
    if groups is not None:
      return groups
  rows = [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([\d,]+)\}", text)]
  width = max(len(r) for r in rows)
  return np.array([r + [r[-1]] * (width - len(r)) for r in rows])


def _moved(kind: str, full: float, size: int) -> float:
  """Bytes one device sends for a collective over `size` peers on a `full`-byte array."""
  if size <= 1:
    return 0.0
  share = (size - 1) / size
  return {"all-reduce": 2 * share * full, "collective-permute": full}.get(kind, share * full)


def analyze(text: str, mesh_shape: dict[str, int], node_of_partition: np.ndarray,
            link_bw: float, cross_bw: float, by_op: bool = False
            ) -> dict[tuple, Traffic]:
  """{(kind, mesh axes the groups span): Traffic} for the optimized module `text`; `by_op` adds
  the op_name (where in the model) to the key."""
  comps, entry = walk.parse(text)
  names = list(mesh_shape)
  dims = [mesh_shape[a] for a in names]
  n = int(np.prod(dims))
  coords = np.stack(np.unravel_index(np.arange(n), dims), axis=1)
  out: dict = collections.defaultdict(Traffic)
  memo: dict = {}

  def describe(ins, comp):
    key = ins.attrs
    if key not in memo:
      groups = replica_groups(ins.attrs, n)
      groups = groups[:, :] if groups.size else np.arange(n)[None]
      g0 = groups[0] % n
      vary = tuple(a for i, a in enumerate(names) if len(set(coords[g0, i])) > 1)
      nodes = node_of_partition[g0]
      cross = float(np.sum(nodes != nodes[0]) / (len(g0) - 1)) if len(g0) > 1 else 0.0
      memo[key] = (len(g0), vary, cross)
    return memo[key]

  for comp, ins, mult, where in walk.instructions(comps, entry):
    base = walk.collective(ins)
    if base not in KINDS:
      continue
    size, vary, cross = describe(ins, comp)
    # XLA's combiners merge collectives into one with several operands: count them all
    operand = sum(walk.shape_bytes(comp.shape_of(o)) for o in ins.operands)
    result = walk.shape_bytes(ins.shape)
    if ins.opcode.endswith("-start") and ins.shape.startswith("("):
      result = max(result - operand, operand)   # (operand, result) tuples
    full = result if base == "all-gather" else operand
    moved = _moved(base, full, size)
    key = (base, vary)
    if by_op:
      key += (where or "?",)
    t = out[key]
    t.count += mult
    t.bytes += mult * full
    t.cross_fraction = cross
    t.cross_node_s += mult * moved * cross / cross_bw
    t.in_node_s += mult * moved * (1 - cross) / link_bw
  return dict(out)
