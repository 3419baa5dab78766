"""The parameter tree's module names, declared once (V3 report §2; checkpoint names: hf/names.py).

A path is a flattened variable key without its collection, e.g. ('moe_blocks', 'layers', 'mlp',
'gate', 'kernel'). Decoder layers are numbered as in the checkpoint: layer i is dense for
i < first_k_dense_replace and MoE after it; MTP depth k + 1 is layer num_layers + k.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from deepseek_jax.config import ModelConfig

EMBED, FINAL_NORM, HEAD = "embed_tokens", "norm", "lm_head"
DENSE_STACK, MOE_STACK, MTP = "dense_blocks", "moe_blocks", "mtp"
SCANNED_LAYERS = "layers"   # a scanned stack: one module whose variables lead with a layer axis
ATTN_NORM, ATTN, FFN_NORM, MLP = "input_layernorm", "self_attn", "post_attention_layernorm", "mlp"
O_PROJ = "o_proj"
ROUTER, ROUTER_BIAS = "gate", "e_score_correction_bias"
ROUTED_EXPERTS, SHARED_EXPERTS = "experts", "shared_experts"
MTP_ENORM, MTP_HNORM, MTP_PROJ = "enorm", "hnorm", "eh_proj"
MTP_BLOCK, MTP_HEAD_NORM = "block", "shared_head_norm"
# Modules that stay high precision whatever the FP8 recipe (V3 report §3.3); `fp8/` imports
# nothing of the model, so its patterns name them and tests/test_naming.py checks that they match.
HIGH_PRECISION = (EMBED, HEAD, ROUTER, MTP_PROJ)

_UNROLLED = re.compile(r"layers_(\d+)")


def unrolled_layer(i: int) -> str:
  """The module name of layer i of an unrolled stack, and of MTP depth i + 1."""
  return f"layers_{i}"


def stack_layers(cfg: ModelConfig, stack: str) -> range:
  """Checkpoint layer numbers of DENSE_STACK, MOE_STACK or MTP, in stack order."""
  first, n, mtp = cfg.first_k_dense_replace, cfg.num_layers, cfg.num_mtp_layers
  return {DENSE_STACK: range(0, first), MOE_STACK: range(first, n), MTP: range(n, n + mtp)}[stack]


class Location(NamedTuple):
  kind: str                 # the top-level module: EMBED, FINAL_NORM, HEAD, a stack, or MTP
  index: int | None         # layer within its stack (MTP: depth - 1); None for a scanned stack
  layers: tuple[int, ...]   # checkpoint layer number of each slice (empty outside the layers)
  sub: tuple[str, ...]      # path inside the decoder layer (an MTP layer's block flattened in)
  stacked: int              # leading stacked-layer axes of the leaf (1 when scanned)


def locate(cfg: ModelConfig, path: tuple[str, ...]) -> Location:
  """Where a leaf lives; KeyError when `path` is not in the tree of `Transformer(cfg)`."""
  top, rest = path[0], tuple(path[1:])
  if top in (EMBED, FINAL_NORM, HEAD):
    return Location(top, None, (), rest, 0)
  if top in (DENSE_STACK, MOE_STACK, MTP) and rest:
    layers = stack_layers(cfg, top)
    if top != MTP and rest[0] == SCANNED_LAYERS:
      return Location(top, None, tuple(layers), rest[1:], 1)
    m = _UNROLLED.fullmatch(rest[0])
    if m and int(m.group(1)) < len(layers):
      i, sub = int(m.group(1)), rest[1:]
      if top == MTP and sub[:1] == (MTP_BLOCK,):
        sub = sub[1:]
      return Location(top, i, (layers[i],), sub, 0)
  raise KeyError(f"{'/'.join(path)}: not a path of the parameter tree of this model")


def is_embedding(path: tuple[str, ...]) -> bool:
  return path[0] == EMBED


def is_mtp(path: tuple[str, ...]) -> bool:
  return path[0] == MTP


def is_routed_expert(path: tuple[str, ...]) -> bool:
  """A leaf of the stacked routed experts (MLP/ROUTED_EXPERTS) of an MoE layer or MTP block."""
  return any(tuple(path[i:i + 2]) == (MLP, ROUTED_EXPERTS) for i in range(len(path) - 1))
