"""All-to-all bytes of the expert-parallel MoE with and without node-limited routing (issue 5).

  python bench/bench_alltoall.py [--tokens-per-device 256] [--d-model 256] [--quick]

8 fake CPU devices, experts split over the `expert` axis. The V3 layout: 256 experts, top-8, 8
routing groups = 8 nodes (one per device here, 32 experts each), node-limited to M = 4 of 8
("Insights into DeepSeek-V3" §4.3). The same router (`deepseek_jax.router.route`, sigmoid scores,
random logits, random balancing bias) runs with topk_group = 4 and = 8 (unlimited), side by side.

Counted two ways:
- dispatch buffers (what `ragged_all_to_all` moves, and what DeepEP sends over IB): token copies,
  one per destination node, and those crossing to another node (`DispatchStats`);
- compiled HLO (what the fixed-buffer `all_to_all` moves): the summed result bytes of every
  all-to-all in one forward+backward step. Buffers are sized from the routing bound
  (capacity_factor x tokens x max nodes per token / shards, at most all tokens), so node-limited
  routing halves them at capacity_factor 1; with capacity_factor=null (exact buffers, room for
  every token everywhere) they do not shrink.
The paper's argument: a token bound for K = 8 experts on N = 8 nodes costs up to 8t over IB when
sent per node; node-limited routing caps it at Mt (M = 4), a ratio of M/N = 0.5.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deepseek_jax import router  # noqa: E402
from deepseek_jax.codesign.node_limited import expected_nodes_spanned  # noqa: E402
from deepseek_jax.config import MeshConfig, ModelConfig  # noqa: E402
from sharding import expert_parallel as ep  # noqa: E402
from sharding import hlo  # noqa: E402
from sharding import mesh as mesh_lib  # noqa: E402


def routing(cfg: ModelConfig, tokens: int, seed: int = 0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  logits = 0.5 * jax.random.normal(k1, (tokens, cfg.n_routed_experts))
  bias = 0.01 * jax.random.normal(k2, (cfg.n_routed_experts,))
  return router.route(logits, bias, cfg)


def measure(cfg: ModelConfig, mesh_cfg: MeshConfig, tokens: int, d: int, m: int,
            as_written: bool = False) -> dict:
  """Dispatch stats and HLO all-to-all bytes of one fwd+bwd step of the routed experts.

  `as_written`: count the HLO before XLA's passes (XLA:CPU moves dtype converts across the
  collectives, so its compiled program would show f32 on every wire)."""
  E = cfg.n_routed_experts
  out = routing(cfg, tokens)
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (tokens, d))
  w = [0.1 * jax.random.normal(kk, s) for kk, s in zip(k[1:], [(E, d, m), (E, d, m), (E, m, d)])]
  mesh = mesh_lib.make_mesh(mesh_cfg)
  f = ep.runner(cfg, mesh_cfg, mesh)

  def step(x, weights, *w):
    y, stats = f(x, weights, out.experts_XK, *w)
    return jnp.sum(y * y), stats

  g = jax.jit(jax.value_and_grad(step, argnums=(0, 1, 2, 3, 4), has_aux=True))
  lowered = g.lower(x, out.weights_XK, *w)
  compiled = lowered.compile()
  (_, stats), _ = compiled(x, out.weights_XK, *w)
  text = lowered.as_text(dialect="hlo") if as_written else compiled.as_text()
  a2a = hlo.collectives(text).get("all-to-all", hlo.Collective(0, 0))
  s = {k: int(v) for k, v in stats._asdict().items()}
  devices = mesh.devices.size
  return dict(
      rows_per_token=s["rows"] / tokens,
      cross_node_rows_per_token=s["cross_node_rows"] / tokens,
      max_nodes_per_token=s["max_nodes_per_token"],
      dropped_assignments=s["dropped_assignments"],
      assignments=s["assignments"],
      payload_bytes_fwd=2 * s["rows"] * d * 4,           # dispatch + combine, f32 rows
      hlo_a2a_ops=a2a.count,
      hlo_a2a_bytes_step=a2a.bytes * devices,             # all devices, forward + backward
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens-per-device", type=int, default=256)
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--moe-ffn-dim", type=int, default=32)
  ap.add_argument("--quick", action="store_true", help="64 tokens per device")
  args = ap.parse_args(argv)
  tpd = 64 if args.quick else args.tokens_per_device
  devices = jax.device_count()
  tokens = tpd * devices
  base = ModelConfig(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                     d_model=args.d_model, moe_ffn_dim=args.moe_ffn_dim)
  results = {}
  for label, topk_group in (("node_limited_M4", 4), ("unlimited", 8)):
    cfg = dataclasses.replace(base, topk_group=topk_group)
    for cap_label, cap in (("cf1.0", 1.0), ("cf1.25", 1.25), ("exact", None)):
      mesh_cfg = MeshConfig(data=1, fsdp=1, expert=devices, tensor=1, capacity_factor=cap)
      results[f"{label}/{cap_label}"] = measure(cfg, mesh_cfg, tokens, args.d_model,
                                                args.moe_ffn_dim)
  lim, unl = results["node_limited_M4/exact"], results["unlimited/exact"]   # nothing dropped
  summary = dict(
      devices=devices, tokens=tokens, experts=256, top_k=8, nodes=8, max_nodes_M=4,
      expected_nodes_unlimited_iid=expected_nodes_spanned(256, 8, 8),
      payload_ratio=lim["rows_per_token"] / unl["rows_per_token"],
      cross_node_ratio=lim["cross_node_rows_per_token"] / unl["cross_node_rows_per_token"],
      limited_vs_per_assignment=lim["rows_per_token"] / 8,
      hlo_ratio_cf1=(results["node_limited_M4/cf1.0"]["hlo_a2a_bytes_step"]
                     / results["unlimited/cf1.0"]["hlo_a2a_bytes_step"]),
      dropped_fraction_limited_cf1=(results["node_limited_M4/cf1.0"]["dropped_assignments"]
                                    / results["node_limited_M4/cf1.0"]["assignments"]),
      hlo_ratio_cf1_25=(results["node_limited_M4/cf1.25"]["hlo_a2a_bytes_step"]
                        / results["unlimited/cf1.25"]["hlo_a2a_bytes_step"]),
      hlo_ratio_exact=(results["node_limited_M4/exact"]["hlo_a2a_bytes_step"]
                       / results["unlimited/exact"]["hlo_a2a_bytes_step"]),
      paper_M_over_N=4 / 8,
  )
  # Wire formats (node-limited, exact buffers): all-to-all bytes per fwd+bwd step vs bf16.
  wires = {}
  cfg = dataclasses.replace(base, topk_group=4)
  for dispatch_dtype, combine_dtype in (("model", "model"), ("bfloat16", "bfloat16"),
                                        ("fp8", "bfloat16"), ("fp8", "logfmt10"),
                                        ("fp8", "logfmt8"), ("fp8", "fp8")):
    mesh_cfg = MeshConfig(data=1, fsdp=1, expert=devices, tensor=1,
                          dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
    r = measure(cfg, mesh_cfg, tokens, args.d_model, args.moe_ffn_dim, as_written=True)
    wires[f"{dispatch_dtype}/{combine_dtype}"] = r["hlo_a2a_bytes_step"]
  bf16 = wires["bfloat16/bfloat16"]
  summary["wire_bytes_vs_bf16"] = {k: round(v / bf16, 3) for k, v in wires.items()}
  summary["wire_note"] = ("dispatch/combine wire; dispatch = tokens out and output gradients "
                          "back to the experts, combine = outputs and input gradients home; "
                          "includes the small routing exchange (ids, weights) in the model dtype")
  print(f"{'setting':28s} {'rows/tok':>8s} {'xnode/tok':>9s} {'max nodes':>9s} "
        f"{'dropped':>8s} {'HLO a2a MB/step':>15s}")
  for k, r in results.items():
    print(f"{k:28s} {r['rows_per_token']:8.3f} {r['cross_node_rows_per_token']:9.3f} "
          f"{r['max_nodes_per_token']:9d} {r['dropped_assignments']:8d} "
          f"{r['hlo_a2a_bytes_step'] / 1e6:15.2f}")
  print(json.dumps(summary, indent=1))
  return results, summary


if __name__ == "__main__":
  main()
