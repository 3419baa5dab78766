"""Text report of the co-design calculator: one function per section, each returning lines.

Reproduces "Insights into DeepSeek-V3" Tables 1-2, §2.3.2 (EP TPOT bound) and §4.3 (node-limited
routing) next to the same quantities for the user's config, hardware and mesh.
"""

from __future__ import annotations

import pathlib

from deepseek_jax.codesign import ep, flops, kv_cache, memory, node_limited, params
from deepseek_jax.codesign.hardware import Hardware
from deepseek_jax.codesign.roofline import roofline
from deepseek_jax.config import ConfigError, ModelConfig, cli, load_config

GiB = 2**30


def reference_model(name: str) -> ModelConfig:
  """A model config shipped in configs/ (package data too), e.g. 'deepseek_v3_671b'."""
  path = cli.config_path(name)
  if not path.is_file():
    raise ConfigError(f"reference config {str(path)!r}: not found (the paper tables need the "
                      "shipped configs: reinstall deepseek-jax)")
  return load_config(path).model


def _b(n: float) -> str:
  """A parameter count: 671.03B, 6.26M, 40.0K."""
  for div, unit in ((1e9, "B"), (1e6, "M")):
    if n >= div:
      return f"{n / div:.2f}{unit}"
  return f"{n / 1e3:.1f}K"


def _flops(x: float) -> str:
  return f"{x / 1e9:.1f} GFLOPs" if x >= 1e9 else f"{x / 1e6:.2f} MFLOPs"


def _size(nbytes: float) -> str:
  """Bytes in GiB, or MiB below 1 GiB."""
  return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def section_model(m: ModelConfig, seq_len: int, variables=None) -> list[str]:
  """Parameters by config arithmetic, checked against `variables` (the model's eval_shape)."""
  pc = params.param_counts(m)
  out = ["== Parameters (V3 report §4.2) ==",
         f"  total {_b(pc['total'])}, active {_b(pc['active'])} without the embedding lookup, "
         f"{_b(pc['active_with_embedding'])} with it (embedding {_b(pc['embedding'])})",
         f"  MTP modules: {_b(pc['mtp_total'])} total, {_b(pc['mtp_active'])} active "
         "(not in the above)"]
  if variables is not None:
    es = params.eval_shape_param_counts(m, variables)
    agree = all(es[k] == pc[k] for k in pc)
    out.append(f"  jax.eval_shape of Transformer.init: total {_b(es['total'])}, active "
               f"{_b(es['active'])}, MTP {_b(es['mtp_total'])}: "
               + ("agrees with the config exactly" if agree else f"DISAGREES: {es} vs {pc}"))
  kv = kv_cache.kv_cache_bytes_per_token(m)
  mha = kv_cache.mha_equivalent_bytes_per_token(m)
  out += ["== This model ==",
          f"  KV cache per token (BF16): {kv / 1000:.3f} KB = ({m.kv_lora_rank} + "
          f"{m.qk_rope_head_dim}) x {m.num_layers} layers x 2 B; as MHA it would be "
          + (f"{mha / 1e6:.3f} MB" if mha >= 1e6 else f"{mha / 1000:.3f} KB")
          + f" ({mha / kv:.1f}x)",
          f"  training FLOPs per token at {seq_len}: "
          f"{_flops(flops.train_flops_per_token(m, seq_len, mtp=False))} (causal; "
          f"{_flops(flops.train_flops_per_token(m, seq_len, mtp=False, causal=False))} "
          "non-causal; MTP modules excluded)"]
  return out


def section_table1(v3: ModelConfig) -> list[str]:
  rows = kv_cache.table1(v3)
  out = ["== Table 1: KV cache per token, BF16, KB = 1000 B (Insights §2.1.2) ==",
         f"  {'model':24s} {'ours KB':>10s} {'paper KB':>10s} {'ours x':>7s} {'paper x':>8s}"]
  for r in rows:
    out.append(f"  {r.name:24s} {r.kb:10.3f} {r.paper_kb:10.3f} {r.ratio:7.2f} "
               f"{r.paper_ratio:8.2f}")
  out.append(f"  note: the paper prints LLaMA's ratio as 7.28x; its own KB figures give "
             f"{rows[2].paper_kb / rows[0].paper_kb:.2f}x")
  return out


