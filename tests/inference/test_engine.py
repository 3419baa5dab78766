"""The continuous-batching engine: a stream of requests arriving mid-run gives every request the
tokens it gets alone (and that contiguous `generate` gives it), per-request stops, budgets,
sampling and MTP speculation, streaming, blocks all returned, each program compiled once,
one-line input errors; the serve command."""

from __future__ import annotations

import collections
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.generate import generate
from deepseek_jax.generate import serve
from deepseek_jax.generate.engine import Engine
from deepseek_jax.generate.load import load_for_inference
from deepseek_jax.generate.steps import (decode_slots, decode_slots_many, prefill_chunk,
                                         prefill_then_decode)
from deepseek_jax.hf import save_hf
from deepseek_jax.model import Transformer
from tests.helpers import init_model, small_config
from tests.inference.test_generate import _drafting_model

SHAPES = dict(slots=3, block_size=4, prefill_chunk=16, group=8, max_seq_len=64)


@pytest.fixture(scope="module")
def model():
  # as a HF checkpoint of it loads (the serve test reuses the compiled steps)
  cfg = small_config(num_layers=3, first_k_dense_replace=1, num_mtp_layers=1,
                     moe_dispatch="dropless", dtype="float32")
  return cfg, init_model(Transformer(cfg), jnp.zeros((1, 4), jnp.int32))


def _stream(seed: int = 0, n: int = 6):
  rs = np.random.RandomState(seed)
  prompts = [rs.randint(0, 64, rs.randint(1, 40)).tolist() for _ in range(n)]
  return prompts, [int(rs.randint(1, 20)) for _ in range(n)]


def test_stream_equals_each_request_alone_and_generate(model):
  """6 requests, 3 slots, half submitted while the first run; prompts longer than a chunk."""
  cfg, variables = model
  prompts, news = _stream()
  engine = Engine(cfg, variables, **SHAPES)
  reqs = [engine.submit(p, n) for p, n in zip(prompts[:3], news[:3])]
  for _ in range(4):
    engine.step()
  reqs += [engine.submit(p, n) for p, n in zip(prompts[3:], news[3:])]
  engine.run()
  assert engine.blocks.in_use == 0 and not engine.blocks.owned
  assert 0 < engine.blocks.peak_in_use <= engine.blocks.num_blocks - 1
  programs = (decode_slots, decode_slots_many, prefill_chunk, prefill_then_decode)
  compiled = [f._cache_size() for f in programs]
  alone = [Engine(cfg, variables, **SHAPES).submit(p, n).result() for p, n in zip(prompts, news)]
  assert [f._cache_size() for f in programs] == compiled   # no engine compiles a program again
  batch = generate(cfg, variables, prompts, max(news)).tokens
  for r, a, g, n in zip(reqs, alone, batch, news):
    assert r.finished and not r.stopped and len(r.tokens) == n
    assert r.tokens == a == g[:n]


def test_several_decode_steps_per_call_emit_the_same_tokens(model):
  """`decode_steps` (decode steps per host round trip while nothing is prefilled) changes how
  often the host is visited, not the tokens: 1 and 5 give the same stream (stops, budgets and
  a request finishing mid-call included), 5 in fewer engine steps."""
  cfg, variables = model
  prompts, news = _stream(seed=2, n=5)
  out, steps = {}, {}
  for k in (1, 5):
    engine = Engine(cfg, variables, **SHAPES, decode_steps=k)
    reqs = [engine.submit(p, n, stop=[7]) for p, n in zip(prompts, news)]
    engine.run()
    out[k], steps[k] = [(r.tokens, r.stopped) for r in reqs], engine.steps
    assert engine.blocks.in_use == 0
  assert out[1] == out[5] and steps[5] < steps[1]


def test_a_new_engine_compiles_each_program_once(model, caplog):
  """Its first calls take arrays it made itself, later ones the calls' outputs: both must hit
  one compiled program (uncommitted arrays had made the first call compile it a second time)."""
  cfg, variables = model
  # Variables on a device, as a checkpoint loads them (with uncommitted ones it did not show).
  variables = jax.device_put(variables, jax.devices()[0])
  shapes = dict(SHAPES, slots=2, prefill_chunk=8)   # shapes no other test compiles
  prompts, news = _stream(seed=3, n=2)
  with jax.log_compiles(), caplog.at_level(logging.DEBUG):
    engine = Engine(cfg, variables, **shapes)
    for p, n in zip(prompts, news):
      engine.submit(p, n)
    engine.run()
  compiled = collections.Counter(
      m.group(1) for m in re.finditer(r"Finished XLA compilation of jit\((\w+)\)", caplog.text))
  assert compiled["prefill_then_decode"] == 1 and compiled["decode_slots_many"] == 1, compiled


