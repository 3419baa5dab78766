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
import json
import os
import pathlib
import sys

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from deepseek_jax.config import ConfigError
from deepseek_jax.tokenizer import make_tokenizer
from deepseek_jax.training import sources

RECORDS_PER_SHARD = 1 << 16


def _pieces_ids(pieces, tokenizer: str, histogram: bool, workers: int):
  ds = grain.MapDataset.source(pieces).map(sources.Tokenize(tokenizer, histogram))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


def write_split(out: pathlib.Path, split: str, pieces, tokenizer: str, seq_len: int,
                vocab_size: int, dtype: str, workers: int = 0,
                records_per_shard: int = RECORDS_PER_SHARD, seq_field: str = "--seq-len") -> dict:
  """Writes `split-NNNNN.array_record` files; returns the split's index entry."""
  stats = {"files": [], "records": 0, "tokens": 0, "bytes": 0, "hist": np.zeros(256, np.int64)}
  writer = None

  def chunks():
    for r in _pieces_ids(pieces, tokenizer, split == "val", workers):
      ids = r["ids"]
      if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise ConfigError(f"{r['piece'].path}: token id {bad} lies outside the vocabulary "
                          f"[0, {vocab_size}) (set --vocab-size to the model's)")
      stats["tokens"] += ids.size
      stats["bytes"] += r["bytes"]
      stats["hist"] += r["hist"]
      yield ids

  try:
    for window in sources.pack_windows(chunks(), seq_len):
      if stats["records"] % records_per_shard == 0:
        if writer is not None:
          writer.close()
        name = f"{split}-{len(stats['files']):05d}.array_record"
        stats["files"].append(name)
        writer = ArrayRecordWriter(str(out / name), "group_size:1")
      writer.write(window.astype(dtype).tobytes())
      stats["records"] += 1
  finally:
    if writer is not None:
      writer.close()
  if stats["records"] == 0:
    raise ConfigError(f"the {split} split holds {stats['tokens']} tokens, too few for one "
                      f"window of seq_len + 1 = {seq_len + 1}; use more data or a shorter "
                      f"{seq_field}")
  stats["hist"] = stats["hist"].tolist() if split == "val" else None
  return stats


def prepare(srcs: list[str], out: str, tokenizer: str = "bytes", seq_len: int = 128,
            val_fraction: float = 0.05, vocab_size: int | None = None, workers: int = 0,
            records_per_shard: int = RECORDS_PER_SHARD, chunk_bytes: int = sources.CHUNK_BYTES,
            seq_field: str = "--seq-len") -> dict:
  """Tokenises `srcs` into `out`; returns the index. Raises ConfigError on bad input."""
  if seq_len < 2:
    raise ConfigError(f"{seq_field}={seq_len}: must be >= 2")
  if not 0 < val_fraction < 1:
    raise ConfigError(f"--val-fraction={val_fraction}: must lie in (0, 1)")
  if not srcs:
    raise ConfigError("no source given")
  files = sorted({f for s in srcs for f in sources.local_files(s, field="source")})
  tok = make_tokenizer(tokenizer, field="--tokenizer")
  vocab = vocab_size or tok.vocab_size
  if not vocab:
    raise ConfigError(f"--tokenizer={tokenizer!r} has no vocabulary size; give --vocab-size")
  dtype = "<u2" if vocab <= 1 << 16 else "<i4"
  train_p, val_p = sources.split_pieces(files, val_fraction, chunk_bytes)
  dest = pathlib.Path(out)
  dest.mkdir(parents=True, exist_ok=True)
  (dest / sources.INDEX).unlink(missing_ok=True)       # the index is written last: a commit mark
  spec = tokenizer if tokenizer == "bytes" else os.path.abspath(tokenizer)
  splits = {name: write_split(dest, name, pieces, spec, seq_len, vocab, dtype, workers,
                              records_per_shard, seq_field)
            for name, pieces in (("train", train_p), ("val", val_p))}
  index = {"format": sources.FORMAT, "tokenizer": spec, "vocab_size": vocab,
           "eos_id": tok.eos_id, "seq_len": seq_len, "dtype": dtype, "val_fraction": val_fraction,
           "sources": [os.path.abspath(f) for f in files], "splits": splits}
  (dest / sources.INDEX).write_text(json.dumps(index, indent=1))
  return index


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
