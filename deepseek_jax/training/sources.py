"""Streaming corpus readers: `.txt` / `.jsonl` / Parquet files cut into pieces, and ArrayRecord.

A piece is a slice of one file that is read and tokenised on its own (bounded memory): a byte
range of a `.txt` or `.jsonl` file cut just after a newline (UTF-8 never splits there), or a row
range of a Parquet file (column "text", read through pyarrow). A `.txt` file is one document, a
`.jsonl` line or a Parquet row is one; each document is followed by the tokenizer's `eos_id`.
`pack_windows` turns the concatenated ids into windows of seq_len + 1 tokens with stride seq_len,
exactly as `data.pack` does in memory. `prepare` writes them as ArrayRecord files beside an
`index.json` (the command: `prepare.py`); `read_index` and `record_source` open them.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import pathlib
from typing import Iterable, Iterator

import grain
import numpy as np
from absl import flags as absl_flags
from array_record.python.array_record_module import ArrayRecordWriter
from grain.sources import ArrayRecordDataSource

from deepseek_jax.config import ConfigError
from deepseek_jax.tokenizer import make_tokenizer

EXTENSIONS = (".txt", ".jsonl", ".parquet")
INDEX = "index.json"
FORMAT = "deepseek-jax-tokens/1"
CHUNK_BYTES = 1 << 20          # text read per piece
SCAN = 1 << 16


def local_files(spec: str, field: str = "train.data") -> list[str]:
  """Sorted corpus files from a file, a directory (recursively) or a glob."""
  p = pathlib.Path(spec)
  if p.is_dir():
    files = [str(f) for f in p.rglob("*") if f.is_file() and f.suffix in EXTENSIONS]
  elif p.is_file():
    files = [spec]
  else:
    files = glob.glob(spec, recursive=True)
  files = sorted(f for f in files if os.path.isfile(f))
  bad = [f for f in files if not f.endswith(EXTENSIONS)]
  if not files or bad:
    raise ConfigError(f"{field}={spec!r}: " + (
        f"{bad[0]!r} is not .txt, .jsonl or .parquet" if bad else
        "matches no file" + (" (use 'stdlib', 'synthetic', a prepared directory, or "
                             ".txt/.jsonl/.parquet files)" if field == "train.data" else "")))
  return files


def _pyarrow():
  try:
    import pyarrow.parquet as pq      # optional: only Parquet corpora need it
  except ImportError:
    raise ConfigError("reading Parquet needs pyarrow: pip install pyarrow") from None
  return pq


@dataclasses.dataclass(frozen=True)
class Piece:
  """Bytes [start, stop) of a text file, or rows [start, stop) of a Parquet file."""
  path: str
  start: int
  stop: int
  ends_doc: bool = True        # .txt: the document ends here (file end or the split point)


def _align(f, pos: int, size: int) -> int:
  """The first offset >= pos that starts a line (0 and size are kept)."""
  if pos <= 0 or pos >= size:
    return min(max(pos, 0), size)
  f.seek(pos - 1)
  while True:
    block = f.read(SCAN)
    if not block:
      return size
    i = block.find(b"\n")
    if i >= 0:
      return f.tell() - len(block) + i + 1


def _size(path: str) -> int:
  """Rows of a Parquet file, bytes of a text file."""
  if path.endswith(".parquet"):
    return _pyarrow().ParquetFile(path).metadata.num_rows
  return os.path.getsize(path)


def file_pieces(path: str, lo: int = 0, hi: int | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> list[Piece]:
  """Pieces covering rows [lo, hi) of a Parquet file (one per row group), or bytes [lo, hi) of a
  text file, each boundary moved to the next line start."""
  if path.endswith(".parquet"):
    meta = _pyarrow().ParquetFile(path).metadata
    ends = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    a, b = lo, ends[-1] if hi is None else hi
    return [Piece(path, max(s, a), min(e, b)) for s, e in zip(ends[:-1].tolist(), ends[1:].tolist())
            if max(s, a) < min(e, b)]
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    a, b = _align(f, lo, size), _align(f, size if hi is None else hi, size)
    cuts = sorted({a, b} | {_align(f, x, size) for x in range(a + chunk_bytes, b, chunk_bytes)})
  cuts = [c for c in cuts if a <= c <= b]
  txt = path.endswith(".txt")
  pieces = [Piece(path, s, e, ends_doc=not txt or e == b) for s, e in zip(cuts, cuts[1:])]
  return pieces or [Piece(path, a, b)]


def _jsonl_cut(path: str, val_fraction: float) -> int:
  """The byte offset where the last ceil(val_fraction n) of the n documents start."""
  starts, pos = [], 0
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        starts.append(pos)
      pos += len(line)
  if len(starts) < 2:
    return pos
  return starts[len(starts) - max(1, math.ceil(val_fraction * len(starts)))]


def split_pieces(files: list[str], val_fraction: float,
                 chunk_bytes: int = CHUNK_BYTES) -> tuple[list[Piece], list[Piece]]:
  """(train, validation) pieces as `data.split_documents` splits: every n-th file held out; a
  single file holds out its last documents (`.jsonl` lines, Parquet rows), or for `.txt` the
  last val_fraction of its bytes, from a line start."""
  if len(files) >= 2:
    n = max(2, round(1 / val_fraction))
    val_idx = set(range(n // 2, len(files), n)) or {len(files) - 1}
    pick = lambda keep: [p for i, f in enumerate(files) if (i in val_idx) == keep
                         for p in file_pieces(f, chunk_bytes=chunk_bytes)]
    return pick(False), pick(True)
  path, n = files[0], _size(files[0])
  if path.endswith(".jsonl"):
    cut = _jsonl_cut(path, val_fraction)
  elif path.endswith(".parquet"):
    cut = n - max(1, math.ceil(val_fraction * n)) if n >= 2 else n
  else:
    cut = int(n * (1 - val_fraction))
  return file_pieces(path, 0, cut, chunk_bytes), file_pieces(path, cut, n, chunk_bytes)


def _line_of(path: str, offset: int, k: int) -> int:
  with open(path, "rb") as f:
    return f.read(offset).count(b"\n") + k + 1


def piece_documents(piece: Piece) -> list[str]:
  """The piece's documents (a `.txt` piece: its text, one part of a document)."""
  if piece.path.endswith(".parquet"):
    pq = _pyarrow()
    pf = pq.ParquetFile(piece.path)
    if "text" not in pf.schema_arrow.names:
      raise ConfigError(f"{piece.path}: no 'text' column (columns: {pf.schema_arrow.names})")
    docs, row = [], 0
    for g in range(pf.num_row_groups):
      n = pf.metadata.row_group(g).num_rows
      if row + n > piece.start and row < piece.stop:
        col = pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
        docs += col[max(piece.start - row, 0):piece.stop - row]
      row += n
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
    if bad is not None:
      raise ConfigError(f"{piece.path}: row {piece.start + bad} field 'text' must be a string")
    return docs
  with open(piece.path, "rb") as f:
    f.seek(piece.start)
    text = f.read(piece.stop - piece.start).decode("utf-8", errors="replace")
  if piece.path.endswith(".txt"):
    return [text]
  docs = []
  for k, line in enumerate(text.split("\n")):
    if not line.strip():
      continue
    try:
      doc = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ConfigError(f"{piece.path}:{_line_of(piece.path, piece.start, k)} is not a JSON "
                        "object with a 'text' string") from None
    if not isinstance(doc, str):
      raise ConfigError(f"{piece.path}:{_line_of(piece.path, piece.start, k)} field 'text' "
                        "must be a string")
    docs.append(doc)
  return docs


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
  return make_tokenizer(spec)


