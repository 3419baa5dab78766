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

import sys

from deepseek_jax import errors
from deepseek_jax.generate import load
from deepseek_jax.generate.decode import Sampling, generate
from deepseek_jax.hf import CheckpointError, HFConfigError


_tokenizer = load.tokenizer_for   # (tests and older callers)


def main(argv=None, prog: str = "python -m deepseek_jax.generate") -> int:
  ap = load.parser(prog, "Generate text with a DeepSeek checkpoint.")
  ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  load.add_sampling_flags(ap)
  ap.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
  load.add_tokenizer_flags(
      ap, ignore_eos_help="do not stop at the checkpoint's eos_token_id or the tokenizer's EOS")
  args = load.finish_parser(ap).parse_intermixed_args(argv)
  try:
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    cfg, variables, info, tok = load.load_model(args, "generate")
    try:
      prompts = [tok.encode(p) for p in args.prompt]
    except ValueError as e:
      raise ValueError(f"--prompt {e}") from None
    stops = load.stop_ids(args, info, tok)
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
