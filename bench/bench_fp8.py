"""FP8 emulation benchmark (V3 report §3.3): cost and accuracy, measured side by side in one run.

  python bench/bench_fp8.py                       # train-step ratio on configs/tiny.yaml + GEMMs
  python bench/bench_fp8.py --recipes deepseek_v3,rowwise --steps 8 --set model.moe_dispatch=dense
  python bench/bench_fp8.py --skip-train          # GEMM costs, SQNR and accumulation only

Reports (one JSON line at the end):
- `train`: median train-step time (CE + MTP + balance loss, AdamW) per recipe over interleaved
  steps, and its ratio to the f32 step (the issue's goal: deepseek_v3 <= 1.5);
- `gemm`: fwd+bwd time of one `fp8_dot_general` per recipe / accumulation vs an f32 dot_general;
- `sqnr_db`: y, dx, dw of each recipe against float64;
- `accumulation`: max|err| / max|ref| at K=4096 of the limited (Hopper) and promoted accumulators.
Absolute times on a shared CPU mean little; the ratios are measured in alternation.

Where the FP8 step's time went, and what brought it from 2.7x to ~1.25x f32 (tiny.yaml, 2 cores):
the routed experts used to call `fp8_dot_general` once per 32-row block and projection, so the
[E, D, M] weights were re-quantised ~143 times per layer and step (and again under remat);
`dispatch.block_swiglu` now quantises weights once per step and activations once per array, with
its own backward (`fp8/grouped.py`). The emulator multiplies dequantised f32 values
(`Format.round` via `reduce_precision`, bitwise equal to the FP8 conversion, which XLA:CPU runs in
scalar code) and `promote` no longer zero-pads slices shorter than N_C (a K of 32 cost 4x).
`--set model.moe_dispatch=dense` or `--recipes ...,tensor_current` show the remaining costs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.fp8 import (F32, GemmSpec, accumulate, fp8_dot_general, make_policy,  # noqa: E402
                              quantize)
from deepseek_jax.fp8.delayed import update_tree  # noqa: E402
from deepseek_jax.fp8.formats import E4M3  # noqa: E402
from deepseek_jax.fp8.policy import RECIPES  # noqa: E402
from deepseek_jax.fp8.scaling import Scaling  # noqa: E402
from deepseek_jax.model import Transformer  # noqa: E402
from deepseek_jax.mtp import cross_entropy, mtp_loss  # noqa: E402


def _median_ratio(fns: dict, args: dict, repeats: int) -> dict:
  """Runs each fn once to compile, then `repeats` rounds in alternation; median seconds."""
  for k, f in fns.items():
    jax.block_until_ready(f(*args[k]))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(*args[k]))
      times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}


def train_step_times(cfg, recipes, steps: int, batch: int, seq: int) -> dict:
  """Median step time per recipe ('none' = f32) on random tokens, interleaved."""
  fns, args, compile_s = {}, {}, {}
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
  for name in ["none"] + [r for r in recipes if r != "none"]:
    model = Transformer(cfg, fp8_policy=None if name == "none" else make_policy(name))
    variables = nn.unbox(model.init(jax.random.key(0), tokens[:, :-1]))
    params, router_state = variables["params"], variables["router_state"]
    state = variables.get("fp8_state")
    tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)

    def step(params, opt, fp8_state, tokens, model=model, tx=tx, router_state=router_state):
      def loss(p, s):
        v = {"params": p, "router_state": router_state}
        if s is not None:
          v["fp8_state"] = s
        out = model.apply(v, tokens[:, :-1], next_tokens_BT=tokens[:, 1:])
        w = jnp.ones(tokens[:, 1:].shape, jnp.float32)
        mtp, _ = mtp_loss(out.mtp_logits, tokens[:, 1:], w, 0.3)
        return (cross_entropy(out.logits_BTV, tokens[:, 1:], w) + mtp
                + out.aux.get("balance_loss", 0.0))
      l, (g, obs) = jax.value_and_grad(loss, argnums=(0, 1))(params, fp8_state)
      updates, opt = tx.update(g, opt, params)
      if fp8_state is not None:   # delayed scaling: roll the observed amaxes in
        fp8_state = update_tree(fp8_state, obs)
      return optax.apply_updates(params, updates), opt, fp8_state, l

    fns[name] = jax.jit(step)
    args[name] = (params, tx.init(params), state, tokens)
    t = time.perf_counter()
    jax.block_until_ready(fns[name](*args[name]))
    compile_s[name] = round(time.perf_counter() - t, 1)
  med = _median_ratio(fns, args, steps)
  return {"step_s": {k: round(v, 4) for k, v in med.items()},
          "ratio_vs_f32": {k: round(v / med["none"], 3) for k, v in med.items()},
          "compile_s": compile_s}


def gemm_times(shapes, repeats: int) -> dict:
  """fwd+bwd of one GEMM: f32 dot_general vs fp8_dot_general per spec; ratios to f32."""
  specs = {"deepseek_v3": RECIPES["deepseek_v3"], "deepseek_v3_fused": RECIPES["deepseek_v3_fused"],
           "deepseek_v3_fp8backend": GemmSpec(backend="fp8"), "rowwise": RECIPES["rowwise"]}
  out = {}
  dn = (((1,), (0,)), ((), ()))
  for M, K, N in shapes:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), jnp.float32)
    grad = lambda dot: jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(dot(a, b))), (0, 1)))
    fns = {"f32": grad(lambda a, b: jax.lax.dot_general(a, b, dn, precision="highest"))}
    for name, spec in specs.items():
      fns[name] = grad(lambda a, b, spec=spec: fp8_dot_general(a, b, dn, spec=spec))
    med = _median_ratio(fns, {k: (x, w) for k in fns}, repeats)
    out[f"{M}x{K}x{N}"] = {k: round(v / med["f32"], 3) for k, v in med.items() if k != "f32"}
  return out


def sqnr(recipes, B=4, T=256, K=1024, N=512) -> dict:
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, T, K)) * np.exp(rng.standard_normal((B, T, 1)))
  w = rng.standard_normal((K, N)) / np.sqrt(K)
  g = rng.standard_normal((B, T, N)) * 1e-6
  refs = (np.einsum("btk,kn->btn", x, w), np.einsum("btn,kn->btk", g, w),
          np.einsum("btk,btn->kn", x, g))
  dn = (((2,), (0,)), ((), ()))
  out = {}
  for name in recipes:
    spec = RECIPES[name]
    if spec is None or spec.delayed:
      continue
    f = jax.jit(lambda a, b, c, spec=spec: (lambda y, vjp: (y,) + vjp(c))(
        *jax.vjp(lambda u, v: fp8_dot_general(u, v, dn, spec=spec), a, b)))
    got = f(*(jnp.asarray(a, jnp.float32) for a in (x, w, g)))
    out[name] = [round(float(10 * np.log10(np.sum(r ** 2) / np.sum((np.asarray(y, np.float64) - r)
                                                                    ** 2))), 2)
                 for y, r in zip(got, refs)]
  return out


def accumulation_errors(K=4096, M=128, N=128) -> dict:
  rng = np.random.default_rng(0)
  qa = quantize(jnp.asarray(rng.standard_normal((1, M, K)), jnp.float32), E4M3,
                Scaling("tensor"), 2)
  qb = quantize(jnp.asarray(rng.standard_normal((1, K, N)), jnp.float32), E4M3,
                Scaling("tensor"), 1)
  exact = np.asarray(qa.dequantize(), np.float64) @ np.asarray(qb.dequantize(), np.float64)
  modes = {"limited13_rz": accumulate.limited(13, True, None),
           "limited13_rz_promote128": accumulate.limited(13, True, 128),
           "limited13_rne": accumulate.limited(13, False, None),
           "limited10_rz": accumulate.limited(10, True, None),
           "promote128_f32": accumulate.promote(128), "f32": F32}
  out = {}
  for name, mode in modes.items():
    y = np.asarray(jax.jit(accumulate.gemm, static_argnums=2)(qa, qb, mode), np.float64)
    err = np.abs(y - exact)
    out[name] = {"max_rel": float(err.max() / np.abs(exact).max()),
                 "median_elementwise_rel": float(np.median(err / np.abs(exact)))}
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  p.add_argument("--recipes", default="deepseek_v3,deepseek_v3_fused")
  p.add_argument("--steps", type=int, default=6, help="timed train steps per recipe")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--seq", type=int, default=None)
  p.add_argument("--skip-train", action="store_true")
  p.add_argument("--gemm-shapes", default="1024x256x768,4096x1024x1024,16x256x128")
  a = p.parse_args(argv)
  recipes = [r for r in a.recipes.split(",") if r]
  for r in recipes:
    if r not in RECIPES:
      p.error(f"--recipes: {r!r} is not one of {list(RECIPES)}")
  result = {"backend": jax.default_backend(), "jax": jax.__version__}
  if not a.skip_train:
    cfg = load_config(a.config, a.set)
    result["train"] = train_step_times(cfg.model, recipes, a.steps, a.batch or cfg.train.batch_size,
                                       a.seq or cfg.train.seq_len)
    print("train:", result["train"], flush=True)
  shapes = [tuple(int(v) for v in s.split("x")) for s in a.gemm_shapes.split(",") if s]
  result["gemm_ratio_vs_f32"] = gemm_times(shapes, 5)
  print("gemm:", result["gemm_ratio_vs_f32"], flush=True)
  result["sqnr_db_y_dx_dw"] = sqnr([r for r in RECIPES if r != "none"])
  result["accumulation_k4096"] = accumulation_errors()
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
