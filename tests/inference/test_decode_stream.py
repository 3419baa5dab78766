"""Streaming detokenisation: the tokenizer's incremental decoder (and the fallback stream over a
whole-sequence decode) gives exactly the non-streaming text, fed in any pieces, at a cost that
does not grow with the text already decoded."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.tokenizer import HFTokenizer, decode_stream

TEXTS = ["héllo wörld, ünïcode 日本語 🙂 ", "def foo(x):\n    return x + 1\n", "a</s>b  c\t\n"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
  """A byte-level BPE of a few hundred ids: merges and multi-byte characters split over ids."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["</s>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 20, trainer)
  path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
  tok.save(str(path))
  return HFTokenizer(path)


def _pieces(decoder, ids, cuts):
  bounds = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
  return "".join(decoder(ids[a:b]) for a, b in zip(bounds, bounds[1:]))


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet="hélowrd, ünïcode日本語🙂\n\tabxyz</s>").map(lambda s: s[:60]),
       cuts=st.lists(st.integers(0, 200), max_size=6))
def test_streaming_equals_decoding_the_whole(bpe, text, cuts):
  ids = bpe.encode(text)
  whole = bpe.decode(ids)
  assert _pieces(bpe.decoder(), ids, cuts) == whole
  assert _pieces(decode_stream(bpe.decode), ids, cuts) == whole
  one_by_one = bpe.decoder()
  assert "".join(one_by_one([i]) for i in ids) == whole


def test_the_stream_decodes_a_window_not_the_whole_text(bpe):
  seen = []

  def counting(ids):
    seen.append(len(ids))
    return bpe.decode(ids)

  ids = bpe.encode("".join(TEXTS) * 20)
  step = decode_stream(counting)
  assert "".join(step([i]) for i in ids) == bpe.decode(ids)
  assert len(ids) > 300 and max(seen) < 16, max(seen)
