"""Parity with Hugging Face transformers (DeepseekV3/V2ForCausalLM, fp32) on committed fixtures.

Goal: logits within 1e-4 relative (max |ours - theirs| / max |theirs|) for prefill, for a cached
one-token step and a cached three-token step, MTP logits likewise, and identical routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import Transformer, init_model_cache
from deepseek_jax.moe import Gate
from tests.inference.conftest import load, reference, rel_err

TOL = 1e-4


def _routes(intermediates, stack: str) -> list[np.ndarray]:
  """Sorted expert indices [tokens, K] of each unrolled MoE layer, in layer order."""
  node = intermediates
  for k in stack.split("/"):
    node = node[k]
  out = []
  for name in sorted(node, key=lambda n: int(n.split("_")[1])):
    layer = node[name].get("block", node[name])
    gate = layer["mlp"]["gate"]
    out.append(np.sort(np.asarray(gate["__call__"][0].experts_XK), axis=-1))
  return out


@pytest.mark.parametrize("name", ["v3_tiny", "v2_tiny", "v3_fp8_tiny"])
def test_prefill_logits_routing_and_mtp_match_transformers(name):
  cfg, variables = load(name, scan_layers=False)
  ref = reference(name)
  out, state = Transformer(cfg).apply(
      variables, jnp.asarray(ref["input_ids"]), mutable=["intermediates"],
      capture_intermediates=lambda m, _: isinstance(m, Gate))
  assert rel_err(out.logits_BTV, ref["logits_prefill"]) < TOL
  routes = _routes(state["intermediates"], "moe_blocks")
  np.testing.assert_array_equal(np.stack(routes), ref["routing_prefill"])
  if "mtp_logits" in ref:
    assert rel_err(out.mtp_logits[0], ref["mtp_logits"]) < TOL
    mtp_routes = _routes(state["intermediates"], "mtp")
    np.testing.assert_array_equal(np.stack(mtp_routes), ref["mtp_routing"])


@pytest.mark.parametrize("name", ["v3_tiny", "v2_tiny"])
def test_cached_decode_steps_match_transformers(name):
  """Prefill 9 tokens into the latent cache in 3-token chunks, a 3-token step (positions 9-11),
  then the 1-token step at position 11 again: both match HF's cached calls."""
  cfg, variables = load(name)
  ref = reference(name)
  ids = jnp.asarray(ref["input_ids"])
  B = ids.shape[0]

  @jax.jit
  def call(cache, tokens_BT, start):
    pos_BT = start + jnp.broadcast_to(jnp.arange(tokens_BT.shape[1])[None], tokens_BT.shape)
    out = Transformer(cfg).apply(variables, tokens_BT, pos_BT, cache=cache)
    return out.logits_BTV, out.cache

  cache = init_model_cache(cfg, B, 16)
  for start in (0, 3, 6):
    _, cache = call(cache, ids[:, start:start + 3], start)
  logits3, cache = call(cache, ids[:, 9:12], 9)
  assert rel_err(logits3, ref["logits_step3"]) < TOL
  logits1, _ = call(cache, ids[:, 11:12], 11)
  assert rel_err(logits1, ref["logits_step1"]) < TOL
