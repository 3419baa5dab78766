"""Roofline of our own training step: XLA's cost analysis vs analytic FLOPs vs measured time.

("Insights into DeepSeek-V3" Table 4 reports MFU against an analytic FLOP count; this does the
same for the step this repository compiles.) The step is forward + backward + an SGD update of a
plain next-token cross-entropy on `Transformer` logits (plus the balance loss; MTP off, since the
analytic count excludes it).

XLA's cost analysis counts a while-loop body once, whatever its trip count, and our programs loop:
`nn.scan` over layers, and the CPU dropless dispatch scans over expert blocks. So the FLOP check
compiles a loop-free twin of the step (layer stacks unrolled, the "dense" dispatch that runs all
E experts on every token) whose arithmetic XLA counts in full, against

  tokens x ModelConfig.flops_per_token(T, mtp=False, causal=False)
                                            (the expanded path computes all T x T scores and
                                             masks half of them)
  + tokens x 6 x L_moe x (E - K) x 3 D M   (the dense dispatch's other experts)

The configured step itself is what gets timed; its own XLA count is reported with the number of
while loops that make it an undercount. Speed is set against a matmul peak measured in the same
run (DESIGN.md: absolute times on a shared machine mean little).
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.codesign.activations import activation_bytes_per_token
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer, abstract_variables
from deepseek_jax.mtp import cross_entropy
from deepseek_jax.training.metrics import measure_matmul_peak  # one peak measurement for all


def _cost(compiled) -> dict:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):   # older JAX returned one dict per computation
    ca = ca[0] if ca else {}
  return dict(ca or {})


def make_train_step(model: ModelConfig, lr: float = 1e-3):
  """(params, router_state, tokens_BT) -> (params, loss): one SGD step on next-token CE."""
  net = Transformer(model)

  def loss_fn(params, router_state, tokens_BT):
    out = net.apply({"params": params, "router_state": router_state}, tokens_BT, with_mtp=False)
    targets_BT = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, :1]], axis=1)
    weight_BT = jnp.ones(tokens_BT.shape, jnp.float32).at[:, -1].set(0.0)
    loss = cross_entropy(out.logits_BTV, targets_BT, weight_BT)
    return loss + out.aux.get("balance_loss", 0.0)

  def step(params, router_state, tokens_BT):
    loss, grads = jax.value_and_grad(loss_fn)(params, router_state, tokens_BT)
    params = jax.tree.map(lambda p, g: p - lr * g.astype(p.dtype), params, grads)
    return params, loss

  return net, step


def dense_dispatch_overhead_flops(model: ModelConfig, tokens: int) -> float:
  """Training FLOPs the "dense" dispatch spends on the E - K experts a token was not routed to."""
  if model.moe_dispatch != "dense":
    return 0.0
  E, K, D, M = model.n_routed_experts, model.num_experts_per_tok, model.d_model, model.moe_ffn_dim
  return 6.0 * model.num_moe_layers * tokens * (E - K) * 3 * D * M


@dataclasses.dataclass(frozen=True)
class Roofline:
  tokens: int
  xla_flops: float               # loop-free twin: counted in full
  xla_bytes: float
  analytic_flops: float          # what the twin computes (non-causal attention, dense dispatch)
  model_flops: float             # the Table 2 method: causal attention, K experts
  step_xla_flops: float | None = None   # the configured step, loop bodies counted once
  step_while_loops: int | None = None
  step_temp_bytes: float | None = None  # XLA's temporaries for the configured step
  activation_estimate: float | None = None  # codesign.activations for the same tokens
  step_s: float | None = None    # median measured time of the configured step
  matmul_peak: float | None = None      # FLOP/s of a large f32 matmul measured in the same run

  @property
  def xla_over_analytic(self) -> float:
    return self.xla_flops / self.analytic_flops

  @property
  def intensity(self) -> float:
    return self.xla_flops / self.xla_bytes if self.xla_bytes else float("nan")

  @property
  def achieved(self) -> float | None:
    """Model FLOPs (Table 2 method) per second of the configured step."""
    return None if self.step_s is None else self.model_flops / self.step_s

  @property
  def mfu(self) -> float | None:
    if self.step_s is None or not self.matmul_peak:
      return None
    return self.achieved / self.matmul_peak


def _compile(model: ModelConfig, tokens_BT, seed: int):
  net, step = make_train_step(model)
  abstract = nn.unbox(abstract_variables(model))
  compiled = jax.jit(step, donate_argnums=(0,)).lower(
      abstract["params"], abstract.get("router_state", {}), tokens_BT).compile()
  return net, compiled


def _while_loops(compiled) -> int:
  return compiled.as_text().count(" while(")


def roofline(model: ModelConfig, batch: int, seq_len: int, measure_steps: int = 0,
             seed: int = 0) -> Roofline:
  """Counts the loop-free twin for [batch, seq_len] tokens; with `measure_steps` > 0 also
  compiles the configured step, counts its while loops and times it."""
  tokens_BT = jax.random.randint(jax.random.PRNGKey(seed), (batch, seq_len), 0, model.vocab_size)
  n_tok = batch * seq_len
  twin = dataclasses.replace(model, scan_layers=False, moe_dispatch="dense")
  _, compiled = _compile(twin, tokens_BT, seed)
  cost = _cost(compiled)
  analytic = (n_tok * twin.flops_per_token(seq_len, mtp=False, causal=False)
              + dense_dispatch_overhead_flops(twin, n_tok))
  out = Roofline(n_tok, float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                 analytic, n_tok * model.flops_per_token(seq_len, mtp=False))
  if measure_steps <= 0:
    return out
  net, compiled = _compile(model, tokens_BT, seed)
  variables = nn.unbox(net.init(jax.random.PRNGKey(seed), tokens_BT[:, :1]))
  params, state = variables["params"], variables.get("router_state", {})
  params, loss = compiled(params, state, tokens_BT)
  loss.block_until_ready()
  times = []
  for _ in range(measure_steps):
    t = time.perf_counter()
    params, loss = compiled(params, state, tokens_BT)
    loss.block_until_ready()
    times.append(time.perf_counter() - t)
  mem = compiled.memory_analysis()
  return dataclasses.replace(
      out, step_xla_flops=float(_cost(compiled).get("flops", 0.0)),
      step_temp_bytes=None if mem is None else float(mem.temp_size_in_bytes),
      activation_estimate=n_tok * activation_bytes_per_token(
          dataclasses.replace(model, num_mtp_layers=0), seq_len),   # the step runs no MTP
      step_while_loops=_while_loops(compiled), step_s=sorted(times)[len(times) // 2],
      matmul_peak=measure_matmul_peak())
