"""deepseek-jax: DeepSeek-V3 (arXiv 2412.19437) and its hardware co-design (ISCA '25, arXiv 2505.09343)
in JAX/Flax.

Who may import whom (`scripts/import_graph.py` checks it; `tests/test_house.py` fails on a breach):
- `config` imports nothing of the project; `tokenizer` only `config`; `fp8/` only `config`;
  `kernels/` nothing.
- The model side (`layers rope attention mla router gmm expert_blocks dispatch moe block mtp model
  loss naming vma`) imports
  `config`, `fp8/`, `kernels/` and itself, never `sharding/`: whoever builds a `Transformer` passes the FP8
  policy and the expert runner (`dispatch.LocalExperts` or `sharding.expert_parallel`).
- `sharding/` imports `config`, `fp8/` and model-side primitives; never training or inference.
- `training/`, `generate/`, `hf/`, `codesign/` build on all of the above; `api` on those; the
  commands (`train.py`, the `__main__` modules) on anything. No cycles anywhere.

The public API below is loaded on first use, so `import deepseek_jax.config` stays light:
`deepseek_jax.load(path_or_id) -> LM` (a run, a HF directory or a cached hub id) with
`LM.generate`, `LM.stream`, `LM.score` and `LM.perplexity` (`api.py`).
"""

from __future__ import annotations

import importlib

from deepseek_jax.version import __version__  # noqa: F401

_API = {
    "LM": "deepseek_jax.api", "load": "deepseek_jax.api",
    "Config": "deepseek_jax.config", "ConfigError": "deepseek_jax.config",
    "ModelConfig": "deepseek_jax.config", "load_config": "deepseek_jax.config",
    "Transformer": "deepseek_jax.model", "abstract_variables": "deepseek_jax.model",
    "init_model_cache": "deepseek_jax.model", "LocalExperts": "deepseek_jax.dispatch",
    "policy_from_config": "deepseek_jax.fp8", "load_hf": "deepseek_jax.hf",
    "save_hf": "deepseek_jax.hf", "Sampling": "deepseek_jax.generate",
    "load_for_inference": "deepseek_jax.generate", "kv_cache_bytes_per_token": "deepseek_jax.codesign",
    "param_counts": "deepseek_jax.codesign", "memory_plan": "deepseek_jax.codesign",
}
__all__ = sorted(_API)


def __getattr__(name: str):
  if name not in _API:
    raise AttributeError(f"module 'deepseek_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_API[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_API))