def section_table2(v2: ModelConfig, v3: ModelConfig, seq_len: int = 4096) -> list[str]:
  out = [f"== Table 2: training GFLOPs per token at seq {seq_len} (Insights §2.2.1) ==",
         "  method: 6 x matmul weights per token (no embedding lookup) + 3 x causal attention "
         "2 n_h (d_qk + d_v) S/2 per layer",
         f"  {'model':22s} {'ours':>9s} {'paper':>8s} {'error':>8s}"]
  for r in flops.table2(v2, v3, seq_len):
    out.append(f"  {r.name:22s} {r.gflops:9.1f} {r.paper_gflops:8.0f} {100 * r.rel_error:+7.1f}%")
  q = flops.qwen_variants(seq_len)
  out.append("  Qwen-72B does not reproduce: every reading of Qwen-2.5 72B's config gives more:")
  for k, v in q.items():
    if not k.endswith("_B"):
      out.append(f"    {k:38s} {v:7.1f}")
  out.append(f"    394 would need {q['implied_N_matmul_B']:.1f}B matmul weights per token; the "
             f"model has {q['N_matmul_B']:.1f}B")
  return out


def section_ep(m: ModelConfig, hw: Hardware, tokens_per_device: int, ep_size: int | None,
               bandwidth: float | None) -> list[str]:
  out = ["== EP inference bound on TPOT (Insights §2.3.2) ==",
         "  (1 B FP8 dispatch + 2 B BF16 combine) x tokens x experts x hidden / bandwidth per "
         "step; x 2 micro-batches x layers",
         f"  {'case':44s} {'step us':>8s} {'TPOT ms':>8s} {'tok/s':>7s}  paper"]
  cases = [("IB 50 GB/s, hidden 7000 ('7K')", 50e9, 7000, "120.96 us, 14.76 ms, ~67"),
           ("IB 50 GB/s, hidden 7168 (V3's d_model)", 50e9, 7168, "(uses 7K)"),
           ("GB200 NVL72 900 GB/s, hidden 7000", 900e9, 7000, "6.72 us, 0.82 ms, ~1200")]
  for name, bw, hidden, paper in cases:
    b = ep.ep_tpot_bound(bw, 32, 9, hidden)
    out.append(f"  {name:44s} {b.step_s * 1e6:8.2f} {b.tpot_s * 1e3:8.3f} {b.tokens_per_s:7.1f}  "
               f"{paper}")
  ep_size = m.n_routed_experts + m.n_shared_experts if ep_size is None else ep_size
  bw = hw.ep_bandwidth(ep_size) if bandwidth is None else bandwidth
  tier = ("given" if bandwidth is not None else
          "scale-up" if ep_size <= hw.scale_up_domain else "scale-out")
  b = ep.ep_tpot_bound_for(m, hw, ep_size, tokens_per_device, bandwidth=bw)
  out.append(f"  this model on {hw.name}: EP over {ep_size} devices -> {tier} {bw / 1e9:g} GB/s, "
             f"{tokens_per_device} tok/device, {m.num_experts_per_tok}+{m.n_shared_experts} "
             f"experts, hidden {m.d_model}, {m.num_layers} layers: step "
             f"{b.step_s * 1e6:.2f} us, TPOT {b.tpot_s * 1e3:.3f} ms, {b.tokens_per_s:.1f} tok/s")
  lat = hw.ep_latency(ep_size)
  if lat:
    bl = ep.ep_tpot_bound_for(m, hw, ep_size, tokens_per_device, bandwidth=bw, latency_s=lat)
    out.append(f"  with the latency term (Insights Table 5: {lat * 1e6:g} us per all-to-all, "
               f"{round((bl.tpot_s - b.tpot_s) / lat)} per token): TPOT {bl.tpot_s * 1e3:.3f} ms, "
               f"{bl.tokens_per_s:.1f} tok/s (the paper's bound takes it as 0)")
  return out


