"""The data pipeline: documents -> tokens -> packed sequences -> batches (V3 report §4.1).

Sources (`train.data`): `stdlib` (default, no download: the `.py` files at the top of this Python's
standard library, sorted by name), `synthetic` (uniform random tokens, for benchmarks), or local
`.txt` (one document per file) / `.jsonl` (one document per line, field "text") files given as a
file, a directory or a glob. The validation split is by file: every n-th file of the sorted list
(n = 1 / val_fraction); a single file splits its documents (or its text) instead.

Tokenizers (`train.tokenizer`, `deepseek_jax.tokenizer`): `bytes` or a local HF `tokenizer.json`.
Each document is followed by the tokenizer's `eos_id` (bytes: NUL) and the stream is packed into
sequences of seq_len + 1 tokens without cross-document masking, as V3 does. Order is deterministic:
a grain `MapDataset` shuffled per epoch from the seed, so batch i is a pure function of (seed, i)
and the iterator's checkpointable position is one integer, `TrainState.data_position`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import pathlib
import sysconfig

import grain
import numpy as np

from deepseek_jax.config import Config, ConfigError
from deepseek_jax.tokenizer import Tokenizer, make_tokenizer

EXTENSIONS = (".txt", ".jsonl")


def stdlib_files() -> list[str]:
  """The embedded corpus: this Python's top-level standard-library `.py` files, sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "*.py")))
  if len(files) < 2:
    raise ConfigError(f"train.data='stdlib': found {len(files)} .py files under {root}; "
                      "point train.data at local .txt/.jsonl files instead")
  return files


def local_files(spec: str) -> list[str]:
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
    raise ConfigError(f"train.data={spec!r}: " + (f"{bad[0]!r} is not .txt or .jsonl" if bad else
                      "matches no file (use 'stdlib', 'synthetic', or .txt/.jsonl files)"))
  return files


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
    raise ValueError(f"{where}: token id {bad} lies outside the model vocabulary "
                     f"[0, {vocab_size}); the tokenizer and model.vocab_size disagree")


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


@dataclasses.dataclass
class Data:
  """Training batches by position, fixed validation batches, and corpus statistics."""
  train: grain.MapDataset                  # batch i = train[i], dicts of [B, T] int32
  val_batches: list[dict[str, np.ndarray]]
  vocab_size: int
  description: str
  tokens_per_byte: float | None            # validation split; None for synthetic data
  unigram_bits: float | None               # validation split's byte entropy

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    batch = self.train[position]
    check_token_ids(batch["tokens"], self.vocab_size, f"training batch {position}")
    check_token_ids(batch["targets"], self.vocab_size, f"training batch {position}")
    return batch


def _batched(seqs: grain.MapDataset, batch_size: int, seed: int | None) -> grain.MapDataset:
  if seed is not None:
    seqs = seqs.shuffle(seed=seed)
  return seqs.repeat(None).batch(batch_size, drop_remainder=True)


def _synthetic(cfg: Config) -> Data:
  t, v = cfg.train, cfg.model.vocab_size

  def window(seed_offset):
    return lambda i: np.random.default_rng([t.seed, seed_offset, i]).integers(
        0, v, t.seq_len + 1, dtype=np.int32)
  train = grain.MapDataset.range(1 << 30).map(window(0)).map(_as_batch)
  val = grain.MapDataset.range(1 << 30).map(window(1)).map(_as_batch)
  val_ds = _batched(val, t.batch_size, None)
  return Data(_batched(train, t.batch_size, None), [val_ds[i] for i in range(t.eval_batches)],
              v, f"synthetic uniform tokens (vocab {v})", None, None)


def make_data(cfg: Config) -> Data:
  """Builds the configured source. Raises ConfigError (user errors) naming the field."""
  t, vocab = cfg.train, cfg.model.vocab_size
  if t.data == "synthetic":
    return _synthetic(cfg)
  tok = make_tokenizer(t.tokenizer)
  if tok.vocab_size > vocab:
    raise ConfigError(f"model.vocab_size={vocab}: tokenizer {tok.name!r} has {tok.vocab_size} "
                      f"ids; set model.vocab_size >= {tok.vocab_size}")
  files = stdlib_files() if t.data == "stdlib" else local_files(t.data)
  train_docs, val_docs = split_documents(files, t.val_fraction)
  train_ids, val_ids = token_stream(train_docs, tok), token_stream(val_docs, tok)
  check_token_ids(train_ids, vocab, f"train.data={t.data!r}")
  check_token_ids(val_ids, vocab, f"train.data={t.data!r}")
  train_seqs = grain.MapDataset.source(pack(train_ids, t.seq_len)).map(_as_batch)
  val_windows = pack(val_ids, t.seq_len)
  # Evenly spaced windows: the fixed validation sample spans the whole split, not its first file.
  pick = np.linspace(0, len(val_windows) - 1, t.eval_batches * t.batch_size).round().astype(int)
  val_ds = _batched(grain.MapDataset.source(val_windows[pick]).map(_as_batch), t.batch_size, None)
  val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
  source = "stdlib " + os.path.dirname(files[0]) if t.data == "stdlib" else t.data
  desc = (f"{source}: {len(files)} files, {len(train_ids):,} train / {len(val_ids):,} val tokens "
          f"({tok.name} tokenizer)")
  val_batches = [val_ds[i] for i in range(t.eval_batches)]
  return Data(_batched(train_seqs, t.batch_size, t.seed), val_batches,
              vocab, desc, len(val_ids) / max(val_bytes, 1), unigram_entropy_bits(val_docs))
