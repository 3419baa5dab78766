"""Temporaries of one MLA layer, forward + backward, by attention implementation (issue 13).

XLA's own memory analysis (`compiled.memory_analysis().temp_size_in_bytes`) of the gradient of one
MLA layer at B=1 and T = 1k, 2k, 4k with the dimensions of configs/small.yaml: materialized vs
blockwise on this CPU, and the fused kernels compiled ahead of time for one H200 (cuDNN) and one
TPU v5p chip (splash attention) when their compilers are installed. Nothing runs; only compiles.

  python bench/bench_attention_memory.py
  python bench/bench_attention_memory.py --seq 1024,2048 --targets cpu,h200 model.num_heads=8
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")             # compile for targets that are not here
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepseek_jax.aot import targets  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.mla import MLA  # noqa: E402

MiB = 1024 ** 2
# (label, target for `targets.parse_target` or None for this host, attention_impl)
RUNS = {"cpu": [("cpu materialized", None, "materialized"), ("cpu blockwise", None, "blockwise")],
        "h200": [("H200 fused (cuDNN)", "h200:1", "fused")],
        "v5p": [("v5p fused (splash)", "tpu-v5p:2x2x1", "fused")]}


def layer_grad(cfg):
  """(params, x, positions) -> d(sum out^2)/d(params, x): one MLA layer's forward and backward."""
  mla = MLA(cfg)

  def loss(params, x_BTD, positions_BT):
    out_BTD, _ = mla.apply({"params": params}, x_BTD, positions_BT)
    return jnp.sum(jnp.square(out_BTD.astype(jnp.float32)))

  return mla, jax.grad(loss, argnums=(0, 1))


def compile_layer(cfg, T: int, device=None):
  """The compiled gradient of one layer at B=1, T tokens, on `device` (None: this host)."""
  mla, grad = layer_grad(cfg)
  x = jax.ShapeDtypeStruct((1, T, cfg.d_model), jnp.dtype(cfg.dtype))
  pos = jax.ShapeDtypeStruct((1, T), jnp.int32)
  params = flax.core.meta.unbox(jax.eval_shape(mla.init, jax.random.key(0), x, pos))["params"]
  args = (params, x, pos)
  if device is not None:
    s = NamedSharding(Mesh(np.array([device]), ("d",)), P())
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), args)
  return jax.jit(grad).lower(*args).compile()


def kernels(compiled) -> str:
  """Custom calls in the optimized HLO (cuDNN, Mosaic): the fused kernels that ran."""
  names = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
  found = sorted({n for n in names if "cudnn" in n or "tpu_custom_call" in n})
  return ", ".join(found) or "-"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
  ap.add_argument("--seq", default="1024,2048,4096", help="comma-separated T values")
  ap.add_argument("--targets", default="cpu,h200,v5p", help=f"any of {', '.join(RUNS)}")
  ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_heads=8")
  args = ap.parse_args(argv)
  seqs = [int(t) for t in args.seq.split(",")]
  base = load_config(args.config, args.overrides).model
  print(f"one MLA layer fwd+bwd, B=1, {base.dtype}: D={base.d_model} N={base.num_heads} "
        f"H={base.qk_nope_head_dim} R={base.qk_rope_head_dim} J={base.v_head_dim} "
        f"C={base.kv_lora_rank}; attention_block={base.attention_block}")
  header = f"{'implementation':<22}" + "".join(f"{'T=' + str(t):>12}" for t in seqs)
  print(header + f"{'per 2x T':>10}  kernels")
  for name in args.targets.split(","):
    for label, target, impl in RUNS[name]:
      device, platform = None, "cpu"
      if target is not None:
        t = targets.parse_target(target)
        try:
          device = targets.devices(t)[0]
        except targets.TargetError as e:
          print(f"{label:<22}skipped: {e}")
          continue
        platform = t.chip.platform
      cfg = dataclasses.replace(base.resolved(platform), attention_impl=impl)
      temps, names, start = [], "-", time.perf_counter()
      for T in seqs:
        compiled = compile_layer(cfg, T, device)
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
        names = kernels(compiled)
      growth = [b / a for a, b in zip(temps, temps[1:]) if a > 0]
      row = f"{label:<22}" + "".join(f"{b / MiB:>9.1f} MiB" for b in temps)
      row += f"{max(growth, default=float('nan')):>9.2f}x  {names}"
      print(row + f"  ({time.perf_counter() - start:.0f} s to compile)", flush=True)


if __name__ == "__main__":
  main()