def section_node_limited(m: ModelConfig, hw: Hardware, sample_tokens: int) -> list[str]:
  nvl = hw.scale_up_achievable or hw.scale_up_bandwidth
  ib = hw.scale_out_bandwidth
  free = node_limited.free_experts_per_node(nvl, ib)
  out = ["== Node-limited routing (V3 report §3.2.2, Insights §4.3) ==",
         f"  {m.n_routed_experts} experts on {m.n_group} nodes (1 group = 1 node), "
         f"K = {m.num_experts_per_tok}, top-{m.topk_group} nodes in this config",
         f"  {hw.name}: NVLink {nvl / 1e9:g} / IB {ib / 1e9:g} GB/s = {free:.2f} experts per node "
         f"at no extra cost -> up to M x {free:.2f} = "
         f"{node_limited.max_experts_at_equal_cost(m.topk_group, nvl, ib):.1f} experts for "
         f"M = {m.topk_group}",
         f"  {'M':>4s} {'nodes/token analytic':>21s} {'sampled (router)':>17s} "
         f"{'IB B/token FP8':>15s} {'vs free':>8s}"]
  limits = sorted(x for x in {1, 2, m.topk_group, m.n_group} if x <= m.n_group)
  if m.n_group == 1:
    out.append("  this config has one routing group: node-limited routing is off (set "
               "model.n_group to the nodes its experts span to plan it)")
  for r in node_limited.node_limit_table(m, limits, 1, sample_tokens):
    sampled = "-" if r.sampled_nodes is None else f"{r.sampled_nodes:.3f}"
    label = f"{r.max_nodes}" + ("*" if r.max_nodes == m.n_group else "")
    out.append(f"  {label:>4s} {r.analytic_nodes:21.3f} {sampled:>17s} "
               f"{r.ib_bytes_per_token:15.0f} {r.relative_to_unlimited:8.2f}")
  out.append("  * unrestricted: exact expectation n (1 - C(E - E/n, K) / C(E, K)) for a uniform "
             "K-subset; capped rows: the analytic value is the cap")
  return out


def section_memory(m: ModelConfig, mesh: dict, micro_batch: int | None, seq_len: int,
                   moment_bytes: float, zero1: bool, hw: Hardware, rules=memory.PLANNING_RULES,
                   variables=None) -> tuple[list[str], memory.MemoryPlan]:
  sizes = memory.mesh_axis_sizes(mesh)
  shards = memory.batch_shards(rules, sizes)
  micro_batch = shards if micro_batch is None else micro_batch
  opt_axes = ("data",) if zero1 and sizes.get("data", 1) > 1 else ()
  plans = {r: memory.memory_plan(m, sizes, rules, micro_batch=micro_batch, seq_len=seq_len,
                                 moment_bytes=moment_bytes, opt_shard_axes=opt_axes, remat=r,
                                 variables=variables)
           for r in ("none", "dots", "full")}
  p = plans[m.remat]
  n_dev = 1
  for v in sizes.values():
    n_dev *= v
  mesh_s = ",".join(f"{k}={v}" for k, v in sizes.items())
  which = ("sharding/rules.py" if tuple(rules) != memory.PLANNING_RULES else "codesign planning")
  out = [f"== Memory plan per device (abstract mesh, eval_shape, {which} rules; no allocation) ==",
         f"  mesh {mesh_s} ({n_dev} devices); micro-batch {micro_batch} x {seq_len} -> "
         f"{p.tokens_per_device:.0f} tokens/device; master {m.param_dtype}, activations "
         f"{m.dtype}, Adam moments {moment_bytes:g} B each" + (", ZeRO-1 over data" if opt_axes
                                                               else ""),
         f"  params {_size(p.params)}, gradients {_size(p.gradients)}, optimizer "
         f"{_size(p.optimizer)}",
         "  activations by remat: " + ", ".join(
             f"{r} {_size(q.activations)}" for r, q in plans.items()),
         f"  total with remat={m.remat}: {_size(p.total)}; with full remat "
         f"{_size(plans['full'].total)}  (HBM of {hw.name}: {hw.hbm_bytes / 1e9:.0f} GB "
         f"= {hw.hbm_bytes / GiB:.1f} GiB)"]
  if p.uneven:
    out.append(f"  warning: {len(p.uneven)} parameters have a dimension the mesh does not divide "
               f"(padded), e.g. {p.uneven[0]}")
  return out, p


