"""DeepSeekMoE block (V3 report §2.1.2): h' = sum_shared FFN_s(u) + sum_{chosen i} g_i FFN_i(u).

Parameter names follow the HF checkpoint (`mlp.gate`, `mlp.experts`, `mlp.shared_experts`). The
routed experts run through the runner the caller passes (`dispatch.LocalExperts` by default, or
the expert-parallel one from `sharding/`); nothing ambient chooses the algorithm.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import dispatch, naming, router
from deepseek_jax import gmm as gmm_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import ACT_BTD, MLP, dtype_of, module_path


ACT_XE = ("act_tokens", None)


class Gate(nn.Module):
  """Router: f32 logits x W_g, then `router.route` with the selection bias from router_state."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_XD: jax.Array) -> router.RouterOutput:
    cfg = self.cfg
    D, E = cfg.d_model, cfg.n_routed_experts
    kernel_DE = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                               ("embed", "experts")), (D, E), jnp.float32)
    bias_E = None
    if cfg.routing_bias:
      bias_E = self.variable(
          "router_state", naming.ROUTER_BIAS,
          nn.with_logical_partitioning(lambda: jnp.zeros((E,), jnp.float32), ("experts",))).value
    logits_XE = jnp.einsum("XD,DE->XE", x_XD.astype(jnp.float32), kernel_DE,
                           precision=jax.lax.Precision.HIGHEST)
    # tokens split like the activations, experts whole
    logits_XE = nn.with_logical_constraint(logits_XE, ACT_XE)
    # each device routes its own tokens (XLA:GPU otherwise replicates the top-k over all of them)
    if bias_E is None:
      return gmm_lib.on_token_shards(lambda lg: router.route(lg, None, cfg), logits_XE, tokens=1)
    return gmm_lib.on_token_shards(lambda lg, b: router.route(lg, b, cfg), logits_XE, bias_E,
                                   tokens=1)


class RoutedExperts(nn.Module):
  """E stacked SwiGLU experts; `__call__(x_XD, weights_XK, experts_XK) -> y_XD` (weighted sum).

  Weights [E, D, M] (gate_proj, up_proj) and [E, M, D] (down_proj); `experts` runs them
  (None: `dispatch.LocalExperts.from_config(cfg)`). A runner that reports dispatch statistics
  has its dropped assignments sown into `intermediates`.
  """
  cfg: ModelConfig
  fp8_policy: Any = None
  experts: Any = None

  def _dots(self) -> dispatch.ExpertDots | None:
    if self.fp8_policy is None:
      return None
    path = module_path(self)
    chosen = {n: self.fp8_policy.dot_general_for(f"{path}/{n}")
              for n in dispatch.ExpertDots._fields}
    if all(d is None for d in chosen.values()):
      return None
    return dispatch.ExpertDots(**{n: d or jax.lax.dot_general for n, d in chosen.items()})

  @nn.compact
  def __call__(self, x_XD, weights_XK, experts_XK) -> jax.Array:
    cfg = self.cfg
    E, D, M = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    in_axes = ("experts", "expert_embed", "moe_mlp")
    out_axes = ("experts", "moe_mlp", "expert_embed")
    w_gate_EDM = self.param("gate_proj", nn.with_logical_partitioning(init, in_axes),
                            (E, D, M), param_dtype)
    w_up_EDM = self.param("up_proj", nn.with_logical_partitioning(init, in_axes),
                          (E, D, M), param_dtype)
    w_down_EMD = self.param("down_proj", nn.with_logical_partitioning(init, out_axes),
                            (E, M, D), param_dtype)
    args = (x_XD.astype(dtype), weights_XK, experts_XK, w_gate_EDM.astype(dtype),
            w_up_EDM.astype(dtype), w_down_EMD.astype(dtype))
    run = self.experts or dispatch.LocalExperts.from_config(cfg)
    y_XD, stats = run(*args, dots=self._dots())
    if stats is not None:
      self.sow("intermediates", "dropped_assignments", stats.dropped_assignments)
    return y_XD


class MoE(nn.Module):
  """`__call__(x_BTD) -> (y_BTD, aux)`; aux = {"load": [E] f32 assignment counts,
  "balance_loss": alpha * sequence-wise balance loss (V3 Eq. 17-20)}."""
  cfg: ModelConfig
  fp8_policy: Any = None
  experts: Any = None   # the routed-expert runner (see RoutedExperts)

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    B, T, D = x_BTD.shape
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    if D != cfg.d_model:
      raise ValueError(f"{module_path(self)}: input width {D} != model.d_model={cfg.d_model}")
    dtype = dtype_of(cfg.dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ACT_BTD)
    x_XD = nn.with_logical_constraint(x_BTD.reshape(B * T, D), ("act_tokens", "act_embed"))
    routing = Gate(cfg, name=naming.ROUTER)(x_XD)
    y_XD = RoutedExperts(cfg, self.fp8_policy, self.experts, name=naming.ROUTED_EXPERTS)(
        x_XD, routing.weights_XK, routing.experts_XK)
    y_BTD = y_XD.reshape(B, T, D).astype(dtype)
    if cfg.n_shared_experts > 0:
      shared = MLP(d_model=D, hidden=cfg.n_shared_experts * cfg.moe_ffn_dim, hidden_axis="moe_mlp",
                   dtype=dtype, param_dtype=dtype_of(cfg.param_dtype), init_std=cfg.init_std,
                   fp8_policy=self.fp8_policy, fuse_gate_up=cfg.fuse_gate_up,
                   name=naming.SHARED_EXPERTS)
      y_BTD = y_BTD + shared(x_BTD).astype(dtype)
    aux = {
        "load": router.expert_load(routing.experts_XK, E),
        "balance_loss": router.balance_loss(routing.scores_XE.reshape(B, T, E),
                                            routing.experts_XK.reshape(B, T, K), cfg),
    }
    return nn.with_logical_constraint(y_BTD, ACT_BTD), aux