def test_per_request_stops_budgets_and_sampling(model):
  """A stop id cuts its request only; a sampled request draws the same tokens alone as beside
  others (its key depends on its seed and positions only); no program recompiles."""
  cfg, variables = model
  prompts, _ = _stream(seed=1, n=4)
  engine = Engine(cfg, variables, **SHAPES)
  greedy = [engine.submit(p, 12).result() for p in prompts[:2]]
  compiled = decode_slots._cache_size(), prefill_chunk._cache_size()
  stop = greedy[0][4]
  kw = dict(temperature=0.9, top_k=8, top_p=0.95, seed=5)
  reqs = [engine.submit(prompts[0], 12, stop=[stop, 63]), engine.submit(prompts[1], 12),
          engine.submit(prompts[2], 1), engine.submit(prompts[3], 15, **kw)]
  engine.run()
  cut = greedy[0].index(stop)
  assert reqs[0].tokens == greedy[0][:cut] and reqs[0].stopped
  assert reqs[1].tokens == greedy[1] and not reqs[1].stopped
  assert len(reqs[2].tokens) == 1
  sampled = Engine(cfg, variables, **SHAPES).submit(prompts[3], 15, **kw).result()
  assert reqs[3].tokens == sampled and len(sampled) == 15
  # ... and its decode steps drew (the batch-wide greedy shortcut, steps._sample_slots, stayed
  # off): after its first token it is not the greedy continuation.
  greedy_after = Engine(cfg, variables, **SHAPES).submit(list(prompts[3]) + sampled[:1], 14)
  assert sampled[1:] != greedy_after.result()
  assert (decode_slots._cache_size(), prefill_chunk._cache_size()) == compiled


def test_iterating_a_request_streams_and_runs_the_others(model):
  cfg, variables = model
  prompts, _ = _stream(seed=2, n=2)
  engine = Engine(cfg, variables, **SHAPES)
  a, b = engine.submit(prompts[0], 6), engine.submit(prompts[1], 30)
  seen = []
  for tok in a:
    seen.append((tok, a.finished))
  assert [t for t, _ in seen] == a.tokens and len(a.tokens) == 6
  assert not seen[0][1]     # the first token came before the request had finished
  assert 0 < len(b.tokens) < 30 and not b.finished   # b advanced in the same steps
  assert b.result() == b.tokens and len(b.tokens) == 30


@pytest.mark.parametrize("kw,match", [
    (dict(prompt_ids=[]), "prompt_ids: must hold at least one token"),
    (dict(prompt_ids=[64]), r"vocab_size=64"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=70), "exceeds max_seq_len=64"),
    (dict(stop=list(range(9))), "stops=8"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=0.0), "top_p=0.0"),
])
def test_bad_requests_are_one_line_errors(model, kw, match):
  cfg, variables = model
  engine = Engine(cfg, variables, **SHAPES)
  args = dict(prompt_ids=[1, 2], max_new_tokens=4) | kw
  with pytest.raises(ValueError, match=match):
    engine.submit(**args)
  assert not engine.queue
  with pytest.raises(ValueError, match="slots=0"):
    Engine(cfg, variables, slots=0)


def test_speculation_per_request_keeps_greedy_tokens(model):
  """Speculating and plain requests share the steps: every greedy output equals plain decoding,
  drafts are verified only for the requests that asked, and some are accepted (a model whose
  MTP module nearly predicts the main model: tests/inference/test_generate.py)."""
  cfg, variables = model
  variables = _drafting_model(variables, 0.05)
  prompts, news = _stream(seed=3, n=4)
  engine = Engine(cfg, variables, speculative=True, **SHAPES)
  reqs = [engine.submit(p, n, speculative=i % 2 == 0) for i, (p, n) in
          enumerate(zip(prompts, news))]
  engine.run()
  plain = Engine(cfg, variables, **SHAPES)   # == generate: the first test
  want = [plain.submit(p, n) for p, n in zip(prompts, news)]
  plain.run()
  for i, (r, w, n) in enumerate(zip(reqs, want, news)):
    assert r.tokens == w.tokens and len(r.tokens) == n
    assert (r.drafted > 0) == (i % 2 == 0 and n > 1)
  assert sum(r.accepted for r in reqs) > 0 and engine.blocks.in_use == 0
  with pytest.raises(ValueError, match="speculative=True"):
    Engine(cfg, variables, **SHAPES).submit([1], 2, speculative=True)


def test_serve_command(model, tmp_path, capsys):
  """Prompts from a file (jsonl with per-line parameters) stream out as JSON lines; a bad line
  is one error line and exit 2."""
  cfg, variables = model
  save_hf(tmp_path / "ckpt", cfg, variables)
  prompts, _ = _stream(seed=4, n=2)
  lines = [json.dumps({"prompt": " ".join(map(str, p)), "max_new_tokens": 3 + i})
           for i, p in enumerate(prompts)]
  (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
  args = ["--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.jsonl"),
          "--format", "jsonl", "--tokenizer", "ids", "--ignore-eos", "--slots", "3",
          "--block-size", "4", "--prefill-chunk", "16", "--max-seq-len", "64"]
  assert serve.main(args) == 0
  events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  done = {e["id"]: e for e in events if e.get("done")}
  assert sorted(done) == [0, 1] and [done[i]["tokens"] for i in (0, 1)] == [3, 4]
  loaded = load_for_inference(tmp_path / "ckpt")[:2]
  assert loaded[0] == cfg   # so serve ran the steps the tests above compiled
  for i in (0, 1):
    text = "".join(e["text"] for e in events if e["id"] == i and "text" in e)
    want = Engine(*loaded, **SHAPES).submit(prompts[i], 3 + i).result()
    assert [int(t) for t in text.split()] == want
  (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + '{"prompt": "1", "top_k": 1.5}\n')
  assert serve.main(args[:2] + ["--prompts", str(tmp_path / "bad.jsonl")] + args[4:]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: --prompts line 2: top_k=1.5 must be int"]
  assert serve.main(args + ["--decode-steps", "0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "decode_steps=0" in err[0] and "positive integer" in err[0], err
