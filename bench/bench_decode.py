"""Decode speed, measured side by side in one run (V3 report §2.1.1 MLA; ISCA '25 §2.1).

1. Absorbed latent cache vs per-step K/V expansion: the same model and cache, one decode step
   with W_UK / W_UV folded into the query and output (reads [c_KV ; k_R] directly) against one that
   re-expands K and V for every cached token through kv_b_proj, at contexts 512, 2048 and 8192.
2. Our `generate` against transformers' `generate` on the same Hugging Face checkpoint (greedy,
   same prompts and lengths; torch runs single-threaded as the semantics doc recommends on shared
   cores), both after a warm-up; the tokens must agree.

  python bench/bench_decode.py                                 # part 1 only
  python bench/bench_decode.py --hf-python /tmp/hfvenv/bin/python   # parts 1 and 2

Prints one line per measurement and the ratios; absolute times on a shared CPU mean little.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.generate import Carry, Sampling, decode_step, generate  # noqa: E402
from deepseek_jax.hf import load_hf, save_hf  # noqa: E402
from deepseek_jax.model import Transformer, init_model_cache  # noqa: E402

HF_SCRIPT = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
path, prompts = sys.argv[1], json.loads(sys.argv[2])
new, repeats = int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
P = max(len(p) for p in prompts)
ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
          pad_token_id=0, eos_token_id=None)
with torch.no_grad():
  model.generate(ids, **kw)
  times = []
  for _ in range(repeats):
    t = time.perf_counter(); out = model.generate(ids, **kw); times.append(time.perf_counter() - t)
print(json.dumps({"seconds": min(times), "tokens": out[:, P:].tolist()}))
"""


def decode_rate(cfg, variables, batch: int, context: int, steps: int, absorb: bool) -> float:
  """Tokens/s of `steps` decode steps with `context` tokens already in the cache."""
  S = context + steps + 8
  cache = {"main": init_model_cache(cfg, batch, S), "mtp": None}
  carry = Carry(jnp.ones(batch, jnp.int32), jnp.full(batch, context, jnp.int32),
                jnp.zeros(batch, bool), jnp.full(batch, 10**6, jnp.int32), jax.random.key(0),
                jnp.zeros(batch, jnp.int32), jnp.zeros((batch, 0), jnp.float32))
  s, stop = Sampling().arrays(), jnp.full((8,), -1, jnp.int32)
  for _ in range(2):  # compile + warm-up
    cache, carry, emit = decode_step(cfg, variables, cache, carry, s, stop, absorb=absorb)
  jax.block_until_ready(emit)
  t = time.perf_counter()
  for _ in range(steps):
    cache, carry, emit = decode_step(cfg, variables, cache, carry, s, stop, absorb=absorb)
  jax.block_until_ready(emit)
  return batch * steps / (time.perf_counter() - t)


def part_absorb(cfg, variables, batch: int, steps: int) -> None:
  print(f"# absorbed latent cache vs per-step K/V expansion (batch {batch}, {steps} steps, "
        f"C={cfg.kv_lora_rank} R={cfg.qk_rope_head_dim} N={cfg.num_heads} L={cfg.num_layers})")
  for context in (512, 2048, 8192):
    absorbed = decode_rate(cfg, variables, batch, context, steps, absorb=True)
    expanded = decode_rate(cfg, variables, batch, context, steps, absorb=False)
    print(f"context {context:5d}: absorbed {absorbed:8.1f} tok/s, expanded {expanded:8.1f} tok/s, "
          f"ratio {absorbed / expanded:5.2f}x", flush=True)


def part_hf(name: str, path: pathlib.Path, hf_python: str, prompts, new: int, repeats: int) -> None:
  cfg, variables = load_hf(path)
  generate(cfg, variables, prompts, new)  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    ours = generate(cfg, variables, prompts, new)
    times.append(time.perf_counter() - t)
  res = subprocess.run([hf_python, "-c", HF_SCRIPT, str(path), json.dumps(prompts), str(new),
                        str(repeats)], capture_output=True, text=True, check=False)
  if res.returncode != 0:
    print(f"{name}: transformers failed: {res.stderr.strip().splitlines()[-1]}")
    return
  theirs = json.loads(res.stdout.strip().splitlines()[-1])
  n = len(prompts) * new
  a, b = n / min(times), n / theirs["seconds"]
  same = ours.tokens == theirs["tokens"]
  print(f"{name}: ours {a:8.1f} tok/s, transformers generate {b:8.1f} tok/s, ratio {a / b:5.2f}x "
        f"(batch {len(prompts)}, {new} new tokens, greedy tokens identical: {same})", flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--hf-python", help="python of a venv with torch + transformers (part 2)")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip-absorb", action="store_true")
  args = ap.parse_args(argv)
  # Positions up to 8192 + steps: widen the table (the speed of a step does not depend on it).
  cfg = load_config(args.config, ["model.max_position_embeddings=16384"]).model
  variables = flax.core.meta.unbox(
      Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  if not args.skip_absorb:
    part_absorb(cfg, variables, args.batch, args.steps)
  if args.hf_python:
    print("# ours vs transformers generate (same checkpoint, greedy)")
    rng = np.random.default_rng(0)
    fixture = ROOT / "tests" / "fixtures" / "hf" / "v3_tiny"
    prompts = [rng.integers(3, 128, 12).tolist(), rng.integers(3, 128, 7).tolist()]
    part_hf("v3_tiny fixture (d_model 32)", fixture, args.hf_python, prompts, args.new_tokens,
            args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
      save_hf(tmp, cfg, variables)  # the project's tiny config, exported for transformers
      prompts = [rng.integers(3, cfg.vocab_size, 12).tolist(),
                 rng.integers(3, cfg.vocab_size, 7).tolist()]
      part_hf(f"{pathlib.Path(args.config).stem} config (d_model {cfg.d_model})",
              pathlib.Path(tmp), args.hf_python, prompts, args.new_tokens, args.repeats)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
