"""Command line for `python -m deepseek_jax.generate`: load a checkpoint, stream generated text.

  python -m deepseek_jax.generate --checkpoint DIR --prompt "Hello" [--prompt ...]
      [--max-new-tokens 128] [--temperature 0] [--top-k 0] [--top-p 1] [--speculative]
      [--tokenizer auto|bytes|ids|PATH/tokenizer.json] [--stop-id N ...] [--ignore-eos]

DIR is a Hugging Face DeepSeek checkpoint directory (config.json + safetensors, FP8 included) or
a train.py workdir (its newest orbax checkpoint).
Tokenizers: the checkpoint's `tokenizer.json` when present, else UTF-8 bytes (vocab >= 256), or
`ids` (prompts and output as comma/space separated token ids). A single prompt streams; several
are printed one per line when done. User errors print one line to stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import codecs
import pathlib
import sys

from deepseek_jax.generate.decode import Sampling, generate
from deepseek_jax.generate.load import load_for_inference
from deepseek_jax.hf import CheckpointError, HFConfigError


class Tokenizer:
  """encode(str) -> ids; decode_stream() -> a function ids -> new text (incremental)."""

  def __init__(self, kind: str, vocab_size: int, path: pathlib.Path | None = None):
    self.kind, self.vocab_size = kind, vocab_size
    self._tok = None
    if kind == "json":
      from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415
      self._tok = HFTokenizer.from_file(str(path))
    elif kind == "bytes" and vocab_size < 256:
      raise ValueError(f"byte tokenizer needs vocab_size >= 256, the model has {vocab_size}; "
                       "use --tokenizer ids")

  def encode(self, text: str) -> list[int]:
    if self.kind == "ids":
      try:
        return [int(t) for t in text.replace(",", " ").split()]
      except ValueError:
        raise ValueError(f"--prompt {text!r}: with --tokenizer ids give token ids such as "
                         "'1,2,3'") from None
    if self.kind == "bytes":
      return list(text.encode("utf-8"))
    return self._tok.encode(text).ids

  def decode_stream(self):
    if self.kind == "ids":
      return lambda ids: "".join(f"{t} " for t in ids)
    if self.kind == "bytes":
      dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
      return lambda ids: dec.decode(bytes(t for t in ids if t < 256))
    seen: list[int] = []
    state = {"text": ""}

    def step(ids):
      seen.extend(ids)
      text = self._tok.decode(seen)
      new, state["text"] = text[len(state["text"]):], text
      return new
    return step


def _tokenizer(arg: str, ckpt: pathlib.Path, vocab: int) -> Tokenizer:
  if arg == "auto":
    if (ckpt / "tokenizer.json").is_file():
      return Tokenizer("json", vocab, ckpt / "tokenizer.json")
    return Tokenizer("bytes" if vocab >= 256 else "ids", vocab)
  if arg in ("bytes", "ids"):
    return Tokenizer(arg, vocab)
  path = pathlib.Path(arg)
  if not path.is_file():
    raise ValueError(f"--tokenizer {arg!r}: not 'auto', 'bytes', 'ids' or a tokenizer.json file")
  return Tokenizer("json", vocab, path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m deepseek_jax.generate",
                               description="Generate text with a DeepSeek checkpoint.")
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
  ap.add_argument("--tokenizer", default="auto")
  ap.add_argument("--stop-id", type=int, action="append", default=[])
  ap.add_argument("--ignore-eos", action="store_true", help="do not stop at config eos_token_id")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = ap.parse_args(argv)
  try:
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    ckpt = pathlib.Path(args.checkpoint)
    cfg, variables, info = load_for_inference(ckpt, args.dtype)
    tok = _tokenizer(args.tokenizer, ckpt, cfg.vocab_size)
    prompts = [tok.encode(p) for p in args.prompt]
    stops = list(args.stop_id)
    eos = info.get("eos_token_id")
    if not args.ignore_eos and eos is not None:
      stops += eos if isinstance(eos, list) else [eos]
    streams = [tok.decode_stream() for _ in prompts]
    texts = [""] * len(prompts)

    def on_tokens(row, ids):
      piece = streams[row](ids)
      texts[row] += piece
      if len(prompts) == 1:
        sys.stdout.write(piece)
        sys.stdout.flush()

    g = generate(cfg, variables, prompts, args.max_new_tokens, sampling, stops, args.seed,
                 args.speculative, on_tokens=on_tokens)
  except (CheckpointError, HFConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if len(prompts) == 1:
    print()
  else:
    for t in texts:
      print(t.replace("\n", "\\n"))
  n = sum(len(t) for t in g.tokens)
  stats = f"{n} tokens in {g.decode_s:.2f}s after a {g.prefill_s:.2f}s prefill"
  if args.speculative:
    stats += f"; MTP acceptance {g.acceptance:.1%} ({g.accepted}/{g.drafted})"
  print(stats, file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
