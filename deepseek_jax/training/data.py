"""The data pipeline: documents -> tokens -> packed sequences -> batches (V3 report §4.1).

Sources (`train.data`): `stdlib` (default, no download: the `.py` files at the top of this Python's
standard library, sorted by name, read into memory), `synthetic` (uniform random tokens), a
directory written by `prepare.py` (ArrayRecord windows + `index.json`), or local `.txt` / `.jsonl`
(field "text") / `.parquet` (column "text") files given as a file, a directory or a glob, which
are prepared once, streaming, into a cache (`DEEPSEEK_JAX_DATA_CACHE`, default
~/.cache/deepseek-jax/data) and then read like a prepared directory. Validation: every n-th file
(n = 1 / val_fraction); a single file holds out its tail.

Each document is followed by the tokenizer's `eos_id` and the stream is packed into windows of
seq_len + 1 tokens without cross-document masking, as V3 does. Order: the windows shuffled from
the seed (grain `MapDataset`), global batch i = elements [i B, (i + 1) B), so batch i is a pure
function of (seed, i) and the checkpointable position is one integer, `TrainState.data_position`.
A process given `rows` reads only those rows of each batch. `train_batch` reads through a grain
loader (prefetch threads, `workers` processes) while positions come in order.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import pathlib
import shutil
import socket
import sys
import sysconfig

import grain
from absl import flags as absl_flags
import numpy as np

from deepseek_jax.config import Config, ConfigError
from deepseek_jax.tokenizer import Tokenizer, make_tokenizer
from deepseek_jax.training import sources

EXTENSIONS = sources.EXTENSIONS
CACHE_ENV = "DEEPSEEK_JAX_DATA_CACHE"


def stdlib_files() -> list[str]:
  """The embedded corpus: this Python's top-level standard-library `.py` files, sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "*.py")))
  if len(files) < 2:
    raise ConfigError(f"train.data='stdlib': found {len(files)} .py files under {root}; "
                      "point train.data at local .txt/.jsonl files instead")
  return files


def local_files(spec: str) -> list[str]:
  return sources.local_files(spec)


def read_documents(path: str) -> list[str]:
  text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
  if not path.endswith(".jsonl"):
    return [text]
  docs = []
  for i, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      docs.append(json.loads(line)["text"])
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ConfigError(f"train.data: {path}:{i} is not a JSON object with a 'text' "
                        "string") from None
    if not isinstance(docs[-1], str):
      raise ConfigError(f"train.data: {path}:{i} field 'text' must be a string")
  return docs


