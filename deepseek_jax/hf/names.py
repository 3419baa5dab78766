"""The checkpoint naming table: each parameter leaf <-> its Hugging Face tensor names (semantics §4).

`model.layers.{i}.X` is layer i of `dense_blocks` (i < first_k_dense_replace) or of `moe_blocks`,
stacked on a leading layer axis; MTP depth k is `model.layers.{num_layers + k}`. Linear weights are
[out, in] in the checkpoint and kernels [in..., out...] here; routed experts are stored per expert
(`mlp.experts.{j}.gate_proj.weight` [M, D]) and stacked here ([E, D, M]).
"""

from __future__ import annotations

import math
import re
from typing import Iterator, NamedTuple

from deepseek_jax.config import ModelConfig

# Multi-axis inputs of a kernel (all other kernels contract one leading axis).
_N_IN = {"o_proj": 2}
# Never quantized in DeepSeek's FP8 release (semantics §3): output head, router, MTP projection.
NOT_FP8 = re.compile(r"(^lm_head\.|mlp\.gate\.weight$|eh_proj\.weight$)")
# Present in released checkpoints but not parameters here (MTP copies of the shared embed/head).
IGNORED = re.compile(r"(\.(embed_tokens|shared_head\.head)\.weight$|rotary_emb\.inv_freq$)")


class Entry(NamedTuple):
  """One checkpoint tensor: where it lives in a leaf (`index` into the leading axes) and how."""
  hf_name: str
  leaf: tuple[str, ...]
  index: tuple[int, ...]
  linear: bool          # [out, in] in the checkpoint, [in..., out...] here
  n_in: int


def block_sub(sub: tuple[str, ...]) -> tuple[str, bool, int]:
  """A block-relative param path -> (HF name, linear?, number of input axes)."""
  if sub[-1] == "e_score_correction_bias":
    return "mlp.gate.e_score_correction_bias", False, 0
  if sub[-1] == "kernel":
    return ".".join(sub[:-1]) + ".weight", True, _N_IN.get(sub[-2], 1)
  if sub[-1] == "weight":
    return ".".join(sub) if sub[-2] != "shared_head_norm" else "shared_head.norm.weight", False, 0
  raise KeyError(f"no checkpoint name for parameter {'/'.join(sub)}")


def entries(cfg: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...]) -> Iterator[Entry]:
  """Checkpoint tensors of one leaf (`path` = (collection, *module path, name))."""
  p = path[1:]
  if p == ("embed_tokens", "embedding"):
    yield Entry("model.embed_tokens.weight", path, (), False, 0)
    return
  if p == ("norm", "weight"):
    yield Entry("model.norm.weight", path, (), False, 0)
    return
  if p == ("lm_head", "kernel"):
    yield Entry("lm_head.weight", path, (), True, 1)
    return
  if p[0] in ("dense_blocks", "moe_blocks"):
    offset = 0 if p[0] == "dense_blocks" else cfg.first_k_dense_replace
    if p[1] == "layers":
      layers, lead, sub = [(offset + i, (i,)) for i in range(shape[0])], 1, p[2:]
    else:
      layers, lead, sub = [(offset + int(p[1].split("_")[1]), ())], 0, p[2:]
  elif p[0] == "mtp":
    k = int(p[1].split("_")[1])
    layers, lead, sub = [(cfg.num_layers + k, ())], 0, p[3:] if p[2] == "block" else p[2:]
  else:
    raise KeyError(f"no checkpoint name for parameter {'/'.join(p)}")
  for layer, idx in layers:
    pre = f"model.layers.{layer}."
    if sub[:2] == ("mlp", "experts"):
      n_experts = shape[lead]
      for j in range(n_experts):
        yield Entry(f"{pre}mlp.experts.{j}.{sub[2]}.weight", path, idx + (j,), True, 1)
      continue
    name, linear, n_in = block_sub(sub)
    yield Entry(pre + name, path, idx, linear, n_in)


def hf_shape(e: Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
  s = leaf_shape[len(e.index):]
  return (math.prod(s[e.n_in:]), math.prod(s[:e.n_in])) if e.linear else s
