"""Command line for `python -m deepseek_jax.generate.serve`: serve prompts through the engine.

  python -m deepseek_jax.generate.serve --checkpoint DIR --prompts FILE|- [--max-new-tokens 128]
      [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--tokenizer auto|bytes|ids|PATH]
      [--stop-id N ...] [--ignore-eos] [--slots 8] [--block-size 16] [--prefill-chunk 64]
      [--max-seq-len N] [--speculative] [--format text|jsonl] [model.attention_impl=... ...]

One request per non-empty line of FILE, or of stdin (`-`), where lines are submitted as they
arrive while earlier requests decode. `--format jsonl`: each line is an object with "prompt" and
optionally "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_ids", "speculative"
(the flags are the defaults; speculation needs --speculative, which builds the drafter's cache). Output, one JSON object per line as tokens arrive: {"id", "text"} pieces, then
{"id", "done": true, "tokens", "stopped", "ttft_s", "tpot_s"}; a summary goes to stderr. Bad
input (a flag, a line, a checkpoint) prints one line to stderr and exits with 2.
"""

from __future__ import annotations

import json
import pathlib
import queue
import sys
import threading
import time

from deepseek_jax.config import cli
from deepseek_jax.generate import load
from deepseek_jax.generate.engine import Engine
from deepseek_jax.hf import CheckpointError, HFConfigError

FIELDS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
          "stop_ids": list, "speculative": bool}


def _parser(prog: str):
  ap = load.parser(prog, "Serve prompts through the continuous-batching engine.")
  ap.add_argument("--prompts", required=True, help="a file of prompts, one per line, or - (stdin)")
  ap.add_argument("--format", choices=("text", "jsonl"), default="text")
  load.add_sampling_flags(ap)
  load.add_tokenizer_flags(ap)
  ap.add_argument("--slots", type=int, default=8, help="requests decoded together")
  cli.add_flag(ap, "--block-size", type=int, default=16, help="tokens per cache block")
  cli.add_flag(ap, "--prefill-chunk", type=int, default=64, help="prompt tokens per step")
  cli.add_flag(ap, "--decode-steps", type=int, default=8,
               help="decode steps per call while no prompt is being prefilled")
  cli.add_flag(ap, "--max-seq-len", type=int, default=None,
               help="longest prompt + output (default: the model's max_position_embeddings)")
  ap.add_argument("--speculative", action="store_true",
                  help="MTP self-speculative decoding (per line in jsonl; the default here)")
  return load.finish_parser(ap)


def _lines(source: str):
  """A queue of (line number, text) from FILE or stdin, then None; read on a thread so stdin's
  requests join while others decode."""
  q: queue.Queue = queue.Queue()

  def read(stream):
    for n, line in enumerate(stream, 1):
      if line.strip():
        q.put((n, line.rstrip("\n")))
    q.put(None)

  if source == "-":
    threading.Thread(target=read, args=(sys.stdin,), daemon=True).start()
  else:
    path = pathlib.Path(source)
    if not path.is_file():
      raise ValueError(f"--prompts {source!r}: no such file (give a file or - for stdin)")
    with open(path, encoding="utf-8", errors="strict") as f:
      try:
        read(f)
      except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {source!r}: not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
  return q


def _request(n: int, line: str, fmt: str, tok, defaults: dict) -> tuple[list[int], dict]:
  """(prompt ids, submit keywords) of line n, or ValueError naming the line and the field."""
  kw = dict(defaults)
  text = line
  if fmt == "jsonl":
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"--prompts line {n}: not a JSON object ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
      raise ValueError(f"--prompts line {n}: needs a \"prompt\" string")
    for key, value in obj.items():
      if key == "prompt":
        continue
      if key not in FIELDS:
        raise ValueError(f"--prompts line {n}: unknown field {key!r} (known: prompt, "
                         f"{', '.join(FIELDS)})")
      want = FIELDS[key]
      if want is list:
        ok = isinstance(value, list) and all(type(v) is int for v in value)
      elif want is bool:
        ok = isinstance(value, bool)
      else:
        ok = isinstance(value, (int, float) if want is float else int) and type(value) is not bool
      if not ok:
        raise ValueError(f"--prompts line {n}: {key}={value!r} must be {want.__name__}")
      kw["stop" if key == "stop_ids" else key] = (
          sorted(set(kw["stop"]) | set(value)) if key == "stop_ids" else want(value))
    text = obj["prompt"]
  try:
    ids = tok.encode(text)
  except ValueError as e:
    raise ValueError(f"--prompts line {n}: {e}") from None
  return ids, kw


def _emit(obj) -> None:
  sys.stdout.write(json.dumps(obj) + "\n")
  sys.stdout.flush()


def main(argv=None, prog: str = "python -m deepseek_jax.generate.serve") -> int:
  args = _parser(prog).parse_intermixed_args(argv)
  try:
    cfg, variables, info, tok = load.load_model(args, "serve")
    stops = load.stop_ids(args, info, tok)
    engine = Engine(cfg, variables, slots=args.slots, block_size=args.block_size,
                    prefill_chunk=args.prefill_chunk, max_seq_len=args.max_seq_len,
                    speculative=args.speculative, decode_steps=args.decode_steps)
    defaults = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=sorted(set(stops)),
                    speculative=args.speculative)
    lines = _lines(args.prompts)
    live, ended, t0, total = [], False, time.perf_counter(), 0
    while not ended or live:
      while True:   # everything that has arrived; wait for a line only when idle
        try:
          item = lines.get(block=not live and not ended)
        except queue.Empty:
          break
        if item is None:
          ended = True
          break
        n, line = item
        ids, kw = _request(n, line, args.format, tok, defaults)
        if kw["speculative"] and not args.speculative:
          raise ValueError(f"--prompts line {n}: speculative=true needs --speculative (the "
                           "engine then holds the drafter's cache)")
        try:
          req = engine.submit(ids, **kw)
        except ValueError as e:
          raise ValueError(f"--prompts line {n}: {e}") from None
        live.append((req, tok.decoder(), 0))
      if not live:
        continue
      engine.step()
      still = []
      for req, decode, shown in live:
        if len(req.tokens) > shown:
          _emit({"id": req.id, "text": decode(req.tokens[shown:])})
        if req.finished:
          times = req.token_times
          tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
          _emit({"id": req.id, "done": True, "tokens": len(req.tokens), "stopped": req.stopped,
                 "ttft_s": round(times[0] - req.submitted, 4) if times else None,
                 "tpot_s": None if tpot is None else round(tpot, 5)})
          total += len(req.tokens)
        else:
          still.append((req, decode, len(req.tokens)))
      live = still
  except (CheckpointError, HFConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{total} tokens in {time.perf_counter() - t0:.2f}s over {engine.steps} engine steps; "
        f"peak cache {engine.blocks.peak_in_use} blocks of {engine.blocks.num_blocks - 1}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
