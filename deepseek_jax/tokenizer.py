"""Tokenizers for the data pipeline and the generate command (V3 report §4.1: a byte-level BPE).

Three kinds: `bytes` (UTF-8 bytes are the ids 0..255), a local Hugging Face `tokenizer.json`
(any model's, through the `tokenizers` library) and `ids` (text is comma/space separated token
ids; the generate command only). `encode` turns a prompt into ids (with whatever special tokens,
such as BOS, a tokenizer.json adds); `encode_documents` turns training documents into id arrays
with none; `decoder()` returns an incremental ids -> new text function whose cost per call does
not grow with the text decoded so far (a tokenizer.json: the library's `DecodeStream`).

The EOS rule, one for both: `eos_id` ends a document. Bytes: 0 (NUL, absent from text). A
tokenizer.json: the first of `EOS_TOKENS` its vocabulary holds, else none. Ids: none. Training
puts `eos_id` after every document; generation stops at it, unless the checkpoint's config.json
declares its own `eos_token_id`, which then wins.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Sequence

import numpy as np

from deepseek_jax.config import ConfigError

EOS_TOKENS = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

Decoder = Callable[[Sequence[int]], str]


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; NUL (0) ends a document."""
  name, vocab_size, eos_id = "bytes", 256, 0

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

  def decoder(self) -> Decoder:
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda ids: dec.decode(bytes(t for t in ids if t < 256))


class HFTokenizer:
  """A local Hugging Face `tokenizer.json`; `field` names the setting in error messages."""

  def __init__(self, path: str | os.PathLike, field: str = "tokenizer"):
    from tokenizers import Tokenizer  # noqa: PLC0415 (optional dependency; only this kind uses it)
    path = str(path)
    try:
      self._tok = Tokenizer.from_file(path)
    except (KeyboardInterrupt, SystemExit):
      raise
    except BaseException as e:  # noqa: BLE001 (tokenizers raises Exception, or a Rust panic)
      detail = str(e).strip().splitlines()[0][:80] if str(e).strip() else ""
      raise ConfigError(f"{field}={path!r}: not a readable tokenizer.json "
                        f"({type(e).__name__}: {detail})") from None
    self.name = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = [self._tok.token_to_id(t) for t in EOS_TOKENS]
    self.eos_id = next((i for i in ids if i is not None), None)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]

  def decoder(self) -> Decoder:
    """Incremental: `tokenizers`' own `DecodeStream` (0.21+), else `decode_stream` over `decode`;
    either costs a few tokens per call, and their concatenation is `decode` of all the ids."""
    try:
      from tokenizers.decoders import DecodeStream  # noqa: PLC0415 (optional dependency)
    except ImportError:
      return decode_stream(self._tok.decode)
    stream = DecodeStream(skip_special_tokens=True)
    return lambda ids: "".join(stream.step(self._tok, int(i)) or "" for i in ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids))


def decode_stream(decode: Callable[[list[int]], str]) -> Decoder:
  """An incremental decoder over a whole-sequence `decode` (Hugging Face's prefix/read-offset
  scheme): text is emitted once the ids since the last emission decode, after a few ids of
  context, to more than that context and do not end in a partial character (U+FFFD)."""
  ids: list[int] = []
  offsets = {"prefix": 0, "read": 0}

  def step(new_ids):
    out = []
    for i in new_ids:
      ids.append(int(i))
      prefix = decode(ids[offsets["prefix"]:offsets["read"]])
      text = decode(ids[offsets["prefix"]:])
      if len(text) > len(prefix) and not text.endswith("\ufffd"):
        out.append(text[len(prefix):])
        offsets["prefix"], offsets["read"] = offsets["read"], len(ids)
    return "".join(out)
  return step


class IdsTokenizer:
  """Text is token ids, e.g. "1,2,3" or "1 2 3"; decoded as ids followed by a space."""
  name, vocab_size, eos_id = "ids", None, None

  def encode(self, text: str) -> list[int]:
    try:
      return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
      raise ValueError(f"{text!r}: the ids tokenizer reads token ids such as '1,2,3'") from None

  def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(self.encode(t), np.int32) for t in texts]

  def decoder(self) -> Decoder:
    return lambda ids: "".join(f"{t} " for t in ids)


Tokenizer = ByteTokenizer | HFTokenizer | IdsTokenizer


def make_tokenizer(spec: str, field: str = "train.tokenizer") -> Tokenizer:
  """'bytes' or the path of a tokenizer.json (the values `train.tokenizer` takes)."""
  if spec == "bytes":
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise ConfigError(f"{field}={spec!r}: must be 'bytes' or an existing tokenizer.json")
  return HFTokenizer(spec, field)
