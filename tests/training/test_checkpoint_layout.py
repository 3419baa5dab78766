"""A checkpoint written by another version is refused in one line and left where it is; a saved
model config that predates a field with a default still resumes."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import Config, ConfigError, config_to_dict
from deepseek_jax.training.checkpoint import Checkpointer


@flax.struct.dataclass
class Old:
  step: jax.Array
  params: dict
  bad_streak: jax.Array
  rng: jax.Array


@flax.struct.dataclass
class New:
  step: jax.Array
  params: dict
  bad_streak: jax.Array


def _abstract(state):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                     sharding=jax.sharding.SingleDeviceSharding(
                                                         jax.devices()[0])), state)


def _save(workdir, state, config):
  ckpt = Checkpointer(workdir, keep=2, async_save=False, config=config)
  assert ckpt.save(state, force=True)
  ckpt.wait()
  return ckpt


def test_other_state_fields_are_refused_and_the_checkpoint_stays(tmp_path):
  config = config_to_dict(Config())
  zero = jnp.zeros((), jnp.int32)
  old = Old(step=jnp.asarray(3, jnp.int32), params={"w": jnp.ones((4,))}, bad_streak=zero,
            rng=jax.random.PRNGKey(0))
  _save(tmp_path, old, config)
  ckpt = Checkpointer(tmp_path, keep=2, async_save=False, config=config)
  new = New(step=old.step, params=old.params, bad_streak=zero)
  with pytest.raises(ConfigError, match=r"other fields \(only there: \['rng'\]"):
    ckpt.restore(_abstract(new))
  assert (tmp_path / "checkpoints" / "3").is_dir()
  assert not (tmp_path / "checkpoints_corrupt").exists()
  back = ckpt.restore(_abstract(old))   # the version that wrote it still reads it
  np.testing.assert_array_equal(back.params["w"], old.params["w"])


def test_a_saved_model_config_without_a_newer_field_resumes(tmp_path):
  config = config_to_dict(Config())
  saved = {**config, "model": {k: v for k, v in config["model"].items() if k != "dropless_block"}}
  zero = jnp.zeros((), jnp.int32)
  state = New(step=jnp.asarray(2, jnp.int32), params={"w": jnp.arange(3.0)}, bad_streak=zero)
  _save(tmp_path, state, saved)
  back = Checkpointer(tmp_path, keep=2, async_save=False, config=config).restore(_abstract(state))
  assert int(back.step) == 2
  changed = {**config, "model": {**config["model"], "d_model": 64}}
  with pytest.raises(ConfigError, match="holds a different model"):
    Checkpointer(tmp_path, keep=2, async_save=False, config=changed).restore(_abstract(state))
