"""Tokenise a corpus once into ArrayRecord files of fixed-length windows, with an `index.json`.

    deepseek-jax prepare --tokenizer bytes --seq-len 128 corpus/ more/*.jsonl --out data/
    deepseek-jax prepare --config configs/tiny.yaml corpus/ --out data/ train.seq_len=256

Sources are `.txt` / `.jsonl` / `.parquet` files, directories or globs, split into train and
validation as `data.split_documents` does (every n-th file; a single file's tail). Pieces of files
are tokenised by grain (worker processes with `--workers`), packed into windows of seq_len + 1
ids with stride seq_len, and written in order, so memory stays bounded by one piece. The index
records the format, tokenizer, vocabulary size, seq_len, the files and record counts of each
split, and the validation split's bytes and byte histogram. `train.data=DIR` trains on it.
With `--config` or `section.field=value` arguments (told from sources by the `=` after a dotted
key), the unset flags come from the config: `train.tokenizer`, `train.seq_len`,
`train.val_fraction`, `train.data_workers` and `model.vocab_size` (tiny.yaml's without --config).
"""

from __future__ import annotations

import re
import sys

from deepseek_jax import errors
from deepseek_jax.config import ConfigError, cli, load_config
from deepseek_jax.training import sources
from deepseek_jax.training.sources import prepare

__all__ = ["main", "prepare"]
# The config keys prepare reads, and the flag each one fills.
KEYS = {"train.tokenizer": "tokenizer", "train.seq_len": "seq_len",
        "train.val_fraction": "val_fraction", "train.data_workers": "workers",
        "model.vocab_size": "vocab_size"}
_OVERRIDE = re.compile(r"[a-z_0-9]+(\.[a-z_0-9]+)+=")


def main(argv: list[str] | None = None,
         prog: str = "python -m deepseek_jax.training.prepare") -> int:
  p = cli.parser(prog, __doc__.split("\n\n")[0], KEYS.__contains__,
                 config="a YAML config whose keys below fill the flags not given (tiny.yaml "
                        "when only overrides are given)",
                 overrides=False)
  p.add_argument("sources", nargs="+", help=".txt/.jsonl/.parquet files, directories or globs, "
                 "and section.field=value overrides of the keys below")
  p.add_argument("--out", required=True, help="output directory (train.data=DIR reads it)")
  p.add_argument("--tokenizer", help="bytes (default) | path to a HF tokenizer.json")
  cli.add_flag(p, "--seq-len", type=int, help="train.seq_len of the runs (required without a "
                                              "config)")
  cli.add_flag(p, "--val-fraction", type=float, help="held-out share (files; default 0.05)")
  cli.add_flag(p, "--vocab-size", type=int,
               help="refuse ids >= this (default: the tokenizer's size)")
  p.add_argument("--workers", type=int, help="tokenizing worker processes (default 0)")
  args = p.parse_intermixed_args(argv)
  args.overrides = [s for s in args.sources if _OVERRIDE.match(s)]
  args.sources = [s for s in args.sources if not _OVERRIDE.match(s)]
  try:
    cli.check_overrides(args.overrides, KEYS.__contains__, "prepare")
    if args.config or args.overrides:
      cfg = load_config(args.config or cli.config_path("tiny"), args.overrides)
      for key, dest in KEYS.items():
        if getattr(args, dest) is None:
          section, name = key.split(".")
          setattr(args, dest, getattr(getattr(cfg, section), name))
    if not args.sources:
      raise ConfigError("no sources: give .txt/.jsonl/.parquet files, directories or globs")
    if args.seq_len is None:
      raise ConfigError("--seq-len: required (or --config / train.seq_len=N)")
    index = prepare(args.sources, args.out, args.tokenizer or "bytes", args.seq_len,
                    0.05 if args.val_fraction is None else args.val_fraction,
                    args.vocab_size, args.workers or 0)
  except ConfigError as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  tr, va = index["splits"]["train"], index["splits"]["val"]
  print(f"prepared {len(index['sources'])} files into {args.out}: {tr['records']:,} train / "
        f"{va['records']:,} val windows of {args.seq_len + 1} tokens ({tr['tokens']:,} / "
        f"{va['tokens']:,} tokens, {index['tokenizer']} tokenizer, vocab {index['vocab_size']})")
  return 0


if __name__ == "__main__":
  errors.command(main, "python -m deepseek_jax.training.prepare")
