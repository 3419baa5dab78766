"""`python -m deepseek_jax.aot --crosscheck`: the compiled training step against the co-design
calculator and the paper ("Insights into DeepSeek-V3" Tables 2 and 4).

Four checks, per device unless said:
  memory       XLA's arguments split by the state's own shardings (parameters, optimizer, the
               rest) and XLA's temporaries, against `codesign.step_memory.step_plan` term by term;
  FLOPs        matmul FLOPs compiled per token, split forward / recomputation (remat) / backward and
               by part (layers, routed experts, MTP, output head), against the model's count and
               Table 2's 250 GFLOPs for V3 at 4096;
  collectives  bytes per step by kind and the mesh axes they span, against the calculator's
               prediction for the expert all-to-alls and the FSDP gathers and reduce-scatters, with
               the cross-node share and the dispatch that node-limited routing (M of N nodes,
               deduplicated per node as DeepEP does) would put on the scale-out network;
  step time    an estimate: compiled FLOPs at the chip's dense BF16 peak plus the collectives at
               the target's in-node and cross-node bandwidths (no overlap, and full overlap), next
               to Table 4. Nothing ran: these are estimates.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import numpy as np

from deepseek_jax.aot import collectives, hlo, walk
from deepseek_jax.aot.targets import GiB
from deepseek_jax.codesign import memory, node_limited, step_memory
from deepseek_jax.model import abstract_variables
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding import specs

# Insights Table 4 (MPFT column: 2048 H800s, V3 at 4096 tokens, batch 15360) and Table 2.
PAPER = {"step_s": 19.926, "tokens_per_day": 272.80e9, "mfu": 0.3894,
         "flops_per_token": 250e9, "devices": 2048}
TOLERANCE = 0.10


def _g(b: float) -> str:
  return f"{b / GiB:7.2f} GiB"


def _gb(b: float) -> str:
  return f"{b / 1e9:9.1f} GB"


def state_bytes(abstract_state) -> dict[str, float]:
  """Per-device bytes of the donated train state by field group, from each leaf's sharding."""
  out: dict[str, float] = collections.Counter()
  for name in ("params", "opt_state"):
    for leaf in jax.tree.leaves(getattr(abstract_state, name)):
      shard = leaf.sharding.shard_shape(leaf.shape)
      out[name] += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  total = sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
              for x in jax.tree.leaves(abstract_state))
  out["other"] = total - out["params"] - out["opt_state"]
  return dict(out)


def _row(term: str, plan: float, xla: float | None, note: str = "") -> str:
  if xla is None:
    return f"  {term:26s} plan {_g(plan)}  {'':>22s} {note}"
  diff = xla / plan - 1 if plan else float("inf")
  mark = "ok" if abs(diff) <= TOLERANCE else "OFF"
  return f"  {term:26s} plan {_g(plan)}  XLA {_g(xla)} {diff:+6.1%} {mark}  {note}"


def memory_lines(b, rep) -> tuple[list[str], dict]:
  sizes = mesh_lib.axis_sizes(b.mesh)
  plan = step_memory.step_plan(b.cfg, sizes)
  got = state_bytes(b.abstract)
  lines = ["memory per device: plan (codesign.step_memory) vs XLA (memory_analysis; arguments "
           "split by the state's shardings)",
           _row("parameters", plan.params, got["params"], "f32 masters"),
           _row("optimizer", plan.optimizer, got["opt_state"],
                f"AdamW m, v in {'bf16' if b.cfg.train.bf16_moments else 'f32'}"),
           _row("other state", plan.other_state, got["other"], "router biases, FP8, counters"),
           _row("arguments", plan.arguments, rep.argument_bytes, "donated: outputs alias them")]
  m, t = b.cfg.model, b.cfg.train
  notes = {
      "grad_accumulator": f"f32, {t.grad_accum} microbatches" if t.grad_accum > 1 else "none",
      "micro_gradients": "one microbatch's, f32",
      "activations": (f"{plan.tokens_per_device:.0f} tokens x saved set (remat {m.remat}, "
                      f"attention {m.attention_impl})"),
      "loss_chunk": "f32 logits, exp, cotangent of one chunk",
      "gathered_weights": "one layer gathered + its gradient, compute dtype",
      "head_gradients": "gathered head gradient: f32 sum + one per loss in compute dtype",
      "ep_buffers": "one MoE layer's all-to-all buffers and expert rows, x2 for backward",
  }
  for name, value in plan.rows():
    if name in notes:
      lines.append(_row(f"  {name.replace('_', ' ')}", value, None, notes[name]))
  lines.append(_row("temporaries", plan.temporaries, rep.temp_bytes,
                    "XLA gives one figure; the plan's terms above"))
  lines.append(_row("total", plan.total, rep.total_bytes,
                    f"of {rep.hbm_bytes / GiB:.1f} GiB HBM"))
  return lines, {"plan": plan, "state": got}


