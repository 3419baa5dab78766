"""Expert parallelism: the routed experts split over mesh axes inside one `shard_map`.

V3 report §3.2.2 and "Insights into DeepSeek-V3" §4.3: each token goes once to every expert shard
that holds one of its experts, and routing groups map onto runs of shards (nodes), so node-limited
routing caps the copies. `runner(...)` builds the runner the model is given. Letters beyond the
dimension key: P expert shards, Y rows per (source, destination) buffer, Z = P*Y buffer rows,
I slots per buffer row (min(K, local experts)), O expert-parallel nodes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from deepseek_jax import dispatch, vma
from deepseek_jax.config import MeshConfig
from deepseek_jax.fp8 import comm
from sharding import mesh as mesh_lib
from sharding.slots import compute_slots, pack_slots  # noqa: F401  (this module's API too)
from sharding import rules as rules_lib


class EPOptions(NamedTuple):
  """Dispatch settings (see `MeshConfig`): capacities, collective, wire dtypes."""
  capacity_factor: float | None = None
  alltoall: str = "auto"             # "auto" | "dense" | "ragged"
  dispatch_dtype: str = "model"      # one of WIRES
  combine_dtype: str = "model"
  compute_capacity_factor: float | None = None

  @classmethod
  def from_config(cls, mesh_cfg) -> "EPOptions":
    return cls(mesh_cfg.capacity_factor, mesh_cfg.alltoall, mesh_cfg.dispatch_dtype,
               mesh_cfg.combine_dtype, getattr(mesh_cfg, "compute_capacity_factor", None))


class DispatchStats(NamedTuple):
  """Global counts (int32, summed over devices) from one dispatch."""
  assignments: jax.Array           # X * K token-expert pairs routed
  dropped_assignments: jax.Array   # pairs whose row did not fit its buffer (output lacks them)
  rows: jax.Array                  # token copies sent (one per token per destination shard)
  dropped_rows: jax.Array
  cross_device_rows: jax.Array     # sent rows whose destination is another device
  cross_node_rows: jax.Array       # sent rows whose destination is another node
  max_nodes_per_token: jax.Array   # most nodes any token reached (<= topk_group when limited)
  buffer_rows: jax.Array           # rows the fixed buffers move: devices * P * Y


def _axes(name: str, rules, sizes) -> tuple[str, ...]:
  return tuple(a for a in rules_lib.mesh_axes_of(name, rules) if sizes.get(a, 1) > 1)


def _sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def splits_experts(mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> bool:
  """True when `rules` split the logical `experts` over mesh axes of size > 1."""
  return bool(_axes("experts", rules_lib.check_rules(rules), _sizes(mesh)))


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
  src_Z: jax.Array       # [Z] source token of each send row (X for an empty row)
  row_XK: jax.Array      # [X, K] send row of each assignment (Z when dropped or padding)
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
  Z = shards * cap
  row_XP = jnp.where(kept_XP, jnp.arange(shards)[None, :] * cap + pos_XP, Z)
  src_Z = jnp.full((Z,), X, jnp.int32).at[row_XP].set(
      jnp.broadcast_to(jnp.arange(X, dtype=jnp.int32)[:, None], (X, shards)), mode="drop")
  safe_dest_XK = jnp.maximum(dest_XK, 0)
  row_XK = jnp.where(dest_XK >= 0, jnp.take_along_axis(row_XP, safe_dest_XK, axis=1), Z)
  earlier_KK = jnp.tril(jnp.ones((K, K), bool), -1)       # k' < k
  same_XKK = dest_XK[:, :, None] == dest_XK[:, None, :]
  slot_XK = jnp.sum(same_XKK & earlier_KK[None], axis=-1, dtype=jnp.int32)
  local_XK = jnp.where(dest_XK >= 0, experts_XK % local_experts, 0).astype(jnp.int32)
  count_P = jnp.sum(kept_XP, axis=0, dtype=jnp.int32)
  return Plan(src_Z, row_XK, slot_XK, local_XK, present_XP, kept_XP, count_P)


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


def _move(x_Z, send_P, recv_P, me, route: _Route, wire: str):
  """encode -> all-to-all of every payload leaf (rows first) -> decode."""
  codec = _CODECS.get(wire)
  if codec is None and wire != "model":
    raise ValueError(f"expert-parallel wire {wire!r}: must be one of {WIRES}")
  payload = x_Z if codec is None else comm.encode(x_Z, codec)
  leaves, tree = jax.tree.flatten(payload)
  Z = x_Z.shape[0]
  moved = []
  for leaf in leaves:   # FP8: data and 1x128 scales; LogFMT: codes and tile min/max
    rows = leaf.reshape(Z, -1)
    if route.ragged:
      rows = _ragged_a2a(rows, route.axes, route.shards, send_P, recv_P, me)
    else:
      rows = _dense_a2a(rows, route.axes, route.shards)
    moved.append(rows.reshape(leaf.shape))
  payload = jax.tree.unflatten(tree, moved)
  return payload if codec is None else comm.decode(payload, codec, x_Z.shape, x_Z.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _exchange(x_Z, send_P, recv_P, me, route: _Route):
  """All-to-all of `x_Z` in wire format `route.there`; its cotangent returns by the reverse
  exchange in `route.back`. Tokens go out in the dispatch format and expert outputs come back
  in the combine format, so the backward pass sends output gradients to the experts in the
  dispatch format and input gradients back in the combine format: V3 §3.3.3's FP8 for "the
  activation before the up-projection and the gradient before the down-projection", BF16 for
  the combine both ways. Lossy codecs are straight-through for the gradient."""
  return _move(x_Z, send_P, recv_P, me, route, route.there)


def _exchange_fwd(x_Z, send_P, recv_P, me, route):
  return _move(x_Z, send_P, recv_P, me, route, route.there), (send_P, recv_P, me, x_Z[:0])


def _exchange_bwd(route, res, g_Z):
  send_P, recv_P, me, ref = res
  g_Z = _move(g_Z, recv_P, send_P, me, route, route.back)   # rows retrace their way
  return vma.cotangent_like(g_Z.astype(ref.dtype), ref), None, None, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _dense_a2a(buf_Z, axes, shards, *_):
  """AllToAll_expert: [P_dst * Y, ...] -> [P_src * Y, ...]."""
  buf = buf_Z.reshape((shards, -1) + buf_Z.shape[1:])
  out = jax.lax.all_to_all(buf, axes, 0, 0, tiled=True)
  return out.reshape(buf_Z.shape)


def _ragged_collective(operand, output, in_off, send, out_off, recv, axis_name):
  return jax.lax.ragged_all_to_all(operand, output, in_off, send, out_off, recv,
                                   axis_name=axis_name)


def _ragged_a2a(buf_Z, axes, shards, send_P, recv_P, me):
  """The same exchange moving only the first send_P[p] rows of each block (block p -> p)."""
  cap = buf_Z.shape[0] // shards
  in_off_P = jnp.arange(shards, dtype=jnp.int32) * cap
  out_off_P = jnp.full((shards,), me * cap, jnp.int32)
  return _ragged_collective(buf_Z, jnp.zeros_like(buf_Z), in_off_P, send_P, out_off_P, recv_P,
                            axes)


def resolve_alltoall(name: str) -> str:
  if name == "auto":
    return "dense" if jax.default_backend() == "cpu" else "ragged"
  if name not in ("dense", "ragged"):
    raise ValueError(f"mesh.alltoall={name!r}: must be 'auto', 'dense' or 'ragged'")
  return name


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Routed experts split over the mesh axes that `rules` give `experts`, in one `shard_map` over
  `mesh` (its own mesh and rules, not ambient ones); `local` runs each shard's experts.

  Same call as `dispatch.LocalExperts`: `(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM,
  w_down_EMD, dots=None) -> (y_XD, DispatchStats)`, all E experts' weights (sharded by jit).
  Weights enter as W[E_expert, D, M_tensor]: `shard_map` all-gathers the fsdp split of D (ZeRO-3)
  and reduce-scatters its gradient. Tokens enter split over the `act_tokens` axes, which must
  include the expert axes. With `options.capacity_factor=None` every buffer has room for all
  local tokens and the result equals single-device dropless dispatch. Build it with `runner`.
  """
  mesh: Mesh | AbstractMesh
  rules: rules_lib.Rules
  n_group: int = 1               # routing groups (nodes) ...
  topk_group: int = 1            # ... and how many one token may reach
  options: EPOptions = EPOptions()
  local: dispatch.LocalExperts = dispatch.LocalExperts()
  node_P: tuple[int, ...] | None = None   # node of each shard (`mesh.expert_shard_nodes`);
  #                                         None: min(n_group, P) runs of consecutive shards

  def __post_init__(self):
    object.__setattr__(self, "rules", rules_lib.check_rules(self.rules))
    ep, tok, mlp = self.axes()
    if not ep:
      raise ValueError("ExpertParallel: the rules split 'experts' over no mesh axis of size > 1; "
                       "use dispatch.LocalExperts (expert_parallel.runner chooses)")
    if not set(ep) <= set(tok):
      raise ValueError(f"expert parallelism: the token axes {tok} (rule 'act_tokens') must include "
                       f"the expert axes {ep} (rule 'experts'), so that each expert shard holds "
                       "different tokens")
    if set(mlp) & set(tok):
      raise ValueError(f"expert parallelism: 'moe_mlp' axes {mlp} must not split tokens {tok}")
    if _axes("act_experts", self.rules, _sizes(self.mesh)) != ep:
      raise ValueError("rules 'act_experts' and 'experts' must name the same mesh axes")

  def axes(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Mesh axes (of size > 1) of the experts, the tokens and the expert hidden dimension M."""
    sizes = _sizes(self.mesh)
    return tuple(_axes(n, self.rules, sizes) for n in ("experts", "act_tokens", "moe_mlp"))

  def __call__(self, x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
               dots: dispatch.ExpertDots | None = None):
    ep, tok, mlp = self.axes()
    sizes = _sizes(self.mesh)
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
      experts_XK = jnp.concatenate([experts_XK.astype(jnp.int32),
                                    jnp.full((pad, K), -1, jnp.int32)])
    x_local = (X + pad) // token_shards
    dests = max_destinations(K, shards, self.n_group, self.topk_group)
    cap = capacity(x_local, dests, shards, self.options.capacity_factor)
    slots = compute_slots(x_local, K, shards * cap, min(K, E // shards),
                          self.options.compute_capacity_factor)
    node_P = self.node_P or tuple(i * min(self.n_group, shards) // shards for i in range(shards))
    if len(node_P) != shards:
      raise ValueError(f"expert parallelism: node_P has {len(node_P)} entries for {shards} shards")
    body = functools.partial(
        _local, ep=ep, tok=tok, mlp=mlp, shards=shards, cap=cap, node_P=node_P, slots=slots,
        dots=dots,
        local=self.local, alltoall=resolve_alltoall(self.options.alltoall), opts=self.options)
    tok_spec = P(tok if len(tok) > 1 else (tok[0] if tok else None), None)
    ep_entry = ep if len(ep) > 1 else ep[0]
    mlp_entry = None if not mlp else (mlp if len(mlp) > 1 else mlp[0])
    stats_spec = DispatchStats(*([P()] * len(DispatchStats._fields)))
    fn = jax.shard_map(
        body, mesh=self.mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, P(ep_entry, None, mlp_entry),
                  P(ep_entry, None, mlp_entry), P(ep_entry, mlp_entry, None)),
        out_specs=(tok_spec, stats_spec))
    y_XD, stats = fn(x_XD, weights_XK, experts_XK.astype(jnp.int32), w_gate_EDM, w_up_EDM,
                     w_down_EMD)
    return y_XD[:X], stats


def runner(model_cfg, mesh_cfg: MeshConfig | None, mesh,
           rules: rules_lib.Rules = rules_lib.DEFAULT_RULES):
  """The routed-expert runner to build the model with on `mesh`.

  `ExpertParallel` (options from `mesh_cfg`, None: defaults; its shards run
  `LocalExperts.from_config(model_cfg)`) when `rules` split the experts over mesh axes of size
  > 1 and `model.moe_dispatch` is "dropless"; otherwise that `LocalExperts` itself (the "dense"
  oracle stays one program that the partitioner splits).
  """
  local = dispatch.LocalExperts.from_config(model_cfg)
  if local.kind == "dense" or not splits_experts(mesh, rules):
    return local
  options = EPOptions.from_config(mesh_cfg or MeshConfig())
  node_P = mesh_lib.expert_shard_nodes(model_cfg, mesh, rules)
  return ExpertParallel(mesh, rules, model_cfg.n_group, model_cfg.topk_group, options, local,
                        node_P)


def _local(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD, *, ep, tok, mlp,
           shards, cap, node_P, slots, dots, local, alltoall, opts):
  """One device (scaling-book notation; E here is the local experts):

    plan (local):    token x needs shard p iff one of its K experts lives there; it takes row
                     pos(x, p) < Y of the buffer for p (rows beyond Y are dropped and counted)
    pack (local):    send[P_dst, Y, D] = x[src(p, y)]; ids, w [P_dst, Y, I] (local expert, weight)
    AllToAll_expert: send[P_dst, Y, D] -> recv[P_src, Y, D]
    experts (local): y[P_src, Y, D] = sum_i w * Expert_{ids}(recv)   (`local`)
    AllToAll_expert: y[P_src, Y, D] -> back[P_dst, Y, D]
    unpack (local):  out[X, D] = sum_p back[p, pos(x, p)];  {U_tensor} -> psum when M_tensor
  """
  X, D = x_XD.shape
  E_loc = w_gate_EDM.shape[0]
  I = min(experts_XK.shape[1], E_loc)  # noqa: E741
  Z = shards * cap
  me = jax.lax.axis_index(ep)
  plan = make_plan(experts_XK, shards, E_loc, cap)
  # ---- pack: [P_dst * Y] rows ----
  x_pad = jnp.concatenate([x_XD, jnp.zeros((1, D), x_XD.dtype)])
  send_ZD = x_pad[plan.src_Z]
  # Ids travel as local id + 1, so that 0 (an empty slot, a padding row, or a row the ragged
  # exchange did not fill) arrives as "no expert" (id E_loc): the experts then see the true rows
  # per expert, and a grouped matmul computes nothing for padding.
  ids_ZI = jnp.zeros((Z, I), jnp.int32).at[plan.row_XK, plan.slot_XK].set(plan.local_XK + 1,
                                                                          mode="drop")
  w_ZI = jnp.zeros((Z, I), weights_XK.dtype).at[plan.row_XK, plan.slot_XK].set(weights_XK,
                                                                               mode="drop")
  # ---- AllToAll_expert: [P_dst*Y, D] -> [P_src*Y, D] ----
  ragged = alltoall == "ragged"
  send_P = plan.count_P
  recv_P = jax.lax.all_to_all(send_P, ep, 0, 0, tiled=True) if ragged else send_P
  out = _Route(ep, shards, ragged, opts.dispatch_dtype, opts.combine_dtype)
  home = _Route(ep, shards, ragged, opts.combine_dtype, opts.dispatch_dtype)
  recv_ZD = _exchange(send_ZD, send_P, recv_P, me, out)
  ids_ZI, w_ZI = (_move(a, send_P, recv_P, me, out, "model") for a in (ids_ZI, w_ZI))
  ids_ZI = jnp.where(ids_ZI > 0, ids_ZI - 1, E_loc)
  if mlp:  # each M shard sees the same rows: typed as varying, so their gradient is psum'd
    recv_ZD, w_ZI = jax.lax.pcast((recv_ZD, w_ZI), mlp, to="varying")
  # ---- local experts (padding rows and slots: no expert, weight 0) ----
  dropped_slots = jnp.zeros((), jnp.int32)
  if slots is None:
    y_ZD, _ = local(recv_ZD, w_ZI, ids_ZI, w_gate_EDM, w_up_EDM, w_down_EMD, dots=dots)
  else:   # the filled slots only, one expert each, then summed back into their rows
    row_S, id_S, w_S, dropped_slots = pack_slots(ids_ZI, w_ZI, E_loc, slots)
    x_SD = jnp.concatenate([recv_ZD, jnp.zeros((1, D), recv_ZD.dtype)])[row_S]
    y_SD, _ = local(x_SD, w_S[:, None], id_S[:, None], w_gate_EDM, w_up_EDM, w_down_EMD,
                    dots=dots)
    y_ZD = jnp.zeros((Z + 1, D), jnp.float32).at[row_S].add(
        y_SD.astype(jnp.float32))[:Z].astype(recv_ZD.dtype)
  # ---- AllToAll_expert back, then unpack: sum over destination shards ----
  y_ZD = _exchange(y_ZD, recv_P, send_P, me, home)
  out_XD = jnp.zeros((X + 1, D), jnp.float32).at[plan.src_Z].add(y_ZD.astype(jnp.float32))[:X]
  if mlp:
    out_XD = jax.lax.psum(out_XD, mlp)                     # {U_tensor}: partial sums over M
  stats = _stats(plan, experts_XK, me, shards, cap, node_P, tok)
  stats = stats._replace(dropped_assignments=stats.dropped_assignments
                         + jax.lax.psum(dropped_slots, tok))
  return out_XD.astype(x_XD.dtype), stats


def _stats(plan: Plan, experts_XK, me, shards, cap, node_P, tok) -> DispatchStats:
  i32 = jnp.int32
  nodes = len(set(node_P))
  node_P = jnp.asarray(node_P, jnp.int32)
  kept, present = plan.kept_XP, plan.present_XP
  remote_P = jnp.arange(shards) != me
  cross_P = node_P != node_P[me]
  node_PO = node_P[:, None] == jnp.arange(nodes)[None, :]
  node_hit_XO = jnp.any(present[:, :, None] & node_PO[None], axis=1)
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
      max_nodes_per_token=jax.lax.pmax(jnp.max(jnp.sum(node_hit_XO, axis=1, dtype=i32)), tok),
      buffer_rows=jax.lax.psum(jnp.asarray(shards * cap, i32), tok),
  )
