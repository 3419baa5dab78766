"""MoE dispatch: routed SwiGLU experts applied to tokens (V3 report §2.1.2, DeepSeekMoE).

Pure functions with one signature, `f(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM,
w_down_EMD, ...) -> y_XD` with y_t = sum_k w_{t,k} * Expert_{e_{t,k}}(x_t):

- `dense_ffn`: every expert on every token, weighted by a dense [X, E] gate matrix. Exact and
  simple; O(E) cost. The test oracle.
- `dropless_ffn`: sort the A = X*K token-expert assignments by expert, grouped matmul, unsort,
  combine. No assignment is ever dropped, every shape is static, and the cost grows with K, not E.
  Two grouped-matmul implementations:
    * "block": pad each expert's group to a multiple of U rows and lay the groups out in a fixed
      number W = floor((A + min(E, A) (U - 1)) / U) of blocks (the worst case over all routings);
      then scan over the blocks, each a plain [U, D] x [D, M] SwiGLU against its expert's weights
      (sliced, never gathered into a copy). Fast on CPU, where `jax.lax.ragged_dot` costs
      O(E) (measured fwd+bwd at X=2048, K=4: 5x the block path at E=8, 33x at E=64).
    * "ragged": `jax.lax.ragged_dot` on the unpadded sorted rows; for GPU/TPU.
  `dropless_ffn` is what the expert-parallel code runs on each shard's local experts.

Expert matmuls go through `dots` (an `ExpertDots`, e.g. from the FP8 policy) as `dot_general`
calls: 2-d x 2-d per block in "block"; [X, D] x [E, D, M] and a batch dimension over experts in
`dense_ffn`. Local letters beyond the dimension key: P padded rows = W blocks x U rows per block.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

DotGeneral = Callable[..., jax.Array]


class ExpertDots(NamedTuple):
  """The `dot_general` used for each expert projection (HF names)."""
  gate_proj: DotGeneral = jax.lax.dot_general
  up_proj: DotGeneral = jax.lax.dot_general
  down_proj: DotGeneral = jax.lax.dot_general


DROPLESS_IMPLS = ("block", "ragged")


def default_dropless_impl() -> str:
  """'ragged' where the backend has a grouped-matmul kernel (GPU/TPU), 'block' on CPU."""
  return "block" if jax.default_backend() == "cpu" else "ragged"


def _check_shapes(fn: str, x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD):
  X, D = x_XD.shape
  E, _, M = w_gate_EDM.shape
  ok = (weights_XK.shape == experts_XK.shape and weights_XK.shape[0] == X
        and w_gate_EDM.shape == (E, D, M) and w_up_EDM.shape == (E, D, M)
        and w_down_EMD.shape == (E, M, D))
  if not ok:
    raise ValueError(f"{fn}: inconsistent shapes x {x_XD.shape}, weights {weights_XK.shape}, "
                     f"experts {experts_XK.shape}, gate_proj {w_gate_EDM.shape}, up_proj "
                     f"{w_up_EDM.shape}, down_proj {w_down_EMD.shape}; expected [X, D], [X, K], "
                     "[X, K], [E, D, M], [E, D, M], [E, M, D]")


def _combine(y_XKD: jax.Array, weights_XK: jax.Array, dtype) -> jax.Array:
  y_XD = jnp.einsum("XKD,XK->XD", y_XKD, weights_XK.astype(y_XKD.dtype),
                    preferred_element_type=jnp.float32)
  return y_XD.astype(dtype)


# ---- dense: the oracle ----

def dense_ffn(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
              dots: ExpertDots | None = None) -> jax.Array:
  """Every expert on every token; the routing enters only through the [X, E] gate matrix."""
  _check_shapes("dense_ffn", x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  dots = dots or ExpertDots()
  X, E = x_XD.shape[0], w_gate_EDM.shape[0]
  gate_XE = jnp.zeros((X, E), weights_XK.dtype).at[
      jnp.arange(X)[:, None], experts_XK].add(weights_XK)
  proj = (((1,), (1,)), ((), ()))                         # XD,EDM->XEM
  h_XEM = (jax.nn.silu(dots.gate_proj(x_XD, w_gate_EDM, proj))
           * dots.up_proj(x_XD, w_up_EDM, proj))
  y_EXD = dots.down_proj(h_XEM, w_down_EMD, (((2,), (1,)), ((1,), (0,))))   # XEM,EMD->EXD
  y_XD = jnp.einsum("EXD,XE->XD", y_EXD, gate_XE.astype(y_EXD.dtype),
                    preferred_element_type=jnp.float32)
  return y_XD.astype(x_XD.dtype)


# ---- dropless ----

def auto_block_size(num_assignments: int, num_experts: int) -> int:
  """Rows per block U for the "block" layout (a power of two).

  The static layout pays up to E (U - 1) padding rows plus a fixed cost per block (one small
  matmul per projection), so the best U grows like sqrt(A / E); measured on CPU
  (bench/bench_moe.py --sweep-blocks) U = 32 is best or within noise of it for A = 8192 and
  E = 8..64, so U = nearest power of two to sqrt(A / E), clipped to [32, 128]. Small inputs
  (decode: A of a few tokens) use U no larger than the mean rows per nonempty expert.
  """
  A, E = max(num_assignments, 1), num_experts
  target = 2 ** math.floor(math.log2(math.sqrt(A / E)) + 0.5) if A >= E else 1
  mean_rows = -(-A // min(E, A))
  return int(min(max(target, 32), 128, 2 ** math.ceil(math.log2(mean_rows))))


def num_blocks(num_assignments: int, num_experts: int, block: int) -> int:
  """Static bound on blocks: sum_e ceil(n_e / block) over any routing with sum_e n_e = A.

  ceil(n / U) <= (n + U - 1) / U for each of the at most min(E, A) nonempty experts.
  """
  nonempty = min(num_experts, num_assignments)
  return (num_assignments + nonempty * (block - 1)) // block


def _sort_by_expert(experts_A: jax.Array, num_experts: int):
  order_A = jnp.argsort(experts_A, stable=True)
  count_E = jnp.zeros((num_experts,), jnp.int32).at[experts_A].add(1)
  return order_A, count_E


def _dropless_block(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD, dots, block):
  """Returns y_XKD: expert outputs per assignment, via the padded block layout (P = W * U)."""
  X, D = x_XD.shape
  K, E = experts_XK.shape[1], w_gate_EDM.shape[0]
  A = X * K
  U = block or auto_block_size(A, E)
  W = num_blocks(A, E, U)
  experts_A = experts_XK.reshape(A)
  order_A, count_E = _sort_by_expert(experts_A, E)
  blocks_E = (count_E + U - 1) // U
  start_E = jnp.cumsum(count_E) - count_E                 # first sorted row of each expert
  pad_start_E = (jnp.cumsum(blocks_E) - blocks_E) * U      # first padded row of each expert
  sorted_e_A = experts_A[order_A]
  dest_sorted_A = pad_start_E[sorted_e_A] + jnp.arange(A, dtype=jnp.int32) - start_E[sorted_e_A]
  dest_A = jnp.zeros((A,), jnp.int32).at[order_A].set(dest_sorted_A, unique_indices=True)
  # Padded row -> source token (X = the zero row appended below).
  token_A = jnp.arange(A, dtype=jnp.int32) // K
  token_P = jnp.full((W * U,), X, jnp.int32).at[dest_A].set(token_A, unique_indices=True)
  # Unused trailing blocks map to expert E-1: their rows are zeros, so they add nothing to any
  # output or gradient.
  expert_W = jnp.minimum(
      jnp.searchsorted(jnp.cumsum(blocks_E), jnp.arange(W), side="right"), E - 1)
  x_pad_XD = jnp.concatenate([x_XD, jnp.zeros((1, D), x_XD.dtype)], axis=0)
  x_WUD = x_pad_XD[token_P].reshape(W, U, D)
  proj = (((1,), (0,)), ((), ()))                          # UD,DM->UM and UM,MD->UD

  def expert_block(x_UD, e):
    h_UM = (jax.nn.silu(dots.gate_proj(x_UD, w_gate_EDM[e], proj))
            * dots.up_proj(x_UD, w_up_EDM[e], proj))
    return dots.down_proj(h_UM, w_down_EMD[e], proj)

  # Without the policy the scan saves each block's weight slices for the backward pass, a
  # [blocks, D, M] copy of the weights per projection (3x the time on CPU and the memory of
  # gathering them); saving only the matmul outputs recomputes the cheap slices instead.
  expert_block = jax.checkpoint(
      expert_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  _, y_WUD = jax.lax.scan(lambda c, xs: (c, expert_block(*xs)), None, (x_WUD, expert_W))
  return y_WUD.reshape(W * U, D)[dest_A].reshape(X, K, D)


def _dropless_ragged(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD):
  """Returns y_XKD via `jax.lax.ragged_dot` on the sorted, unpadded assignments."""
  X, D = x_XD.shape
  K, E = experts_XK.shape[1], w_gate_EDM.shape[0]
  A = X * K
  order_A, count_E = _sort_by_expert(experts_XK.reshape(A), E)
  x_AD = x_XD[order_A // K]
  h_AM = (jax.nn.silu(jax.lax.ragged_dot(x_AD, w_gate_EDM, count_E))
          * jax.lax.ragged_dot(x_AD, w_up_EDM, count_E))
  y_sorted_AD = jax.lax.ragged_dot(h_AM, w_down_EMD, count_E)
  inverse_A = jnp.zeros((A,), jnp.int32).at[order_A].set(
      jnp.arange(A, dtype=jnp.int32), unique_indices=True)
  return y_sorted_AD[inverse_A].reshape(X, K, D)


def dropless_ffn(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                 dots: ExpertDots | None = None, impl: str | None = None,
                 block: int | None = None) -> jax.Array:
  """Sorted grouped-matmul dispatch; exact (equal to `dense_ffn`) for any routing.

  `impl`: "block" or "ragged" (None: `default_dropless_impl()`). "ragged" multiplies through
  `jax.lax.ragged_dot` and so cannot honour custom `dots` (the FP8 seam); with custom dots it
  falls back to "block". `block`: rows per block U (None: `auto_block_size`). Expert ids must lie
  in [0, E); the expert-parallel caller remaps to local ids first.
  """
  _check_shapes("dropless_ffn", x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  impl = impl or default_dropless_impl()
  if impl not in DROPLESS_IMPLS:
    raise ValueError(f"dropless_ffn: impl={impl!r} must be one of {DROPLESS_IMPLS}")
  if block is not None and (not isinstance(block, int) or block <= 0):
    raise ValueError(f"dropless_ffn: block={block!r} must be a positive integer")
  experts_XK = experts_XK.astype(jnp.int32)
  if impl == "ragged" and dots is None:
    y_XKD = _dropless_ragged(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  else:
    y_XKD = _dropless_block(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                            dots or ExpertDots(), block)
  return _combine(y_XKD, weights_XK, x_XD.dtype)
