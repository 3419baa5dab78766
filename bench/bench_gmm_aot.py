"""The routed experts' cost on an H200 and a TPU v5p, compiled here (no accelerator needed): one MoE
expert layer (`dispatch.dropless_ffn`, sorted grouped matmuls) forward + backward at E = 8 and 64.

  JAX_PLATFORMS=cpu python bench/bench_gmm_aot.py                  # X = 16384, K = 6, gmm, bf16
  JAX_PLATFORMS=cpu python bench/bench_gmm_aot.py --tokens 8192 --targets h200:1 --ragged

Issue 13: compiled FLOPs <= 1.3x the useful ones (18 A D M: three projections, forward and
backward, A = X K rows) and memory (arguments + temporaries) at E = 64 within 1.3x of E = 8.
XLA's cost analysis cannot see into kernels (custom calls), so compiled FLOPs = the matmuls XLA
itself runs (`aot.hlo`, loops by trip count) + for each kernel call 2 x rows x K x N from its
operand shapes: what a grouped kernel computes over the rows it is given (forward/dlhs: [R, K] x
[E, K, N] -> [R, N]; tgmm: [K, R] x [R, N] -> [E, K, N]). Tile padding adds at most one partial
row tile per group and call (E x 64 or 128 rows; the "tile bound" column). `--ragged` adds
`jax.lax.ragged_dot`, which XLA:GPU rewrites into a dense masked GEMM over all experts.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import dispatch  # noqa: E402
from deepseek_jax.aot import hlo, targets  # noqa: E402

KERNELS = ("mosaic_gpu", "__gpu$xla.gpu.triton", "tpu_custom_call")
ROW_TILE = {"mosaic_gpu": 64, "__gpu$xla.gpu.triton": 64, "tpu_custom_call": 128}
GiB = 1024 ** 3


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([0-9,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def kernel_flops(text: str) -> tuple[float, float, dict]:
  """(FLOPs of the grouped-matmul kernel calls from their operand shapes, the same plus one
  partial row tile per group and call, calls per target)."""
  comps, _ = hlo.parse(text)
  total, bound, calls = 0.0, 0.0, {}
  for comp in comps.values():
    for ins in comp.instrs:
      m = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
      if ins.opcode != "custom-call" or not m or not any(k in m.group(1) for k in KERNELS):
        continue
      target = next(k for k in KERNELS if k in m.group(1))
      out = _dims(ins.shape)
      mats = [_dims(comp.shape_of(o)) for o in ins.operands]
      mats = [d for d in mats if len(d) == 2]
      flops = extra = 0.0
      if len(out) == 2:          # [R, K] x [E, K, N] -> [R, N]
        R, N = out
        K = next((d[1] for d in mats if d[0] == R), 0)
        E = next((_dims(comp.shape_of(o))[0] for o in ins.operands
                  if len(_dims(comp.shape_of(o))) == 3), 0)
        flops, extra = 2.0 * R * K * N, 2.0 * E * ROW_TILE[target] * K * N
      elif len(out) == 3:        # tgmm: rows R contracted, [E, P, Q] out
        E, P, Q = out
        R = next((d[0] if d[1] == P else d[1] for d in mats if P in d), 0)
        flops, extra = 2.0 * R * P * Q, 2.0 * E * ROW_TILE[target] * P * Q
      total, bound = total + flops, bound + flops + extra
      calls[target] = calls.get(target, 0) + 1
  return total, bound, calls


def compile_layer(target_name: str, X: int, E: int, K: int, D: int, M: int, impl: str, dtype,
                  fuse: bool = True):
  """The compiled forward + backward of one expert layer on one device of the target."""
  target = targets.parse_target(target_name)
  device = targets.devices(target)[0]
  s = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ("d",)),
                                 jax.sharding.PartitionSpec())
  shapes = [((X, D), dtype), ((X, K), jnp.float32), ((X, K), jnp.int32), ((E, D, M), dtype),
            ((E, D, M), dtype), ((E, M, D), dtype), ((X, D), dtype)]
  args = [jax.ShapeDtypeStruct(sh, dt, sharding=s) for sh, dt in shapes]
  platform = target.chip.platform

  def fwd_bwd(x, w, e, wg, wu, wd, dy):
    f = lambda x, w, wg, wu, wd: dispatch.dropless_ffn(  # noqa: E731
        x, w, e, wg, wu, wd, impl=impl, platform=platform, fuse_gate_up=fuse)
    y, vjp = jax.vjp(f, x, w, wg, wu, wd)
    return y, vjp(dy)

  t = time.perf_counter()
  compiled = jax.jit(fwd_bwd).lower(*args).compile()
  return compiled, time.perf_counter() - t


def measure(target_name, X, E, K, D, M, impl, dtype, fuse=True) -> dict:
  compiled, seconds = compile_layer(target_name, X, E, K, D, M, impl, dtype, fuse)
  text = compiled.as_text()
  summary = hlo.summarize(text)
  kflops, kbound, calls = kernel_flops(text)
  mem = compiled.memory_analysis()
  useful = 18.0 * X * K * D * M
  xla_own = None
  if "tpu" in target_name:
    xla_own = (compiled.cost_analysis() or {}).get("flops")
  return dict(target=target_name, E=E, impl=impl, compile_s=seconds, xla_dots=summary.dot_flops,
              kernels=kflops, kernels_bound=kbound, calls=calls, useful=useful,
              ratio=(summary.dot_flops + kflops) / useful,
              ratio_bound=(summary.dot_flops + kbound) / useful, xla_own=xla_own,
              args=mem.argument_size_in_bytes, temps=mem.temp_size_in_bytes,
              outputs=mem.output_size_in_bytes, loops=len(summary.loops))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--experts", type=int, nargs="+", default=[64, 8])
  p.add_argument("--k", type=int, default=6)
  p.add_argument("--d", type=int, default=2048)
  p.add_argument("--m", type=int, default=1408)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--targets", nargs="+", default=["h200:1", "tpu-v5p:2x2x1"])
  p.add_argument("--ragged", action="store_true",
                 help="also jax.lax.ragged_dot at the first E (GPU targets)")
  p.add_argument("--no-fuse", action="store_true", help="gate and up as two grouped matmuls")
  a = p.parse_args(argv)
  dtype = jnp.dtype(a.dtype)
  X, K, D, M = a.tokens, a.k, a.d, a.m
  print(f"MoE expert layer fwd+bwd, X={X} tokens, K={K}, D={D}, M={M}, {a.dtype}, "
        f"{'gate, up separate' if a.no_fuse else 'gate+up fused'}; A = X K = "
        f"{X * K}; useful FLOPs 18 A D M = {18.0 * X * K * D * M / 1e12:.3f} TFLOP")
  rows = []
  for target in a.targets:
    runs = [(E, "gmm") for E in a.experts]
    if a.ragged and targets.parse_target(target).chip.platform == "gpu":
      runs.append((a.experts[0], "ragged"))
    for E, impl in runs:
      r = measure(target, X, E, K, D, M, impl, dtype, not a.no_fuse)
      rows.append(r)
      xla_own = f" (XLA:TPU's own count {r['xla_own'] / r['useful']:.3f}x)" if r["xla_own"] else ""
      print(f"{target:>14} E={E:<3} {impl:<6} compiled/useful {r['ratio']:.3f}x "
            f"(tile bound {r['ratio_bound']:.3f}x){xla_own}; XLA matmuls "
            f"{r['xla_dots'] / 1e12:.3f} + kernels {r['kernels'] / 1e12:.3f} TFLOP "
            f"{r['calls']}; args {r['args'] / GiB:.2f} GiB + temps {r['temps'] / GiB:.2f} GiB "
            f"= {(r['args'] + r['temps']) / GiB:.2f} GiB (outputs {r['outputs'] / GiB:.2f}); "
            f"while loops {r['loops']}; compile {r['compile_s']:.0f} s", flush=True)
  print("\nmemory at E=64 / E=8 (gmm):")
  for target in a.targets:
    by_e = {r["E"]: r for r in rows if r["target"] == target and r["impl"] == "gmm"}
    if 64 in by_e and 8 in by_e:
      big, small = by_e[64], by_e[8]
      total = (big["args"] + big["temps"]) / (small["args"] + small["temps"])
      print(f"{target:>14}: args+temps {total:.3f}x; temps alone "
            f"{big['temps'] / max(small['temps'], 1):.3f}x; "
            f"args {big['args'] / small['args']:.2f}x "
            f"(the weights: 3 E D M x {dtype.itemsize} B)")
  return 0 if all(math.isfinite(r["ratio"]) for r in rows) else 1


if __name__ == "__main__":
  raise SystemExit(main())