@dataclasses.dataclass(frozen=True)
class Tokenize:
  """Piece -> {"ids": its token ids (EOS after each document), "bytes", "hist"}; picklable,
  so grain's worker processes run it (each builds the tokenizer once)."""
  tokenizer: str
  histogram: bool = False

  def __call__(self, piece: Piece) -> dict:
    tok = _tokenizer(self.tokenizer)
    docs = piece_documents(piece)
    eos = [] if tok.eos_id is None else [tok.eos_id]
    parts = []
    for i, ids in enumerate(tok.encode_documents(docs)):
      parts.append(np.asarray(ids, np.int32))
      if eos and (piece.ends_doc or i < len(docs) - 1):
        parts.append(np.asarray(eos, np.int32))
    raw = [d.encode("utf-8") for d in docs]
    hist = np.zeros(256, np.int64)
    if self.histogram:
      for r in raw:
        hist += np.bincount(np.frombuffer(r, np.uint8), minlength=256)
    ids = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    return {"ids": ids, "bytes": sum(map(len, raw)), "hist": hist, "piece": piece}


def pack_windows(chunks: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
  """Windows [seq_len + 1] of the concatenated stream, stride seq_len (`data.pack`, streamed)."""
  buf = np.zeros((0,), np.int32)
  for ids in chunks:
    buf = np.concatenate([buf, ids])
    n = (len(buf) - 1) // seq_len
    for k in range(n):                     # views: no copy of the chunk's windows
      yield buf[k * seq_len:(k + 1) * seq_len + 1]
    buf = buf[n * seq_len:]


def read_index(directory: str, field: str = "train.data") -> dict:
  path = pathlib.Path(directory) / INDEX
  try:
    index = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{field}={directory!r}: unreadable {INDEX} ({type(e).__name__})") from None
  if index.get("format") != FORMAT:
    raise ConfigError(f"{field}={directory!r}: {INDEX} is not a {FORMAT} index")
  return index


def is_prepared(spec: str) -> bool:
  return (pathlib.Path(spec) / INDEX).is_file()


@dataclasses.dataclass(frozen=True)
class Decode:
  """An ArrayRecord record (raw token ids) -> int32 [seq_len + 1]."""
  dtype: str

  def __call__(self, record: bytes) -> np.ndarray:
    return np.frombuffer(record, self.dtype).astype(np.int32)


def record_source(directory: str, index: dict, split: str):
  """A grain random-access source of one split's windows (raw records; map `Decode` over it)."""
  files = [str(pathlib.Path(directory) / f) for f in index["splits"][split]["files"]]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise ConfigError(f"train.data={directory!r}: {missing[0]} listed in {INDEX} is missing")
  return ArrayRecordDataSource(files)


RECORDS_PER_SHARD = 1 << 16


def _pieces_ids(pieces, tokenizer: str, histogram: bool, workers: int):
  ds = grain.MapDataset.source(pieces).map(Tokenize(tokenizer, histogram))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  if workers > 0:
    if not absl_flags.FLAGS.is_parsed():      # grain's workers read absl flags: take defaults
      absl_flags.FLAGS.mark_as_parsed()
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
    for window in pack_windows(chunks(), seq_len):
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
            records_per_shard: int = RECORDS_PER_SHARD, chunk_bytes: int = CHUNK_BYTES,
            seq_field: str = "--seq-len") -> dict:
  """Tokenises `srcs` into `out`; returns the index. Raises ConfigError on bad input."""
  if seq_len < 2:
    raise ConfigError(f"{seq_field}={seq_len}: must be >= 2")
  if not 0 < val_fraction < 1:
    raise ConfigError(f"--val-fraction={val_fraction}: must lie in (0, 1)")
  if not srcs:
    raise ConfigError("no source given")
  files = sorted({f for s in srcs for f in local_files(s, field="source")})
  tok = make_tokenizer(tokenizer, field="--tokenizer")
  vocab = vocab_size or tok.vocab_size
  if not vocab:
    raise ConfigError(f"--tokenizer={tokenizer!r} has no vocabulary size; give --vocab-size")
  dtype = "<u2" if vocab <= 1 << 16 else "<i4"
  train_p, val_p = split_pieces(files, val_fraction, chunk_bytes)
  dest = pathlib.Path(out)
  dest.mkdir(parents=True, exist_ok=True)
  (dest / INDEX).unlink(missing_ok=True)       # the index is written last: a commit mark
  spec = tokenizer if tokenizer == "bytes" else os.path.abspath(tokenizer)
  splits = {name: write_split(dest, name, pieces, spec, seq_len, vocab, dtype, workers,
                              records_per_shard, seq_field)
            for name, pieces in (("train", train_p), ("val", val_p))}
  index = {"format": FORMAT, "tokenizer": spec, "vocab_size": vocab,
           "eos_id": tok.eos_id, "seq_len": seq_len, "dtype": dtype, "val_fraction": val_fraction,
           "sources": [os.path.abspath(f) for f in files], "splits": splits}
  (dest / INDEX).write_text(json.dumps(index, indent=1))
  return index
