"""A run's workdir finds everything: config.yaml (what --resume reads), the tokenizer, train.log
and a README-style summary; resume overrides are checked field by field; a 32000-token HF
tokenizer travels from training to generation and evaluation."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

import train
from deepseek_jax.config import ConfigError, config_to_dict, load_config
from deepseek_jax.evaluate import main as evaluate_main
from deepseek_jax.generate import __main__ as generate_cli
from deepseek_jax.generate.load import tokenizer_for
from deepseek_jax.tokenizer import HFTokenizer
from deepseek_jax.training import checkpoint
from tests.training.conftest import RUN, SMALL, STEPS, run_train, small_config


def test_workdir_holds_config_log_and_summary(run_a):
  workdir, proc = run_a
  cfg = load_config(workdir / "config.yaml")
  assert cfg == load_config(train.DEFAULT_CONFIG, [f"train.steps={STEPS}", *RUN])
  assert checkpoint.run_config(workdir) == cfg and checkpoint.run_tokenizer(workdir) == "bytes"
  assert not (workdir / "tokenizer.json").exists()             # bytes: nothing to carry
  assert not list(workdir.glob(".*tmp*"))                       # atomic writes left no temp
  log = (workdir / "train.log").read_text()
  assert log.startswith("--- ") and "$ train.py --workdir" in log.splitlines()[0]
  assert "compiled train and eval steps" in log and f"step {STEPS}: validation loss" in log
  assert "\r" not in log and "\033" not in log
  summary = (workdir / "summary.txt").read_text()
  assert summary.rstrip() in proc.stdout and summary.rstrip().splitlines()[-1] in log
  for text in ("DeepSeek-V3 run in", "tokenizer: UTF-8 bytes", "config.yaml",
               f"--workdir {workdir} --resume", f"deepseek_jax.generate --checkpoint {workdir}",
               f"deepseek_jax.evaluate --checkpoint {workdir}"):
    assert text in summary, text


def test_resume_overrides_are_checked_field_by_field(tmp_path):
  run = small_config("train.steps=10")
  ok = train.resume_config(run, tmp_path, None, ["train.steps=20", "train.learning_rate=1e-3",
                                                 "train.eval_every=5", "model.remat=full"])
  assert ok == dataclasses.replace(
      run, train=dataclasses.replace(run.train, steps=20, learning_rate=1e-3, eval_every=5),
      model=dataclasses.replace(run.model, remat="full"))
  # Repeating the run's own values is no change; a --config that, with the overrides, is the run.
  assert train.resume_config(run, tmp_path, None, SMALL) == run
  assert train.resume_config(run, tmp_path, train.DEFAULT_CONFIG,
                             [*SMALL, "train.steps=10"]) == run
  for item, field in (("train.batch_size=8", "train.batch_size"), ("train.seed=2", "train.seed"),
                      ("model.num_layers=3", "model.num_layers"), ("mesh.fsdp=2", "mesh.fsdp"),
                      ("fp8.recipe=deepseek_v3", "fp8.recipe"),
                      ("train.tokenizer=/x/tokenizer.json", "train.tokenizer")):
    with pytest.raises(ConfigError, match=f"{field} cannot change on resume: {field} is .* given"):
      train.resume_config(run, tmp_path, None, [item])
  with pytest.raises(ConfigError, match="is not this run's config: train.steps is 10 in .*, 300 in"):
    train.resume_config(run, tmp_path, train.DEFAULT_CONFIG, SMALL)
  assert all(train.resumable(f) for f in train.RESUMABLE)
  assert set(train.RESUMABLE) < {k for k in _flat_keys(config_to_dict(run))}


def _flat_keys(tree, prefix=""):
  for k, v in tree.items():
    yield from _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]


VOCAB = 32000


@pytest.fixture(scope="module")
def word_run(xla_cache, tmp_path_factory):
  """4 steps of the small model over a 32000-word WordLevel tokenizer.json and a text of its
  words (the tokenizer's source file is removed after training: the run keeps its own copy)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415 (optional dependency)
  src = tmp_path_factory.mktemp("tok")
  words = ["<unk>", "</s>", *(f"w{i}" for i in range(VOCAB - 2))]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(src / "tokenizer.json"))
  docs = [" ".join(f"w{(i * 7919 + d) % 64}" for i in range(75)) for d in range(40)]
  (src / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  workdir = tmp_path_factory.mktemp("word_run")
  run_train(xla_cache, workdir, "--steps", "4", *SMALL, f"model.vocab_size={VOCAB}",
            f"train.tokenizer={src / 'tokenizer.json'}", f"train.data={src / 'corpus.jsonl'}",
            "train.eval_every=4", "train.checkpoint_every=4")
  copied = (workdir / "tokenizer.json").read_bytes()
  assert copied == (src / "tokenizer.json").read_bytes()
  (src / "tokenizer.json").unlink()
  return workdir, src / "corpus.jsonl"


def test_a_32000_token_tokenizer_travels_to_generation(word_run, capsys):
  workdir, _ = word_run
  cfg = load_config(workdir / "config.yaml")
  assert cfg.train.tokenizer == str(workdir / "tokenizer.json") and cfg.model.vocab_size == VOCAB
  for where in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "4"):
    tok = tokenizer_for("auto", where, VOCAB)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == VOCAB
  assert generate_cli.main(["--checkpoint", str(workdir), "--prompt", "w1 w2 w3",
                            "--max-new-tokens", "6", "--ignore-eos"]) == 0
  out = capsys.readouterr().out.split()
  assert len(out) == 6 and all(w in ("<unk>", "</s>") or w[0] == "w" for w in out), out
  # Without the run's copy the command names what is missing instead of guessing bytes.
  (workdir / "tokenizer.json").rename(workdir / "moved.json")
  try:
    assert generate_cli.main(["--checkpoint", str(workdir), "--prompt", "w1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer" in err and "missing" in err, err
  finally:
    (workdir / "moved.json").rename(workdir / "tokenizer.json")


def test_evaluate_scores_text_with_the_runs_tokenizer(word_run, capsys, tmp_path):
  workdir, corpus = word_run
  assert evaluate_main(["--checkpoint", str(workdir), "--data", str(corpus),
                        "--seq-len", "32"]) == 0
  out = capsys.readouterr().out
  values = {l.split()[0]: l.split()[1] for l in out.splitlines()[1:]}
  loss = float(values["loss"])
  scored = 40 * 75 + 40 - 1                             # words and an EOS each, shifted by one
  assert f"{scored:,} tokens" in out and 0 < loss < math.log(VOCAB) + 1
  assert math.isclose(float(values["perplexity"]), math.exp(loss), rel_tol=1e-3)
  n_bytes = sum(len(json.loads(l)["text"].encode()) for l in corpus.read_text().splitlines())
  bpb = loss * scored / math.log(2) / n_bytes
  assert math.isclose(float(values["bits/byte"]), bpb, rel_tol=1e-3)
  (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
  for argv in (["--data", str(tmp_path / "none.txt")], ["--data", str(tmp_path / "bad.jsonl")]):
    assert evaluate_main(["--checkpoint", str(workdir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and err.count("\n") == 1, err


def test_training_exports_a_hf_directory_every_n_steps(tmp_path, xla_cache):
  from deepseek_jax.generate.load import load_for_inference  # noqa: PLC0415
  workdir = tmp_path / "run"
  run_train(xla_cache, workdir, *SMALL, "train.steps=4", "train.export_every=2",
            "train.eval_every=100", "train.checkpoint_every=100")
  for step in (2, 4):
    d = workdir / "hf" / f"step_{step}"
    assert (d / "config.json").is_file() and (d / "generation_config.json").is_file(), step
  _, exported, _ = load_for_inference(workdir / "hf" / "step_4")
  _, trained, _ = load_for_inference(workdir)
  for a, b in zip(jax.tree.leaves(exported["params"]), jax.tree.leaves(trained["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