def _phase(op_name: str) -> str:
  if "rematted_computation" in op_name:
    return "remat"
  return "backward" if "transpose(" in op_name else "forward"


def _part(op_name: str) -> str:
  if "OutputHead" in op_name or "lm_head" in op_name:
    return "head"
  if "/mtp/" in op_name:
    return "mtp"
  return "experts" if "/experts/" in op_name else "layers"


def flops_by_phase(text: str) -> dict[tuple[str, str], float]:
  """{(phase, part): matmul FLOPs per device per step}, dots and kernels by their op_name."""
  comps, entry = walk.parse(text)
  out: dict = collections.Counter()
  for comp, ins, mult, name in walk.instructions(comps, entry, into_fusions=True):
    if ins.opcode == "dot":
      f = hlo.dot_flops(comp, ins)
    elif ins.opcode == "convolution":
      f = hlo.conv_flops(comp, ins)
    elif ins.opcode == "custom-call":
      f = hlo.kernel_flops(comp, ins, walk.call_target(ins)) or 0.0
    else:
      continue
    out[(_phase(name), _part(name))] += mult * f
  return dict(out)


def flops_lines(b, rep, text: str, devices: int) -> tuple[list[str], dict]:
  m, t = b.cfg.model, b.cfg.train
  tokens = t.batch_size * t.seq_len
  per_token = lambda x: x * devices / tokens  # noqa: E731
  split = flops_by_phase(text)
  model = m.flops_per_token(t.seq_len, mtp=True)
  compiled = per_token(rep.compiled_flops)
  lines = [f"FLOPs per token: compiled {compiled / 1e9:.1f} G, model {model / 1e9:.1f} G "
           f"(forward + backward, MTP included) = {compiled / model:.2f}x; Table 2: "
           f"{PAPER['flops_per_token'] / 1e9:.0f} G (V3 at 4096, without MTP: "
           f"{m.flops_per_token(t.seq_len, mtp=False) / 1e9:.1f} G here)"]
  for phase in ("forward", "remat", "backward"):
    parts = {p: per_token(v) for (ph, p), v in split.items() if ph == phase}
    lines.append(f"  {phase:9s} {sum(parts.values()) / 1e9:7.1f} G: " + ", ".join(
        f"{p} {v / 1e9:.1f}" for p, v in sorted(parts.items(), key=lambda kv: -kv[1])))
  remat = sum(per_token(v) for (ph, _), v in split.items() if ph == "remat")
  experts = sum(per_token(v) for (ph, p), v in split.items() if ph == "forward" and p == "experts")
  routed = m.num_moe_layers * m.num_experts_per_tok * 6 * m.d_model \
      * m.moe_ffn_dim
  lines.append(f"  without the recomputation {(compiled - remat) / 1e9:.1f} G = "
               f"{(compiled - remat) / model:.2f}x the model; routed experts forward "
               f"{experts / 1e9:.1f} G vs {routed / 1e9:.1f} G routed "
               f"({experts / routed if routed else 0:.2f}x: rows padded to "
               f"mesh.compute_capacity_factor and whole blocks)")
  return lines, {"compiled_per_token": compiled, "model_per_token": model, "split": split}


