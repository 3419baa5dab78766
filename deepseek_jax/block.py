"""Decoder blocks (V3 report §2): pre-norm h += MLA(norm(h)); h += FFN(norm(h)), the FFN dense SwiGLU
or DeepSeekMoE, and stacks of them under `nn.scan` (compile time does not grow with depth) with an
optional remat policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax import naming
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import ACT_BTD, MLP, RMSNorm, dtype_of
from deepseek_jax.mla import MLA
from deepseek_jax.moe import MoE


class Block(nn.Module):
  """One pre-norm decoder block (HF names: input_layernorm, self_attn, post_attention_layernorm, mlp)."""
  cfg: ModelConfig
  fp8_policy: Any = None
  moe: bool = False
  absorb: bool = True
  experts: Any = None   # the MoE's routed-expert runner (`moe.RoutedExperts`)

  @nn.compact
  def __call__(self, h_BTD, positions_BT, cache, layer=None, segments_BT=None):
    """-> (h, (cache, aux)); `cache`/`layer`/`segments_BT` as in `MLA.__call__`."""
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    norm_kw = dict(eps=cfg.rms_norm_eps, param_dtype=pdt, axis_name="embed")
    h_BTD = checkpoint_name(h_BTD, "decoder_layer_input")
    attn_BTD, cache = MLA(cfg, self.fp8_policy, self.absorb, name=naming.ATTN)(
        RMSNorm(name=naming.ATTN_NORM, **norm_kw)(h_BTD), positions_BT, cache, layer, segments_BT)
    h_BTD = h_BTD + attn_BTD
    x_BTD = RMSNorm(name=naming.FFN_NORM, **norm_kw)(h_BTD)
    if self.moe:
      y_BTD, aux = MoE(cfg, self.fp8_policy, self.experts, name=naming.MLP)(x_BTD)
    else:
      y_BTD = MLP(cfg.d_model, cfg.ffn_dim, dtype=dt, param_dtype=pdt, init_std=cfg.init_std,
                  fp8_policy=self.fp8_policy, fuse_gate_up=cfg.fuse_gate_up, name=naming.MLP)(x_BTD)
      aux = {}
    h_BTD = nn.with_logical_constraint(h_BTD + y_BTD, ACT_BTD)
    return h_BTD, (cache, aux)


class StackBlock(Block):
  """A `Block` that carries the whole `[L, ...]` cache stack and takes its layer index as the
  scanned input: `((h, stack), positions, layer) -> ((h, stack), aux)`. Decoding scans this, so
  each layer writes its new tokens into the stack in place instead of the scan slicing a layer
  out (xs) and stacking it back (ys), which copies the whole cache every step."""

  def __call__(self, carry, positions_BT, layer):
    h_BTD, stack = carry
    h_BTD, (stack, aux) = super().__call__(h_BTD, positions_BT, stack, layer)
    return (h_BTD, stack), aux


# What each layer policy keeps for the backward pass (the rest is recomputed from the block input,
# which remat always keeps): the `checkpoint_name` tags are MaxText's, set in mla.py ("mla_q",
# "mla_kv", "attention_out"), layers.MLP ("mlp_wi", "mlp_wo"; also the shared experts) and
# Block ("decoder_layer_input").
PROJECTIONS = ("mla_q", "mla_kv", "attention_out", "mlp_wi", "mlp_wo")
_REMAT_POLICIES = {
    "full": None,                                     # nothing
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,   # every weight matmul
    "projections": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
    # The same, with the block input in pinned host memory (XLA:CPU lowers it too: same RAM).
    "projections_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=PROJECTIONS, names_which_can_be_offloaded=("decoder_layer_input",),
        offload_src="device", offload_dst="pinned_host"),
}


class BlockStack(nn.Module):
  """`n` blocks of one kind, scanned (stacked params with a leading 'layers' axis) or unrolled."""
  cfg: ModelConfig
  n: int
  moe: bool
  fp8_policy: Any = None
  absorb: bool = True
  experts: Any = None

  @nn.compact
  def __call__(self, h_BTD, positions_BT, cache, segments_BT=None):
    cfg = self.cfg
    block_cls = Block if cache is None else StackBlock
    if cfg.remat != "none":
      block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat],
                           prevent_cse=not cfg.scan_layers)
    kw = dict(cfg=cfg, fp8_policy=self.fp8_policy, moe=self.moe, absorb=self.absorb,
              experts=self.experts)
    if cfg.scan_layers:
      axes = {"params": 0, "router_state": 0, "fp8_state": 0, "intermediates": 0, "absorbed": 0}
      scanned = nn.scan(block_cls, variable_axes=axes, split_rngs={"params": True},
                        in_axes=(nn.broadcast, 0) if cache is not None else (nn.broadcast,) * 4,
                        length=self.n,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      if cache is None:
        h_BTD, (_, aux) = scanned(name=naming.SCANNED_LAYERS, **kw)(
            h_BTD, positions_BT, None, None, segments_BT)
      else:
        (h_BTD, cache), aux = scanned(name=naming.SCANNED_LAYERS, **kw)(
            (h_BTD, cache), positions_BT, jnp.arange(self.n, dtype=jnp.int32))
      return h_BTD, cache, aux
    auxes = []
    for i in range(self.n):
      block = block_cls(name=naming.unrolled_layer(i), **kw)
      if cache is None:
        h_BTD, (_, a) = block(h_BTD, positions_BT, None, None, segments_BT)
      else:
        (h_BTD, cache), a = block((h_BTD, cache), positions_BT, i)
      auxes.append(a)
    return h_BTD, cache, jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)


UNROLL_DECODE_LAYERS = 16   # decoding runs stacks of up to this many layers unrolled


def unstacked(cfg: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
  """The same model with its layer stacks unrolled: `cfg` with `scan_layers=False` and, in every
  collection, each stack's `[L, ...]` variables split into one subtree per layer
  (`naming.unrolled_layer(i)`). Decoding takes this layout when the model has at most
  UNROLL_DECODE_LAYERS layers: a scanned stack slices every layer's weights out of the stack in
  every step, and XLA:CPU copies a dynamic slice before its dot (the expert weights alone:
  ~0.3 ms per MoE layer and step at tiny.yaml)."""
  if not cfg.scan_layers:
    return cfg, variables
  counts = {naming.DENSE_STACK: cfg.first_k_dense_replace, naming.MOE_STACK: cfg.num_moe_layers}
  out = {}
  for col, tree in variables.items():
    tree = dict(tree)
    for stack, n in counts.items():
      if stack in tree and naming.SCANNED_LAYERS in tree[stack]:
        sub = dict(tree[stack])
        layers = sub.pop(naming.SCANNED_LAYERS)
        for i in range(n):
          sub[naming.unrolled_layer(i)] = jax.tree.map(lambda a, i=i: a[i], layers)
        tree[stack] = sub
    out[col] = tree
  return dataclasses.replace(cfg, scan_layers=False), out
