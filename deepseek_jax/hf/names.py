"""The checkpoint naming table: parameter leaf <-> Hugging Face tensor names (semantics §4).

`model.layers.{i}.X` is decoder layer i as `naming.locate` numbers it (dense, then MoE, then the MTP
depths), X the layer-relative path joined by dots. Linear weights are [out, in] in the checkpoint
and kernels [in..., out...] here; routed experts are stored per expert
(`mlp.experts.{j}.gate_proj.weight` [M, D]) and stacked here ([E, D, M]).
"""

from __future__ import annotations

import math
import re
from typing import Iterator, NamedTuple

from deepseek_jax import naming
from deepseek_jax.config import ModelConfig

# Multi-axis inputs of a kernel (all other kernels contract one leading axis).
_N_IN = {naming.O_PROJ: 2}
# The leaves outside the decoder layers: (checkpoint name, linear?).
_TOP = {(naming.EMBED, "embedding"): ("model.embed_tokens.weight", False),
        (naming.FINAL_NORM, "weight"): ("model.norm.weight", False),
        (naming.HEAD, "kernel"): ("lm_head.weight", True)}
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
  """A decoder-layer-relative param path -> (HF name, linear?, number of input axes)."""
  if sub[-1] == naming.ROUTER_BIAS:
    return ".".join(sub), False, 0
  if sub[-1] == "kernel":
    return ".".join(sub[:-1]) + ".weight", True, _N_IN.get(sub[-2], 1)
  if sub[-1] == "weight":
    return ".".join(sub) if sub[-2] != naming.MTP_HEAD_NORM else "shared_head.norm.weight", False, 0
  raise KeyError(f"no checkpoint name for parameter {'/'.join(sub)}")


def entries(cfg: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...]) -> Iterator[Entry]:
  """Checkpoint tensors of one leaf (`path` = (collection, *module path, name))."""
  p = tuple(path[1:])
  if p in _TOP:
    name, linear = _TOP[p]
    yield Entry(name, path, (), linear, 1 if linear else 0)
    return
  loc = naming.locate(cfg, p)
  if not loc.layers:
    raise KeyError(f"no checkpoint name for parameter {'/'.join(p)}")
  for i, layer in enumerate(loc.layers):
    pre, idx = f"model.layers.{layer}.", (i,) * loc.stacked
    if loc.sub[:2] == (naming.MLP, naming.ROUTED_EXPERTS):
      for j in range(shape[loc.stacked]):
        yield Entry(f"{pre}mlp.experts.{j}.{loc.sub[2]}.weight", path, idx + (j,), True, 1)
      continue
    name, linear, n_in = block_sub(loc.sub)
    yield Entry(pre + name, path, idx, linear, n_in)


def hf_shape(e: Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
  s = leaf_shape[len(e.index):]
  return (math.prod(s[e.n_in:]), math.prod(s[:e.n_in])) if e.linear else s
