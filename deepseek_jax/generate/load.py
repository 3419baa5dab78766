"""Model weights for inference from either kind of checkpoint (generation and export).

- a Hugging Face directory (`config.json` + safetensors, FP8 included): through `hf.load_hf`;
- a `train.py` run: its workdir, its `checkpoints/` directory or one `checkpoints/<step>` directory
  (orbax, written by `training/checkpoint.py`). Only `params` and `router_state` are read (a
  partial restore: the optimizer moments never leave the disk); the model config comes from the
  JSON record saved beside the state.

`load_for_inference(path, dtype) -> (ModelConfig, variables, info)`; `info` holds the source
config.json fields worth keeping (token ids) for HF checkpoints and the training step otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import flax
import jax

from deepseek_jax import hf
from deepseek_jax.config import ConfigError, ModelConfig, config_from_dict
from deepseek_jax.hf import CheckpointError
from deepseek_jax.model import abstract_variables


def _step_dir(path: pathlib.Path) -> pathlib.Path | None:
  """The newest `checkpoints/<step>` under a workdir, a checkpoints dir or a step dir itself."""
  if (path / "state").is_dir() and (path / "meta").is_dir():
    return path
  root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit() and p.is_dir()
                 and (p / "state").is_dir()) if root.is_dir() else []
  return steps[-1][1] if steps else None


def _model_config(meta_file: pathlib.Path) -> ModelConfig:
  try:
    model = json.loads(meta_file.read_text())["config"]["model"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError):
    raise CheckpointError(f"{meta_file}: no readable model config (expected the JSON record "
                          "train.py writes beside each checkpoint)") from None
  try:   # validated like any config file
    return config_from_dict({"model": model}).model
  except ConfigError as e:
    raise CheckpointError(f"{meta_file}: the saved model config is invalid here ({e})") from None


def load_trained(path, dtype: str | None = None) -> tuple[ModelConfig, dict, int]:
  """(ModelConfig, {'params', 'router_state'}, step) from a train.py checkpoint."""
  import orbax.checkpoint as ocp  # noqa: PLC0415 (only this path needs orbax)
  path = pathlib.Path(path)
  step_dir = _step_dir(path)
  if step_dir is None:
    raise CheckpointError(f"{path}: neither a Hugging Face directory (config.json) nor a train.py "
                          "workdir with checkpoints/<step>/state")
  cfg = _model_config(step_dir / "meta" / "metadata")
  ckpt = ocp.PyTreeCheckpointer()
  tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state")
  if "params" not in tree:
    raise CheckpointError(f"{step_dir / 'state'}: holds no 'params' (not a train.py TrainState)")
  want = {k: tree[k] for k in ("params", "router_state") if k in tree}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(dtype=m.dtype, sharding=device), want)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), want)
  out = ckpt.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=args, partial_restore=True))
  variables = {"params": out["params"]}
  if out.get("router_state"):
    variables["router_state"] = out["router_state"]
  if dtype is not None and dtype != cfg.param_dtype:
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    target = flax.core.meta.unbox(abstract_variables(cfg))
    variables = jax.tree.map(lambda a, t: a.astype(t.dtype), variables,
                             {k: target[k] for k in variables})
  return cfg, variables, int(step_dir.name)


def load_for_inference(path, dtype: str = "float32") -> tuple[ModelConfig, dict, dict]:
  """(ModelConfig, variables, info) from a Hugging Face directory or a train.py checkpoint."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory")
  if (path / "config.json").is_file() or path.suffix == ".safetensors":
    cfg, variables = hf.load_hf(path, dtype=dtype)
    raw = json.loads(((path if path.is_dir() else path.parent) / "config.json").read_text())
    return cfg, variables, {k: raw[k] for k in hf.PASSTHROUGH if k in raw}
  cfg, variables, step = load_trained(path, dtype)
  return cfg, variables, {"step": step}
