"""Parameter counts: the config's arithmetic against `jax.eval_shape` of the real model."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.codesign.params import eval_shape_param_counts, param_counts
from deepseek_jax.codesign.report import reference_model


def test_v3_headline_numbers():
  pc = param_counts(reference_model("deepseek_v3_671b"))
  assert round(pc["total"] / 1e9, 2) == 671.03
  assert round(pc["active"] / 1e9, 1) == 36.6          # the "37B" without the embedding lookup
  assert pc["active_with_embedding"] / 1e9 == pytest.approx(37.55, abs=0.01)


@pytest.mark.parametrize("name", ["deepseek_v3_671b", "deepseek_v2_lite", "deepseek_v2_236b"])
def test_eval_shape_agrees_with_config(name):
  m = reference_model(name)
  assert eval_shape_param_counts(m) == param_counts(m)


def test_v2_sizes():
  pc = param_counts(reference_model("deepseek_v2_236b"))
  assert round(pc["total"] / 1e9) == 236 and round(pc["active_with_embedding"] / 1e9) == 21


@settings(max_examples=4, deadline=None)
@given(layers=st.integers(1, 3), dense=st.integers(0, 1), shared=st.integers(0, 2),
       q_lora=st.sampled_from([None, 24]), mtp=st.integers(0, 1), bias=st.booleans())
def test_eval_shape_agrees_on_random_small_models(layers, dense, shared, q_lora, mtp, bias):
  m = dataclasses.replace(
      reference_model("deepseek_v3_671b"), vocab_size=40, d_model=16, num_layers=layers,
      first_k_dense_replace=min(dense, layers), num_heads=2, q_lora_rank=q_lora, kv_lora_rank=8,
      qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, ffn_dim=24, n_routed_experts=8,
      n_shared_experts=shared, num_experts_per_tok=2, moe_ffn_dim=6, n_group=2, topk_group=1,
      routing_bias=bias, num_mtp_layers=mtp, max_position_embeddings=64, yarn=None)
  assert eval_shape_param_counts(m) == param_counts(m)
