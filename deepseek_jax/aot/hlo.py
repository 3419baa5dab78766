"""A reading of XLA's optimized HLO text: FLOPs of matmuls with loops counted by their trip counts,
bytes each kernel moves, the kernels (custom calls) and the collectives.

XLA's own cost analysis counts a while-loop body once (a layer scan hides all layers but one) and
gives nothing or -1 for custom calls (cuDNN, Pallas/Triton/Mosaic kernels), so the AOT report
walks the module itself (`walk` reads the text): a computation's FLOPs are its dots and convolutions plus those of what it
calls, a `while` multiplies its body by `known_trip_count`, a `conditional` takes its costliest
branch. Bytes follow the roofline convention: each top-level instruction of a non-fused
computation is one kernel that reads its operands and writes its result once, except that a slice
read (dynamic-slice, gather) costs the slice and an in-place update costs the update.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

from deepseek_jax.aot import walk
from deepseek_jax.aot.walk import Computation, Instr, parse, shape_bytes

_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
         "add-dependency", "domain", "get-dimension-size"}


def dot_flops(comp: Computation, ins: Instr) -> float:
  out = math.prod(walk.dims(ins.shape)) if walk.dims(ins.shape) else 1
  lhs = walk.dims(comp.shape_of(ins.operands[0])) if ins.operands else []
  m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
  contract = [int(d) for d in m.group(1).split(",") if d] if m else []
  return 2.0 * out * math.prod(lhs[d] for d in contract if d < len(lhs))


def _window_taps(s_in: int, s_out: int, size: int, lo: int, stride: int) -> int:
  """Window taps that land on real input (not padding), summed over the output positions."""
  return sum(max(0, min(size - 1, lo - o * stride + s_in - 1) - max(0, lo - o * stride) + 1)
             for o in range(s_out))


def conv_flops(comp: Computation, ins: Instr) -> float:
  """FLOPs of a convolution, counting only taps on real input. XLA:TPU writes some dots as a
  convolution whose window slides over zero padding (e.g. a [T, D] x [D, N, H] projection as a
  window of N over an input padded by N - 1): counting every tap would overstate it N-fold."""
  out_dims = walk.dims(ins.shape) or [1]
  rhs = walk.dims(comp.shape_of(ins.operands[1])) if len(ins.operands) > 1 else []
  m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not rhs or not m:
    return 0.0
  lhs_l, rhs_l, out_l = m.groups()
  every_tap = 2.0 * math.prod(out_dims) * math.prod(
      d for k, d in enumerate(rhs) if k != rhs_l.find("o"))
  spatial = sorted(c for c in rhs_l if c.isdigit())
  if not spatial:
    return every_tap
  w = re.search(r"window=\{([^}]*)\}", ins.attrs)
  fields = dict(re.findall(r"(\w+)=(\S+)", w.group(1))) if w else {}
  if "lhs_dilate" in fields or "rhs_dilate" in fields or len(out_dims) != len(out_l):
    return every_tap                              # dilated: an upper bound is good enough
  lhs = walk.dims(comp.shape_of(ins.operands[0]))
  sizes = [int(x) for x in fields.get("size", "").split("x") if x] or [1] * len(spatial)
  pads = [int(p.split("_")[0]) for p in fields.get("pad", "").split("x") if p] or [0] * len(spatial)
  strides = [int(x) for x in fields.get("stride", "").split("x") if x] or [1] * len(spatial)
  try:
    taps = math.prod(
        _window_taps(lhs[lhs_l.index(c)], out_dims[out_l.index(c)], sizes[j], pads[j], strides[j])
        for j, c in enumerate(spatial))
    per_position = math.prod(d for k, d in enumerate(out_dims) if not out_l[k].isdigit())
    return 2.0 * per_position * rhs[rhs_l.index("i")] * taps
  except (ValueError, IndexError):
    return every_tap


def kernel_flops(comp: Computation, ins: Instr, target: str) -> float | None:
  """FLOPs of a kernel XLA cannot see into, from its operand shapes; None when unrecognised.

  A declared Pallas cost estimate first. cuDNN fused attention: 2 B N T S (K + J) for the two
  products, halved under a causal mask (the kernel skips masked tiles), x2.5 for the backward
  (five products instead of two); splash attention by its kernels' products likewise. A
  grouped matmul (Pallas Mosaic-GPU/Triton/Mosaic-TPU): out [A, N] from [A, K] x [G, K, N], or
  the weight gradient [G, K, N] from [A, K] and [A, N]: 2 A K N either way (padding rows count).
  """
  est = re.search(r'"cost_estimate":\{"flops":"(\d+)"', ins.attrs)
  if est:   # Pallas TPU kernels declare their cost (megablox gmm/tgmm do)
    return float(est.group(1))
  if ins.name.startswith("splash_mha"):   # splash attention: q [B,N,T,K], k, v [B,N,S,J]; causal
    ops = [walk.dims(comp.shape_of(o)) for o in ins.operands]
    qkv = [o for o in ops if len(o) == 4][:3]
    if len(qkv) < 3:
      return None
    (b, n, t, k), s_, j = qkv[0], qkv[1][2], qkv[2][3]
    per_product = b * n * t * s_ / 2        # MACs per head-dim unit under the causal mask
    terms = {"fwd": k + j, "dkv": 2 * k + 2 * j, "dq": 2 * k + j}
    kind = next((v for key, v in terms.items() if key in ins.name), None)
    return None if kind is None else 2.0 * per_product * kind
  if target.startswith("__cudnn$fmha"):
    bnts = re.search(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":\s*\[([^\]]*)\]',
                     ins.attrs)
    arrays = walk.ARRAY.findall(ins.attrs.split("operand_layout_constraints={", 1)[-1])
    if not bnts or len(arrays) < 3:
      return None
    b, n, t, k_s = (int(v.strip().strip('"')) for v in bnts.group(1).split(","))
    k = int(arrays[0][1].split(",")[-1])
    j = int(arrays[2][1].split(",")[-1])
    f = 2.0 * b * n * t * k_s * (k + j)
    f *= 0.5 if '"mask_type": "CAUSAL"' in ins.attrs or '"mask_type":"CAUSAL"' in ins.attrs else 1
    return f * (2.5 if "Backward" in target else 1.0)
  out = walk.dims(ins.shape)
  ops = [walk.dims(comp.shape_of(o)) for o in ins.operands]
  if len(out) == 2:
    a, n = out
    for w in (o for o in ops if len(o) == 3 and o[2] == n):
      if any(len(x) == 2 and x == [a, w[1]] for x in ops):
        return 2.0 * a * w[1] * n
  if len(out) == 3:   # the weight gradient; the kernel may take x transposed ([K, A])
    _, k, n = out
    mats = [o for o in ops if len(o) == 2]
    for i, x in enumerate(mats):
      for a, kk in ((x[0], x[1]), (x[1], x[0])):
        if kk == k and any(sorted(y) == sorted([a, n]) for j, y in enumerate(mats) if j != i):
          return 2.0 * a * k * n
  return None


@dataclasses.dataclass
class Summary:
  """What the walk found; every count is per device and per call of the entry computation."""
  dot_flops: float = 0.0
  kernel_flops: float = 0.0        # custom calls counted from their shapes (`kernel_flops`)
  opaque_kernels: int = 0          # custom calls with no FLOP count (not in either figure)
  kernel_bytes: float = 0.0
  custom_calls: dict = dataclasses.field(default_factory=lambda: defaultdict(int))
  collectives: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0, 0.0]))
  loops: list = dataclasses.field(default_factory=list)     # (trip count, body name)
  unknown_trip_loops: int = 0
  bytes_by_instr: dict = dataclasses.field(default_factory=lambda: defaultdict(float))

  def top_bytes(self, n: int = 10) -> list[tuple[str, float]]:
    """The instructions moving the most bytes per step: where a memory-bound step goes."""
    return sorted(self.bytes_by_instr.items(), key=lambda kv: -kv[1])[:n]


def _fusion_bytes(comps, ins: Instr, comp: Computation) -> float:
  """Bytes a fusion moves: slice reads cost the slice, an in-place update root its update."""
  called = comps.get((walk.called(ins.attrs, "calls") or [""])[0])
  if called is None:
    return shape_bytes(ins.shape) + sum(shape_bytes(comp.shape_of(o)) for o in ins.operands)
  users = defaultdict(list)
  for i in called.instrs:
    for o in i.operands:
      users[o].append(i)
  pnames = list(called.params)
  root = next((i for i in called.instrs if i.name == called.root), None)
  in_place = set()
  out = shape_bytes(ins.shape)
  roots = [root] if root is not None and root.opcode != "tuple" else (
      [next((i for i in called.instrs if i.name == o), None) for o in root.operands] if root else [])
  for r in roots:
    if r is not None and r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
      in_place.add(r.operands[0])
      out += shape_bytes(called.shape_of(r.operands[1])) - shape_bytes(r.shape)
  total = max(out, 0.0)

  def sliced(name: str, depth: int = 0) -> float | None:
    """Bytes read from `name` when only slices of it are read (through bitcasts), else None."""
    us = users.get(name, [])
    if not us or depth > 4:
      return None
    read = 0.0
    for u in us:
      if u.opcode in ("dynamic-slice", "gather", "slice") and u.operands[0] == name:
        read += shape_bytes(u.shape)
      elif u.opcode == "bitcast" and (r := sliced(u.name, depth + 1)) is not None:
        read += r
      else:
        return None
    return read

  for k, o in enumerate(ins.operands):
    p = pnames[k] if k < len(pnames) else None
    if p in in_place:
      continue
    r = sliced(p) if p is not None else None
    total += shape_bytes(comp.shape_of(o)) if r is None else r
  return total


def summarize(text: str) -> Summary:
  comps, entry = parse(text)
  s = Summary()
  flops_memo: dict[str, float] = {}

  def flops(name: str) -> float:
    if name in flops_memo:
      return flops_memo[name]
    flops_memo[name] = 0.0
    comp, total = comps.get(name), 0.0
    for ins in comp.instrs if comp else ():
      inner = [flops(c) for c in walk.callees(ins, into_fusions=True)]
      if ins.opcode == "dot":
        total += dot_flops(comp, ins)
      elif ins.opcode == "convolution":
        total += conv_flops(comp, ins)
      elif ins.opcode == "while":
        total += (walk.trip_count(ins.attrs, comps) or 1) * inner[0]
      elif ins.opcode == "conditional":   # the costliest branch
        total += max(inner, default=0.0)
      else:
        total += sum(inner)
    flops_memo[name] = total
    return total

  for comp, ins, mult, _ in walk.instructions(comps, entry):
    op = ins.opcode
    if op.endswith("-done"):
      continue
    kind = walk.collective(ins)
    if kind is not None:
      c = s.collectives[kind]
      c[0] += mult
      c[1] += mult * (shape_bytes(ins.shape) if not op.endswith("-start") else
                      sum(shape_bytes(comp.shape_of(o)) for o in ins.operands))
    if op == "custom-call":
      target = walk.call_target(ins) or "?"
      s.custom_calls[target] += mult
      f = kernel_flops(comp, ins, target)
      if f is not None:
        s.kernel_flops += mult * f
      elif not target[:1].isupper():   # XLA:TPU's own bookkeeping calls are capitalised
        s.opaque_kernels += 1
    if op == "while":
      n = walk.trip_count(ins.attrs, comps)
      if n is None:
        s.unknown_trip_loops += 1
      s.loops.append((n, walk.callees(ins)[0]))
    if op in _FREE:
      continue
    if op == "fusion":
      moved = _fusion_bytes(comps, ins, comp)
    elif op in ("dynamic-slice", "gather", "slice"):
      moved = 2 * shape_bytes(ins.shape)
    elif op == "dynamic-update-slice" and len(ins.operands) > 1:
      moved = 2 * shape_bytes(comp.shape_of(ins.operands[1]))
    else:
      moved = shape_bytes(ins.shape) + sum(shape_bytes(comp.shape_of(o)) for o in ins.operands)
    s.kernel_bytes += mult * moved
    s.bytes_by_instr[f"{comp.name}/{ins.name}"] += mult * moved

  s.dot_flops = flops(entry)
  return s
