"""Per-tensor delayed scaling: explicit amax-history state (the TransformerEngine/Flax recipe).

Not DeepSeek's recipe (V3 report §3.3.2 scales online); offered as a documented, tested option
because it is the classic per-tensor baseline. The state of one GEMM site is a single f32 array
`amax_history [H, 3]`, one column per tensor (x, w, g), row 0 the most recent step. It lives in
the model's `fp8_state` collection (one slice per scanned layer), hence in the train state and in
checkpoints; nothing is hidden in modules or globals.

Protocol, all pure functions:
- scale estimate of a tensor = max of its column (`algo='max'`) times 2**margin; an all-zero
  column (a fresh state, or one never updated) falls back to the tensor's current amax, so a
  stale or missing update degrades to current scaling, never to a bogus scale (TE#982, PR#567);
- `fp8_dot_general` returns the amaxes it observed (x and w in the forward, g in the backward) as
  the *cotangent* of `amax_history`: an array shaped like the state holding the observation in
  row 0 and zeros elsewhere. `jax.grad` with respect to the `fp8_state` collection therefore
  yields observations, and `update(state, observation)` rolls them in;
- microbatches and repeated use of one site within a step: combine observations with `merge`
  (elementwise max; never a mean, which underestimates the amax and clips, marin#7659). Plain
  gradient *summation* over reuse over-estimates the amax, which is safe (coarser, never clipping).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COLUMNS = ("x", "w", "g")


def init_state(history: int) -> jax.Array:
  """A fresh amax history `[history, 3]` (zeros: the first step scales from the current amax)."""
  return jnp.zeros((history, len(COLUMNS)), jnp.float32)


def estimates(amax_history: jax.Array) -> jax.Array:
  """Per-tensor amax estimates `[3]` (0 where the history is empty)."""
  return jnp.max(amax_history, axis=0)


def observation(amaxes: jax.Array, amax_history: jax.Array) -> jax.Array:
  """The cotangent carrying this step's `[3]` amaxes: row 0 set, zeros elsewhere."""
  obs = jnp.zeros_like(amax_history)
  return obs.at[0].set(amaxes.astype(amax_history.dtype))


def update(amax_history: jax.Array, obs: jax.Array) -> jax.Array:
  """Rolls the observed amaxes (row 0 of `obs`) into the history; pure, works on stacked
  per-layer states `[L, H, 3]` too."""
  return jnp.concatenate([obs[..., :1, :], amax_history[..., :-1, :]], axis=-2)


def merge(obs_a, obs_b):
  """Combines two observation pytrees (microbatches, repeated use): elementwise max."""
  return jax.tree_util.tree_map(jnp.maximum, obs_a, obs_b)


def update_tree(state_tree, obs_tree):
  """`update` over a whole `fp8_state` collection."""
  return jax.tree_util.tree_map(update, state_tree, obs_tree)
