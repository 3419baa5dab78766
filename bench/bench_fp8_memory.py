"""FP8 activation caches (V3 report §3.3.3): XLA's memory accounting before and after, and the FP8
train step's time against f32, side by side in one run.

  python bench/bench_fp8_memory.py                      # configs/tiny.yaml shapes, 6 timed steps
  python bench/bench_fp8_memory.py --steps 10 --recipe deepseek_v3_fused
  python bench/bench_fp8_memory.py --skip-time          # memory only (compiles, runs nothing)
  python bench/bench_fp8_memory.py --skip-memory --runs 3   # train-step ratios, 3 runs

Three variants, each compiled here (XLA:CPU) and read from `compiled.memory_analysis()`:
- `f32`: no FP8;
- `fp8_before`: the recipe as it was: gate and up kept in the compute dtype for the SwiGLU
  backward, and the routed experts' block path caching f32 copies of FP8 values (reproduced
  below by `_F32Cache`, the test oracle of tests/fp8/test_swiglu_cache.py);
- `fp8`: the recipe now: gate and up cached as E4M3 bytes (1x128 tiles) with silu(gate) * up
  recomputed in the backward, and FP8 bytes plus scales in the block path's caches.
Temporary bytes are reported for one dense MLP's fwd+bwd, the routed experts' fwd+bwd
(`dispatch.dropless_ffn`, block path) and the whole jitted train step (CE + MTP + balance loss,
AdamW); then the median train-step time of each variant over interleaved steps, as ratios to f32
(the goal: fp8 <= 1.5x f32 on CPU). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from bench.bench_fp8 import _median_ratio  # noqa: E402
from deepseek_jax import dispatch  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.fp8 import grouped  # noqa: E402
from deepseek_jax.fp8.policy import RECIPES, Policy, make_policy  # noqa: E402
from deepseek_jax.layers import MLP, dtype_of  # noqa: E402
from deepseek_jax.model import Transformer  # noqa: E402
from deepseek_jax.mtp import cross_entropy, mtp_loss  # noqa: E402

VARIANTS = ("f32", "fp8_before", "fp8")


class _F32Cache(grouped.ExpertNumerics):
  """The former block-path cache: f32 copies of the FP8 values (4x the bytes)."""

  def fprop_x_cached(self, x):
    cache, values = super().fprop_x_cached(x)
    return (cache.dequantize() if hasattr(cache, "dequantize") else cache), values


def _without_swiglu_cache(policy: Policy) -> Policy:
  off = lambda s: s if s is None else dataclasses.replace(s, swiglu_cache=None)  # noqa: E731
  return Policy(rules=tuple((p, off(s)) for p, s in policy.rules), default=off(policy.default))


@contextlib.contextmanager
def _variant(name: str):
  """While tracing `fp8_before`, the block path builds `_F32Cache` numerics."""
  original = grouped.expert_numerics
  if name == "fp8_before":
    grouped.expert_numerics = lambda dot: (None if original(dot) is None
                                           else _F32Cache(dot.spec))
  try:
    yield
  finally:
    grouped.expert_numerics = original


def _policy(name: str, recipe: str):
  if name == "f32":
    return None
  policy = make_policy(recipe)
  return _without_swiglu_cache(policy) if name == "fp8_before" else policy


def _temp_bytes(fn, *args) -> int:
  return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def mlp_temp(cfg, recipe: str, tokens: int) -> dict:
  """Temporary bytes of one dense MLP's fwd+bwd (d_model x ffn_dim, `tokens` rows)."""
  dtype = dtype_of(cfg.dtype)
  x = jax.random.normal(jax.random.key(0), (1, tokens, cfg.d_model)).astype(dtype)
  out = {}
  for name in VARIANTS:
    model = MLP(cfg.d_model, cfg.ffn_dim, dtype=dtype, fp8_policy=_policy(name, recipe))
    variables = model.init(jax.random.key(1), x)
    loss = lambda v, x, model=model: jnp.sum(model.apply(v, x).astype(jnp.float32) ** 2)  # noqa: E731
    with _variant(name):
      out[name] = _temp_bytes(jax.grad(loss, argnums=(0, 1)), variables, x)
  return out


def experts_temp(cfg, recipe: str, tokens: int) -> dict:
  """Temporary bytes of the routed experts' fwd+bwd on the block path (E experts, top-K)."""
  dtype = dtype_of(cfg.dtype)
  E, K, D, M = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.d_model, cfg.moe_ffn_dim
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((tokens, D)), dtype)
  experts = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]),
                        jnp.int32)
  weights = jnp.asarray(rng.random((tokens, K)), jnp.float32)
  ws = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), dtype)
        for s in ((E, D, M), (E, D, M), (E, M, D))]
  out = {}
  for name in VARIANTS:
    policy = _policy(name, recipe)
    dots = None if policy is None else dispatch.ExpertDots(
        *(policy.dot_general_for(f"experts/{n}") for n in dispatch.ExpertDots._fields))

    def loss(x, wg, wu, wd, dots=dots):
      y = dispatch.dropless_ffn(x, weights, experts, wg, wu, wd, dots=dots, impl="block")
      return jnp.sum(y.astype(jnp.float32) ** 2)
    with _variant(name):
      out[name] = _temp_bytes(jax.grad(loss, argnums=(0, 1, 2, 3)), x, *ws)
  return out


