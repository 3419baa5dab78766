"""Tokenise a corpus once into ArrayRecord files of fixed-length windows, with an `index.json`.

    python -m deepseek_jax.training.prepare --tokenizer bytes --seq-len 128 corpus/ more/*.jsonl --out data/

Sources are `.txt` / `.jsonl` / `.parquet` files, directories or globs, split into train and
validation as `data.split_documents` does (every n-th file; a single file's tail). Pieces of files
are tokenised by grain (worker processes with `--workers`), packed into windows of seq_len + 1
ids with stride seq_len, and written in order, so memory stays bounded by one piece. The index
records the format, tokenizer, vocabulary size, seq_len, the files and record counts of each
split, and the validation split's bytes and byte histogram. `train.data=DIR` trains on it.
"""

from __future__ import annotations

import argparse
import sys

from deepseek_jax.config import ConfigError
from deepseek_jax.training import sources
from deepseek_jax.training.sources import prepare

__all__ = ["main", "prepare"]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m deepseek_jax.training.prepare",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("sources", nargs="+", help=".txt/.jsonl/.parquet files, directories or globs")
  p.add_argument("--out", required=True, help="output directory (train.data=DIR reads it)")
  p.add_argument("--tokenizer", default="bytes", help="bytes | path to a HF tokenizer.json")
  p.add_argument("--seq-len", type=int, required=True, help="train.seq_len of the runs")
  p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share (files)")
  p.add_argument("--vocab-size", type=int, default=None,
                 help="refuse ids >= this (default: the tokenizer's size)")
  p.add_argument("--workers", type=int, default=0, help="tokenizing worker processes")
  args = p.parse_args(argv)
  try:
    index = prepare(args.sources, args.out, args.tokenizer, args.seq_len, args.val_fraction,
                    args.vocab_size, args.workers)
  except ConfigError as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  tr, va = index["splits"]["train"], index["splits"]["val"]
  print(f"prepared {len(index['sources'])} files into {args.out}: {tr['records']:,} train / "
        f"{va['records']:,} val windows of {args.seq_len + 1} tokens ({tr['tokens']:,} / "
        f"{va['tokens']:,} tokens, {index['tokenizer']} tokenizer, vocab {index['vocab_size']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
