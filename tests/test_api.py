"""The Python API (`deepseek_jax.load`, `LM`): a run, a HF directory and a cached hub id load in one
call with their tokenizer; generate equals the decode loop's tokens, a batch equals its prompts one
by one, stop strings cut, a stream joins to generate's text, scores equal a float64 per-prefix
reference; bad arguments are one-line errors; the README example runs as written."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepseek_jax
from deepseek_jax import api, hf
from deepseek_jax.config import Config, config_to_dict
from deepseek_jax.generate import generate
from deepseek_jax.model import Transformer
from deepseek_jax.naming import EMBED
from deepseek_jax.tokenizer import ByteTokenizer, HFTokenizer
from tests.helpers import init_model, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = small_config(vocab_size=320, dtype="float32", max_position_embeddings=512,
                   moe_dispatch="dropless")  # as a HF checkpoint loads: one compilation for both
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_run(workdir: pathlib.Path, cfg=CFG, seed: int = 0) -> dict:
  """A train.py workdir (config.yaml + one orbax checkpoint at step 2) of a random model."""
  training = pytest.importorskip("deepseek_jax.training")
  from deepseek_jax.training.checkpoint import save_run_files  # noqa: PLC0415
  variables = init_model(Transformer(cfg), jnp.zeros((1, 8), jnp.int32), seed)
  zero = jnp.zeros((), jnp.int32)
  state = training.TrainState(
      step=jnp.asarray(2, jnp.int32), params=variables["params"],
      opt_state=optax.sgd(1e-3).init(variables["params"]),
      router_state=variables.get("router_state", {}), fp8_state={}, rng=jax.random.PRNGKey(0),
      data_position=zero, bad_streak=zero, bad_total=zero)
  run_cfg = save_run_files(Config(model=cfg), workdir)
  ckpt = training.Checkpointer(workdir, keep=1, async_save=False, config=config_to_dict(run_cfg))
  assert ckpt.save(state, force=True)
  ckpt.close()
  return variables


def bpe_tokenizer(path: pathlib.Path) -> pathlib.Path:
  """A byte-level BPE of at most 320 ids with <s> and </s>, and a tokenizer_config.json beside
  it holding a chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["hello world, the model speaks. <|user|> <|assistant|>"] * 20, trainer)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": TEMPLATE}))
  return path / "tokenizer.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("api") / "run"
  variables = make_run(workdir)
  return workdir, variables


@pytest.fixture(scope="module")
def lm(run):
  return deepseek_jax.load(run[0])


@pytest.fixture(scope="module")
def hf_dir(run, tmp_path_factory):
  """The run's weights as a HF directory with a BPE tokenizer and a chat template."""
  d = tmp_path_factory.mktemp("hf") / "tiny"
  hf.save_hf(d, CFG, run[1])
  bpe_tokenizer(d)
  return d


def test_load_a_run_with_its_byte_tokenizer(run, lm):
  assert isinstance(lm, deepseek_jax.LM) and isinstance(lm.tokenizer, ByteTokenizer)
  assert lm.info == {"step": 2} and lm.eos_ids == [0] and lm.config.vocab_size == 320
  np.testing.assert_array_equal(lm.variables["params"][EMBED]["embedding"],
                                run[1]["params"][EMBED]["embedding"])
  assert "deepseek_jax.api" in deepseek_jax._API.values() and deepseek_jax.load is api.load


def test_greedy_equals_the_decode_loop_ids_and_text(lm):
  prompt = list("def f(x):".encode())
  want = generate(lm.config, lm.variables, [prompt], 12, stop_tokens=[0]).tokens[0]
  assert lm.generate(prompt, max_new_tokens=12) == want
  assert lm.generate("def f(x):", max_new_tokens=12) == ByteTokenizer().decoder()(want)


def test_the_engine_streams_what_generate_returns(lm):
  prompts = [list(b"def f(x):"), list(b"import numpy")]
  engine = lm.engine(slots=2, block_size=8, prefill_chunk=16)
  requests = [engine.submit(p, max_new_tokens=9, stop=lm.eos_ids) for p in prompts]
  for p, r in zip(prompts, requests):
    assert list(r) == lm.generate(p, max_new_tokens=9)


def test_a_batch_equals_its_prompts_one_by_one(lm):
  prompts = ["import np\n", "x"]  # B = 2 and 16 prompt positions, as elsewhere: one compilation
  batch = lm.generate(prompts, max_new_tokens=10)
  assert batch == [lm.generate(p, max_new_tokens=10) for p in prompts]
  ids = [list(p.encode()) for p in prompts]
  assert lm.generate(ids, max_new_tokens=10) == [lm.generate(i, max_new_tokens=10) for i in ids]
  kw = dict(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=3)
  assert lm.generate(prompts[:1], **kw) == [lm.generate(prompts[0], **kw)]