def train_steps(cfg, recipe: str, batch: int, seq: int):
  """{variant: (compiled step, args)} of the tiny train step (AdamW on CE + MTP + balance)."""
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
  steps = {}
  for name in VARIANTS:
    model = Transformer(cfg, fp8_policy=_policy(name, recipe))
    variables = nn.unbox(model.init(jax.random.key(0), tokens[:, :-1]))
    params, router_state = variables["params"], variables["router_state"]
    tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)

    def step(params, opt, tokens, model=model, tx=tx, router_state=router_state):
      def loss(p):
        out = model.apply({"params": p, "router_state": router_state}, tokens[:, :-1],
                          next_tokens_BT=tokens[:, 1:])
        w = jnp.ones(tokens[:, 1:].shape, jnp.float32)
        mtp, _ = mtp_loss(out.mtp_logits, tokens[:, 1:], w, 0.3)
        return (cross_entropy(out.logits_BTV, tokens[:, 1:], w) + mtp
                + out.aux.get("balance_loss", 0.0))
      l, g = jax.value_and_grad(loss)(params)
      updates, opt = tx.update(g, opt, params)
      return optax.apply_updates(params, updates), opt, l

    args = (params, tx.init(params), tokens)
    with _variant(name):
      steps[name] = (jax.jit(step).lower(*args).compile(), args)
  return steps


def _mib(n: int) -> float:
  return round(n / 2 ** 20, 3)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  p.add_argument("--recipe", default="deepseek_v3",
                 choices=[r for r in RECIPES if r.startswith("deepseek_v3")])
  p.add_argument("--steps", type=int, default=6, help="timed train steps per variant")
  p.add_argument("--runs", type=int, default=3, help="timing runs (each --steps interleaved "
                 "steps, one ratio each), in this process")
  p.add_argument("--skip-time", action="store_true", help="memory only")
  p.add_argument("--skip-memory", action="store_true",
                 help="train-step times only (the memory of the train step is still read)")
  a = p.parse_args(argv)
  if a.steps < 1:
    p.error(f"--steps={a.steps}: must be >= 1")
  if a.runs < 1:
    p.error(f"--runs={a.runs}: must be >= 1")
  cfg = load_config(a.config, a.set)
  m, t = cfg.model, cfg.train
  tokens = t.batch_size * t.seq_len
  result = {"backend": jax.default_backend(), "jax": jax.__version__, "recipe": a.recipe,
            "config": pathlib.Path(a.config).name, "tokens_per_step": tokens}
  memory = {} if a.skip_memory else {"dense_mlp_fwd_bwd": mlp_temp(m, a.recipe, tokens),
                                      "routed_experts_fwd_bwd": experts_temp(m, a.recipe, tokens)}
  steps = train_steps(m, a.recipe, t.batch_size, t.seq_len)
  memory["train_step"] = {k: int(c.memory_analysis().temp_size_in_bytes)
                          for k, (c, _) in steps.items()}
  result["temp_bytes"] = memory
  print(f"temporary bytes (XLA memory analysis, {jax.default_backend()}), MiB; "
        f"{a.recipe} before -> after the FP8 caches:")
  for what, v in memory.items():
    print(f"  {what:24s} f32 {_mib(v['f32']):9.3f}  fp8_before {_mib(v['fp8_before']):9.3f}  "
          f"fp8 {_mib(v['fp8']):9.3f}  saved {_mib(v['fp8_before'] - v['fp8']):8.3f} "
          f"({(v['fp8_before'] - v['fp8']) / v['fp8_before']:.1%})", flush=True)
  if not a.skip_time:
    result["runs"] = []
    for i in range(a.runs):
      med = _median_ratio({k: c for k, (c, _) in steps.items()},
                          {k: args for k, (_, args) in steps.items()}, a.steps)
      run = {"step_s": {k: round(v, 4) for k, v in med.items()},
             "ratio_vs_f32": {k: round(v / med["f32"], 3) for k, v in med.items()},
             "loadavg_1m": round(os.getloadavg()[0], 2)}
      result["runs"].append(run)
      print(f"run {i + 1}: train step, median of interleaved steps (ratio to f32): "
            + ", ".join(f"{k} {v:.4f} s ({run['ratio_vs_f32'][k]:.2f}x)" for k, v in med.items())
            + f"; load average {run['loadavg_1m']}", flush=True)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
