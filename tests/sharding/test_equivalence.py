"""Sharded == unsharded: loss and gradients of the whole model (dense + MoE + MTP) on 8 devices."""

import jax
import numpy as np
import pytest

from tests.sharding import common

# 1 dense + 1 MoE layer and one MTP depth (another MoE block): every layer kind, one compile each.
CFG = common.small_cfg(num_layers=2)


def _assert_grads_close(grads, grads_ref):
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for (path, g), g_ref in zip(flat, jax.tree.leaves(grads_ref)):
    scale = float(np.max(np.abs(g_ref))) + 1e-12
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=2e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


# (2, 2, 2, 1) and (2, 1, 2, 2) between them shard every axis; the other two run with -m slow.
@pytest.mark.parametrize("shape", [pytest.param((8, 1, 1, 1), marks=pytest.mark.slow), (2, 2, 2, 1),
                                   pytest.param((1, 2, 4, 1), marks=pytest.mark.slow), (2, 1, 2, 2)])
def test_loss_and_grads_match_single_device(shape):
  _, _, loss_ref, grads_ref = common.reference(CFG)
  loss, grads, text, placed = common.sharded_loss_and_grads(CFG, shape)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
  _assert_grads_close(grads, grads_ref)
  # The mesh really split the work: expert-parallel all-to-all iff experts are split, and
  # the expert weights sit on the expected axes.
  data, fsdp, expert, tensor = shape
  assert ("all_to_all" in text) == (expert > 1)
  w = placed["params"]["moe_blocks"]["layers"]["mlp"]["experts"]["gate_proj"]
  shard = w.addressable_shards[0].data.shape
  assert shard == (w.shape[0], w.shape[1] // expert, w.shape[2] // fsdp, w.shape[3] // tensor)


def test_non_expert_weights_over_the_expert_axis_by_override():
  """`mesh.rules=["embed=fsdp,expert"]` shards every non-expert weight's D over fsdp x expert
  (ZeRO-3 across expert-parallel ranks) while the routed experts keep E over expert and their
  own D (`expert_embed`) over fsdp; loss and gradients still equal one device's."""
  from sharding import rules as rules_lib  # noqa: PLC0415
  rules = rules_lib.with_overrides(rules_lib.DEFAULT_RULES, ["embed=fsdp,expert"])
  _, _, loss_ref, grads_ref = common.reference(CFG)
  loss, grads, _, placed = common.sharded_loss_and_grads(CFG, (1, 2, 4, 1), rules=rules)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  _assert_grads_close(grads, grads_ref)
  q_a = placed["params"]["dense_blocks"]["layers"]["self_attn"]["q_a_proj"]["kernel"]
  assert q_a.addressable_shards[0].data.shape == (q_a.shape[0], q_a.shape[1] // 8, q_a.shape[2])
  w = placed["params"]["moe_blocks"]["layers"]["mlp"]["experts"]["gate_proj"]
  assert w.addressable_shards[0].data.shape == (w.shape[0], w.shape[1] // 4, w.shape[2] // 2,
                                                w.shape[3])
