"""`python -m deepseek_jax.evaluate`: loss, bits per byte and perplexity of a checkpoint on text.

  deepseek-jax eval --checkpoint DIR --data FILE.txt|FILE.jsonl [--seq-len 128] [--batch-size 8]
      [--max-tokens N] [--tokenizer auto|bytes|PATH] [--dtype ...] [model.field=value ...]

DIR is a train.py workdir (or one of its checkpoints) or a Hugging Face directory; the tokenizer
is the run's (`generate.load.tokenizer_for`). A .txt file is one document, a .jsonl file holds
`{"text": ...}` documents. Each document is followed by the tokenizer's EOS as in training; the
stream is cut into sequences of seq_len + 1 tokens (the last one shorter) and every next token
is scored by the main head. Prints the mean loss in nats per token, bits per UTF-8 byte of the
documents (the sum of the losses / ln 2 / bytes) and perplexity exp(loss). Overrides change how
the loaded model computes (`config.cli.INFERENCE_KEYS`). User errors print one line and exit 2.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import errors
from deepseek_jax.config import ModelConfig, cli
from deepseek_jax.generate import load
from deepseek_jax.model import Transformer
from deepseek_jax.tokenizer import Tokenizer


def read_documents(path: pathlib.Path) -> list[str]:
  if not path.is_file():
    raise ValueError(f"--data {path}: no such file")
  text = path.read_text(encoding="utf-8", errors="replace")
  if path.suffix != ".jsonl":
    return [text]
  docs = []
  for n, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        docs.append(json.loads(line)["text"])
      except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"--data {path}:{n}: not a JSON object with a \"text\" string") from None
  return docs


def sequences(docs: list[str], tok: Tokenizer, seq_len: int, max_tokens: int = 0):
  """[N, seq_len + 1] token windows (padded with 0) and their [N, seq_len] target weights."""
  eos = [] if tok.eos_id is None else [tok.eos_id]
  stream = np.concatenate([np.asarray([*ids, *eos], np.int32)
                           for ids in tok.encode_documents(docs)] or [np.zeros(0, np.int32)])
  if max_tokens:
    stream = stream[:max_tokens + 1]
  if len(stream) < 2:
    raise ValueError("--data: fewer than 2 tokens to score")
  n = -(-(len(stream) - 1) // seq_len)
  windows = np.zeros((n, seq_len + 1), np.int32)
  weights = np.zeros((n, seq_len), np.float32)
  for i in range(n):
    part = stream[i * seq_len:(i + 1) * seq_len + 1]
    windows[i, :len(part)] = part
    weights[i, :len(part) - 1] = 1.0
  return windows, weights


def nll_sum_fn(cfg: ModelConfig):
  model = Transformer(cfg)

  @jax.jit
  def nll_sum(variables, windows_BS, weights_BT):
    out = model.apply(variables, windows_BS[:, :-1], with_mtp=False)
    logp_BTV = jax.nn.log_softmax(out.logits_BTV.astype(jnp.float32), axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, windows_BS[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(logp_BT * weights_BT)
  return nll_sum


def evaluate(cfg: ModelConfig, variables: dict, windows, weights, batch_size: int) -> float:
  """Mean next-token loss (nats) over the weighted positions."""
  nll, count = 0.0, float(weights.sum())
  fn = nll_sum_fn(cfg)
  for i in range(0, len(windows), batch_size):
    w, m = windows[i:i + batch_size], weights[i:i + batch_size]
    pad = batch_size - len(w)          # one batch shape: one compilation
    w, m = np.pad(w, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)))
    nll += float(fn(variables, w, m))
  return nll / count


def main(argv=None, prog: str = "python -m deepseek_jax.evaluate") -> int:
  ap = load.parser(prog, "Loss, bits per byte and perplexity on a text file.")
  ap.add_argument("--data", required=True, help="a .txt file (one document) or .jsonl of {text}")
  cli.add_flag(ap, "--seq-len", type=int, default=128, help="tokens of context per sequence")
  cli.add_flag(ap, "--batch-size", type=int, default=8)
  cli.add_flag(ap, "--max-tokens", type=int, default=0, help="score only the first N (0: all)")
  load.add_tokenizer_flags(ap, stops=False)
  args = load.finish_parser(ap).parse_intermixed_args(argv)
  try:   # a bad key is told before the data is read (load_model checks it again)
    cli.check_overrides(args.overrides, cli.INFERENCE_KEYS.__contains__, "eval")
    if args.seq_len < 1 or args.batch_size < 1 or args.max_tokens < 0:
      raise ValueError("--seq-len and --batch-size must be >= 1, --max-tokens >= 0")
    if args.tokenizer == "ids":
      raise ValueError("--tokenizer ids: evaluation reads text; use auto, bytes or a path")
    docs = read_documents(pathlib.Path(args.data))
    cfg, variables, _, tok = load.load_model(args, "eval")
    windows, weights = sequences(docs, tok, args.seq_len, args.max_tokens)
    if windows.max() >= cfg.vocab_size:
      raise ValueError(f"the tokenizer gives ids up to {windows.max()}, the model has "
                       f"{cfg.vocab_size}: not this model's tokenizer")
  except ValueError as e:     # ConfigError, CheckpointError and HFConfigError included
    print(f"error: {e}", file=sys.stderr)
    return 2
  loss = evaluate(cfg, variables, windows, weights, args.batch_size)
  tokens = int(weights.sum())
  scored = tokens if not args.max_tokens else None
  text = f"{args.data}: {tokens:,} tokens ({tok.name} tokenizer)"
  print(f"{text}\nloss        {loss:.4f} nats/token\nperplexity  {math.exp(min(loss, 700)):.3f}")
  if scored is not None:   # bytes of what was scored: all documents (EOS has no bytes)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"bits/byte   {loss * tokens / math.log(2) / n_bytes:.4f}")
  else:
    print("bits/byte   (not computed with --max-tokens: the scored bytes are not known)")
  return 0


if __name__ == "__main__":
  errors.command(main, "python -m deepseek_jax.evaluate")
