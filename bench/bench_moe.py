"""MoE layer step time (forward + backward) against the number of routed experts E.

  python bench/bench_moe.py                    # E = 8, 16, 32, 64 at X = 2048 tokens, K = 4
  python bench/bench_moe.py --sweep-blocks     # also time the "block" path at fixed block sizes
  python bench/bench_moe.py --ragged           # also time jax.lax.ragged_dot (slow on CPU)

Issue 3 goals: dropless t(64)/t(8) <= 1.5 at fixed tokens and K (the dense oracle grows ~E/8),
and dropless >= 4x faster than dense at E = 64. Every variant is compiled first and then timed in
interleaved rounds (shuffled each round), so all columns see the same machine load; the table
reports medians of CPU seconds per step (process time summed over threads, robust to other jobs
on a shared machine) and of wall seconds. "floor" is one SwiGLU over X*K rows (the grouped
matmul's FLOPs without any dispatch): dropless above it pays sorting, padding, per-block overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import dispatch
from deepseek_jax.config import ModelConfig
from deepseek_jax.moe import MoE


def _moe_step(cfg, impl, block, x_BTD):
  """A jitted fwd+bwd step of the MoE layer (gradients w.r.t. all params and x)."""
  model = MoE(cfg, experts=dispatch.LocalExperts(cfg.moe_dispatch, impl, block))
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x_BTD))

  def loss(params, x_BTD):
    y_BTD, aux = model.apply({**variables, "params": params}, x_BTD)
    return jnp.mean(y_BTD * y_BTD) + aux["balance_loss"]

  step = jax.jit(jax.value_and_grad(loss, (0, 1)))
  args = (variables["params"], x_BTD)
  jax.block_until_ready(step(*args))
  return lambda: step(*args)


def _floor_step(X, K, D, M):
  """One SwiGLU over X*K rows: the dropless FLOPs with no routing or dispatch."""
  k = jax.random.split(jax.random.key(1), 4)
  x_AD = jax.random.normal(k[0], (X * K, D))
  w = (0.02 * jax.random.normal(k[1], (D, M)), 0.02 * jax.random.normal(k[2], (D, M)),
       0.02 * jax.random.normal(k[3], (M, D)))

  def loss(w, x_AD):
    y_AD = (jax.nn.silu(x_AD @ w[0]) * (x_AD @ w[1])) @ w[2]
    return jnp.mean(y_AD * y_AD)

  step = jax.jit(jax.value_and_grad(loss, (0, 1)))
  jax.block_until_ready(step(w, x_AD))
  return lambda: step(w, x_AD)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--moe-ffn-dim", type=int, default=128)
  ap.add_argument("--k", type=int, default=4)
  ap.add_argument("--experts", default="8,16,32,64")
  ap.add_argument("--shared", type=int, default=1, help="shared experts (constant cost)")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--sweep-blocks", action="store_true")
  ap.add_argument("--ragged", action="store_true")
  a = ap.parse_args()
  X, K, D, M = a.batch * a.seq, a.k, a.d_model, a.moe_ffn_dim
  experts = [int(e) for e in a.experts.split(",")]
  x_BTD = jax.random.normal(jax.random.key(2), (a.batch, a.seq, D))
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); X={X} tokens, K={K}, "
        f"D={D}, M={M}, shared experts {a.shared}; fwd+bwd per step, median of {a.rounds} "
        "interleaved rounds")

  steps = {("floor", None, None): _floor_step(X, K, D, M)}
  for E in experts:
    cfg = ModelConfig(d_model=D, n_routed_experts=E, num_experts_per_tok=K, n_group=1,
                      topk_group=1, n_shared_experts=a.shared, moe_ffn_dim=M, init_std=0.02)
    steps[("dropless", E, None)] = _moe_step(cfg, "block", None, x_BTD)
    steps[("dense", E, None)] = _moe_step(dataclasses.replace(cfg, moe_dispatch="dense"), None,
                                          None, x_BTD)
    if a.ragged:
      steps[("ragged", E, None)] = _moe_step(cfg, "ragged", None, x_BTD)
    if a.sweep_blocks:
      for U in (16, 32, 64, 128):
        steps[("block", E, U)] = _moe_step(cfg, "block", U, x_BTD)

  cpu = {key: [] for key in steps}
  wall = {key: [] for key in steps}
  order = list(steps)
  for _ in range(a.rounds):
    random.Random(_).shuffle(order)        # no variant always follows the slowest one
    for key in order:
      c0, w0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(steps[key]())
      cpu[key].append(time.process_time() - c0)
      wall[key].append(time.perf_counter() - w0)
  c = {key: statistics.median(v) * 1e3 for key, v in cpu.items()}
  w = {key: statistics.median(v) * 1e3 for key, v in wall.items()}

  print(f"\nfloor (one SwiGLU over X*K = {X * K} rows): cpu {c['floor', None, None]:.0f} ms, "
        f"wall {w['floor', None, None]:.0f} ms")
  A = X * K
  print(f"\n{'E':>4} {'block U':>8} {'dropless cpu ms':>16} {'wall ms':>8} {'dense cpu ms':>13} "
        f"{'wall ms':>8} {'dense/dropless':>15} {'dropless/floor':>15}")
  for E in experts:
    d, o = ("dropless", E, None), ("dense", E, None)
    print(f"{E:>4} {dispatch.auto_block_size(A, E):>8} {c[d]:>16.0f} {w[d]:>8.0f} {c[o]:>13.0f} "
          f"{w[o]:>8.0f} {c[o] / c[d]:>15.2f} {c[d] / c['floor', None, None]:>15.2f}")
  e0, e1 = experts[0], experts[-1]
  print(f"\nt({e1})/t({e0}) in cpu time: dropless "
        f"{c['dropless', e1, None] / c['dropless', e0, None]:.2f} (goal <= 1.5), dense "
        f"{c['dense', e1, None] / c['dense', e0, None]:.2f}")
  print(f"t({e1})/t({e0}) in wall time: dropless "
        f"{w['dropless', e1, None] / w['dropless', e0, None]:.2f}, dense "
        f"{w['dense', e1, None] / w['dense', e0, None]:.2f}")
  print(f"dense/dropless at E={e1}: cpu {c['dense', e1, None] / c['dropless', e1, None]:.2f}x, "
        f"wall {w['dense', e1, None] / w['dropless', e1, None]:.2f}x (goal >= 4)")
  if a.ragged:
    for E in experts:
      r, d = ("ragged", E, None), ("dropless", E, None)
      print(f"ragged_dot path at E={E}: cpu {c[r]:.0f} ms = {c[r] / c[d]:.1f}x the block path, "
            f"wall {w[r]:.0f} ms = {w[r] / w[d]:.1f}x (on a GPU the CPU time is the host's)")
  if a.sweep_blocks:
    print("\nblock-size sweep (cpu ms):", " ".join(f"U={U:<4}" for U in (16, 32, 64, 128)))
    for E in experts:
      print(f"  E={E:<3}", " ".join(f"{c['block', E, U]:>6.0f}" for U in (16, 32, 64, 128)),
            f"  auto U={dispatch.auto_block_size(A, E)}")


if __name__ == "__main__":
  main()
