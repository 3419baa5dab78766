"""KV cache per token: Insights Table 1 to the byte, and the MLA/GQA/MHA formulas as properties."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.codesign import kv_cache
from deepseek_jax.codesign.dense_models import LLAMA3_1_405B, QWEN2_5_72B
from deepseek_jax.codesign.report import reference_model
from deepseek_jax.config import ConfigError, ModelConfig

V3 = reference_model("deepseek_v3_671b")


def test_table1_to_the_byte():
  rows = kv_cache.table1(V3)
  assert [r.bytes_per_token for r in rows] == [70272, 327680, 516096]
  for r in rows:
    assert r.kb == pytest.approx(r.paper_kb, abs=1e-9)


def test_table1_ratios_and_the_papers_7_28():
  qwen, llama = kv_cache.table1(V3)[1:]
  assert round(qwen.ratio, 2) == qwen.paper_ratio == 4.66
  # The paper prints 7.28x; its own byte counts give 7.34x.
  assert round(llama.ratio, 2) == 7.34
  assert llama.paper_ratio == 7.28


def test_mha_equivalent_of_v3():
  mha = kv_cache.mha_equivalent_bytes_per_token(V3)
  assert mha == 2 * 128 * 128 * 61 * 2
  assert mha / kv_cache.kv_cache_bytes_per_token(V3) == pytest.approx(56.9, abs=0.05)


@given(layers=st.integers(1, 200), bpe=st.sampled_from([1, 2, 4]))
def test_bytes_linear_in_layers_and_element_size(layers, bpe):
  v3 = dataclasses.replace(V3, first_k_dense_replace=0)
  for m in (v3, QWEN2_5_72B, LLAMA3_1_405B):
    one = dataclasses.replace(m, num_layers=1)
    many = dataclasses.replace(m, num_layers=layers)
    kv = kv_cache.kv_cache_bytes_per_token
    assert kv(many, bpe) == layers * kv(one, bpe)
    assert kv(many, bpe) == bpe * kv(many, 1)


@given(c=st.integers(1, 1024), r=st.sampled_from([2, 16, 64]), layers=st.integers(1, 100))
def test_mla_caches_latent_plus_shared_rope_key(c, r, layers):
  m = ModelConfig(kv_lora_rank=c, qk_rope_head_dim=r, num_layers=layers, first_k_dense_replace=0)
  assert kv_cache.kv_cache_bytes_per_token(m) == (c + r) * layers * 2


def test_gqa_with_all_heads_is_mha():
  mha = dataclasses.replace(QWEN2_5_72B, num_kv_heads=QWEN2_5_72B.num_heads)
  kv = kv_cache.kv_cache_bytes_per_token
  assert kv(mha) == 2 * 64 * 128 * 80 * 2
  assert kv(mha) == 8 * kv(QWEN2_5_72B)


def test_bad_element_size_is_a_user_error():
  with pytest.raises(ConfigError, match="bytes_per_element"):
    kv_cache.kv_cache_bytes_per_token(V3, 0)
