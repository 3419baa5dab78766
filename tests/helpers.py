"""Shared test helpers: small random configs and model builders."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
from hypothesis import strategies as st

from deepseek_jax.config import ModelConfig, YarnConfig


def has_module(name: str) -> bool:
  """Whether `name` is importable; False (not an error) when a parent package is missing too."""
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


HAS_TOKAMAX = has_module("tokamax")
HAS_GPU_COMPILER = has_module("jax_plugins.xla_cuda12")
HAS_TPU_COMPILER = has_module("libtpu")


def small_config(**overrides) -> ModelConfig:
  """A small all-feature config: 2 layers (1 dense + 1 MoE), MTP off unless asked."""
  base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, q_lora_rank=16, kv_lora_rank=8,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, ffn_dim=48,
              first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=2, moe_ffn_dim=16, n_group=4, topk_group=2,
              max_position_embeddings=256, yarn=None, num_mtp_layers=0, init_std=0.2,
              moe_dispatch="dense")
  base.update(overrides)
  return ModelConfig(**base)


@st.composite
def mla_configs(draw, moe: bool = False):
  """Random small MLA configs (q_lora_rank may be None; YaRN on or off)."""
  layers = draw(st.integers(1, 3))
  yarn = draw(st.sampled_from([None, YarnConfig(factor=4.0, original_max_position_embeddings=16)]))
  return small_config(
      d_model=draw(st.sampled_from([16, 32])),
      num_layers=layers,
      first_k_dense_replace=draw(st.integers(0, layers)) if moe else layers,
      num_heads=draw(st.integers(1, 3)),
      q_lora_rank=draw(st.sampled_from([None, 8, 16])),
      kv_lora_rank=draw(st.sampled_from([4, 8, 16])),
      qk_nope_head_dim=draw(st.sampled_from([4, 8])),
      qk_rope_head_dim=draw(st.sampled_from([2, 4, 8])),
      v_head_dim=draw(st.sampled_from([4, 8])),
      yarn=yarn,
  )


def init_model(model, tokens_BT, seed: int = 0):
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), tokens_BT)
  from flax import linen as nn
  return nn.meta.unbox(variables)


def random_tokens(cfg: ModelConfig, B: int, T: int, seed: int = 0):
  return jax.random.randint(jax.random.PRNGKey(seed + 100), (B, T), 0, cfg.vocab_size, jnp.int32)


def replace(cfg: ModelConfig, **kw) -> ModelConfig:
  return dataclasses.replace(cfg, **kw)