def split_documents(files: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """(train, validation) documents: every n-th file held out, or a single file's tail."""
  if len(files) >= 2:
    n = max(2, round(1 / val_fraction))
    val_idx = set(range(n // 2, len(files), n)) or {len(files) - 1}
    train = [d for i, f in enumerate(files) if i not in val_idx for d in read_documents(f)]
    val = [d for i, f in enumerate(files) if i in val_idx for d in read_documents(f)]
    return train, val
  docs = read_documents(files[0])
  if len(docs) >= 2:
    cut = len(docs) - max(1, math.ceil(val_fraction * len(docs)))
    return docs[:cut], docs[cut:]
  text = docs[0] if docs else ""
  cut = int(len(text) * (1 - val_fraction))
  return [text[:cut]], [text[cut:]]


def token_stream(docs: list[str], tok: Tokenizer) -> np.ndarray:
  """The documents' ids, each followed by `tok.eos_id` (when the tokenizer has one)."""
  parts = []
  for ids in tok.encode_documents(docs):
    parts.append(ids)
    if tok.eos_id is not None:
      parts.append(np.asarray([tok.eos_id], np.int32))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
  """JAX gathers clamp out-of-range ids silently; refuse them here instead."""
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    bad = int(tokens.max() if tokens.max() >= vocab_size else tokens.min())
    raise ConfigError(f"model.vocab_size={vocab_size}: {where}: token id {bad} lies outside the "
                      f"model vocabulary [0, {vocab_size}); the tokenizer and model.vocab_size "
                      "disagree")


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """[n, seq_len + 1] windows of the stream (inputs = [:, :-1], targets = [:, 1:])."""
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise ConfigError(f"train.seq_len={seq_len}: the split holds {len(stream)} tokens, too few "
                      "for one sequence; use more data or a shorter seq_len")
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[idx]


def unigram_entropy_bits(docs: list[str]) -> float:
  """Entropy of the byte distribution of `docs` (bits per byte): the unigram baseline."""
  counts = np.zeros(256, np.int64)
  for d in docs:
    counts += np.bincount(np.frombuffer(d.encode("utf-8"), np.uint8), minlength=256)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def _as_batch(window: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": window[:-1], "targets": window[1:]}


@dataclasses.dataclass(frozen=True)
class Rows:
  """Batch i -> rows [lo, hi) of global batch i, i.e. windows i B + lo .. i B + hi - 1 of `seqs`
  (picklable: grain's worker processes run it)."""
  seqs: grain.MapDataset
  batch_size: int
  lo: int
  hi: int

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    w = np.stack([self.seqs[i * self.batch_size + r] for r in range(self.lo, self.hi)])
    return {"tokens": w[:, :-1], "targets": w[:, 1:]}


def _batched(windows: grain.MapDataset, batch_size: int, seed: int | None,
             rows: slice | None = None) -> grain.MapDataset:
  if seed is not None:
    windows = windows.shuffle(seed=seed)
  lo, hi, _ = (rows or slice(0, batch_size)).indices(batch_size)
  return grain.MapDataset.range(sys.maxsize // batch_size).map(
      Rows(windows.repeat(None), batch_size, lo, hi))


def process_rows(batch_size: int, index: int, count: int) -> slice:
  """The contiguous rows of each global batch that process `index` of `count` reads."""
  if batch_size % count:
    raise ConfigError(f"train.batch_size={batch_size}: must be a multiple of the "
                      f"{count} processes")
  n = batch_size // count
  return slice(index * n, (index + 1) * n)


@dataclasses.dataclass
class Data:
  """Training batches by position, fixed validation batches, and corpus statistics."""
  train: grain.MapDataset                  # batch i = train[i], dicts of [rows, T] int32
  val_batches: list[dict[str, np.ndarray]]
  vocab_size: int
  description: str
  tokens_per_byte: float | None            # validation split; None for synthetic data
  unigram_bits: float | None               # validation split's byte entropy
  workers: int = 0                         # loader worker processes (0: prefetch threads only)
  prefetch: int = 8                        # batches read ahead
  _loader: object = dataclasses.field(default=None, repr=False, compare=False)
  _next: int = dataclasses.field(default=-1, repr=False, compare=False)

  def loader(self, position: int) -> grain.IterDataset:
    """Batches from `position` on, read ahead (threads, then `workers` processes)."""
    it = self.train[position:].to_iter_dataset(
        grain.ReadOptions(num_threads=2 if self.workers == 0 else 1,
                          prefetch_buffer_size=self.prefetch))
    if self.workers > 0:
      if not absl_flags.FLAGS.is_parsed():    # grain's workers read absl flags: take defaults
        absl_flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=max(1, self.prefetch // self.workers)))
    return it

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    if self._loader is None or position != self._next:
      self.close()
      self._loader = iter(self.loader(position))
    batch = next(self._loader)
    self._next = position + 1
    check_token_ids(batch["tokens"], self.vocab_size, f"training batch {position}")
    check_token_ids(batch["targets"], self.vocab_size, f"training batch {position}")
    return batch

  def close(self) -> None:
    """Stops the loader's threads and worker processes (a new read restarts them)."""
    loader, self._loader, self._next = self._loader, None, -1
    if loader is not None and hasattr(loader, "close"):
      loader.close()


@dataclasses.dataclass(frozen=True)
class SyntheticWindow:
  seed: int
  stream: int
  vocab: int
  length: int

  def __call__(self, i: int) -> np.ndarray:
    return np.random.default_rng([self.seed, self.stream, i]).integers(
        0, self.vocab, self.length, dtype=np.int32)


def _val_batches(windows, n_windows: int, cfg: Config, rows: slice | None) -> list[dict]:
  """Evenly spaced windows: the fixed validation sample spans the whole split."""
  t = cfg.train
  pick = np.linspace(0, n_windows - 1, t.eval_batches * t.batch_size).round().astype(int)
  w = np.stack([np.asarray(windows[int(i)]) for i in pick]).reshape(t.eval_batches, t.batch_size, -1)
  w = w[:, rows or slice(None)]
  return [{"tokens": b[:, :-1], "targets": b[:, 1:]} for b in w]


def _synthetic(cfg: Config, rows: slice | None, workers: int) -> Data:
  t, v = cfg.train, cfg.model.vocab_size
  train = grain.MapDataset.range(1 << 30).map(SyntheticWindow(t.seed, 0, v, t.seq_len + 1))
  val = grain.MapDataset.range(1 << 30).map(SyntheticWindow(t.seed, 1, v, t.seq_len + 1))
  val_ds = _batched(val, t.batch_size, None, rows)
  return Data(_batched(train, t.batch_size, None, rows),
              [val_ds[i] for i in range(t.eval_batches)], v,
              f"synthetic uniform tokens (vocab {v})", None, None, workers)


def _cache_dir(files: list[str], tok_spec: str, cfg: Config) -> pathlib.Path:
  stamp = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
  if tok_spec != "bytes":
    stamp.append((os.path.abspath(tok_spec), os.stat(tok_spec).st_mtime_ns))
  key = hashlib.sha256(json.dumps([sources.FORMAT, stamp, tok_spec, cfg.train.seq_len,
                                   cfg.train.val_fraction]).encode()).hexdigest()[:20]
  root = os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/deepseek-jax/data")
  return pathlib.Path(root) / key


def prepared_cache(files: list[str], cfg: Config) -> pathlib.Path:
  """Local corpus files prepared once (streaming) into the cache; reused while they are unchanged."""
  t = cfg.train
  dest = _cache_dir(files, t.tokenizer, cfg)
  if sources.is_prepared(str(dest)):
    return dest
  tmp = dest.with_name(f"{dest.name}.tmp-{socket.gethostname()}-{os.getpid()}")
  try:
    sources.prepare(files, str(tmp), t.tokenizer, t.seq_len, t.val_fraction,
                        seq_field="train.seq_len")
  except ConfigError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ConfigError(f"train.data={t.data!r}: {e}") from None
  if dest.exists() and not sources.is_prepared(str(dest)):
    shutil.rmtree(dest, ignore_errors=True)          # a partial copy
  try:
    os.rename(tmp, dest)
  except OSError:                                    # another process got there first
    shutil.rmtree(tmp, ignore_errors=True)
  return dest


def _prepared(cfg: Config, directory: str, rows: slice | None, workers: int,
              n_files: int | None = None) -> Data:
  t, vocab = cfg.train, cfg.model.vocab_size
  index = sources.read_index(directory)
  if index["seq_len"] != t.seq_len:
    raise ConfigError(f"train.seq_len={t.seq_len}: {directory} was prepared with seq_len "
                      f"{index['seq_len']}; set train.seq_len={index['seq_len']} or prepare again")
  if index["vocab_size"] > vocab:
    raise ConfigError(f"model.vocab_size={vocab}: {directory} holds ids up to "
                      f"{index['vocab_size'] - 1}; set model.vocab_size >= {index['vocab_size']}")
  if n_files is None and index["tokenizer"] != t.tokenizer and (
      t.tokenizer == "bytes" or os.path.abspath(t.tokenizer) != index["tokenizer"]):
    raise ConfigError(f"train.tokenizer={t.tokenizer!r}: {directory} was prepared with tokenizer "
                      f"{index['tokenizer']!r}; set train.tokenizer to it")
  decode = sources.Decode(index["dtype"])
  train = grain.MapDataset.source(sources.record_source(directory, index, "train")).map(decode)
  val = grain.MapDataset.source(sources.record_source(directory, index, "val")).map(decode)
  tr, va = index["splits"]["train"], index["splits"]["val"]
  hist = np.asarray(va["hist"], np.float64)
  p = hist[hist > 0] / max(hist.sum(), 1)
  tok_name = "bytes" if index["tokenizer"] == "bytes" else t.tokenizer
  what = (f"{t.data}: {n_files} files" if n_files is not None else
          f"{directory} (prepared, {len(index['sources'])} files)")
  desc = (f"{what}, {tr['tokens']:,} train / {va['tokens']:,} val tokens ({tok_name} tokenizer)")
  return Data(_batched(train, t.batch_size, t.seed, rows), _val_batches(val, len(val), cfg, rows),
              vocab, desc, va["tokens"] / max(va["bytes"], 1), float(-(p * np.log2(p)).sum()),
              workers)


def make_data(cfg: Config, rows: slice | None = None, workers: int | None = None) -> Data:
  """Builds the configured source. Raises ConfigError (user errors) naming the field.

  rows: the rows of each global batch this process reads (`process_rows`); None reads all.
  workers: loader processes (default `train.data_workers` where the config has it, else 0)."""
  t, vocab = cfg.train, cfg.model.vocab_size
  workers = int(getattr(t, "data_workers", 0) if workers is None else workers)
  if t.data == "synthetic":
    return _synthetic(cfg, rows, workers)
  if t.data != "stdlib" and sources.is_prepared(t.data):
    return _prepared(cfg, t.data, rows, workers)
  tok = make_tokenizer(t.tokenizer)
  if tok.vocab_size > vocab:
    raise ConfigError(f"model.vocab_size={vocab}: tokenizer {tok.name!r} has {tok.vocab_size} "
                      f"ids; set model.vocab_size >= {tok.vocab_size}")
  if t.data != "stdlib":
    files = local_files(t.data)
    return _prepared(cfg, str(prepared_cache(files, cfg)), rows, workers, len(files))
  files = stdlib_files()
  train_docs, val_docs = split_documents(files, t.val_fraction)
  train_ids, val_ids = token_stream(train_docs, tok), token_stream(val_docs, tok)
  check_token_ids(train_ids, vocab, f"train.data={t.data!r}")
  check_token_ids(val_ids, vocab, f"train.data={t.data!r}")
  train_seqs = grain.MapDataset.source(pack(train_ids, t.seq_len))
  val_windows = pack(val_ids, t.seq_len)
  val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
  desc = (f"stdlib {os.path.dirname(files[0])}: {len(files)} files, {len(train_ids):,} train / "
          f"{len(val_ids):,} val tokens ({tok.name} tokenizer)")
  return Data(_batched(train_seqs, t.batch_size, t.seed, rows),
              _val_batches(val_windows, len(val_windows), cfg, rows), vocab, desc,
              len(val_ids) / max(val_bytes, 1), unigram_entropy_bits(val_docs), workers)
