"""The routed experts on one device (V3 report §2.1.2, DeepSeekMoE): `dense_ffn` (every expert
on every token, the test oracle), `dropless_ffn` (sort assignments by expert, grouped matmul,
unsort; "gmm", "block" or "ragged" kernels; "block" gathers the chosen experts' weights instead
when there are at most E assignments) and `LocalExperts`, the runner the MoE block is given.
Expert id E marks a slot with no expert (expert-parallel padding): zero output, in no group.
Letters beyond the dimension key: U rows per block, W blocks, M2 = 2M (gate and up fused).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax import gmm as gmm_lib
from deepseek_jax.expert_blocks import (HIGH_PRECISION, BlockNumerics,  # noqa: F401  (dispatch's API too)
                                        HighPrecision, block_numerics, block_swiglu)
from deepseek_jax.fp8.dot import swiglu_dot
from deepseek_jax.kernels import cpu as cpu_kernels
from deepseek_jax.vma import cotangent_like, varying_like
from deepseek_jax.gmm import auto_block_size, num_blocks  # noqa: F401  (dispatch's API too)

DotGeneral = Callable[..., jax.Array]


class ExpertDots(NamedTuple):
  """The `dot_general` used for each expert projection (HF names)."""
  gate_proj: DotGeneral = jax.lax.dot_general
  up_proj: DotGeneral = jax.lax.dot_general
  down_proj: DotGeneral = jax.lax.dot_general


DROPLESS_IMPLS = ("block", "ragged", "gmm")
PLATFORMS = ("auto",) + gmm_lib.PLATFORMS


def default_dropless_impl(platform: str = "auto") -> str:
  """'gmm' on GPU/TPU (a grouped-matmul kernel), 'block' on CPU; `platform` "auto" asks
  `jax.default_backend()`, any other value is the target and decides alone."""
  return "block" if gmm_lib.resolve_platform(platform) == "cpu" else "gmm"


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
      jnp.arange(X)[:, None], experts_XK].add(weights_XK, mode="drop")   # id E: no expert
  proj = (((1,), (1,)), ((), ()))                         # XD,EDM->XEM
  gate_XEM, up_XEM = dots.gate_proj(x_XD, w_gate_EDM, proj), dots.up_proj(x_XD, w_up_EDM, proj)
  y_EXD = swiglu_dot(dots.down_proj, gate_XEM, up_XEM, w_down_EMD,
                     (((2,), (1,)), ((1,), (0,))))                      # XEM,EMD->EXD
  y_XD = jnp.einsum("EXD,XE->XD", y_EXD, gate_XE.astype(y_EXD.dtype),
                    preferred_element_type=jnp.float32)
  return y_XD.astype(x_XD.dtype)


# ---- dropless ----

def _sort_by_expert(experts_A: jax.Array, num_experts: int):
  """Stable order by expert and the rows per expert; id E (no expert) sorts last, uncounted."""
  order_A = jnp.argsort(experts_A, stable=True)
  count_E = jnp.zeros((num_experts,), jnp.int32).at[experts_A].add(1, mode="drop")
  return order_A, count_E


def _block_layout(experts_XK, num_experts: int, block: int | None = None):
  """The padded block layout (`gmm.block_layout`) of the assignments: (U, W, dest_A [A] padded
  row (of W*U) of each assignment (W*U: no expert), token_WU source token of each padded row (X
  for padding), expert_W expert of each block)."""
  X, K = experts_XK.shape
  E, A = num_experts, X * K
  U = block or auto_block_size(A, E)
  order_A, count_E = _sort_by_expert(experts_XK.reshape(A), E)
  layout = gmm_lib.block_layout(count_E, A, U)
  dest_A = jnp.zeros((A,), jnp.int32).at[order_A].set(layout.dest_A, unique_indices=True)
  token_WU = jnp.where(layout.row_WU < A, order_A[jnp.minimum(layout.row_WU, A - 1)] // K, X)
  return U, layout.row_WU.shape[0], dest_A, token_WU, layout.group_W


def _assignment_layout(experts_XK, num_experts: int):
  """One block per assignment, in assignment order (no sort): the blocks the sorted layout has
  at U = 1, in the same form as `_block_layout`. Id E (no expert) gets a zero row of expert E-1
  and is dropped from the output."""
  X, K = experts_XK.shape
  A, E = X * K, num_experts
  experts_A = experts_XK.reshape(A)
  a_A = jnp.arange(A, dtype=jnp.int32)
  valid_A = experts_A < E
  token_WU = jnp.where(valid_A, a_A // K, X)[:, None]
  return 1, A, jnp.where(valid_A, a_A, A), token_WU, jnp.minimum(experts_A, E - 1)


def gathers_experts(num_assignments: int, num_experts: int, block: int | None = None) -> bool:
  """Whether the block path runs the gathered form: at most E assignments (decoding a few rows)
  and one row per block (`block` None or 1; the automatic size is 1 there anyway). Then every
  assignment is its own block and its expert's weights are gathered for one batched product,
  instead of sorting and looping over blocks (`expert_blocks.block_swiglu`'s `gathered`)."""
  return num_assignments <= num_experts and block in (None, 1)


def _dropless_block(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD, dots, block):
  """Returns y_XKD: expert outputs per assignment, via the padded block layout, or with one
  block per assignment, gathered, when `gathers_experts`.

  "block" is fast on CPU, where `jax.lax.ragged_dot` costs O(E) (measured fwd+bwd at X=2048,
  K=4: 5x the block path at E=8, 33x at E=64). Decoding tiny.yaml at batch 2 (8 assignments,
  16 experts), the gathered form reads 8 experts' weights where the scan over layers first
  copied all 16 out of the layer stack (bench/bench_experts_decode.py)."""
  X, D = x_XD.shape
  K, E = experts_XK.shape[1], w_gate_EDM.shape[0]
  gathered = gathers_experts(X * K, E, block)
  layout = _assignment_layout if gathered else functools.partial(_block_layout, block=block)
  U, W, dest_A, token_WU, expert_W = layout(experts_XK, E)
  x_pad_XD = jnp.concatenate([x_XD, jnp.zeros((1, D), x_XD.dtype)], axis=0)
  x_WUD = x_pad_XD[token_WU]
  numerics = block_numerics(dots)
  if numerics is not None:
    y_WUD = block_swiglu(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, numerics, gathered)
  else:
    y_WUD = _generic_block_swiglu(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, dots,
                                  gathered)
  y_AD = jnp.take(y_WUD.reshape(W * U, D), dest_A, axis=0, mode="fill", fill_value=0)
  return y_AD.reshape(X, K, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_block(block, x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD):
  """`_dropless_block` by the CPU kernel (`kernels.cpu.moe_decode`); its gradient is XLA's
  path's (the kernel has no backward: a small batch that trains differentiates XLA's blocks)."""
  y_XKD = cpu_kernels.moe_decode(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  # Typed here, inside the custom_vjp, not only by `choose` outside it: the output's manual-axis
  # type decides the cotangent autodiff hands back (without it the sharded gradients differ).
  return varying_like(y_XKD, (x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD))


def _kernel_block_fwd(block, x_XD, experts_XK, *weights):
  return _kernel_block(block, x_XD, experts_XK, *weights), (x_XD, experts_XK, weights)


def _kernel_block_bwd(block, res, ct_XKD):
  x_XD, experts_XK, weights = res
  y_XKD, vjp = jax.vjp(lambda x, *w: _dropless_block(x, experts_XK, *w, ExpertDots(), block),
                       x_XD, *weights)
  ct_x, *ct_w = vjp(cotangent_like(ct_XKD, y_XKD))
  return (cotangent_like(ct_x, x_XD), None,
          *(cotangent_like(c, w) for c, w in zip(ct_w, weights)))


_kernel_block.defvjp(_kernel_block_fwd, _kernel_block_bwd)


def _generic_block_swiglu(x_WUD, expert_W, w_gate_EDM, w_up_EDM, w_down_EMD, dots, gathered):
  """Any `dot_general` callables, one call per block and projection (vmapped over the blocks
  when `gathered`, scanned otherwise), autodiff for the rest."""
  proj = (((1,), (0,)), ((), ()))                          # UD,DM->UM and UM,MD->UD

  def expert_block(x_UD, e):
    return swiglu_dot(dots.down_proj, dots.gate_proj(x_UD, w_gate_EDM[e], proj),
                      dots.up_proj(x_UD, w_up_EDM[e], proj), w_down_EMD[e], proj)

  # Without the policy the scan saves each block's weight slices for the backward pass, a
  # [blocks, D, M] copy of the weights per projection (3x the time on CPU and the memory of
  # gathering them); saving only the matmul outputs recomputes the cheap slices instead.
  expert_block = jax.checkpoint(
      expert_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  if gathered:
    return jax.vmap(expert_block)(x_WUD, expert_W)
  _, y_WUD = jax.lax.scan(lambda c, xs: (c, expert_block(*xs)), None, (x_WUD, expert_W))
  return y_WUD


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


def _dropless_gmm(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD, platform, fuse, block):
  """Returns y_XKD via `gmm.gmm` on the sorted, unpadded assignments (no-expert slots sort last
  and belong to no group); gate and up are one [E, D, 2M] grouped matmul when `fuse`."""
  X, D = x_XD.shape
  K, (E, _, M) = experts_XK.shape[1], w_gate_EDM.shape
  A = X * K
  order_A, count_E = _sort_by_expert(experts_XK.reshape(A), E)
  x_AD = x_XD[order_A // K]
  grouped_mm = functools.partial(gmm_lib.gmm, group_sizes_E=count_E, platform=platform,
                                 block=block)
  if fuse:
    gate_up_AM2 = grouped_mm(x_AD, (w_gate_EDM, w_up_EDM))
    gate_AM, up_AM = gate_up_AM2[:, :M], gate_up_AM2[:, M:]
  else:
    gate_AM, up_AM = grouped_mm(x_AD, w_gate_EDM), grouped_mm(x_AD, w_up_EDM)
  y_sorted_AD = grouped_mm(jax.nn.silu(gate_AM) * up_AM, w_down_EMD)
  inverse_A = jnp.zeros((A,), jnp.int32).at[order_A].set(
      jnp.arange(A, dtype=jnp.int32), unique_indices=True)
  return y_sorted_AD[inverse_A].reshape(X, K, D)


def dropless_ffn(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                 dots: ExpertDots | None = None, impl: str | None = None,
                 block: int | None = None, platform: str = "auto",
                 fuse_gate_up: bool = True) -> jax.Array:
  """Sorted grouped-matmul dispatch; exact (equal to `dense_ffn`) for any routing.

  `impl`: "gmm" (`gmm.gmm`: a grouped-matmul kernel chosen by `platform`, cost ~ tokens x K
  forward and backward; `fuse_gate_up` runs gate and up as one), "block" (padded blocks, the
  CPU path) or "ragged" (`jax.lax.ragged_dot`, which XLA:GPU rewrites into a dense masked GEMM
  over all experts); None: `default_dropless_impl(platform)`. "gmm" and "ragged" cannot honour
  custom `dots` (the FP8 seam): with them the FP8 recipe runs "block", whose own backward
  (`block_swiglu`) already costs ~ tokens x K. `block`: rows per block U (None:
  `auto_block_size`). Expert ids lie in [0, E], E for a slot with no expert; the expert-parallel
  caller remaps to local ids first.
  """
  _check_shapes("dropless_ffn", x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  if platform not in PLATFORMS:
    raise ValueError(f"dropless_ffn: platform={platform!r} must be one of {PLATFORMS}")
  impl = impl or default_dropless_impl(platform)
  if impl not in DROPLESS_IMPLS:
    raise ValueError(f"dropless_ffn: impl={impl!r} must be one of {DROPLESS_IMPLS}")
  if block is not None and (not isinstance(block, int) or block <= 0):
    raise ValueError(f"dropless_ffn: block={block!r} must be a positive integer")
  experts_XK = experts_XK.astype(jnp.int32)
  if impl == "gmm" and dots is None:
    y_XKD = _dropless_gmm(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                          gmm_lib.resolve_platform(platform), fuse_gate_up, block)
  elif impl == "ragged" and dots is None:
    y_XKD = _dropless_ragged(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  else:
    # Decoding on the CPU (few tokens, f32, no FP8 seam, no block size pinned): one kernel
    # reads each hit expert's weights once in place; elsewhere XLA's blocks.
    y_XKD = cpu_kernels.choose(
        dots is None and block is None and cpu_kernels.moe_applies(x_XD, w_gate_EDM),
        functools.partial(_kernel_block, block), functools.partial(
            _dropless_block, dots=dots or ExpertDots(), block=block),
        x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD)
  return _combine(y_XKD, weights_XK, x_XD.dtype)


# ---- the runner the MoE block is given ----

DISPATCH_KINDS = ("dense", "dropless")


@dataclasses.dataclass(frozen=True)
class LocalExperts:
  """Routed experts on one device: `__call__(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM,
  w_down_EMD, dots=None) -> (y_XD, None)` (no dispatch statistics; see
  `sharding.expert_parallel.ExpertParallel` for the runner that has them).

  `kind` "dense" runs `dense_ffn`, "dropless" runs `dropless_ffn` with `impl` ("gmm", "block",
  "ragged"; None: by platform), `block` rows per block (None: `auto_block_size`), `platform`
  (the target: "cpu", "gpu", "tpu"; "auto": `jax.default_backend()` when called) and
  `fuse_gate_up`. Frozen and hashable, so it can be a flax module attribute.
  """
  kind: str = "dropless"
  impl: str | None = None
  block: int | None = None
  platform: str = "auto"
  fuse_gate_up: bool = True

  def __post_init__(self):
    if self.kind not in DISPATCH_KINDS:
      raise ValueError(f"LocalExperts: kind={self.kind!r} must be one of {DISPATCH_KINDS}")
    if self.impl is not None and self.impl not in DROPLESS_IMPLS:
      raise ValueError(f"LocalExperts: impl={self.impl!r} must be one of {DROPLESS_IMPLS} or None")
    if self.block is not None and (not isinstance(self.block, int) or isinstance(self.block, bool)
                                   or self.block <= 0):
      raise ValueError(f"LocalExperts: block={self.block!r} must be a positive integer or None")
    if self.platform not in PLATFORMS:
      raise ValueError(f"LocalExperts: platform={self.platform!r} must be one of {PLATFORMS}")
    if not isinstance(self.fuse_gate_up, bool):
      raise ValueError(f"LocalExperts: fuse_gate_up={self.fuse_gate_up!r} must be a bool")

  @classmethod
  def from_config(cls, model_cfg) -> "LocalExperts":
    """`model.moe_dispatch`, `model.dropless_impl` ("auto" -> None), `model.dropless_block`,
    `model.platform` and `model.fuse_gate_up`."""
    impl = None if model_cfg.dropless_impl == "auto" else model_cfg.dropless_impl
    return cls(model_cfg.moe_dispatch, impl, model_cfg.dropless_block, model_cfg.platform,
               model_cfg.fuse_gate_up)

  def __call__(self, x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
               dots: ExpertDots | None = None) -> tuple[jax.Array, None]:
    if self.kind == "dense":
      return dense_ffn(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD,
                       dots=dots), None
    run = functools.partial(dropless_ffn, dots=dots, impl=self.impl, block=self.block,
                            platform=self.platform, fuse_gate_up=self.fuse_gate_up)
    impl = self.impl or default_dropless_impl(self.platform)
    if impl == "gmm" and dots is None and gmm_lib.resolve_platform(self.platform) != "cpu":
      return gmm_lib.on_token_shards(run, x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM,
                                     w_down_EMD), None
    return run(x_XD, weights_XK, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD), None