def test_stop_strings_cut_the_text_before_the_first_one(lm):
  full = lm.generate(["def ", "x"], max_new_tokens=10)
  assert all(len(t) >= 6 for t in full), full
  stop = full[0][3:5]
  got = lm.generate(["def ", "x"], max_new_tokens=10, stop=["\x01never", stop])
  cut = [t[:t.index(stop)] if stop in t else t for t in full]
  assert got == cut and got[0] == full[0][:full[0].index(stop)]
  assert lm.generate("def ", max_new_tokens=10, stop=full[0][0]) == ""


def test_stream_joins_to_generate(lm):
  for kw in ({}, {"stop": [lm.generate("def ", max_new_tokens=10)[4:6]]},
             {"temperature": 1.0, "top_p": 0.9, "seed": 5}):
    pieces = list(lm.stream("def ", max_new_tokens=10, **kw))
    assert "".join(pieces) == lm.generate("def ", max_new_tokens=10, **kw), kw
    assert len(pieces) > 1 or not kw, pieces          # pieces arrive as tokens do
  it = lm.stream("def ", max_new_tokens=10)
  next(it, None)
  it.close()                      # stops the generation thread


def test_score_equals_a_float64_per_prefix_reference(lm):
  """Row t of the reference holds the prefix ids[:t] followed by random junk (so a model that
  looked ahead would disagree); log p(ids[t]) is the log-softmax of its logits at t - 1 in f64."""
  text = "def f(x):"
  ids = list(text.encode())
  n = len(ids)
  junk = np.random.default_rng(0).integers(0, lm.config.vocab_size, (n - 1, n))
  rows = np.where(np.arange(n)[None, :] < np.arange(1, n)[:, None], np.asarray(ids)[None], junk)
  apply = jax.jit(lambda v, t: Transformer(lm.config).apply(v, t, with_mtp=False).logits_BTV)
  logits = np.asarray(apply(lm.variables, jnp.asarray(rows, jnp.int32)), np.float64)
  want = 0.0
  for t in range(1, n):
    x = logits[t - 1, t - 1]
    want += x[ids[t]] - x.max() - np.log(np.exp(x - x.max()).sum())
  got = lm.score(text)
  assert abs(got - want) < 1e-4 * abs(want), (got, want)
  assert lm.score(ids) == got
  assert lm.score([text, "xy", text]) == pytest.approx([got, lm.score("xy"), got], rel=1e-6)
  assert lm.perplexity(text) == pytest.approx(np.exp(-want / (len(ids) - 1)), rel=1e-4)


def test_a_hf_directory_brings_its_tokenizer_and_chat_template(hf_dir, lm):
  m = deepseek_jax.load(hf_dir)
  assert isinstance(m.tokenizer, HFTokenizer) and m.chat_template == TEMPLATE
  assert m.eos_ids == [m.tokenizer.eos_id]      # no eos_token_id in this config.json
  prompt = m.encode("hello world")
  want = m.tokenizer.decode(generate(m.config, m.variables, [prompt], 6,
                                    stop_tokens=m.eos_ids).tokens[0])
  assert m.generate("hello world", max_new_tokens=6) == want.rstrip("\ufffd")  # an unfinished
  # character at the end is held back by the incremental decoder
  want = m.tokenizer.encode_documents(["<s><|user|>hello<|assistant|>"])[0].tolist()
  assert m.apply_chat_template("hello") == want
  assert m.apply_chat_template([{"role": "user", "content": "hello"}]) == want
  out = m.generate(["hello", [{"role": "user", "content": "hello"}]], max_new_tokens=4, chat=True)
  assert out[0] == out[1] == m.tokenizer.decode(m.generate(want, max_new_tokens=4)).rstrip("\ufffd")
  with pytest.raises(ValueError, match="chat=True: the tokenizer of .* has no chat template"):
    lm.generate("hello", chat=True)


def test_a_run_with_a_tokenizer_json_uses_it(run, tmp_path):
  """train.py copies a run's HF tokenizer into the workdir: it wins over config.yaml's bytes."""
  shutil.copytree(run[0], tmp_path / "run")
  bpe_tokenizer(tmp_path / "run")
  m = deepseek_jax.load(tmp_path / "run" / "checkpoints")
  assert isinstance(m.tokenizer, HFTokenizer) and m.chat_template == TEMPLATE
  assert m.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}


