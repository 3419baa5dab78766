"""The training state: one pytree holding everything a run needs to continue exactly.

`TrainState`: step, `params`, optimizer state, `router_state` (the balancing biases, §2.1.2, moved
by the bias rule, never by the optimizer), `fp8_state` (delayed-scaling amax histories, if any),
the run key, the data-iterator position and the non-finite-step counters. Checkpointing it
makes resume exact.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # int32 scalar: optimizer steps taken (skipped steps included)
  params: Any                  # trainable variables
  opt_state: Any               # optax state
  router_state: Any            # {'moe_blocks': ..., 'mtp': ...} routing biases; {} for dense models
  fp8_state: Any               # FP8 delayed-scaling amax histories; {} for stateless recipes
  rng: jax.Array               # uint32[2] run key for stochastic layers (fold_in(rng, step)); no
                               # layer draws from it yet, it stays for the checkpoint layout
  data_position: jax.Array     # int32 scalar: batches consumed by the data iterator
  bad_streak: jax.Array        # int32 scalar: consecutive non-finite steps (updates skipped)
  bad_total: jax.Array         # int32 scalar: all non-finite steps of the run


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, batch_shape: tuple[int, int],
                 seed: int) -> Callable[[], TrainState]:
  """Returns `init() -> TrainState` with logically-partitioned boxes left on the leaves.

  Keep the boxes for `jax.eval_shape` + `nn.get_partition_spec` (the sharding seam); run
  `nn.unbox(init())` (under jit with out_shardings) for the real state.
  """
  def init() -> TrainState:
    root = jax.random.PRNGKey(seed)
    init_key, run_key = jax.random.split(root)
    tokens_BT = jnp.zeros(batch_shape, jnp.int32)
    variables = model.init(init_key, tokens_BT)
    params = variables["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params),
                      router_state=variables.get("router_state", {}),
                      fp8_state=variables.get("fp8_state", {}), rng=run_key,
                      data_position=zero, bad_streak=zero, bad_total=zero)
  return init


def init_state(init_fn: Callable[[], TrainState], shardings=None) -> TrainState:
  """Materialises the state under jit, directly into `shardings` (None: default placement)."""
  return jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()


def abstract_state(init_fn: Callable[[], TrainState]) -> TrainState:
  """Shapes and dtypes of the state (boxes kept, so logical partition specs can be read)."""
  return jax.eval_shape(init_fn)


def model_variables(params, router_state, fp8_state) -> dict:
  """The variable collections `Transformer.apply` reads (empty collections left out)."""
  out = {"params": params}
  if router_state:
    out["router_state"] = router_state
  if fp8_state:
    out["fp8_state"] = fp8_state
  return out


def variables_of(state: TrainState) -> dict:
  """`model_variables` of a state (or of a state-shaped tree of shardings or shapes)."""
  return model_variables(state.params, state.router_state, state.fp8_state)


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
