"""The one tokenizer module: round trips, and one EOS rule for training and generation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.config import ConfigError
from deepseek_jax.generate.__main__ import _tokenizer
from deepseek_jax.tokenizer import (EOS_TOKENS, ByteTokenizer, HFTokenizer, IdsTokenizer,
                                    make_tokenizer)
from deepseek_jax.training.data import token_stream


def _stream(decoder, ids, cuts):
  """Decodes `ids` fed in pieces cut at `cuts`."""
  bounds = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
  return "".join(decoder(ids[a:b]) for a, b in zip(bounds, bounds[1:]))


@given(text=st.text(), cuts=st.lists(st.integers(0, 1000), max_size=5))
def test_bytes_round_trip_in_any_pieces(text, cuts):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert _stream(tok.decoder(), ids, cuts) == text     # multi-byte characters cut anywhere
  np.testing.assert_array_equal(tok.encode_documents([text])[0], np.asarray(ids, np.int32))


@given(ids=st.lists(st.integers(0, 2**31 - 1)), cuts=st.lists(st.integers(0, 1000), max_size=3))
def test_ids_round_trip(ids, cuts):
  tok = IdsTokenizer()
  assert tok.encode(_stream(tok.decoder(), ids, cuts)) == ids
  assert tok.eos_id is None


def test_ids_reject_text():
  with pytest.raises(ValueError, match="token ids"):
    IdsTokenizer().encode("1,two")


@given(docs=st.lists(st.text(), max_size=5))
def test_training_puts_eos_after_every_document(docs):
  tok = ByteTokenizer()
  want = [i for d in docs for i in [*d.encode("utf-8"), tok.eos_id]]
  assert tok.eos_id == 0
  np.testing.assert_array_equal(token_stream(docs, tok), np.asarray(want, np.int32))


def _json_tokenizer(path, extra):
  from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415 (optional dependency)
  vocab = {w: i for i, w in enumerate(["<unk>", "a", "b", *extra])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))
  return vocab


@settings(max_examples=15, deadline=None)
@given(present=st.lists(st.sampled_from(EOS_TOKENS), unique=True), data=st.data())
def test_json_eos_is_the_first_known_eos_token_in_the_vocabulary(tmp_path_factory, present, data):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  vocab = _json_tokenizer(path, data.draw(st.permutations(present)))
  tok = make_tokenizer(str(path))
  first = next((t for t in EOS_TOKENS if t in present), None)
  assert tok.eos_id == (None if first is None else vocab[first])
  stream = token_stream(["a b", "b"], tok)
  eos = [] if first is None else [vocab[first]]
  np.testing.assert_array_equal(stream, [vocab["a"], vocab["b"], *eos, vocab["b"], *eos])
  assert _stream(tok.decoder(), tok.encode("a b a"), [1]) == "a b a"


def test_bad_specs_name_the_field(tmp_path):
  with pytest.raises(ConfigError, match="train.tokenizer="):
    make_tokenizer(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ConfigError, match="--tokenizer=.*not a readable tokenizer.json"):
    HFTokenizer(tmp_path / "bad.json", "--tokenizer")


def test_cli_auto_picks_bytes_then_ids(tmp_path):
  assert isinstance(_tokenizer("auto", tmp_path, 256), ByteTokenizer)
  assert isinstance(_tokenizer("auto", tmp_path, 100), IdsTokenizer)
  with pytest.raises(ValueError, match="vocab_size >= 256"):
    _tokenizer("bytes", tmp_path, 100)
  _json_tokenizer(tmp_path / "tokenizer.json", ["</s>"])
  assert isinstance(_tokenizer("auto", tmp_path, 100), HFTokenizer)
