"""Shardings for the whole train state, from abstract shapes (lm1b `setup_initial_state`, nanodo).

`jax.eval_shape(init)` gives the state's shapes with each parameter boxed in its logical names, the
rules turn the names into mesh axes, and `jax.jit(init, out_shardings=...)` creates every array
already split, so no device ever holds a whole state (`init_sharded`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.config import ConfigError
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib

Path = tuple[str, ...]


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_names(path) -> Path:
  return tuple(_key_name(k) for k in path)


def _is_box(x) -> bool:
  return isinstance(x, meta.AxisMetadata)


def strip_boxes(tree):
  """The tree with every box replaced by its value (no sharding constraint applied)."""
  return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def _flatten(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)


def logical_table(abstract_tree) -> dict[Path, tuple]:
  """{key path: logical names} for every boxed leaf of a tree (e.g. `eval_shape(model.init)`)."""
  leaves, _ = _flatten(abstract_tree)
  return {path_names(p): tuple(x.names) for p, x in leaves if _is_box(x)}


def _lookup(table: Mapping[Path, tuple], path: Path, ndim: int) -> tuple | None:
  for i in range(len(path)):
    for cand in (path[i:], ("params",) + path[i:]):
      names = table.get(cand)
      if names is not None and len(names) == ndim:
        return names
  return None


def mesh_spec(names, rules: rules_lib.Rules, sizes: Mapping[str, int]) -> P:
  """Logical names -> PartitionSpec on a mesh with `sizes`, dropping axes of size 1 or absent."""
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  out = []
  for entry in spec:
    axes = tuple(a for a in rules_lib.as_axes(entry) if sizes.get(a, 1) > 1)
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def _check_leaf(where: str, shape, names, spec: P, sizes: Mapping[str, int]) -> None:
  for d, (n, entry) in enumerate(zip(shape, spec)):
    k = math.prod(sizes[a] for a in rules_lib.as_axes(entry))
    if n % k:
      raise ConfigError(f"{where}: dimension {d} ({names[d]!r}) has size {n}, which does not "
                        f"divide over {entry!r} (size {k}); change the mesh or override "
                        f"'{names[d]}=' in mesh.rules")


def state_shardings(abstract_state, mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES,
                    logical=None) -> Any:
  """A `NamedSharding` for every leaf (every box) of `abstract_state`.

  A boxed leaf is sharded by its own names; an unboxed one by the names of the known variable
  its key path ends with, when the ranks agree (e.g. unboxed Adam moments); anything else
  (step counters, scalars) is replicated. Mesh axes of size 1 are dropped, and a dimension that
  does not divide over its axes raises ConfigError naming the leaf.

  Args:
    abstract_state: output of `jax.eval_shape` (any pytree: variables, a TrainState, ...).
    mesh: a `Mesh` (or `AbstractMesh` for planning).
    rules: logical -> mesh rules (`rules.DEFAULT_RULES` or `rules.rules_from_config`).
    logical: optional boxed tree (or a `logical_table`) naming unboxed leaves by path suffix, e.g.
      `jax.eval_shape(model.init, rng, tokens)` when the state holds unboxed params and moments.
  Returns:
    A tree with the structure of `abstract_state` (each box replaced by its sharding), usable as
    `out_shardings`/`in_shardings` for the boxed or the unboxed state.
  """
  rules = rules_lib.check_rules(rules)
  sizes = mesh_lib.axis_sizes(mesh)
  leaves, treedef = _flatten(abstract_state)
  table = logical_table(abstract_state)
  if logical is not None:
    is_table = isinstance(logical, Mapping) and all(isinstance(k, tuple) for k in logical)
    table.update(logical if is_table else logical_table(logical))
  out = []
  for p, x in leaves:
    names = tuple(x.names) if _is_box(x) else None
    value = x.value if _is_box(x) else x
    shape = getattr(value, "shape", ())
    if names is None and shape:
      names = _lookup(table, path_names(p), len(shape))
    spec = P() if names is None else mesh_spec(names, rules, sizes)
    if names is not None:
      _check_leaf("/".join(path_names(p)), shape, names, spec, sizes)
    out.append(NamedSharding(mesh, spec))
  return jax.tree_util.tree_unflatten(treedef, out)


def spec_table(abstract_tree, mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES
               ) -> dict[str, list]:
  """{'params/embed_tokens/embedding': ['tensor', 'fsdp'], ...}: one JSON-ready row per leaf."""
  shardings = state_shardings(abstract_tree, mesh, rules)
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  rows = {}
  for p, s in leaves:
    rows["/".join(path_names(p))] = [list(e) if isinstance(e, tuple) else e for e in s.spec]
  return dict(sorted(rows.items()))


def compile_init(init_fn: Callable, *args, mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES,
                 logical=None):
  """Compiles `init_fn(*args)` with the state's shardings as `out_shardings`.

  Returns (compiled, shardings); `compiled(*args)` creates the state split across the mesh (each
  device computes only its own shards), and `compiled.memory_analysis()` tells what it costs.
  """
  with mesh_lib.activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, mesh, rules, logical)
    compiled = jax.jit(init_fn, out_shardings=shardings).lower(*args).compile()
  return compiled, shardings


def init_sharded(init_fn: Callable, *args, mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES,
                 logical=None):
  """Runs `init_fn(*args)` already sharded (see `compile_init`); returns (state, shardings).

  `init_fn` may return boxed or unboxed values; e.g. `init_sharded(Transformer(cfg).init, rng,
  tokens_BT, mesh=mesh, rules=rules)`, or a function building the whole train state.
  """
  compiled, shardings = compile_init(init_fn, *args, mesh=mesh, rules=rules, logical=logical)
  return compiled(*args), shardings


def batch_sharding(mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES, ndim: int = 2
                   ) -> NamedSharding:
  """Tokens [B, T, ...] split over the act_batch axes: B_{data,fsdp,expert}."""
  sizes = mesh_lib.axis_sizes(mesh)
  spec = mesh_spec(("act_batch", "act_seq") + (None,) * (ndim - 2), rules, sizes)
  return NamedSharding(mesh, spec)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _bytes(shape, dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds for `abstract_tree` under `shardings` (largest shard; no allocation)."""
  leaves = jax.tree.leaves(strip_boxes(abstract_tree))
  shard_list = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  if len(leaves) != len(shard_list):
    raise ValueError(f"bytes_per_device: {len(leaves)} leaves but {len(shard_list)} shardings")
  return sum(_bytes(s.shard_shape(x.shape), x.dtype) for x, s in zip(leaves, shard_list))


def total_bytes(abstract_tree) -> int:
  """Bytes of the whole (unsharded) tree."""
  return sum(_bytes(x.shape, x.dtype) for x in jax.tree.leaves(strip_boxes(abstract_tree)))
