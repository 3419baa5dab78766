"""The continuous-batching engine against static batches, side by side in one run (issue 18).

A seeded synthetic stream of requests (mixed prompt and output lengths, Poisson arrivals) is
served twice on the same model: by `Engine` (paged latent cache, requests join and leave every
step) and by static batches of `--slots` requests in arrival order through `generate` (contiguous
cache; a batch starts when its last request has arrived and the previous batch is done, and runs
until its longest request is done). Both run after a warm-up (every program compiled). Reported:
(a) every request's greedy tokens against running it alone through the engine and against its
static batch, (b) output tokens/s (--repeats engine / static pairs alternating; the pair with the
median ratio is reported, and every pair's ratio), (c) p50/p99 time per output token and to the
first token (that pair), (d) cache bytes: the paged pool's peak in use against static batching's.

  python bench/bench_engine.py [--config configs/tiny.yaml | --checkpoint DIR] [--requests 64]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.generate import generate  # noqa: E402
from deepseek_jax.generate.engine import Engine  # noqa: E402
from deepseek_jax.generate.load import load_for_inference  # noqa: E402
from deepseek_jax.generate.paged import bytes_per_token  # noqa: E402
from deepseek_jax.model import Transformer  # noqa: E402


def stream(cfg, n: int, seed: int, prompt_range, new_range, mean_gap: float):
  rs = np.random.RandomState(seed)
  prompts = [rs.randint(1, cfg.vocab_size, rs.randint(*prompt_range)).tolist() for _ in range(n)]
  news = [int(rs.randint(*new_range)) for _ in range(n)]
  arrivals = np.cumsum(rs.exponential(mean_gap, n)) - mean_gap
  return prompts, news, np.maximum(arrivals, 0.0)


def engine_kw(args, max_len: int) -> dict:
  return dict(slots=args.slots, block_size=args.block_size, prefill_chunk=args.prefill_chunk,
              max_seq_len=-(-max_len // args.block_size) * args.block_size,
              num_blocks=args.num_blocks)


def serve_engine(cfg, variables, prompts, news, arrivals, kw):
  """Submit each request at its arrival time; step while anything is in flight."""
  engine = Engine(cfg, variables, **kw)
  reqs, i, t0 = [None] * len(prompts), 0, time.perf_counter()
  while i < len(prompts) or engine.busy:
    now = time.perf_counter() - t0
    while i < len(prompts) and arrivals[i] <= now:
      reqs[i] = engine.submit(prompts[i], news[i])
      reqs[i].submitted = t0 + arrivals[i]
      i += 1
    if engine.busy:
      engine.step()
    elif i < len(prompts):
      time.sleep(max(arrivals[i] - now, 0.0))
  end = max(r.token_times[-1] for r in reqs)
  return ([r.tokens for r in reqs], [(r.submitted, r.token_times) for r in reqs], end - t0,
          engine)


def serve_static(cfg, variables, prompts, news, arrivals, batch: int):
  """Batches of `batch` in arrival order through `generate`, each run to its longest budget."""
  out, times = [None] * len(prompts), [None] * len(prompts)
  t0 = time.perf_counter()
  for lo in range(0, len(prompts), batch):
    rows = list(range(lo, min(lo + batch, len(prompts))))
    wait = arrivals[rows[-1]] - (time.perf_counter() - t0)
    if wait > 0:
      time.sleep(wait)
    stamps = {b: [] for b in rows}

    def on_tokens(row, toks, rows=rows, stamps=stamps):
      now = time.perf_counter()
      stamps[rows[row]].extend([now] * len(toks))

    g = generate(cfg, variables, [prompts[b] for b in rows], max(news[b] for b in rows),
                 on_tokens=on_tokens)
    for k, b in enumerate(rows):
      out[b] = g.tokens[k][:news[b]]
      times[b] = (t0 + arrivals[b], stamps[b][:news[b]])
  end = max(t[-1] for _, t in times)
  return out, times, end - t0


def latency(times) -> dict:
  tpot = [(t[-1] - t[0]) / (len(t) - 1) for _, t in times if len(t) > 1]
  ttft = [t[0] - s for s, t in times]
  pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3   # noqa: E731
  return {"tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
          "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  ap.add_argument("--checkpoint", default=None, help="a run or HF directory (else random init)")
  ap.add_argument("--requests", type=int, default=64)
  ap.add_argument("--slots", type=int, default=8, help="engine slots = static batch size")
  ap.add_argument("--block-size", type=int, default=16)
  ap.add_argument("--prefill-chunk", type=int, default=64)
  ap.add_argument("--num-blocks", type=int, default=None,
                  help="the engine's pool (default: every slot at the longest request)")
  ap.add_argument("--prompt-len", type=int, nargs=2, default=(8, 160), metavar=("MIN", "MAX"))
  ap.add_argument("--new-tokens", type=int, nargs=2, default=(4, 128), metavar=("MIN", "MAX"))
  ap.add_argument("--mean-gap", type=float, default=0.02, help="mean seconds between arrivals")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--skip-alone", action="store_true", help="skip (a)'s alone runs")
  ap.add_argument("--repeats", type=int, default=3,
                  help="engine / static pairs, alternating (the shared host's speed drifts)")
  args = ap.parse_args(argv)
  if args.checkpoint:
    cfg, variables, _ = load_for_inference(args.checkpoint)
    source = args.checkpoint
  else:
    cfg = load_config(args.config).model
    variables = flax.core.meta.unbox(jax.jit(Transformer(cfg).init)(
        jax.random.key(args.seed), jnp.zeros((1, 8), jnp.int32)))
    source = f"{args.config} (random init, seed {args.seed})"
  variables = jax.device_put(variables)
  prompts, news, arrivals = stream(cfg, args.requests, args.seed, args.prompt_len,
                                   args.new_tokens, args.mean_gap)
  lengths = [len(p) + n for p, n in zip(prompts, news)]
  kw = engine_kw(args, max(lengths))
  print(f"model: {source}; {args.requests} requests, prompts {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens, outputs {min(news)}-{max(news)}, arrivals over "
        f"{arrivals[-1]:.2f}s; engine {kw}; backend {jax.default_backend()}")

  # warm-up: every program of both (the static batches compile one per shape)
  serve_engine(cfg, variables, prompts[:3], [2, 2, 2], np.zeros(3), kw)
  static_warm, _, _ = serve_static(cfg, variables, prompts, news, np.zeros(len(prompts)),
                                   args.slots)
  pairs = []
  for _ in range(args.repeats):   # engine and static alternating; each pair's ratio counts
    e_run = serve_engine(cfg, variables, prompts, news, arrivals, kw)
    pairs.append((e_run, serve_static(cfg, variables, prompts, news, arrivals, args.slots)))
  ratios = [s_run[2] / e_run[2] for e_run, s_run in pairs]
  mid = int(np.argsort(ratios)[len(ratios) // 2])   # the pair with the median ratio
  (eng_tokens, eng_times, eng_s, engine), (st_tokens, st_times, st_s) = pairs[mid]
  n_out = sum(news)
  assert all(len(t) == n for t, n in zip(eng_tokens, news)), "engine budgets"
  same_static = sum(a == b for a, b in zip(eng_tokens, st_tokens))
  print(f"(a) engine == its static batch (contiguous generate): {same_static}/{len(news)}; "
        f"static run == static warm-up: {sum(a == b for a, b in zip(st_tokens, static_warm))}"
        f"/{len(news)}")
  if not args.skip_alone:
    alone = [Engine(cfg, variables, **kw).submit(p, n).result() for p, n in zip(prompts, news)]
    same_alone = sum(a == b for a, b in zip(eng_tokens, alone))
    print(f"(a) engine stream == each request alone through the engine: "
          f"{same_alone}/{len(news)}")
    assert same_alone == len(news), "a request's greedy output changed in the stream"
  print(f"(b) throughput, the median of {len(pairs)} alternating pairs: engine "
        f"{n_out / eng_s:.1f} tok/s ({eng_s:.2f}s, {engine.steps} steps), static "
        f"{n_out / st_s:.1f} tok/s ({st_s:.2f}s); engine/static = {st_s / eng_s:.2f}x ({n_out} "
        "output tokens, from the first arrival to the last token); every pair: "
        + ", ".join(f"{r:.2f}x" for r in ratios))
  assert all(p[0][0] == eng_tokens and p[1][0] == st_tokens for p in pairs), "runs differ"
  le, ls = latency(eng_times), latency(st_times)
  print("(c) per request, ms:     " + "  ".join(f"{k:>12}" for k in le))
  print("    engine             " + "  ".join(f"{v:12.1f}" for v in le.values()))
  print("    static batches     " + "  ".join(f"{v:12.1f}" for v in ls.values()))
  per_tok = bytes_per_token(cfg, engine.cache_dtype)
  peak = engine.blocks.peak_in_use * engine.block_bytes
  static_b = args.slots * max(lengths) * per_tok
  static_gen = sum(len(range(lo, min(lo + args.slots, len(news)))) *
                   _generate_len(prompts[lo:lo + args.slots], news[lo:lo + args.slots])
                   for lo in range(0, len(news), args.slots)) * per_tok / -(-len(news) //
                                                                            args.slots)
  print(f"(d) cache bytes per token (C+R)*L*dtype = {per_tok}; paged peak in use "
        f"{engine.blocks.peak_in_use} blocks x {args.block_size} tokens = {peak / 2**20:.2f} MiB "
        f"(pool allocated {engine.cache_bytes / 2**20:.2f} MiB); static batch x max length = "
        f"{args.slots} x {max(lengths)} = {static_b / 2**20:.2f} MiB (paged/static "
        f"{peak / static_b:.2f}); generate's own static batches allocate {static_gen / 2**20:.2f}"
        f" MiB on average")
  return 0


def _generate_len(prompts, news) -> int:
  """The cache length `generate` allocates for one batch (its rounding)."""
  P = max(len(p) for p in prompts)
  chunk = min(512, -(-P // 16) * 16)
  P_pad = -(-P // chunk) * chunk
  return -(-(P_pad + max(news) + 2) // 64) * 64


if __name__ == "__main__":
  raise SystemExit(main())
