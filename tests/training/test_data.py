"""The data pipeline: embedded corpus, split by file, tokenizers, packing, deterministic order."""

import json

import numpy as np
import pytest

from deepseek_jax.config import ConfigError
from deepseek_jax.training import data as data_lib
from tests.training.conftest import small_config


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
  """Local corpora are prepared into a cache: keep it out of ~/.cache."""
  monkeypatch.setenv(data_lib.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "data-cache"))


@pytest.fixture(scope="module")
def stdlib_data():
  return data_lib.make_data(small_config())


def test_stdlib_corpus_is_a_deterministic_file_split():
  files = data_lib.stdlib_files()
  assert files == sorted(files) and len(files) >= 20
  assert data_lib.stdlib_files() == files
  train, val = data_lib.split_documents(files, 0.05)
  texts = {data_lib.read_documents(f)[0] for f in files}
  assert val and train and set(train) | set(val) <= texts
  assert not set(train) & set(val)          # no file lands on both sides
  assert 0.02 < len(val) / len(files) < 0.1


def test_packing_shifts_targets_by_one_and_covers_the_stream():
  stream = np.arange(100, dtype=np.int32)
  windows = data_lib.pack(stream, seq_len=8)
  assert windows.shape == (12, 9)
  np.testing.assert_array_equal(windows[:, 0], np.arange(12) * 8)
  np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])   # consecutive windows touch
  b = data_lib._as_batch(windows[3])
  np.testing.assert_array_equal(b["tokens"][1:], b["targets"][:-1])


def test_batches_are_bytes_of_the_corpus(stdlib_data):
  batch = stdlib_data.train_batch(0)
  assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
  text = bytes(batch["tokens"][0].astype(np.uint8)).decode("utf-8", "replace")
  assert text.isprintable() or "\n" in text or "\x00" in text
  assert stdlib_data.tokens_per_byte == pytest.approx(1.0, abs=1e-3)
  assert 4.0 < stdlib_data.unigram_bits < 5.5      # Python source bytes


def test_order_is_a_pure_function_of_seed_and_position(stdlib_data):
  again = data_lib.make_data(small_config())
  for i in (0, 1, 57, 10_000):
    for k in ("tokens", "targets"):
      np.testing.assert_array_equal(stdlib_data.train_batch(i)[k], again.train_batch(i)[k])
  other = data_lib.make_data(small_config("train.seed=1"))
  assert not np.array_equal(stdlib_data.train_batch(0)["tokens"], other.train_batch(0)["tokens"])
  # Shuffled without replacement within an epoch: the first batches hold distinct windows.
  firsts = {stdlib_data.train_batch(i)["tokens"][j].tobytes() for i in range(20) for j in range(4)}
  assert len(firsts) == 80


def test_local_txt_and_jsonl_files(tmp_path):
  for i in range(4):
    (tmp_path / f"doc{i}.txt").write_text(f"text file {i} " * 40)
  rows = [{"text": f"json document {i} " * 20} for i in range(6)]
  (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  d = data_lib.make_data(small_config(f"train.data={tmp_path}", "train.val_fraction=0.3"))
  assert "5 files" in d.description
  b = d.train_batch(3)
  assert b["tokens"].shape == (4, 32)
  one = data_lib.make_data(small_config(f"train.data={tmp_path / 'more.jsonl'}",
                                        "train.val_fraction=0.3", "train.seq_len=16"))
  val_text = bytes(one.val_batches[0]["tokens"][0].astype(np.uint8))
  assert b"json document 4" in val_text or b"json document 5" in val_text   # the held-out tail


@pytest.mark.parametrize("content, match", [
    ('{"txt": "x"}\n', "more.jsonl:1 is not a JSON object with a 'text'"),
    ("not json\n", "more.jsonl:1"),
    ('{"text": 3}\n', "must be a string"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, match):
  (tmp_path / "more.jsonl").write_text(content)
  with pytest.raises(ConfigError, match=match):
    data_lib.make_data(small_config(f"train.data={tmp_path / 'more.jsonl'}"))


def test_missing_source_and_tokenizer_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="train.data="):
    data_lib.make_data(small_config(f"train.data={tmp_path / 'nothing.txt'}"))
  with pytest.raises(ConfigError, match="train.tokenizer="):
    data_lib.make_data(small_config(f"train.tokenizer={tmp_path / 'tok.json'}"))
  with pytest.raises(ConfigError, match="model.vocab_size=200"):
    data_lib.make_data(small_config("model.vocab_size=200"))


def test_hf_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  for i in range(3):
    (tmp_path / f"d{i}.txt").write_text("def f(x):\n    return x + 1\n" * 30)
  d = data_lib.make_data(small_config(f"train.tokenizer={path}", f"train.data={tmp_path}/*.txt",
                                      "model.vocab_size=512", "train.seq_len=8"))
  assert d.tokens_per_byte < 0.9           # merges: fewer tokens than bytes
  assert d.train_batch(0)["tokens"].max() < tok.get_vocab_size()
  with pytest.raises(ConfigError, match="model.vocab_size=256: tokenizer"):
    data_lib.make_data(small_config(f"train.tokenizer={path}", f"train.data={tmp_path}/*.txt",
                                    "model.vocab_size=256"))


def test_out_of_vocabulary_ids_raise(stdlib_data):
  # A user error (issue 17 case 9): ConfigError naming model.vocab_size, exit 2 from the commands.
  with pytest.raises(ConfigError, match="model.vocab_size=256: batch 0: token id 300 lies outside "
                                        "the model vocabulary"):
    data_lib.check_token_ids(np.asarray([[1, 300]]), 256, "batch 0")
  with pytest.raises(ConfigError, match="token id -1"):
    data_lib.check_token_ids(np.asarray([[-1, 3]]), 256, "batch 0")
  stdlib_data.vocab_size = 100     # a model smaller than the corpus's ids
  with pytest.raises(ConfigError, match="training batch 5"):
    stdlib_data.train_batch(5)
  stdlib_data.vocab_size = 256


def test_synthetic_source_is_deterministic_and_in_vocab():
  d = data_lib.make_data(small_config("train.data=synthetic"))
  again = data_lib.make_data(small_config("train.data=synthetic"))
  b0, b0_again = d.train_batch(7), again.train_batch(7)
  np.testing.assert_array_equal(b0["tokens"], b0_again["tokens"])
  assert b0["tokens"].max() < 256 and d.tokens_per_byte is None


def test_unigram_entropy():
  assert data_lib.unigram_entropy_bits(["abab"]) == pytest.approx(1.0)
  assert data_lib.unigram_entropy_bits(["aaaa"]) == pytest.approx(0.0)
