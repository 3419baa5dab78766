"""Parameter counts, total and active (V3 report §4.2: "671B total, 37B activated per token").

Two independent routes that must agree: `ModelConfig.param_counts()` (arithmetic on the config) and
`eval_shape_param_counts` (the shapes of the real model's variables under `jax.eval_shape`, nothing
allocated). Active parameters are what one token multiplies through: everything except the
embedding table and the routed experts it was not sent to (K of E per MoE layer); V3's "37B" is
36.6B this way and 37.5B with the embedding lookup counted.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from deepseek_jax import naming
from deepseek_jax.codesign.dense_models import DenseModel
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import abstract_variables


def param_counts(model: ModelConfig | DenseModel) -> dict[str, int]:
  """Config arithmetic: total, active, active_with_embedding, embedding (+ MTP for DeepSeek)."""
  if not isinstance(model, (ModelConfig, DenseModel)):
    raise TypeError(f"expected a ModelConfig or DenseModel, got {type(model).__name__}")
  return model.param_counts()


def eval_shape_param_counts(model: ModelConfig, variables=None) -> dict[str, int]:
  """Counts from the model's abstract variables (`params` and `router_state`).

  Keys match `ModelConfig.param_counts()`: the MTP subtree is reported apart ('mtp_total',
  'mtp_active') and the main model's 'active' scales each routed-expert tensor by K/E and drops
  the embedding table.
  """
  if variables is None:
    variables = abstract_variables(model)
  variables = nn.unbox(variables)
  frac = model.num_experts_per_tok / model.n_routed_experts
  out = dict.fromkeys(("total", "active", "embedding", "mtp_total", "mtp_active"), 0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in path[1:])   # path[0]: the collection
    size = int(leaf.size)
    active = size * frac if naming.is_routed_expert(keys) else size
    prefix = "mtp_" if naming.is_mtp(keys) else ""
    out[prefix + "total"] += size
    if naming.is_embedding(keys):
      out["embedding"] += size
      continue
    out[prefix + "active"] += active
  out = {k: int(round(v)) for k, v in out.items()}
  out["active_with_embedding"] = out["active"] + out["embedding"]
  return out
