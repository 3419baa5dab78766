"""Weights for inference from a train.py checkpoint (orbax), and its export to HF format."""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import hf
from deepseek_jax.config import Config, config_to_dict
from deepseek_jax.generate import load_for_inference
from deepseek_jax.hf import CheckpointError
from deepseek_jax.hf import __main__ as hf_cli
from tests.inference.conftest import load


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A TrainState (the v3_tiny fixture's weights, Adam moments, step 7) saved by
  training.Checkpointer exactly as train.py does."""
  training = pytest.importorskip("deepseek_jax.training")
  model_cfg, variables = load("v3_tiny")
  params = variables["params"]
  zero = jnp.zeros((), jnp.int32)
  state = training.TrainState(
      step=jnp.asarray(7, jnp.int32), params=params, opt_state=optax.adam(1e-3).init(params),
      router_state=variables["router_state"], fp8_state={}, rng=jax.random.PRNGKey(0),
      data_position=zero, bad_streak=zero, bad_total=zero)
  workdir = tmp_path_factory.mktemp("run")
  cfg_dict = config_to_dict(Config(model=model_cfg))
  ckpt = training.Checkpointer(workdir, keep=2, async_save=False, config=cfg_dict)
  assert ckpt.save(state, force=True)
  ckpt.close()
  return workdir, model_cfg, state


def _assert_same(a, b):
  fa, fb = (flax.traverse_util.flatten_dict(x) for x in (a, b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_trained_checkpoint_loads_params_and_router_state(trained):
  workdir, model_cfg, state = trained
  for where in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "7"):
    cfg, variables, info = load_for_inference(where)
    assert cfg == model_cfg and info == {"step": 7}
    _assert_same(variables, {"params": state.params, "router_state": state.router_state})
  cfg16, v16, _ = load_for_inference(workdir, "bfloat16")
  assert cfg16 == dataclasses.replace(model_cfg, dtype="bfloat16", param_dtype="bfloat16")
  kinds = {str(x.dtype) for x in jax.tree.leaves(v16["params"])}
  assert kinds == {"bfloat16", "float32"}  # the router kernel stays f32


def test_trained_checkpoint_exports_to_hugging_face(trained, tmp_path):
  workdir, model_cfg, state = trained
  assert hf_cli.main(["convert", str(workdir), str(tmp_path / "hf")]) == 0
  cfg, variables = hf.load_hf(tmp_path / "hf")
  assert cfg.num_mtp_layers == 1 and cfg.d_model == model_cfg.d_model
  _assert_same(variables, {"params": state.params, "router_state": state.router_state})


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="neither a Hugging Face directory"):
    load_for_inference(tmp_path)
