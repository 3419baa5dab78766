"""Streaming safetensors I/O for Hugging Face checkpoints (single file or sharded index).

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
`{dtype, shape, data_offsets}`, then raw little-endian data. Reading memory-maps the file and
returns one tensor at a time as a view (nothing is copied until the caller converts it), and
writing streams tensors one by one after a header computed from their shapes, so neither side
holds a second copy of the weights. FP8 (`F8_E4M3`, `F8_E5M2`) and `BF16` map onto ml_dtypes.
Pickle formats (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written as asked; the message says what to do."""


def _refuse_pickle(path: pathlib.Path) -> None:
  raise CheckpointError(
      f"{path}: pickle checkpoints are never loaded (unpickling can run arbitrary code); convert "
      "it to safetensors first, e.g. in a sandbox with transformers' "
      "save_pretrained(..., safe_serialization=True)")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
  """One memory-mapped .safetensors file; `get(name)` returns a read-only view."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    if self.path.suffix in PICKLE_SUFFIXES:
      _refuse_pickle(self.path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      raw = f.read(8)
      n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
      if not 0 < n <= min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"{self.path}: not a safetensors file (bad header length)")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    self._start, data_len = 8 + n, size - 8 - n
    self._entries = {}
    for name, e in header.items():
      if not isinstance(e, dict):
        raise CheckpointError(f"{self.path}: tensor {name!r}: header entry {e!r} is not an object")
      dtype = DTYPES.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
      if dtype is None:
        raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype "
                              f"{e.get('dtype')!r}")
      shape, offsets = e.get("shape"), e.get("data_offsets")
      if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(f"{self.path}: tensor {name!r} has shape {shape!r} (a list of "
                              "sizes >= 0 expected)")
      if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise CheckpointError(f"{self.path}: tensor {name!r} has data_offsets {offsets!r} (two "
                              "integers expected)")
      shape, (lo, hi) = tuple(shape), offsets
      if not 0 <= lo <= hi <= data_len or hi - lo != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets "
                              "(truncated file?)")
      self._entries[name] = (dtype, shape, lo)
    self._mm = None

  def keys(self) -> list[str]:
    """Tensor names in file order (sequential reads)."""
    return sorted(self._entries, key=lambda k: self._entries[k][2])

  def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    dtype, shape, _ = self._entries[name]
    return dtype, shape

  def get(self, name: str) -> np.ndarray:
    dtype, shape, lo = self._entries[name]
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    count = math.prod(shape)
    return np.frombuffer(self._mm, dtype=dtype.newbyteorder("<"), count=count,
                         offset=self._start + lo).reshape(shape)


class Checkpoint:
  """All tensors of a checkpoint directory (`model.safetensors` or a sharded index) or one file."""

  def __init__(self, path):
    path = pathlib.Path(path)
    if not path.exists():
      raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
      files = [path]
    elif (path / INDEX_NAME).is_file():
      try:
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path / INDEX_NAME}: not a safetensors index (no weight_map)"
                              ) from None
      files = [path / f for f in sorted(set(weight_map.values()))]
      for f in files:
        if not f.is_file():
          raise CheckpointError(f"{path / INDEX_NAME}: names shard {f.name}, which is missing")
    else:
      files = sorted(path.glob("*.safetensors"))
      if not files:
        pickles = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickles:
          _refuse_pickle(pickles[0])
        raise CheckpointError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file")
    self.files = [SafetensorsFile(f) for f in files]
    self._where = {}
    for f in self.files:
      for k in f.keys():
        if k in self._where:
          raise CheckpointError(f"{path}: tensor {k!r} appears in two files")
        self._where[k] = f

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def keys(self) -> list[str]:
    """Names grouped by file, in file order."""
    return [k for f in self.files for k in f.keys()]

  def info(self, name: str):
    return self._where[name].info(name)

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
    return self._where[name].get(name)


class TensorPlan(NamedTuple):
  """A tensor to write: its name, dtype, shape and a function producing it when its turn comes."""
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  produce: Callable[[], np.ndarray]


def _write_file(path: pathlib.Path, plans: list[TensorPlan], metadata: dict[str, str]) -> int:
  header, offset = {"__metadata__": dict(metadata)}, 0
  for p in plans:
    n = math.prod(p.shape) * np.dtype(p.dtype).itemsize
    header[p.name] = {"dtype": DTYPE_NAMES[np.dtype(p.dtype)], "shape": list(p.shape),
                      "data_offsets": [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for p in plans:
      arr = np.asarray(p.produce(), dtype=p.dtype)
      if arr.shape != tuple(p.shape):
        raise ValueError(f"{p.name}: produced shape {arr.shape}, planned {p.shape}")
      f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
  return offset


def write_checkpoint(directory, plans: Iterable[TensorPlan], max_shard_bytes: int | None = None,
                     metadata: dict[str, str] | None = None) -> list[pathlib.Path]:
  """Writes `model.safetensors`, or shards plus `model.safetensors.index.json` when the tensors
  exceed `max_shard_bytes`. Tensors are produced and written one at a time."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  metadata = {"format": "pt", **(metadata or {})}
  plans = list(plans)
  shards, cur, cur_bytes = [], [], 0
  for p in plans:
    n = math.prod(p.shape) * np.dtype(p.dtype).itemsize
    if cur and max_shard_bytes is not None and cur_bytes + n > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(p)
    cur_bytes += n
  shards.append(cur)
  for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_NAME]:
    stale.unlink(missing_ok=True)
  if len(shards) == 1:
    _write_file(directory / SINGLE_NAME, shards[0], metadata)
    return [directory / SINGLE_NAME]
  weight_map, total, paths = {}, 0, []
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    total += _write_file(directory / name, shard, metadata)
    weight_map.update({p.name: name for p in shard})
    paths.append(directory / name)
  (directory / INDEX_NAME).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
  return paths
