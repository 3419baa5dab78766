"""Node-limited routing and cross-node traffic ("Insights into DeepSeek-V3" §4.3; V3 §3.2.2).

Experts live on nodes (one routing group = one node). Dispatch sends a token once over IB to each
node that holds one of its experts and forwards it over NVLink inside the node, so its IB cost is
(nodes spanned) x t rather than K x t. Node-limited routing caps the nodes at M (V3: 4 of 8).
NVLink moves ~160 GB/s against IB's 50, so a token can reach ~3.2 experts per node "for free":
up to M x 3.2 ~ 13 experts at the cost of M IB sends.

`expected_nodes_spanned` is exact for unrestricted routing when the K experts are a uniformly
random K-subset (iid scores, no bias); `sample_nodes_spanned` measures it on a real router.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from deepseek_jax import router
from deepseek_jax.config import ConfigError, ModelConfig


def _check_layout(n_experts: int, n_nodes: int, k: int) -> None:
  for n, v in (("n_experts", n_experts), ("n_nodes", n_nodes), ("experts_per_token", k)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"{n}={v!r}: must be a positive integer")
  if n_experts % n_nodes:
    raise ConfigError(f"n_nodes={n_nodes}: must divide n_experts={n_experts}")
  if k > n_experts:
    raise ConfigError(f"experts_per_token={k}: must be <= n_experts={n_experts}")


def expected_nodes_spanned(n_experts: int, n_nodes: int, k: int) -> float:
  """E[distinct nodes] when K of E experts (E/n_nodes per node) are a uniform random subset.

  Each node is missed with probability C(E - E/n, K) / C(E, K), so E = n (1 - that).
  """
  _check_layout(n_experts, n_nodes, k)
  per = n_experts // n_nodes
  miss = math.comb(n_experts - per, k) / math.comb(n_experts, k)
  return n_nodes * (1.0 - miss)


def free_experts_per_node(nvlink_bandwidth: float, ib_bandwidth: float) -> float:
  """Experts a token can reach per node over NVLink in the time of one IB send (the 3.2x)."""
  if not (nvlink_bandwidth > 0 and ib_bandwidth > 0):
    raise ConfigError(f"bandwidths ({nvlink_bandwidth!r}, {ib_bandwidth!r}): must be > 0")
  return nvlink_bandwidth / ib_bandwidth


def max_experts_at_equal_cost(max_nodes: int, nvlink_bandwidth: float,
                              ib_bandwidth: float) -> float:
  """M x (NVLink / IB): V3's 4 x 3.2 = 12.8 ("up to 13 experts")."""
  return max_nodes * free_experts_per_node(nvlink_bandwidth, ib_bandwidth)


@dataclasses.dataclass(frozen=True)
class TokenTraffic:
  nodes: float         # nodes the token is sent to over IB
  ib_bytes: float      # nodes x hidden x bytes
  ib_s: float
  nvlink_s: float      # forwarding every expert copy inside its node
  time_s: float        # max of the two (they overlap in the pipelined kernels)


def token_dispatch_traffic(nodes: float, experts_per_token: int, hidden: int,
                           bytes_per_element: float, ib_bandwidth: float,
                           nvlink_bandwidth: float) -> TokenTraffic:
  """Dispatch cost of one token: IB once per node, NVLink once per expert."""
  if not nodes >= 0:
    raise ConfigError(f"nodes={nodes!r}: must be >= 0")
  per_copy = hidden * bytes_per_element
  ib_s = nodes * per_copy / ib_bandwidth
  nvl_s = experts_per_token * per_copy / nvlink_bandwidth
  return TokenTraffic(nodes, nodes * per_copy, ib_s, nvl_s, max(ib_s, nvl_s))


@dataclasses.dataclass(frozen=True)
class NodeLimitRow:
  max_nodes: int               # M (n_nodes: unrestricted)
  analytic_nodes: float        # exact E[nodes] unrestricted (uniform routing); else the cap M
  sampled_nodes: float | None  # mean over tokens routed by the real router, when sampled
  ib_bytes_per_token: float    # dispatch over IB, from the sampled mean when there is one
  relative_to_unlimited: float


def node_limit_table(model: ModelConfig, limits=(1, 2, 4, None), bytes_per_element: float = 1,
                     sample_tokens: int = 0, seed: int = 0) -> list[NodeLimitRow]:
  """IB dispatch bytes per token (FP8 by default) for node limits M; None = unrestricted.

  One group = one node (`model.n_group` nodes). Unrestricted, the expectation is exact; capped,
  the analytic value is the bound M, and with `sample_tokens` > 0 the real router (same config,
  `topk_group` = M) measures how close to M routing actually comes.
  """
  n_nodes, E, K = model.n_group, model.n_routed_experts, model.num_experts_per_tok
  free = expected_nodes_spanned(E, n_nodes, K)
  rows = []
  for m in limits:
    m = n_nodes if m is None else m
    if not isinstance(m, int) or not 1 <= m <= n_nodes:
      raise ConfigError(f"node limit {m!r}: must be an integer in [1, n_group={n_nodes}]")
    analytic = free if m == n_nodes else float(m)
    sampled = None
    if sample_tokens:
      cfg = dataclasses.replace(model, topk_group=m)
      sampled = float(np.mean(sample_nodes_spanned(cfg, sample_tokens, seed)))
    nodes = analytic if sampled is None else sampled
    rows.append(NodeLimitRow(m, analytic, sampled, nodes * model.d_model * bytes_per_element,
                             nodes / free))
  return rows


def nodes_spanned(experts_XK, n_experts: int, n_nodes: int) -> np.ndarray:
  """Distinct nodes per token for integer expert ids [X, K] (contiguous experts per node)."""
  e = np.asarray(experts_XK)
  per = n_experts // n_nodes
  node_XK = e // per
  hit_XO = np.zeros((e.shape[0], n_nodes), bool)
  np.put_along_axis(hit_XO, node_XK, True, axis=1)
  return hit_XO.sum(axis=1)


def sample_nodes_spanned(model: ModelConfig, n_tokens: int = 4096, seed: int = 0,
                         bias_scale: float = 0.0):
  """Routes random logits through `deepseek_jax.router.route`; returns distinct nodes per token.

  One routing group = one node. `bias_scale` > 0 draws a random balancing bias of that size.
  """
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  logits = jax.random.normal(k1, (n_tokens, model.n_routed_experts))
  bias = None
  if model.routing_bias:
    bias = bias_scale * jax.random.normal(k2, (model.n_routed_experts,))
  out = jax.jit(router.route, static_argnums=2)(logits, bias, model)
  return nodes_spanned(out.experts_XK, model.n_routed_experts, model.n_group)
