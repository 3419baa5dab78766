"""Per-tensor delayed scaling: explicit amax-history state (the TransformerEngine/Flax recipe).

Not DeepSeek's recipe (V3 report §3.3.2 scales online): the classic per-tensor baseline, as an
option. A GEMM site's state is `amax_history [history, 3]` (columns x, w, g; row 0 the newest) in
the `fp8_state` collection; `fp8_dot_general` returns this step's amaxes as that state's cotangent,
which `update` rolls in and `merge` combines (max) across microbatches and reuse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COLUMNS = ("x", "w", "g")


def init_state(history: int) -> jax.Array:
  """A fresh amax history `[history, 3]` (zeros: the first step scales from the current amax)."""
  return jnp.zeros((history, len(COLUMNS)), jnp.float32)


def estimates(amax_history: jax.Array) -> jax.Array:
  """Per-tensor amax estimates `[3]` (0 where the history is empty: the caller then scales from
  the current amax, so a missing update degrades to current scaling, never to a bogus scale)."""
  return jnp.max(amax_history, axis=0)


def observation(amaxes: jax.Array, amax_history: jax.Array) -> jax.Array:
  """The cotangent carrying this step's `[3]` amaxes: row 0 set, zeros elsewhere."""
  obs = jnp.zeros_like(amax_history)
  return obs.at[0].set(amaxes.astype(amax_history.dtype))


def update(amax_history: jax.Array, obs: jax.Array) -> jax.Array:
  """Rolls the observed amaxes (row 0 of `obs`) into the history; pure, works on stacked
  per-layer states `[L, history, 3]` too."""
  return jnp.concatenate([obs[..., :1, :], amax_history[..., :-1, :]], axis=-2)


def merge(obs_a, obs_b):
  """Combines two observation pytrees (microbatches, repeated use): elementwise max."""
  return jax.tree_util.tree_map(jnp.maximum, obs_a, obs_b)


def update_tree(state_tree, obs_tree):
  """`update` over a whole `fp8_state` collection."""
  return jax.tree_util.tree_map(update, state_tree, obs_tree)