def collective_prediction(b, sizes) -> dict[str, float]:
  """Calculator bytes per device per step: EP all-to-alls, FSDP all-gathers, reduce-scatters."""
  m, t, mc = b.cfg.model, b.cfg.train, b.cfg.mesh
  rules = tuple(tuple(r) for r in memory.project_rules(mc))
  cb = step_memory.compute_bytes(m.dtype)
  tokens, rows = step_memory.expert_rows(b.cfg, rules, sizes)
  d, c = (step_memory.wire_bytes(w, cb) for w in (mc.dispatch_dtype, mc.combine_dtype))
  remat = m.remat != "none"
  moe_layers = m.num_moe_layers + m.num_mtp_layers
  # forward: dispatch + combine; recomputation: the dispatch only (the backward needs the experts'
  # inputs, not the combined output); backward: each cotangent returns by the reverse route, the
  # output gradients to the experts in the dispatch format, the input gradients in the combine's
  a2a = t.grad_accum * moe_layers * rows * m.d_model * ((d + c) + remat * d + (d + c))
  passes = 2    # forward and backward (a recomputation can reuse the backward's gather)
  gathered = cb * sum(n for *_, n in step_memory.gathered_weights(abstract_variables(m), rules,
                                                                  sizes))
  return {"all-to-all": a2a, "all-gather": t.grad_accum * passes * gathered,
          "reduce-scatter": t.grad_accum * gathered, "rows_per_layer": rows, "tokens": tokens}


def bytes_by_dtype(text: str) -> dict[str, dict[str, float]]:
  """{kind: {element type: bytes per step}} of the collectives' operands (all-gathers: results)."""
  comps, entry = walk.parse(text)
  out: dict = collections.defaultdict(collections.Counter)
  for comp, ins, mult, _ in walk.instructions(comps, entry):
    kind = walk.collective(ins)
    if kind not in collectives.KINDS:
      continue
    shapes = [comp.shape_of(o) for o in ins.operands]
    if kind == "all-gather":     # the gathered results: the tuple's second half when async
      shapes = walk.arrays(ins.shape)[len(shapes) if "-start" in ins.opcode else 0:]
    for sh in shapes:
      out[kind][sh.split("[")[0]] += mult * walk.shape_bytes(sh)
  return {k: dict(v) for k, v in out.items()}


def collective_lines(b, target, text: str) -> tuple[list[str], dict]:
  sizes = mesh_lib.axis_sizes(b.mesh)
  nodes = mesh_lib.node_ids(list(b.mesh.devices.flat))
  chip = target.chip
  got = collectives.analyze(text, sizes, nodes, chip.link_bw, chip.dcn_bw, by_op=True)
  pred = collective_prediction(b, sizes)
  by_kind: dict = collections.defaultdict(collectives.Traffic)
  rules = tuple(tuple(r) for r in memory.project_rules(b.cfg.mesh))
  ep_axes = set(rules_lib.as_axes(specs.mesh_spec(("experts",), rules, sizes)[0]))
  for (kind, axes, op), tr in got.items():
    if kind == "all-to-all" and not set(axes) & ep_axes:   # the expert exchange spans EP axes
      kind = "all-to-all (other)"
    elif kind in ("all-gather", "reduce-scatter") and not set(axes) & set(step_memory.BATCH_AXES):
      kind += " (other axes)"
    k = by_kind[(kind, axes)]
    k.count += tr.count
    k.bytes += tr.bytes
    k.in_node_s += tr.in_node_s
    k.cross_node_s += tr.cross_node_s
    k.cross_fraction = tr.cross_fraction
  lines = [f"collectives per device per step (times at {chip.link_bw / 1e9:.0f} GB/s in a node, "
           f"{chip.dcn_bw / 1e9:.0f} GB/s across; ring algorithms, no latency):"]
  measured: dict = collections.Counter()
  for (kind, axes), tr in sorted(by_kind.items(), key=lambda kv: -kv[1].bytes):
    measured[kind] += tr.bytes
    lines.append(f"  {kind:28s} over {','.join(axes) or '-':22s} x{tr.count:7.0f} {_gb(tr.bytes)}"
                 f"  {tr.cross_fraction:4.0%} of peers off-node  in-node {tr.in_node_s:6.2f} s, "
                 f"cross-node {tr.cross_node_s:6.2f} s")
  dtypes = bytes_by_dtype(text)
  for kind, what in (("all-to-all", "dispatch + combine forward, dispatch recomputed, both back"),
                     ("all-gather", "every weight gathered in the compute dtype, fwd + bwd"),
                     ("reduce-scatter", "every weight gradient in the compute dtype, once per "
                      "microbatch")):
    ratio = measured[kind] / pred[kind] if pred[kind] else float("nan")
    split = ", ".join(f"{d} {_gb(v).strip()}" for d, v in sorted(dtypes.get(kind, {}).items(),
                                                               key=lambda kv: -kv[1]))
    lines.append(f"  calculator {kind:14s} {_gb(pred[kind])} vs compiled {_gb(measured[kind])}: "
                 f"{ratio:.2f}x  ({what}; all {kind}s by dtype: {split})")
  m = b.cfg.model
  if m.n_routed_experts:
    ep_nodes = len(set(mesh_lib.expert_shard_nodes(m, b.mesh, memory.project_rules(b.cfg.mesh))))
    K = m.num_experts_per_tok
    per_gpu = K * (ep_nodes - 1) / ep_nodes
    lines.append(f"  dispatch copies per token leaving the node: this program sends one row per "
                 f"destination expert shard, K (n-1)/n = {per_gpu:.2f} of K = {K} with the experts "
                 f"on n = {ep_nodes} nodes")
    if ep_nodes > 1 and m.n_routed_experts % ep_nodes == 0:
      free = node_limited.expected_nodes_spanned(m.n_routed_experts, ep_nodes, K)
      limit = min(m.topk_group, ep_nodes) if m.n_group == ep_nodes else ep_nodes
      lines.append(f"    sent once per node (DeepEP): E[nodes] = {free:.2f} unrestricted, <= M = "
                   f"{limit} node-limited ({limit / per_gpu - 1:+.0%} of this program's "
                   "scale-out dispatch; not done here)")
  comm = {"in_node_s": sum(t.in_node_s for t in got.values()),
          "cross_node_s": sum(t.cross_node_s for t in got.values())}
  return lines, {"measured": dict(measured), "predicted": pred, **comm}


