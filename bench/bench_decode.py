"""Decode speed, measured side by side in one run (V3 report §2.1.1 MLA; ISCA '25 §2.1).

1. Roofline: tiny.yaml at batch 8, context 8192: the bytes one decode step must move (the latent
   cache up to the current length, its write, and the active weights, term by term) against the
   memory bandwidth measured in the same process (a jitted sum over 512 MiB), interleaved with
   the decode loop; the fraction of that roofline, per cache dtype (f32, bf16, FP8 latent).
2. FP8 / bf16 latent cache error: logits against the f32 cache (same prompt, same steps).
3. Absorbed latent cache vs per-step K/V expansion (batch 4, contexts 512, 2048, 8192).
4. Our `generate` against transformers' `generate` on the same Hugging Face checkpoint (greedy,
   same prompts and lengths; torch single-threaded as the semantics doc recommends on shared
   cores), both after a warm-up; the tokens must agree.

  python bench/bench_decode.py                                      # parts 1-3
  python bench/bench_decode.py --hf-python /tmp/hfvenv/bin/python   # and part 4

Every figure is the median of --repeats runs; absolute times on a shared CPU mean little.
"""

from __future__ import annotations

import argparse
import contextlib
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
from deepseek_jax.generate import Carry, Sampling, Tokens, decode_loop, generate  # noqa: E402
from deepseek_jax.hf import load_hf, save_hf  # noqa: E402
from deepseek_jax.kernels import cpu as cpu_kernels  # noqa: E402
from deepseek_jax.mla import FP8_LATENT  # noqa: E402
from deepseek_jax.model import Transformer, init_model_cache  # noqa: E402
from deepseek_jax.training.metrics import measure_matmul_peak  # noqa: E402

