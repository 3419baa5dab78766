"""Expert parallelism: routed experts split over the `expert` mesh axis inside one `shard_map`.

V3 report §3.2.2 and "Insights into DeepSeek-V3" §4.3: each token is sent once to every
expert-parallel node that holds one of its experts (not once per expert), and node-limited routing
caps those nodes at `topk_group` (M = 4 of 8 in V3). Routing groups map onto runs of expert
shards (`mesh.expert_nodes`), so the router's group limit is exactly a node limit.

Letters: P expert shards, E_loc = E/P local experts, X_loc tokens per device, K experts per token,
L = min(K, E_loc) slots per row, C rows per (source, destination) pair. Scaling-book notation:

  plan (local):    token x needs shard p iff one of its K experts lives there; it takes row
                   pos(x, p) < C of the buffer for p (rows beyond C are dropped and counted)
  pack (local):    send[P_dst, C, D] = x[src(p, c)]; ids, w [P_dst, C, L] (local expert, weight)
  AllToAll_expert: send[P_dst, C, D] -> recv[P_src, C, D]
  experts (local): y[P_src, C, D] = sum_l w * Expert_{ids}(recv)  (`dispatch.dropless_ffn`)
  AllToAll_expert: y[P_src, C, D] -> back[P_dst, C, D]
  unpack (local):  out[X_loc, D] = sum_p back[p, pos(x, p)];  {U_tensor} -> psum when M_tensor

Expert weights enter as W[E_expert, D, M_tensor]: `shard_map` all-gathers the fsdp split of D
(ZeRO-3) and reduce-scatters its gradient. Tokens enter split over the act_tokens axes, which
must include the expert axes. The collective is `all_to_all` on fixed buffers or, where the
backend has it (not XLA:CPU), `ragged_all_to_all`, which moves only the filled rows. Each
direction has a wire format (`WIRES`, from `mesh.dispatch_dtype` / `mesh.combine_dtype`): the
model dtype, bfloat16, FP8 (E4M3, 1x128 tiles, power-of-two scales: `fp8.comm`) or LogFMT-8/10;
the token-to-expert direction uses the dispatch format in both passes (tokens forward, output
gradients backward) and the other direction the combine format (see `_exchange`). With
`capacity_factor=None` every buffer has room for all local tokens and the result equals
single-device dropless dispatch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax import dispatch, vma
from deepseek_jax.config import MeshConfig
from deepseek_jax.fp8 import comm
from sharding import rules as rules_lib


class EPOptions(NamedTuple):
  """Dispatch settings (see `MeshConfig`): capacity, collective, wire dtypes."""
  capacity_factor: float | None = None
  alltoall: str = "auto"             # "auto" | "dense" | "ragged"
  dispatch_dtype: str = "model"      # "model" | "bfloat16"
  combine_dtype: str = "model"

  @classmethod
  def from_config(cls, mesh_cfg) -> "EPOptions":
    return cls(mesh_cfg.capacity_factor, mesh_cfg.alltoall, mesh_cfg.dispatch_dtype,
               mesh_cfg.combine_dtype)


_OPTIONS: contextvars.ContextVar[EPOptions] = contextvars.ContextVar("ep_options",
                                                                     default=EPOptions())


@contextlib.contextmanager
def options(opts: EPOptions) -> Iterator[EPOptions]:
  """Sets the dispatch options for code traced inside (`mesh.activate` enters this)."""
  token = _OPTIONS.set(opts)
  try:
    yield opts
  finally:
    _OPTIONS.reset(token)


class DispatchStats(NamedTuple):
  """Global counts (int32, summed over devices) from one dispatch."""
  assignments: jax.Array           # X * K token-expert pairs routed
  dropped_assignments: jax.Array   # pairs whose row did not fit its buffer (output lacks them)
  rows: jax.Array                  # token copies sent (one per token per destination shard)
  dropped_rows: jax.Array
  cross_device_rows: jax.Array     # sent rows whose destination is another device
  cross_node_rows: jax.Array       # sent rows whose destination is another node
  max_nodes_per_token: jax.Array   # most nodes any token reached (<= topk_group when limited)
  buffer_rows: jax.Array           # rows the fixed buffers move: devices * P * C


def _mesh_and_rules():
  mesh = jax.sharding.get_abstract_mesh()
  return mesh, nn.get_logical_axis_rules()


def _axes(name: str, rules, sizes) -> tuple[str, ...]:
  return tuple(a for a in rules_lib.mesh_axes_of(name, rules) if sizes.get(a, 1) > 1)


def enabled() -> bool:
  """True when tracing under a mesh and rules that split the `experts` axis (`mesh.activate`)."""
  mesh, rules = _mesh_and_rules()
  if mesh.empty or not rules or mesh.manual_axes:
    return False
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  try:
    return bool(_axes("experts", rules, sizes))
  except KeyError:
    return False


def max_destinations(num_experts_per_tok: int, shards: int, n_group: int, topk_group: int) -> int:
  """Most expert shards one token can reach: min(K, P, topk_group * shards per group)."""
  per_group = max(1, shards // n_group)
  return min(num_experts_per_tok, shards, topk_group * per_group)


def capacity(tokens: int, destinations: int, shards: int, factor: float | None) -> int:
  """Rows per (source, destination) buffer: factor * tokens * destinations / shards, or all."""
  if factor is None:
    return tokens
  return int(min(tokens, max(1, math.ceil(factor * tokens * destinations / shards))))


class Plan(NamedTuple):
  """Where each token goes on one device (all int32 / bool, no gradient)."""
  src_R: jax.Array       # [P*C] source token of each send row (X_loc for an empty row)
  row_XK: jax.Array      # [X, K] send row of each assignment (P*C when dropped or padding)
  slot_XK: jax.Array     # [X, K] slot of the assignment within its row
  local_XK: jax.Array    # [X, K] local expert id at the destination
  present_XP: jax.Array  # [X, P] token needs shard p
  kept_XP: jax.Array     # [X, P] ... and fits its buffer
  count_P: jax.Array     # [P] filled rows per destination


def make_plan(experts_XK: jax.Array, shards: int, local_experts: int, cap: int) -> Plan:
  """Rows for one device's tokens: one per (token, destination shard); -1 marks padding."""
  X, K = experts_XK.shape
  dest_XK = jnp.where(experts_XK >= 0, experts_XK // local_experts, -1)
  present_XP = jnp.any(dest_XK[:, :, None] == jnp.arange(shards)[None, None, :], axis=1)
  pos_XP = jnp.cumsum(present_XP, axis=0, dtype=jnp.int32) - 1
  kept_XP = present_XP & (pos_XP < cap)
  R = shards * cap
  row_XP = jnp.where(kept_XP, jnp.arange(shards)[None, :] * cap + pos_XP, R)
  src_R = jnp.full((R,), X, jnp.int32).at[row_XP].set(
      jnp.broadcast_to(jnp.arange(X, dtype=jnp.int32)[:, None], (X, shards)), mode="drop")
  safe_dest_XK = jnp.maximum(dest_XK, 0)
  row_XK = jnp.where(dest_XK >= 0, jnp.take_along_axis(row_XP, safe_dest_XK, axis=1), R)
  earlier_KK = jnp.tril(jnp.ones((K, K), bool), -1)       # k' < k
  same_XKK = dest_XK[:, :, None] == dest_XK[:, None, :]
  slot_XK = jnp.sum(same_XKK & earlier_KK[None], axis=-1, dtype=jnp.int32)
  local_XK = jnp.where(dest_XK >= 0, experts_XK % local_experts, 0).astype(jnp.int32)
  count_P = jnp.sum(kept_XP, axis=0, dtype=jnp.int32)
  return Plan(src_R, row_XK, slot_XK, local_XK, present_XP, kept_XP, count_P)


# Wire formats of the two exchange directions (`mesh.dispatch_dtype`, `mesh.combine_dtype`).
WIRES = MeshConfig.WIRES   # config.py validates the names without importing fp8/
_CODECS = {"bfloat16": comm.BF16, "fp8": comm.FP8_DISPATCH, "logfmt8": comm.LOGFMT8,
           "logfmt10": comm.LOGFMT10}
if set(_CODECS) | {"model"} != set(WIRES):
  raise ImportError(f"expert_parallel codecs {sorted(_CODECS)} + 'model' != MeshConfig.WIRES "
                    f"{WIRES}")


class _Route(NamedTuple):
  """One exchange: the collective, and the wire formats out (`there`) and back (`back`)."""
  axes: tuple[str, ...]
  shards: int
  ragged: bool
  there: str
  back: str


def _move(x_R, send_P, recv_P, me, route: _Route, wire: str):
  """encode -> all-to-all of every payload leaf (rows first) -> decode."""
  codec = _CODECS.get(wire)
  if codec is None and wire != "model":
    raise ValueError(f"expert-parallel wire {wire!r}: must be one of {WIRES}")
  payload = x_R if codec is None else comm.encode(x_R, codec)
  leaves, tree = jax.tree.flatten(payload)
  R = x_R.shape[0]
  moved = []
  for leaf in leaves:   # FP8: data and 1x128 scales; LogFMT: codes and tile min/max
    rows = leaf.reshape(R, -1)
    if route.ragged:
      rows = _ragged_a2a(rows, route.axes, route.shards, send_P, recv_P, me)
    else:
      rows = _dense_a2a(rows, route.axes, route.shards)
    moved.append(rows.reshape(leaf.shape))
  payload = jax.tree.unflatten(tree, moved)
  return payload if codec is None else comm.decode(payload, codec, x_R.shape, x_R.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _exchange(x_R, send_P, recv_P, me, route: _Route):
  """All-to-all of `x_R` in wire format `route.there`; its cotangent returns by the reverse
  exchange in `route.back`. Tokens go out in the dispatch format and expert outputs come back
  in the combine format, so the backward pass sends output gradients to the experts in the
  dispatch format and input gradients back in the combine format: V3 §3.3.3's FP8 for "the
  activation before the up-projection and the gradient before the down-projection", BF16 for
  the combine both ways. Lossy codecs are straight-through for the gradient."""
  return _move(x_R, send_P, recv_P, me, route, route.there)


def _exchange_fwd(x_R, send_P, recv_P, me, route):
  return _move(x_R, send_P, recv_P, me, route, route.there), (send_P, recv_P, me, x_R[:0])


def _exchange_bwd(route, res, g_R):
  send_P, recv_P, me, ref = res
  g_R = _move(g_R, recv_P, send_P, me, route, route.back)   # rows retrace their way
  return vma.cotangent_like(g_R.astype(ref.dtype), ref), None, None, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _dense_a2a(buf_R, axes, shards, *_):
  """AllToAll_expert: [P_dst * C, ...] -> [P_src * C, ...]."""
  buf = buf_R.reshape((shards, -1) + buf_R.shape[1:])
  out = jax.lax.all_to_all(buf, axes, 0, 0, tiled=True)
  return out.reshape(buf_R.shape)


def _ragged_collective(operand, output, in_off, send, out_off, recv, axis_name):
  return jax.lax.ragged_all_to_all(operand, output, in_off, send, out_off, recv,
                                   axis_name=axis_name)


def _ragged_a2a(buf_R, axes, shards, send_P, recv_P, me):
  """The same exchange moving only the first send_P[p] rows of each block (block p -> p)."""
  cap = buf_R.shape[0] // shards
  in_off_P = jnp.arange(shards, dtype=jnp.int32) * cap
  out_off_P = jnp.full((shards,), me * cap, jnp.int32)
  return _ragged_collective(buf_R, jnp.zeros_like(buf_R), in_off_P, send_P, out_off_P, recv_P,
                            axes)


def resolve_alltoall(name: str) -> str:
  if name == "auto":
    return "dense" if jax.default_backend() == "cpu" else "ragged"
  if name not in ("dense", "ragged"):
    raise ValueError(f"mesh.alltoall={name!r}: must be 'auto', 'dense' or 'ragged'")
  return name


def moe_ffn(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD, *,
            n_group: int = 1, topk_group: int = 1, dots: dispatch.ExpertDots | None = None,
            impl: str | None = None, opts: EPOptions | None = None):
  """Expert-parallel routed experts; same contract as `dispatch.dropless_ffn`, plus stats.

  Call under `mesh.activate` (jit traces it; the ambient mesh and rules choose the axes).
  Args:
    x_XD: [X, D] tokens; weights_XK, experts_XK: [X, K] routing (`router.route`).
    w_gate_EDM, w_up_EDM: [E, D, M]; w_down_EMD: [E, M, D], all E experts (sharded by jit).
    n_group, topk_group: the routing groups (nodes) and how many a token may use.
    dots, impl: passed to `dispatch.dropless_ffn` (FP8 seam, grouped-matmul kind).
    opts: `EPOptions`; default the ones set by `options(...)`.
  Returns:
    (y_XD [X, D], DispatchStats).
  """
  opts = opts or _OPTIONS.get()
  mesh, rules = _mesh_and_rules()
  if mesh.empty or not rules:
    raise ValueError("expert_parallel.moe_ffn: no mesh or logical rules in context; trace under "
                     "sharding.mesh.activate(mesh, rules)")
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  ep = _axes("experts", rules, sizes)
  tok = _axes("act_tokens", rules, sizes)
  mlp = _axes("moe_mlp", rules, sizes)
  if not set(ep) <= set(tok):
    raise ValueError(f"expert parallelism: the token axes {tok} (rule 'act_tokens') must include "
                     f"the expert axes {ep} (rule 'experts'), so that each expert shard holds "
                     "different tokens")
  if set(mlp) & set(tok):
    raise ValueError(f"expert parallelism: 'moe_mlp' axes {mlp} must not split tokens {tok}")
  if _axes("act_experts", rules, sizes) != ep:
    raise ValueError("rules 'act_experts' and 'experts' must name the same mesh axes")
  X, K = experts_XK.shape
  E = w_gate_EDM.shape[0]
  shards = math.prod(sizes[a] for a in ep)
  token_shards = math.prod(sizes[a] for a in tok)
  if E % shards:
    raise ValueError(f"expert parallelism: {E} experts do not divide over {shards} shards {ep}")
  pad = -X % token_shards
  if pad:  # e.g. init on a single sequence: padding tokens route nowhere
    x_XD = jnp.concatenate([x_XD, jnp.zeros((pad, x_XD.shape[1]), x_XD.dtype)])
    weights_XK = jnp.concatenate([weights_XK, jnp.zeros((pad, K), weights_XK.dtype)])
    experts_XK = jnp.concatenate([experts_XK.astype(jnp.int32), jnp.full((pad, K), -1, jnp.int32)])
  x_local = (X + pad) // token_shards
  dests = max_destinations(K, shards, n_group, topk_group)
  cap = capacity(x_local, dests, shards, opts.capacity_factor)
  nodes = min(n_group, shards)
  body = functools.partial(
      _local, ep=ep, tok=tok, mlp=mlp, shards=shards, cap=cap, nodes=nodes, dots=dots, impl=impl,
      alltoall=resolve_alltoall(opts.alltoall), opts=opts)
  tok_spec = P(tok if len(tok) > 1 else (tok[0] if tok else None), None)
  ep_entry = ep if len(ep) > 1 else ep[0]
  mlp_entry = None if not mlp else (mlp if len(mlp) > 1 else mlp[0])
  stats_spec = DispatchStats(*([P()] * len(DispatchStats._fields)))
  fn = jax.shard_map(
      body, mesh=mesh,
      in_specs=(tok_spec, tok_spec, tok_spec, P(ep_entry, None, mlp_entry),
                P(ep_entry, None, mlp_entry), P(ep_entry, mlp_entry, None)),
      out_specs=(tok_spec, stats_spec))
  y_XD, stats = fn(x_XD, weights_XK, experts_XK.astype(jnp.int32), w_gate_EDM, w_up_EDM,
                   w_down_EMD)
  return y_XD[:X], stats


def _local(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD, *, ep, tok, mlp,
           shards, cap, nodes, dots, impl, alltoall, opts):
  """One device: plan, pack, AllToAll_expert, local experts, AllToAll_expert back, unpack."""
  X, D = x_XD.shape
  E_loc = w_gate_EDM.shape[0]
  L = min(experts_XK.shape[1], E_loc)
  R = shards * cap
  me = jax.lax.axis_index(ep)
  plan = make_plan(experts_XK, shards, E_loc, cap)
  # ---- pack: [P_dst * C] rows ----
  x_pad = jnp.concatenate([x_XD, jnp.zeros((1, D), x_XD.dtype)])
  send_RD = x_pad[plan.src_R]
  ids_RL = jnp.zeros((R, L), jnp.int32).at[plan.row_XK, plan.slot_XK].set(plan.local_XK,
                                                                          mode="drop")
  w_RL = jnp.zeros((R, L), weights_XK.dtype).at[plan.row_XK, plan.slot_XK].set(weights_XK,
                                                                               mode="drop")
  # ---- AllToAll_expert: [P_dst*C, D] -> [P_src*C, D] ----
  ragged = alltoall == "ragged"
  send_P = plan.count_P
  recv_P = jax.lax.all_to_all(send_P, ep, 0, 0, tiled=True) if ragged else send_P
  out = _Route(ep, shards, ragged, opts.dispatch_dtype, opts.combine_dtype)
  home = _Route(ep, shards, ragged, opts.combine_dtype, opts.dispatch_dtype)
  recv_RD = _exchange(send_RD, send_P, recv_P, me, out)
  ids_RL, w_RL = (_move(a, send_P, recv_P, me, out, "model") for a in (ids_RL, w_RL))
  if mlp:  # each M shard sees the same rows: typed as varying, so their gradient is psum'd
    recv_RD, w_RL = jax.lax.pcast((recv_RD, w_RL), mlp, to="varying")
  # ---- local experts (padding rows and slots carry weight 0) ----
  y_RD = dispatch.dropless_ffn(recv_RD, w_RL, ids_RL, w_gate_EDM, w_up_EDM, w_down_EMD,
                               dots=dots, impl=impl)
  # ---- AllToAll_expert back, then unpack: sum over destination shards ----
  y_RD = _exchange(y_RD, recv_P, send_P, me, home)
  out_XD = jnp.zeros((X + 1, D), jnp.float32).at[plan.src_R].add(y_RD.astype(jnp.float32))[:X]
  if mlp:
    out_XD = jax.lax.psum(out_XD, mlp)                     # {U_tensor}: partial sums over M
  stats = _stats(plan, experts_XK, me, shards, cap, nodes, tok)
  return out_XD.astype(x_XD.dtype), stats


def _stats(plan: Plan, experts_XK, me, shards, cap, nodes, tok) -> DispatchStats:
  i32 = jnp.int32
  node_P = jnp.arange(shards) * nodes // shards
  kept, present = plan.kept_XP, plan.present_XP
  remote_P = jnp.arange(shards) != me
  cross_P = node_P != (me * nodes // shards)
  node_PN = node_P[:, None] == jnp.arange(nodes)[None, :]
  node_hit_XN = jnp.any(present[:, :, None] & node_PN[None], axis=1)
  valid_XK = experts_XK >= 0
  dropped_XK = valid_XK & (plan.row_XK >= shards * cap)
  total = lambda v: jax.lax.psum(jnp.sum(v, dtype=i32), tok)  # noqa: E731
  return DispatchStats(
      assignments=total(valid_XK),
      dropped_assignments=total(dropped_XK),
      rows=total(kept),
      dropped_rows=total(present & ~kept),
      cross_device_rows=total(kept & remote_P[None]),
      cross_node_rows=total(kept & cross_P[None]),
      max_nodes_per_token=jax.lax.pmax(jnp.max(jnp.sum(node_hit_XN, axis=1, dtype=i32)), tok),
      buffer_rows=jax.lax.psum(jnp.asarray(shards * cap, i32), tok),
  )