def test_a_large_vocabulary_without_a_tokenizer_takes_ids_only(hf_dir, tmp_path):
  d = tmp_path / "bare"
  shutil.copytree(hf_dir, d)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    (d / f).unlink()
  m = deepseek_jax.load(d)
  assert m.tokenizer is None
  with pytest.raises(ValueError, match=r"a 320-token model with no tokenizer\.json"):
    m.generate("hello")
  assert m.score([1, 2, 3]) < 0
  assert isinstance(deepseek_jax.load(d, tokenizer="bytes").tokenizer, ByteTokenizer)


def _fake_cache(root: pathlib.Path, repo: str, source: pathlib.Path) -> pathlib.Path:
  """The hub cache layout: blobs, refs/main -> commit, snapshots/<commit>/ with symlinks."""
  folder = root / ("models--" + repo.replace("/", "--"))
  snap = folder / "snapshots" / "0123abc"
  snap.mkdir(parents=True)
  (folder / "blobs").mkdir()
  for f in source.iterdir():
    blob = folder / "blobs" / f"blob-{f.name}"
    shutil.copy(f, blob)
    os.symlink(os.path.relpath(blob, snap), snap / f.name)
  (folder / "refs").mkdir()
  (folder / "refs" / "main").write_text("0123abc")
  return snap


def test_a_hub_id_loads_from_the_local_cache_only(hf_dir, tmp_path, monkeypatch):
  snap = _fake_cache(tmp_path / "hub", "tiny-org/tiny-v3", hf_dir)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  assert api.resolve("tiny-org/tiny-v3") == snap
  assert api.cached_snapshot("tiny-org/tiny-v3", None, tmp_path / "hub") == snap
  assert api.cached_snapshot("tiny-org/tiny-v3", "0123abc", tmp_path / "hub") == snap
  assert api.cached_snapshot("tiny-org/other", None, tmp_path / "hub") is None
  m = deepseek_jax.load("tiny-org/tiny-v3")
  assert isinstance(m.tokenizer, HFTokenizer) and m.config.vocab_size == 320
  with pytest.raises(ValueError, match="tiny-org/missing: not a local path and not in the "
                                       "Hugging Face cache"):
    deepseek_jax.load("tiny-org/missing")
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # without huggingface_hub
  assert api.resolve("tiny-org/tiny-v3") == snap
  with pytest.raises(ValueError, match="tiny-org/missing: not a local path"):
    api.resolve("tiny-org/missing")
  monkeypatch.delenv("HF_HUB_CACHE")
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  assert api.hub_cache() == tmp_path / "hub" and api.resolve("tiny-org/tiny-v3") == snap


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate("x", temperature=-1), "temperature=-1.0: must be >= 0"),
    (lambda m: m.generate("x", top_p=2), r"top_p=2.0: must lie in \(0, 1\]"),
    (lambda m: m.generate("x", top_k=1.5), "top_k=1.5: must be an integer"),
    (lambda m: m.generate("x", temperature="hot"), "temperature='hot': must be a number"),
    (lambda m: m.generate("x", max_new_tokens=0), "max_new_tokens=0: must be a positive"),
    (lambda m: m.generate("x", stop=[""]), r"stop=\[''\]: must be a non-empty string"),
    (lambda m: m.generate([1, 2], stop="a"), "stop=: stop strings need text prompts"),
    (lambda m: m.generate([1, 999]), r"token ids must lie in \[0, 320\)"),
    (lambda m: m.generate({"a": 1}), "prompt must be a string, a list of strings"),
    (lambda m: m.generate(""), "'': no tokens"),
    (lambda m: m.stream(["a", "b"]), "stream: one text prompt"),
    (lambda m: m.score("x"), "at least 2 tokens"),
    (lambda m: deepseek_jax.load("/no/such/dir"), "/no/such/dir: no such file or directory"),
    (lambda m: deepseek_jax.load("runs/x", dtype="fp16"), "dtype='fp16': must be None"),
])
def test_bad_arguments_are_one_line_errors(lm, call, message):
  with pytest.raises(ValueError, match=message) as e:
    call(lm)
  assert "\n" not in str(e.value)


def readme_example() -> str:
  text = (ROOT / "README.md").read_text()
  block = re.search(r"^## Python API\n.*?```python\n(.*?)```", text, re.S | re.M)
  assert block, "README has no '## Python API' section with a python code block"
  return block.group(1)


def test_the_readme_example_runs_as_written(run, tmp_path, monkeypatch, capsys):
  """The README's example loads `runs/tiny` (what `python train.py` writes): here a run of the
  tests' tiny model (`make_run`), in a fresh working directory."""
  shutil.copytree(run[0], tmp_path / "runs" / "tiny")
  monkeypatch.chdir(tmp_path)
  exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__readme__"})
  assert capsys.readouterr().out.strip()