CACHE_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "fp8 latent": FP8_LATENT}

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
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "tokens": out[:, P:].tolist()}))
"""


def _state(cfg, batch: int, context: int, steps: int, dtype=None):
  """A cache of context + steps slots, every row at position `context` (the slots before hold
  zeros: the cost of a step does not depend on their values)."""
  S = -(-(context + steps + 2) // 64) * 64
  cache = {"main": init_model_cache(cfg, batch, S, dtype), "mtp": None}
  carry = Carry(jnp.ones(batch, jnp.int32), jnp.full(batch, context, jnp.int32),
                jnp.zeros(batch, bool), jnp.full(batch, 10**6, jnp.int32), jax.random.key(0),
                jnp.zeros(batch, jnp.int32), jnp.zeros((batch, 0), jnp.float32))
  zero = jnp.zeros((), jnp.int32)
  out = Tokens(jnp.zeros((batch, S), jnp.int32), jnp.zeros(batch, jnp.int32), zero, zero, zero)
  return cache, carry, out


def random_model(config: str):
  """(model config, randomly initialised variables, seed 0) of a config file; positions up to
  16384 (8192 + steps: the table is widened, a step's speed does not depend on it)."""
  cfg = load_config(config, ["model.max_position_embeddings=16384"]).model
  return cfg, flax.core.meta.unbox(
      Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


def loop_timer(cfg, variables, batch: int, context: int, steps: int, absorb=True, dtype=None,
               kernel=True):
  """A function timing `steps` decode steps in one `decode_loop` call (compiled on creation;
  `kernel=False`: XLA's blocked attention even where the CPU kernel would run)."""
  s, stop = Sampling().arrays(), jnp.full((8,), -1, jnp.int32)
  with contextlib.nullcontext() if kernel else cpu_kernels.disabled():
    jax.clear_caches()   # the choice is made when tracing: no trace of the other choice reused
    compiled = decode_loop.lower(cfg, variables, *_state(cfg, batch, context, steps, dtype), s,
                                 stop, jnp.int32(steps), absorb=absorb).compile()
  if absorb and kernel != (cpu_kernels.TARGET in compiled.as_text()) and cpu_kernels.available():
    raise AssertionError(f"the decode step {'lacks' if kernel else 'has'} the CPU kernel")

  def run() -> float:
    state = jax.block_until_ready(_state(cfg, batch, context, steps, dtype))
    t = time.perf_counter()
    jax.block_until_ready(compiled(variables, *state, s, stop, jnp.int32(steps)))
    return (time.perf_counter() - t) / steps
  return run


def bandwidth_timer(mib: int = 512):
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()

  def run() -> float:
    t = time.perf_counter()
    f(x).block_until_ready()
    return x.nbytes / (time.perf_counter() - t)
  return run


def step_flops(cfg, variables, batch: int, context: int) -> dict[str, float]:
  """FLOPs of one absorbed decode step: the attention over the latent cache (each of N heads
  scores context + 1 slots over C + R and sums C of them: 2 N (2C + R) per slot, per layer) and
  2 per active weight per token (the K of E routed experts; neither the embedding nor MTP)."""
  L, C, R, N = cfg.num_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_heads
  E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
  weights = 0.0
  for path, x in flax.traverse_util.flatten_dict(variables["params"]).items():
    if path[0] in ("mtp", "embed_tokens"):
      continue
    weights += x.size * (K / E if "/experts/" in "/".join(path) else 1.0)
  return {"attention over the cache": 2.0 * L * batch * (context + 1) * N * (2 * C + R),
          "weights": 2.0 * batch * weights}


def step_bytes(cfg, variables, batch: int, context: int, dtype=None) -> dict[str, float]:
  """Bytes one decode step must move, term by term: each row reads its cache up to its
  position (context + 1 slots) and writes one slot per layer; the weights of the main model are
  read once (the MTP module does not run), the embedding only for the batch's rows, the routed
  experts only those hit (expected count for uniform routing: E (1 - (1 - K/E)^B))."""
  L, C, R = cfg.num_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim
  c = init_model_cache(cfg, 1, 1, dtype)["moe" if cfg.num_moe_layers else "dense"]
  per_slot = C * c.latent_BSC.dtype.itemsize + R * c.rope_BSR.dtype.itemsize
  E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
  hit = E * (1 - (1 - K / E) ** batch) if E else 0
  terms = {"latent cache read": L * batch * (context + 1) * per_slot,
           "latent cache write": L * batch * per_slot}
  weights = {"embedding rows": 0.0, "attention": 0.0, "dense FFN, shared experts, router, norms": 0.0,
             f"routed experts ({hit:.1f} of {E} hit)": 0.0, "output head": 0.0}
  for path, x in flax.traverse_util.flatten_dict(variables["params"]).items():
    name = "/".join(path)
    if path[0] == "mtp":
      continue
    n = x.size * x.dtype.itemsize
    if path[0] == "embed_tokens":
      weights["embedding rows"] += n * batch / x.shape[0]
    elif "self_attn" in name:
      weights["attention"] += n
    elif "/experts/" in name:
      weights[f"routed experts ({hit:.1f} of {E} hit)"] += n * hit / E
    elif path[0] == "lm_head":
      weights["output head"] += n
    else:
      weights["dense FFN, shared experts, router, norms"] += n
  return dict(terms, **weights)


def part_roofline(cfg, variables, batch: int, context: int, steps: int, repeats: int,
                  dtypes=tuple(CACHE_DTYPES), attention=("kernel", "xla")) -> None:
  kernel = cpu_kernels.available() and jax.default_backend() == "cpu"
  attention = [a for a in attention if a == "xla" or kernel]
  print(f"# roofline: batch {batch}, context {context}, {steps} steps per loop, median of "
        f"{repeats} (each run: bandwidth, then each cache dtype and attention, interleaved); "
        f"attention: {', '.join(attention)} (kernel: the CPU kernel, kernels/cpu.py; xla: XLA's "
        "blocked loop)")
  bw, mm = bandwidth_timer(), lambda: measure_matmul_peak(sizes=(1024,), repeats=3)
  timers = {f"{k}, {a}": loop_timer(cfg, variables, batch, context, steps,
                                    dtype=CACHE_DTYPES[k], kernel=a == "kernel")
            for k in dtypes for a in attention}
  runs = {k: [] for k in ["bw", "mm", *timers]}
  bw(), mm(), [run() for run in timers.values()]   # untimed: a process's first run is slow
  for _ in range(repeats):
    runs["bw"].append(bw())
    runs["mm"].append(mm())
    for k, run in timers.items():
      runs[k].append(run())
  bandwidth = float(np.median(runs["bw"]))
  peak = float(np.median(runs["mm"]))
  flops = step_flops(cfg, variables, batch, context)
  print(f"bandwidth (jitted sum over 512 MiB, this process): {bandwidth / 1e9:.1f} GB/s; f32 "
        f"matmul peak (jitted 1024^3, best of 3 per run): {peak / 1e9:.1f} GFLOP/s")
  print(f"{sum(flops.values()) / 1e6:.1f} MFLOP per step = "
        + " + ".join(f"{name} {v / 1e6:.1f}" for name, v in flops.items())
        + f": compute bound {sum(flops.values()) / peak * 1e3:.2f} ms")
  for key in timers:
    k = key.split(",")[0]
    terms = step_bytes(cfg, variables, batch, context, CACHE_DTYPES[k])
    total = sum(terms.values())
    fractions = [total / bandwidth / t for t in runs[key]]
    # The roofline proper: the slower of moving the bytes and doing the FLOPs, each at this
    # process's measured rate (medians, as the memory roofline: an FP8 latent cache moves 4x
    # fewer cache bytes for the same FLOPs, and on a CPU its step is bound by the arithmetic).
    bound = max(total / bandwidth, sum(flops.values()) / peak)
    t = float(np.median(runs[key]))
    print(f"cache {key}: {total / 1e6:.1f} MB per step = "
          + " + ".join(f"{name} {v / 1e6:.2f}" for name, v in terms.items()))
    print(f"  step {t * 1e3:.2f} ms ({batch / t:.0f} tok/s), roofline {total / bandwidth * 1e3:.2f} "
          f"ms: {np.median(fractions):.0%} of the memory roofline (runs: "
          + ", ".join(f"{f:.0%}" for f in fractions) + "); "
          f"{np.median([bound / r for r in runs[key]]):.0%} of max(memory, compute) "
          f"({bound * 1e3:.2f} ms)",
          flush=True)


def part_cache_error(cfg, variables, steps: int = 32) -> None:
  """Logits with a bf16 / FP8-latent cache against the f32 cache, teacher-forced on one random
  sequence: the relative error max |d| / max |f32 logits| over the prompt's last token and the
  `steps` tokens after it, and how many greedy tokens agree. One cached call per dtype over the
  whole sequence: each token is written to the cache and then attends from it (in the cache's
  dtype), exactly as a prefill followed by decode steps reads it, in one compile per dtype."""
  print(f"# latent cache dtype error (prompt 64, {steps} teacher-forced steps, batch 2)")
  rng = np.random.default_rng(0)
  T = 64 + steps
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, T)), jnp.int32)
  apply = jax.jit(Transformer(cfg).apply)
  logits = {}
  for k, d in CACHE_DTYPES.items():
    out = apply(variables, tokens, cache=init_model_cache(cfg, 2, T, d))
    logits[k] = np.asarray(out.logits_BTV[:, 63:], np.float64)
  ref = logits["f32"]
  for k in ("bf16", "fp8 latent"):
    err = np.max(np.abs(logits[k] - ref)) / np.max(np.abs(ref))
    same = np.mean(np.argmax(logits[k], -1) == np.argmax(ref, -1))
    print(f"cache {k}: logits relative error {err:.2e}, greedy token agreement {same:.0%}",
          flush=True)


