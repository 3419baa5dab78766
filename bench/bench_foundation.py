"""Foundation benchmarks: MFU, compile time vs depth, absorbed vs expanded decode, each a ratio
measured side by side in this process.

  python bench/bench_foundation.py [--config configs/tiny.yaml] [--quick]

1. Model FLOPs utilisation of tiny.yaml forward+backward against an f32 matmul peak measured here.
2. Compile time of forward+backward at 4 and at 32 layers (scanned stacks): ratio (target <= 1.5).
3. Decode at context 2048, batch 8: absorbed latent cache vs expanding K/V every step (target >= 2x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from deepseek_jax.config import load_config
from deepseek_jax.model import Transformer, init_model_cache
from deepseek_jax.training.metrics import measure_matmul_peak


def best_time(fn, *args, repeat: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def matmul_peak(n: int, dtype) -> float:
  """GFLOP/s of an n^3 matmul in `dtype` (f32: the training package's own measurement)."""
  if dtype == jnp.float32:
    return measure_matmul_peak(sizes=(n,)) / 1e9
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  return 2 * n**3 / best_time(jax.jit(lambda x, y: x @ y), a, a) / 1e9


def loss_fn(model, params, rest, tokens_BT):
  out = model.apply(dict(rest, params=params), tokens_BT)
  logp = jax.nn.log_softmax(out.logits_BTV[:, :-1])
  nll = -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)
  return jnp.mean(nll) + sum(jnp.mean(m) for m in out.mtp_logits) * 0.0


def train_mfu(cfg, batch: int, seq: int, peak: float) -> dict:
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, cfg.vocab_size)
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))
  params = variables.pop("params")
  step = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(model, p, variables, t)))
  t = best_time(step, params, tokens)
  flops = cfg.flops_per_token(seq, mtp=False) * batch * seq   # the loss ignores MTP
  return {"step_s": t, "gflops": flops / 1e9, "achieved_gflops_s": flops / t / 1e9,
          "mfu": flops / t / 1e9 / peak}


def compile_time(cfg, layers: int) -> float:
  cfg = dataclasses.replace(cfg, num_layers=layers, first_k_dense_replace=min(
      cfg.first_k_dense_replace, layers))
  model = Transformer(cfg)
  tokens = jnp.zeros((2, 32), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  shapes = nn.meta.unbox(shapes)
  params = shapes.pop("params")
  f = jax.jit(jax.value_and_grad(lambda p, r, t: loss_fn(model, p, r, t)))
  t0 = time.perf_counter()
  f.lower(params, shapes, tokens).compile()
  return time.perf_counter() - t0


def decode_ratio(cfg, batch: int, context: int) -> dict:
  cfg = dataclasses.replace(cfg, num_mtp_layers=0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, 8), 0, cfg.vocab_size)
  variables = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens))
  cache = init_model_cache(cfg, batch, context)
  # Fill the cache with random latents (a long prefill would only cost time here).
  cache = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(2), a.shape, a.dtype), cache)
  pos = jnp.full((batch, 1), context - 1, jnp.int32)
  out = {}
  for name, absorb in (("absorbed", True), ("expanded", False)):
    model = Transformer(cfg, absorb=absorb)
    step = jax.jit(lambda v, t, p, c, m=model: m.apply(v, t, positions_BT=p, cache=c).logits_BTV)
    out[name] = batch / best_time(step, variables, tokens[:, :1], pos, cache)
  out["ratio"] = out["absorbed"] / out["expanded"]
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/tiny.yaml")
  ap.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--context", type=int, default=2048)
  args = ap.parse_args()
  cfg = load_config(args.config).model
  gpu = jax.default_backend() != "cpu"
  # The peak in the model's compute dtype: f32 on CPU, bf16 (8192^3) on an accelerator.
  peak = matmul_peak(1024 if args.quick else (8192 if gpu else 2048),
                     jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32)
  batch, seq = (2, 64) if args.quick else (args.batch, args.seq)
  res = {"backend": jax.default_backend(), "matmul_peak_gflops_s": peak,
         "train_fwd_bwd": train_mfu(cfg, batch, seq, peak)}
  c4, c32 = compile_time(cfg, 4), compile_time(cfg, 8 if args.quick else 32)
  res["compile_s"] = {"layers_4": c4, "layers_32": c32, "ratio": c32 / c4}
  res["decode_b8"] = decode_ratio(cfg, 2 if args.quick else 8, 256 if args.quick else args.context)
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