def plans_by_mesh(m: ModelConfig, devices: int, user_mesh: dict | None, seq_len: int,
                  moment_bytes: float, zero1: bool, variables=None,
                  rules=memory.PLANNING_RULES) -> list[tuple[str, memory.MemoryPlan]]:
  """Full-remat plans for `devices` on the automatic FSDP + EP mesh, FSDP alone and pure data
  parallelism (plus `user_mesh`), one sequence per batch shard."""
  meshes = [("auto FSDP+EP", memory.auto_mesh(m, devices, rules)),
            ("FSDP only", {"data": 1, "fsdp": devices, "expert": 1, "tensor": 1}),
            ("data parallel", {"data": devices, "fsdp": 1, "expert": 1, "tensor": 1})]
  if user_mesh is not None:
    meshes.insert(0, ("--mesh", dict(user_mesh)))
  out = []
  for label, sizes in meshes:
    opt_axes = ("data",) if zero1 and sizes.get("data", 1) > 1 else ()
    plan = memory.memory_plan(m, sizes, rules, micro_batch=memory.batch_shards(rules, sizes),
                              seq_len=seq_len, moment_bytes=moment_bytes,
                              opt_shard_axes=opt_axes, remat="full", variables=variables)
    short = ",".join(f"{k[0]}{v}" for k, v in sizes.items())
    out.append((f"{label}\n{short}", plan))
  return out


def section_roofline(m: ModelConfig, batch: int, seq_len: int, steps: int) -> list[str]:
  r = roofline(m, batch, seq_len, measure_steps=steps)
  out = [f"== Roofline of our train step ({batch} x {seq_len} tokens) ==",
         "  FLOP check on the loop-free twin (layers unrolled, dense dispatch: XLA counts every "
         "loop body once)",
         f"  {'XLA FLOPs':>12s} {'analytic':>12s} {'XLA/analytic':>13s} {'XLA bytes':>11s} "
         f"{'FLOP/byte':>10s}",
         f"  {r.xla_flops:12.4g} {r.analytic_flops:12.4g} {r.xla_over_analytic:13.3f} "
         f"{r.xla_bytes:11.4g} {r.intensity:10.2f}",
         f"  model FLOPs per step (Table 2 method, causal, K experts): {r.model_flops:.4g}"]
  if r.step_s is not None:
    out.append(f"  configured step: XLA counts {r.step_xla_flops:.4g} FLOPs with "
               f"{r.step_while_loops} while loops counted once; measured {r.step_s * 1e3:.1f} ms "
               f"-> {r.achieved / 1e9:.2f} model GFLOP/s vs a {r.matmul_peak / 1e9:.1f} GFLOP/s "
               f"matmul measured in this run: MFU {100 * r.mfu:.1f}%")
    if r.step_temp_bytes is not None:
      out.append(f"  XLA temporaries {r.step_temp_bytes / 1e6:.1f} MB vs the analytic activation "
                 f"estimate {r.activation_estimate / 1e6:.1f} MB (remat={m.remat}; gradients, "
                 "dispatch buffers and fusion transients are not in the estimate)")
  return out
