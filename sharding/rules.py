"""Logical axis rules: one table from the model's logical names to mesh axes (scaling-book style).

The model names every parameter and block-boundary activation dimension logically
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`); this table is the only place those
names meet the mesh axes `data`, `fsdp`, `expert`, `tensor`. Exactly one entry per logical name, no
fall-through (flax tries rules in order; with unique names order does not matter). Read a weight's
sharding off its names, e.g. the routed experts ("experts", "embed", "moe_mlp") become
W[E_expert, D_fsdp, M_tensor]: experts split over `expert` (expert parallelism, V3 report §3.2.2),
the model dimension over `fsdp` (ZeRO-3: all-gathered before use, gradients reduce-scattered) and
the expert hidden dimension over `tensor` (Megatron-style). Activations at block boundaries are
x[B_{data,fsdp,expert}, T, D]: every device holds different sequences, and the tensor axis
replicates them.

When two names of one weight map to the same mesh axis, the name listed first keeps it (flax's
rule order): `embed` comes before the latent ranks, so q_a_proj [D, Q] is [D_fsdp, Q] while
q_b_proj [Q, N, H+R], which has no D, becomes [Q_fsdp, N_tensor, H+R]. Without that the up
projections would be replicated (9 GB per device for V3's q_b_proj at tensor=1). Per-head widths,
norms and the scan `layers` axis stay replicated.

Non-expert weights are replicated over `expert` by default (each expert-parallel rank holds the
attention and dense weights of its fsdp shard). The routed experts name their D `expert_embed`,
so the override `mesh.rules=["embed=fsdp,expert"]` extends ZeRO-3 of everything else over the
expert axis too (memory / expert size, for an all-gather over `expert` per layer) without
touching the experts' own layout; `codesign.memory.PLANNING_RULES` sizes both choices.
"""

from __future__ import annotations

from typing import Iterable, Sequence

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rule = tuple[str, "str | tuple[str, ...] | None"]
Rules = tuple[Rule, ...]

BATCH_AXES = ("data", "fsdp", "expert")

DEFAULT_RULES: Rules = (
    # ---- parameters ----
    ("embed", "fsdp"),            # D of every non-expert weight (ZeRO-3)
    ("expert_embed", "fsdp"),     # D of the routed experts' weights
    ("vocab", "tensor"),          # V of the embedding and the output head
    ("heads", "tensor"),          # N of the MLA projections
    ("qk_head_dim", None),        # H + R per head
    ("kv_head_dim", None),        # H + J per head (kv_b_proj)
    ("v_head_dim", None),         # J per head (o_proj)
    ("q_latent", "fsdp"),         # Q: q_b_proj has no D, so its latent side takes fsdp
    ("kv_latent", "fsdp"),        # C (+ R): likewise kv_b_proj
    ("mlp", "tensor"),            # F, dense SwiGLU hidden
    ("moe_mlp", "tensor"),        # M, routed and shared expert hidden
    ("experts", "expert"),        # E: expert parallelism
    ("layers", None),             # L, the scanned-stack axis
    ("mtp_in", None),             # 2D, the MTP eh_proj input
    ("norm", None),               # RMSNorm weights with no other name
    # ---- activations ----
    ("act_batch", BATCH_AXES),    # B at block boundaries
    ("act_seq", None),            # T
    ("act_embed", None),          # D
    ("act_tokens", BATCH_AXES),   # X = B*T flattened inside the MoE (must match act_batch)
    ("act_experts", "expert"),    # the all-to-all axis of expert-parallel dispatch (= experts)
)


def as_axes(entry) -> tuple[str, ...]:
  """A rule's mesh entry (None, "axis" or ("a", "b")) as a tuple of axis names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def check_rules(rules: Sequence[Rule]) -> Rules:
  """Validates a rule table and returns it as a tuple; raises ValueError naming the bad entry.

  Rules: each logical name appears once; mesh axes are among MESH_AXES and appear at most once per
  entry; no logical name is also a mesh-axis name.
  """
  seen: set[str] = set()
  out = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"rules[{i}]={rule!r}: each rule must be a (logical_name, mesh_axes) pair")
    name, entry = rule
    if name in seen:
      raise ValueError(f"rules[{i}]: logical name {name!r} appears twice; keep one entry per name")
    if name in MESH_AXES:
      raise ValueError(f"rules[{i}]: logical name {name!r} is also a mesh axis; rename it")
    axes = as_axes(entry)
    for a in axes:
      if a not in MESH_AXES:
        raise ValueError(f"rules[{i}]: {name!r} -> {entry!r}: mesh axis {a!r} is not one of "
                         f"{MESH_AXES}")
    if len(set(axes)) != len(axes):
      raise ValueError(f"rules[{i}]: {name!r} -> {entry!r} repeats a mesh axis")
    seen.add(name)
    out.append((name, None if not axes else (axes[0] if len(axes) == 1 else axes)))
  return tuple(out)


def with_overrides(rules: Sequence[Rule], overrides: Iterable[str]) -> Rules:
  """Replaces single entries from strings "logical=axis[,axis]" ("logical=" replicates).

  The logical name must already have a rule (a typo must not silently add a new one).
  """
  table = dict(check_rules(rules))
  for o in overrides:
    if not isinstance(o, str) or o.count("=") != 1:
      raise ValueError(f"mesh.rules entry {o!r}: must read 'logical_name=mesh_axis[,mesh_axis]'")
    name, rhs = (s.strip() for s in o.split("="))
    if name not in table:
      raise ValueError(f"mesh.rules entry {o!r}: unknown logical name {name!r}; known: "
                       f"{sorted(table)}")
    axes = tuple(a.strip() for a in rhs.split(",") if a.strip())
    table[name] = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return check_rules(tuple(table.items()))


def rules_from_config(mesh_cfg) -> Rules:
  """DEFAULT_RULES with `mesh_cfg.rules` overrides applied (a `deepseek_jax.config.MeshConfig`)."""
  return with_overrides(DEFAULT_RULES, getattr(mesh_cfg, "rules", ()))


def mesh_axes_of(name: str, rules: Sequence[Rule]) -> tuple[str, ...]:
  """The mesh axes a logical name maps to (() when replicated); KeyError text names the gap."""
  for n, entry in rules:
    if n == name:
      return as_axes(entry)
  raise KeyError(f"logical axis {name!r} has no rule; add one to sharding/rules.py")
