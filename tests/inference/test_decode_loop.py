"""The decode loop: the whole generation is one on-device call (no host round-trip between steps),
and streaming in chunks of any size gives the same tokens, each once."""

import pytest

from deepseek_jax.generate import decode as decode_mod
from deepseek_jax.generate import generate


@pytest.mark.parametrize("speculative", [False, True])
def test_one_call_without_streaming_and_same_tokens_streamed_in_chunks(v3, monkeypatch,
                                                                       speculative):
  cfg, variables = v3
  prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44]]
  calls = []
  real = decode_mod.decode_loop

  def counting(*a, **kw):
    calls.append(int(kw["max_steps"]))
    return real(*a, **kw)

  monkeypatch.setattr(decode_mod, "decode_loop", counting)
  whole = generate(cfg, variables, prompts, 13, speculative=speculative)
  assert len(calls) == 1 and whole.steps >= 6 and all(len(t) == 13 for t in whole.tokens)
  for every in (1, 3):
    calls.clear()
    seen = [[], []]
    g = generate(cfg, variables, prompts, 13, speculative=speculative, stream_every=every,
                 on_tokens=lambda b, t: seen[b].extend(t))
    assert g.tokens == whole.tokens and seen == whole.tokens
    assert len(calls) <= g.steps // every + 2   # one call per chunk, plus one in flight
  with pytest.raises(ValueError, match="stream_every=0"):
    generate(cfg, variables, prompts, 4, stream_every=0)
