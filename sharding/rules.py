"""Logical axis rules: the one table from the model's logical axis names to mesh axes.

One entry per logical name. Order matters: flax walks the rules in order and gives a dimension its
mesh axes only while this array uses none of them yet, so when two names of one array map to the
same mesh axis the earlier rule wins and the later dimension stays replicated (`embed` is listed
before the latent ranks). The layout reasoning is in docs/design-notes.md.
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
