"""The pure train step: non-finite guard, router-bias rule, gradient accumulation, eval step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import router
from deepseek_jax.fp8 import policy_from_config
from deepseek_jax.model import Transformer, abstract_variables
from deepseek_jax.training import data as data_lib
from deepseek_jax.training import make_init_fn, make_optimizer, step as step_lib, variables_of
from tests import helpers
from tests.training.conftest import compile_fast, small_config

GAMMA = 0.01


@pytest.fixture(scope="module")
def setup():
  cfg = small_config(f"train.bias_update_gamma={GAMMA}")
  model = Transformer(cfg.model)
  tx = make_optimizer(cfg.train)
  init_fn = make_init_fn(model, tx, (cfg.train.batch_size, cfg.train.seq_len), 0)
  state = compile_fast(jax.jit(lambda: nn.unbox(init_fn())))()
  batch = {k: jnp.asarray(v) for k, v in data_lib.make_data(cfg).train_batch(0).items()}
  train_step = compile_fast(
      jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, cfg=cfg)), state, batch)
  return cfg, model, state, train_step, batch


@pytest.fixture(scope="module")
def grads(setup):
  """{grad_accum: (loss, aux, grads, fp8 observations)} for one batch, without and with
  accumulation."""
  cfg, model, state, _, batch = setup
  out = {}
  for n in (1, 2):
    c = small_config(f"train.bias_update_gamma={GAMMA}", f"train.grad_accum={n}")
    args = (state.params, state.fp8_state, state.router_state, batch)
    out[n] = compile_fast(jax.jit(functools.partial(step_lib._grads, model=model, cfg=c)),
                          *args)(*args)
  return out


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_non_finite_loss_skips_the_update_and_counts(setup):
  _, _, state, train_step, batch = setup
  kernel = state.params["lm_head"]["kernel"]
  poisoned = state.replace(params={**state.params,
                                   "lm_head": {"kernel": kernel.at[0, 0].set(jnp.nan)}})
  new, m = train_step(poisoned, batch)
  assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
  assert_trees_equal(new.params, poisoned.params)
  assert_trees_equal(new.opt_state, poisoned.opt_state)
  assert_trees_equal(new.router_state, poisoned.router_state)
  assert (int(new.step), int(new.data_position)) == (1, 1)
  assert (int(new.bad_streak), int(new.bad_total)) == (1, 1)
  new, m = train_step(new, batch)
  assert (int(new.bad_streak), int(new.bad_total), int(m["bad_streak"])) == (2, 2, 2)
  # A finite step resets the streak but not the total.
  good, m = train_step(state.replace(bad_streak=jnp.int32(2), bad_total=jnp.int32(2)), batch)
  assert bool(m["finite"]) and (int(good.bad_streak), int(good.bad_total)) == (0, 2)
  assert not np.array_equal(good.params["lm_head"]["kernel"], kernel)


def test_router_biases_move_by_gamma_against_the_load(setup, grads):
  cfg, _, state, train_step, batch = setup
  aux = grads[1][1]
  load_LE, mtp_load_DE = np.asarray(aux["load"]), np.asarray(aux["mtp_load"])
  assert load_LE.sum() == cfg.train.batch_size * cfg.train.seq_len * cfg.model.num_experts_per_tok
  new, m = train_step(state, batch)
  bias = lambda block: np.asarray(block["mlp"]["gate"]["e_score_correction_bias"])  # noqa: E731
  main = lambda t: bias(t["moe_blocks"]["layers"])  # noqa: E731
  mtp = lambda t: bias(t["mtp"]["layers_0"]["block"])  # noqa: E731
  for layer, load in ((main, load_LE), (mtp, mtp_load_DE[0])):
    expected = GAMMA * np.sign(load.mean(-1, keepdims=True) - load)
    assert np.any(expected != 0)   # the batch is not perfectly balanced
    np.testing.assert_allclose(layer(new.router_state) - layer(state.router_state), expected,
                               atol=1e-7)
  np.testing.assert_allclose(m["maxvio"], router.max_violation(load_LE), rtol=1e-6)
  np.testing.assert_allclose(m["mtp_maxvio"], router.max_violation(mtp_load_DE), rtol=1e-6)
  # The biases are state, not parameters: the optimizer never sees them.
  assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(new.params))


@pytest.mark.parametrize("scan", [True, False])
def test_each_routing_bias_pairs_with_its_layers_load(scan):
  cfg = helpers.small_config(num_layers=3, first_k_dense_replace=1, num_mtp_layers=2,
                             scan_layers=scan)
  router_state = nn.unbox(abstract_variables(cfg))["router_state"]
  E = cfg.n_routed_experts
  aux = {"load": jnp.arange(2 * E, dtype=jnp.float32).reshape(2, E),
         "mtp_load": 100 + jnp.arange(2 * E, dtype=jnp.float32).reshape(2, E)}
  pairs = step_lib._bias_load_pairs(router_state, aux, cfg)
  bias = lambda block: block["mlp"]["gate"]["e_score_correction_bias"]  # noqa: E731
  if scan:
    np.testing.assert_array_equal(bias(pairs["moe_blocks"]["layers"]), aux["load"])
  for i in range(0 if scan else 2):
    np.testing.assert_array_equal(bias(pairs["moe_blocks"][f"layers_{i}"]), aux["load"][i])
  for k in range(2):
    np.testing.assert_array_equal(bias(pairs["mtp"][f"layers_{k}"]["block"]), aux["mtp_load"][k])


def test_gradient_accumulation_matches_the_full_batch(grads):
  (loss1, aux1, g1, _), (loss2, aux2, g2, _) = grads[1], grads[2]
  np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
  np.testing.assert_array_equal(aux1["load"], aux2["load"])       # integer counts, summed
  np.testing.assert_array_equal(aux1["mtp_load"], aux2["mtp_load"])
  for k in ("ce", "mtp", "balance"):
    np.testing.assert_allclose(aux1[k], aux2[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7), g1, g2)


def test_eval_step_is_the_main_head_cross_entropy(setup, grads):
  cfg, model, state, _, batch = setup
  variables = variables_of(state)
  eval_step = compile_fast(jax.jit(functools.partial(step_lib.eval_step, model=model)),
                           variables, batch)
  val = eval_step(variables, batch)
  np.testing.assert_allclose(val, grads[1][1]["ce"], rtol=1e-5)
  assert abs(float(val) - np.log(cfg.model.vocab_size)) < 0.1    # near-uniform at init


def test_delayed_scaling_fp8_state_rolls_the_observed_amaxes():
  cfg = small_config("fp8.recipe=tensor_delayed", "model.num_mtp_layers=0")
  model = Transformer(cfg.model, fp8_policy=policy_from_config(cfg.fp8))
  tx = make_optimizer(cfg.train)
  init_fn = make_init_fn(model, tx, (cfg.train.batch_size, cfg.train.seq_len), 0)
  state = compile_fast(jax.jit(lambda: nn.unbox(init_fn())))()
  histories = jax.tree.leaves(state.fp8_state)
  assert histories and all(float(jnp.abs(h).max()) == 0 for h in histories)   # fresh: all zero
  batch = {k: jnp.asarray(v) for k, v in data_lib.make_data(cfg).train_batch(0).items()}
  step = compile_fast(jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                                cfg=cfg)), state, batch)
  one, m = step(state, batch)
  two, _ = step(one, batch)
  assert bool(m["finite"])
  for h1, h2 in zip(jax.tree.leaves(one.fp8_state), jax.tree.leaves(two.fp8_state)):
    h1, h2 = np.asarray(h1), np.asarray(h2)
    assert np.all(h1[..., 0, :] > 0) and np.all(h1[..., 1:, :] == 0)   # x, w, g amaxes seen
    np.testing.assert_array_equal(h2[..., 1, :], h1[..., 0, :])         # rolled one row down
