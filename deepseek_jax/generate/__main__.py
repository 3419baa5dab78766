"""Command line for `python -m deepseek_jax.generate`: load a checkpoint, stream generated text.

  deepseek-jax generate --checkpoint DIR --prompt "Hello" [--prompt ...]
      [--max-new-tokens 128] [--temperature 0] [--top-k 0] [--top-p 1] [--speculative]
      [--tokenizer auto|bytes|ids|PATH/tokenizer.json] [--stop-id N ...] [--ignore-eos]
      [model.attention_impl=materialized ...]

DIR is a Hugging Face DeepSeek checkpoint directory (config.json + safetensors, FP8 included), a
train.py workdir (its newest orbax checkpoint) or one of its `checkpoints/<step>`.
Tokenizers (`deepseek_jax.tokenizer`), with `auto`: the checkpoint's `tokenizer.json`, else the
run's (its workdir's copy, else `train.tokenizer` of its config), else UTF-8 bytes for a vocabulary
of at most 256 ids beyond which nothing is guessed; or `ids` (prompts and output as comma/space
separated token ids). Text streams through the tokenizer's incremental decoder. Generation
stops at the checkpoint's `eos_token_id`, else at the tokenizer's EOS (bytes: NUL), unless
--ignore-eos. A single prompt streams; several are printed one per line when done. User errors
print one line to stderr and exit with 2. Positional `model.field=value` overrides change how the
loaded model computes (`config.cli.INFERENCE_KEYS`, listed by --help), never what it is.
"""

from __future__ import annotations

import pathlib
import sys

from deepseek_jax import errors
from deepseek_jax.config import cli
from deepseek_jax.generate.decode import Sampling, generate
from deepseek_jax.generate.load import load_for_inference, tokenizer_for
from deepseek_jax.hf import CheckpointError, HFConfigError


_tokenizer = tokenizer_for   # (tests and older callers)


def main(argv=None, prog: str = "python -m deepseek_jax.generate") -> int:
  ap = cli.parser(prog, "Generate text with a DeepSeek checkpoint.",
                  cli.INFERENCE_KEYS.__contains__,
                  title="model keys a loaded checkpoint may change (model.field=value)")
  ap.add_argument("--checkpoint", "--workdir", dest="checkpoint", required=True,
                  help="a train.py workdir, one of its checkpoints/<step>, or a HF directory")
  ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  cli.add_flag(ap, "--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  cli.add_flag(ap, "--top-k", type=int, default=0)
  cli.add_flag(ap, "--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
  ap.add_argument("--tokenizer", default="auto",
                  help="auto (the checkpoint's or the run's), bytes, ids or PATH/tokenizer.json")
  cli.add_flag(ap, "--stop-id", type=int, action="append", default=[])
  cli.add_flag(ap, "--ignore-eos", action="store_true",
                  help="do not stop at the checkpoint's eos_token_id or the tokenizer's EOS")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("overrides", nargs="*", metavar="model.field=value",
                  help="how the loaded model computes (the keys listed below)")
  args = ap.parse_intermixed_args(argv)
  try:
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    ckpt = pathlib.Path(args.checkpoint)
    cli.check_overrides(args.overrides, cli.INFERENCE_KEYS.__contains__, "generate")
    cfg, variables, info = load_for_inference(ckpt, args.dtype)
    cfg = cli.model_overrides(cfg, args.overrides, "generate")
    tok = _tokenizer(args.tokenizer, ckpt, cfg.vocab_size)
    try:
      prompts = [tok.encode(p) for p in args.prompt]
    except ValueError as e:
      raise ValueError(f"--prompt {e}") from None
    stops = list(args.stop_id)
    eos = info.get("eos_token_id", tok.eos_id)
    if not args.ignore_eos and eos is not None:
      stops += eos if isinstance(eos, list) else [eos]
    streams = [tok.decoder() for _ in prompts]
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
  errors.command(main, "python -m deepseek_jax.generate")