def part_absorb(cfg, variables, batch: int, steps: int, repeats: int) -> None:
  print(f"# absorbed latent cache vs per-step K/V expansion (batch {batch}, {steps} steps, "
        f"C={cfg.kv_lora_rank} R={cfg.qk_rope_head_dim} N={cfg.num_heads} L={cfg.num_layers})")
  for context in (512, 2048, 8192):
    a = loop_timer(cfg, variables, batch, context, steps, absorb=True)
    e = loop_timer(cfg, variables, batch, context, steps, absorb=False)
    ta, te = [], []
    for _ in range(repeats):
      ta.append(a())
      te.append(e())
    ta, te = float(np.median(ta)), float(np.median(te))
    print(f"context {context:5d}: absorbed {batch / ta:8.1f} tok/s, expanded {batch / te:8.1f} "
          f"tok/s, ratio {te / ta:5.2f}x", flush=True)


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
  a, b = n / float(np.median(times)), n / theirs["seconds"]
  same = ours.tokens == theirs["tokens"]
  print(f"{name}: ours {a:8.1f} tok/s, transformers generate {b:8.1f} tok/s, ratio {a / b:5.2f}x "
        f"(batch {len(prompts)}, {new} new tokens, medians of {repeats}, greedy tokens identical: "
        f"{same})", flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  ap.add_argument("--batch", type=int, default=8, help="rows of the roofline part")
  ap.add_argument("--context", type=int, default=8192, help="context of the roofline part")
  ap.add_argument("--steps", type=int, default=32, help="decode steps per timed loop")
  ap.add_argument("--hf-python", help="python of a venv with torch + transformers (part 4)")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--cache-dtypes", default=",".join(CACHE_DTYPES),
                  help=f"comma-separated subset of {', '.join(CACHE_DTYPES)} (roofline part)")
  ap.add_argument("--attention", default="kernel,xla",
                  help="comma-separated subset of kernel (the CPU kernel), xla (roofline part)")
  ap.add_argument("--parts", default="roofline,error,absorb",
                  help="comma-separated subset of roofline, error, absorb (and hf with --hf-python)")
  args = ap.parse_args(argv)
  parts = set(args.parts.split(",")) | ({"hf"} if args.hf_python else set())
  cfg, variables = random_model(args.config)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  if "roofline" in parts:
    part_roofline(cfg, variables, args.batch, args.context, args.steps, args.repeats,
                  args.cache_dtypes.split(","), args.attention.split(","))
  if "error" in parts:
    part_cache_error(cfg, variables)
  if "absorb" in parts:
    part_absorb(cfg, variables, 4, 16, args.repeats)
  if "hf" in parts:
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
