"""Generation: greedy equals transformers' `generate` on a ragged batch, chunked prefill, stop
tokens and budgets, one compiled step, MTP speculation identical to plain greedy, the CLI."""

from __future__ import annotations

import flax
import jax.numpy as jnp
import pytest

from deepseek_jax.generate import __main__ as generate_cli
from deepseek_jax.generate import Sampling, decode_loop, generate
from tests.inference.conftest import fixture_dir, reference


def _prompts(ref) -> list[list[int]]:
  ids, lens = ref["input_ids"], ref["gen_prompt_lens"]
  return [ids[b, :lens[b]].tolist() for b in range(len(lens))]


def test_greedy_matches_transformers_generate_on_ragged_batch(v3):
  """HF left-pads; we give each row its own positions. Chunked prefill (chunks of 2, the shorter
  prompt ending two chunks early) gives the same tokens; streaming sees every token once."""
  cfg, variables = v3
  ref = reference("v3_tiny")
  want = ref["gen_tokens"].tolist()
  streamed = [[], []]
  g = generate(cfg, variables, _prompts(ref), 10, on_tokens=lambda b, t: streamed[b].extend(t))
  assert g.tokens == want and streamed == want and g.stopped == [False, False]
  assert generate(cfg, variables, _prompts(ref), 10, prefill_chunk=2).tokens == want


def test_one_compiled_loop_for_any_length_sampling_or_stops(v3):
  cfg, variables = v3
  prompts = _prompts(reference("v3_tiny"))
  generate(cfg, variables, prompts, 10)
  n = decode_loop._cache_size()
  generate(cfg, variables, prompts, 17, Sampling(0.7, 5, 0.9), stop_tokens=[3, 4], seed=3)
  generate(cfg, variables, prompts, 3, Sampling(1.3, 0, 0.5), stop_tokens=[9])
  assert decode_loop._cache_size() == n


def test_stop_tokens_and_budget(v3):
  cfg, variables = v3
  ref = reference("v3_tiny")
  want = ref["gen_tokens"].tolist()
  stop = want[0][3]
  g = generate(cfg, variables, _prompts(ref), 10, stop_tokens=[stop])
  for b in range(2):
    cut = want[b].index(stop) if stop in want[b] else len(want[b])
    assert g.tokens[b] == want[b][:cut] and g.stopped[b] == (stop in want[b])
  g = generate(cfg, variables, _prompts(ref), 4)
  assert g.tokens == [w[:4] for w in want] and g.steps <= 4


def _drafting_model(variables, eps: float):
  """The fixture with its blocks' residual branches scaled by `eps` and an MTP module that
  reproduces the eps=0 model exactly (identity block, eh_proj passing the embedding): the draft
  is the main model's next greedy token when eps=0 and often is when eps is small."""
  flat = flax.traverse_util.flatten_dict(variables)
  out = {}
  for k, a in flat.items():
    path = "/".join(k)
    branch = path.endswith("o_proj/kernel") or "down_proj" in path
    if k[1] in ("dense_blocks", "moe_blocks") and branch:
      a = a * eps
    elif k[1] == "mtp":
      if branch:
        a = jnp.zeros_like(a)
      elif path.endswith("enorm/weight"):
        a = jnp.ones_like(a)
      elif path.endswith("eh_proj/kernel"):
        D = a.shape[1]
        a = jnp.concatenate([jnp.eye(D, dtype=a.dtype), jnp.zeros((D, D), a.dtype)])
      elif path.endswith("shared_head_norm/weight"):
        a = flat[("params", "norm", "weight")]
    out[k] = a
  return flax.traverse_util.unflatten_dict(out)


def test_speculative_greedy_is_identical_to_plain_greedy(v3):
  cfg, variables = v3
  prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44]]
  compiled = []
  for eps, lo, hi in ((0.0, 1.0, 1.0), (0.3, 0.3, 0.95), (1.0, 0.0, 0.2)):
    model = _drafting_model(variables, eps) if eps < 1 else variables
    plain = generate(cfg, model, prompts, 24)
    fast = generate(cfg, model, prompts, 24, speculative=True, prefill_chunk=4)
    assert fast.tokens == plain.tokens, eps
    assert lo <= fast.acceptance <= hi, (eps, fast.acceptance)
    compiled.append(decode_loop._cache_size())
  assert compiled[0] == compiled[-1]   # one loop each for plain and speculative steps


def test_speculative_stops_and_budget_cut_inside_a_step(v3):
  cfg, variables = v3
  model = _drafting_model(variables, 0.0)  # every draft accepted: two tokens per step
  prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44]]
  plain = generate(cfg, model, prompts, 7)
  fast = generate(cfg, model, prompts, 7, speculative=True, prefill_chunk=4)
  assert fast.tokens == plain.tokens and all(len(t) == 7 for t in fast.tokens)
  stop = plain.tokens[0][2]  # the first token of a two-token step
  cut = generate(cfg, model, prompts, 7, stop_tokens=[stop], speculative=True, prefill_chunk=4)
  for b in range(2):
    t = plain.tokens[b]
    assert cut.tokens[b] == (t[:t.index(stop)] if stop in t else t)


def test_speculative_needs_an_mtp_module():
  from tests.inference.conftest import load  # noqa: PLC0415
  cfg, variables = load("v2_tiny")
  with pytest.raises(ValueError, match="num_mtp_layers=0"):
    generate(cfg, variables, [[1, 2]], 4, speculative=True)


def test_cli_streams_the_greedy_continuation(capsys):
  ref = reference("v3_tiny")
  prompts = [",".join(map(str, p)) for p in _prompts(ref)]
  argv = ["--checkpoint", str(fixture_dir("v3_tiny")), "--tokenizer", "ids", "--ignore-eos",
          "--max-new-tokens", "10", "--prompt", prompts[0], "--prompt", prompts[1]]
  assert generate_cli.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [[int(t) for t in line.split()] for line in lines] == ref["gen_tokens"].tolist()
  assert generate_cli.main(["--checkpoint", str(fixture_dir("nope")), "--prompt", "1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and len(err.splitlines()) == 1
