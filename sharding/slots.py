"""Packing the filled expert slots of received expert-parallel rows (`mesh.compute_capacity_factor`):
each received row carries up to min(K, local experts) slots, mostly empty; the experts then run on
factor x the expected filled slots instead of every slot."""

from __future__ import annotations

import math

import jax.numpy as jnp


def compute_slots(tokens: int, k: int, rows: int, slots_per_row: int,
                  factor: float | None) -> int | None:
  """Expert rows computed per device: factor x the expected tokens x K, at most every slot;
  None (factor None, or no saving): run every slot of the received rows."""
  if factor is None:
    return None
  s = max(1, math.ceil(factor * tokens * k))
  return s if s < rows * slots_per_row else None


def pack_slots(ids_ZI, w_ZI, no_expert: int, slots: int):
  """The first `slots` filled (row, slot) pairs in row order -> (row_S [S] (Z: empty), id_S,
  w_S, dropped count). Filled slots beyond `slots` are dropped (counted)."""
  Z, I = ids_ZI.shape  # noqa: E741
  filled_A = (ids_ZI < no_expert).reshape(-1)
  pos_A = jnp.cumsum(filled_A, dtype=jnp.int32) - 1
  keep_A = filled_A & (pos_A < slots)
  src_S = jnp.full((slots,), Z * I, jnp.int32).at[jnp.where(keep_A, pos_A, slots)].set(
      jnp.arange(Z * I, dtype=jnp.int32), mode="drop")
  id_S = jnp.concatenate([ids_ZI.reshape(-1), jnp.full((1,), no_expert, ids_ZI.dtype)])[src_S]
  w_S = jnp.concatenate([w_ZI.reshape(-1), jnp.zeros((1,), w_ZI.dtype)])[src_S]
  return src_S // I, id_S, w_S, jnp.sum(filled_A & ~keep_A, dtype=jnp.int32)