def estimate_lines(b, target, rep, comm: dict, devices: int) -> list[str]:
  m, t = b.cfg.model, b.cfg.train
  tokens = t.batch_size * t.seq_len
  compute = rep.compiled_flops / target.chip.peak_bf16
  wire = max(comm["in_node_s"], comm["cross_node_s"])
  model_flops = m.flops_per_token(t.seq_len, mtp=False) * tokens
  out = [f"step estimate (not measured; compiled FLOPs at {target.chip.peak_bf16 / 1e12:.0f} "
         f"TFLOP/s dense BF16, every FP8 GEMM counted at the BF16 rate; collectives as above, "
         f"in-node and cross-node concurrent):",
         f"  compute {compute:.2f} s, communication {wire:.2f} s "
         f"(in-node {comm['in_node_s']:.2f}, cross-node {comm['cross_node_s']:.2f})"]
  for label, step in (("no overlap", compute + wire), ("full overlap", max(compute, wire))):
    mfu = model_flops / (devices * target.chip.peak_bf16 * step)
    out.append(f"  {label:12s}: {step:6.2f} s/step, {tokens / step * 86400 / 1e9:7.2f}B tokens/day, "
               f"MFU {mfu:.2%} (model FLOPs without MTP / BF16 peak, as Table 4)")
  out.append(f"  paper (Table 4, MPFT, {PAPER['devices']} H800): {PAPER['step_s']} s/step, "
             f"{PAPER['tokens_per_day'] / 1e9:.2f}B tokens/day, MFU {PAPER['mfu']:.2%}")
  return out


def crosscheck(b, target, rep, text: str) -> tuple[list[str], dict]:
  """The four checks' lines and their figures, for the compiled train step of `b`."""
  devices = b.mesh.devices.size
  mem, mem_d = memory_lines(b, rep)
  fl, fl_d = flops_lines(b, rep, text, devices)
  co, co_d = collective_lines(b, target, text)
  est = estimate_lines(b, target, rep, co_d, devices)
  figures = {
      "memory": {"plan": dataclasses.asdict(mem_d["plan"]), "state": mem_d["state"]},
      "flops": {**{k: v for k, v in fl_d.items() if k != "split"},
                "split": {f"{ph}/{p}": v for (ph, p), v in fl_d["split"].items()}},
      "collectives": co_d}
  return mem + fl + co + est, figures
