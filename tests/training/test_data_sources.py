"""Streaming sources, prepare, process shards and resume: the same tokens as the in-memory reader."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deepseek_jax.config import ConfigError
from deepseek_jax.tokenizer import make_tokenizer
from deepseek_jax.training import data as data_lib
from deepseek_jax.training import prepare as prepare_lib
from deepseek_jax.training import sources
from tests.training.conftest import REPO, small_config

DOCS = [f"document {i}: " + "the quick brown fox é jumps\n" * (3 + i % 5) for i in range(24)]


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(data_lib.CACHE_ENV, str(tmp_path / "cache"))


def in_memory_windows(files, seq_len=16, val_fraction=0.25):
  train, val = data_lib.split_documents(files, val_fraction)
  tok = make_tokenizer("bytes")
  return (data_lib.pack(data_lib.token_stream(train, tok), seq_len),
          data_lib.pack(data_lib.token_stream(val, tok), seq_len))


def records(directory, split):
  index = sources.read_index(str(directory))
  src = sources.record_source(str(directory), index, split)
  return np.stack([sources.Decode(index["dtype"])(src[i]) for i in range(len(src))])


def write_corpus(tmp_path, kind):
  d = tmp_path / kind
  d.mkdir()
  if kind == "txt":
    for i, doc in enumerate(DOCS[:8]):
      (d / f"doc{i:02d}.txt").write_text(doc)
  elif kind == "jsonl":
    (d / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n\n" for t in DOCS))
  else:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), d / "all.parquet",
                   row_group_size=5)
  return d


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
@pytest.mark.parametrize("chunk_bytes", [64, sources.CHUNK_BYTES])
def test_prepared_windows_equal_the_in_memory_reader(tmp_path, kind, chunk_bytes):
  d = write_corpus(tmp_path, kind)
  # The in-memory reference reads the same documents (Parquet: as the equivalent .jsonl).
  ref = write_corpus(tmp_path, "jsonl") if kind == "parquet" else d
  want_train, want_val = in_memory_windows(data_lib.local_files(str(ref)))
  index = prepare_lib.prepare([str(d)], str(tmp_path / "out"), "bytes", 16, 0.25,
                              records_per_shard=7, chunk_bytes=chunk_bytes)
  np.testing.assert_array_equal(records(tmp_path / "out", "train"), want_train)
  np.testing.assert_array_equal(records(tmp_path / "out", "val"), want_val)
  assert index["splits"]["train"]["records"] == len(want_train)
  assert len(index["splits"]["train"]["files"]) == -(-len(want_train) // 7)


def test_train_data_reads_a_prepared_directory_like_the_files(tmp_path):
  d = write_corpus(tmp_path, "txt")
  prepare_lib.prepare([str(d / "*.txt")], str(tmp_path / "out"), "bytes", 32, 0.05)
  from_files = data_lib.make_data(small_config(f"train.data={d}"))
  prepared = data_lib.make_data(small_config(f"train.data={tmp_path / 'out'}"))
  for i in (0, 1, 9):
    np.testing.assert_array_equal(from_files.train_batch(i)["tokens"],
                                  prepared.train_batch(i)["tokens"])
  assert prepared.tokens_per_byte == pytest.approx(from_files.tokens_per_byte)
  assert "prepared, 8 files" in prepared.description
  with pytest.raises(ConfigError, match="train.seq_len=16: .* prepared with seq_len 32"):
    data_lib.make_data(small_config(f"train.data={tmp_path / 'out'}", "train.seq_len=16"))
  with pytest.raises(ConfigError, match="model.vocab_size=100"):
    data_lib.make_data(small_config(f"train.data={tmp_path / 'out'}", "model.vocab_size=100"))


@pytest.mark.parametrize("spec", ["stdlib", "synthetic", "files"])
def test_two_processes_partition_each_batch(tmp_path, spec):
  if spec == "files":           # distinct windows: random letters
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefghij"), 200)) for _ in range(20)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = str(tmp_path / "r.jsonl")
  cfg = small_config(f"train.data={spec}")
  whole = data_lib.make_data(cfg)
  parts = [data_lib.make_data(cfg, rows=data_lib.process_rows(4, p, 2)) for p in range(2)]
  seen = []
  for i in range(6):
    got = [p.train_batch(i)["tokens"] for p in parts]
    assert all(g.shape == (2, 32) for g in got)
    np.testing.assert_array_equal(np.concatenate(got), whole.train_batch(i)["tokens"])
    seen += [r.tobytes() for g in got for r in g]
  assert len(set(seen)) == len(seen)         # no window read twice within the epoch
  np.testing.assert_array_equal(np.concatenate([p.val_batches[0]["tokens"] for p in parts]),
                                whole.val_batches[0]["tokens"])
  with pytest.raises(ConfigError, match="multiple of the 3 processes"):
    data_lib.process_rows(4, 0, 3)


def test_resume_and_workers_give_the_uninterrupted_batches(tmp_path):
  cfg = small_config(f"train.data={write_corpus(tmp_path, 'txt')}")
  straight = data_lib.make_data(cfg)
  want = [straight.train_batch(i)["tokens"] for i in range(12)]
  restarted = data_lib.make_data(cfg)           # a restart at position 5
  got = [restarted.train_batch(i)["tokens"] for i in range(5, 12)]
  with_worker = data_lib.make_data(cfg, workers=1)
  try:
    got_w = [with_worker.train_batch(i)["tokens"] for i in range(5, 12)]
  finally:
    with_worker.close()
  for w, a, b in zip(want[5:], got, got_w):
    np.testing.assert_array_equal(w, a)
    np.testing.assert_array_equal(w, b)
  np.testing.assert_array_equal(restarted.train_batch(2)["tokens"], want[2])   # jumps back


def run_prepare(*args):
  return subprocess.run([sys.executable, "-m", "deepseek_jax.training.prepare", *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, timeout=120)


def test_prepare_command_and_its_errors(tmp_path, capsys):
  d = write_corpus(tmp_path, "txt")
  assert prepare_lib.main(["--seq-len", "16", str(d), "--out", str(tmp_path / "out")]) == 0
  assert "prepared 8 files" in capsys.readouterr().out
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "a.jsonl").write_text('{"text": "%s"}\nnot json\n' % ("fine " * 20))
  (tmp_path / "bad" / "b.jsonl").write_text('{"body": "x"}\n')
  (tmp_path / "bad" / "empty.txt").write_text("")
  cases = [((tmp_path / "nothing",), "matches no file"),
           ((tmp_path / "bad" / "empty.txt",), "too few for one window"),
           ((tmp_path / "bad" / "a.jsonl",), "a.jsonl:2 is not a JSON object"),
           ((tmp_path / "bad" / "b.jsonl",), "b.jsonl:1 is not a JSON object with a 'text'"),
           ((d, "--vocab-size", 100), "lies outside the vocabulary [0, 100)"),
           ((d, "--tokenizer", tmp_path / "tok.json"), "--tokenizer=")]
  for args, match in cases:
    r = prepare_lib.main(["--seq-len", "16", *map(str, args), "--out", str(tmp_path / "x")])
    assert r == 2, args
  r = run_prepare("--seq-len", 16, tmp_path / "bad" / "b.jsonl", "--out", tmp_path / "x")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "text" in lines[0], r.stderr
  for args, match in cases:
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace(")", r"\)")):
      prepare_lib.prepare([str(args[0])], str(tmp_path / "x"), seq_len=16,
                          vocab_size=100 if "--vocab-size" in args else None,
                          tokenizer=str(args[2]) if "--tokenizer" in args else "bytes")


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
  (tmp_path / "a.parquet").write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ConfigError, match="reading Parquet needs pyarrow: pip install pyarrow"):
    sources.split_pieces([str(tmp_path / "a.parquet")], 0.1)


BOUNDED = textwrap.dedent("""
    import os, resource, sys
    from deepseek_jax.training import prepare, data
    from tests.training.conftest import small_config
    src, out, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    line = "".join(chr(97 + i % 26) for i in range(99)) + "\\n"
    with open(src, "w") as f:                          # the corpus, written in 1 MB blocks
      for _ in range(mb):
        f.write(line * 10486)
    prepare.prepare([src], out, "bytes", 128, 0.01)
    d = data.make_data(small_config("train.data=" + out, "train.seq_len=128", "train.batch_size=8"))
    for i in range(2000):
      d.train_batch(i)
    print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


@pytest.mark.slow
def test_memory_stays_bounded_on_a_large_corpus(tmp_path):
  """A 400 MB text corpus (800 MB of windows) is prepared and read in bounded memory."""
  mb = 400
  r = subprocess.run([sys.executable, "-c", BOUNDED, tmp_path / "big.txt", tmp_path / "out",
                      str(mb)], capture_output=True, text=True, cwd=REPO, timeout=900,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  base_mb, peak_mb = map(int, r.stdout.split()[-2:])
  # After the imports, preparing and reading 400 MB adds well under 150 MB (measured: ~70).
  assert peak_mb - base_mb < 150, f"peak RSS {peak_mb} MB ({base_mb} after imports), {mb} MB corpus"
