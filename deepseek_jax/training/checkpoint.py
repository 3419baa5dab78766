"""Checkpoints through orbax's `CheckpointManager`: async, keep N, exact resume, fallback.

The layout, declared here once: `<workdir>/checkpoints/<step>/state` holds the whole `TrainState`
(so the data position and router biases come back too) and `<step>/meta/metadata` a JSON record
of the config and step. Beside them the workdir holds `config.yaml` (the run's config, what
`--resume` reads), `tokenizer.json` (a copy of the run's HF tokenizer) and `train.log`; `run_config`
and `run_tokenizer` read them back. `step_dir`, `read_model_config` and `restore_weights` read it back for
inference (generate/load.py). Saves are asynchronous (the device-to-host copy happens before
`save` returns, so the donated state may be reused at once) and refuse parameters that are not
finite. `restore` walks the steps newest first; a checkpoint that cannot be read is reported in one
line, moved aside into `checkpoints_corrupt/` (never deleted) and the next older one is tried.
Half-written checkpoints (a run killed mid-save) are orbax temporaries and are never listed.
A save that fails (disk full, a read-only directory) raises `CheckpointWriteError` in one line
naming the step and the newest good checkpoint, which is left as it was. Inference reads
(`restore_weights` on a workdir) fall back past unreadable steps without moving anything.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml

from deepseek_jax import errors
from deepseek_jax.config import (IMPLEMENTATION_FIELDS, Config, ConfigError, ModelConfig,
                                 config_from_dict, config_to_dict, load_config)

CHECKPOINTS = "checkpoints"          # under the workdir, one directory per step
STATE, META = "state", "meta"        # orbax items of a step: the TrainState, the JSON record
META_FILE = "metadata"               # the file orbax's JsonSave writes inside META
CONFIG, TOKENIZER, LOG = "config.yaml", "tokenizer.json", "train.log"   # beside checkpoints/
_CONFIG_HEADER = ("# The run's config, written by train.py: `python train.py --workdir DIR --resume`"
                  " reads it;\n# load it with deepseek_jax.config.load_config. 'auto' choices are"
                  " made per backend at start.\n")


def write_atomic(path: pathlib.Path, data: str | bytes) -> None:
  """`path` holds either its old content or all of `data`, never a part (temp file + rename)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def workdir_of(path: str | pathlib.Path) -> pathlib.Path | None:
  """The train.py workdir holding `path` (itself, its checkpoints/ or a checkpoints/<step>)."""
  path = pathlib.Path(path).absolute()
  for d in (path, path.parent, path.parent.parent):
    if (d / CONFIG).is_file() or (d / CHECKPOINTS).is_dir():
      return d
  return None


def save_run_files(cfg: Config, workdir: pathlib.Path) -> Config:
  """Writes `<workdir>/config.yaml` and, for a HF tokenizer, `<workdir>/tokenizer.json` (a copy);
  returns `cfg` with `train.tokenizer` naming that copy (what the run trains with from now on)."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  spec = cfg.train.tokenizer
  if spec != "bytes":
    dest = workdir / TOKENIZER
    if not dest.exists() or not os.path.samefile(spec, dest):
      write_atomic(dest, pathlib.Path(spec).read_bytes())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokenizer=str(dest)))
  text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
  write_atomic(workdir / CONFIG, _CONFIG_HEADER + text)
  return cfg


def run_config(workdir: str | pathlib.Path) -> Config | None:
  """The config of the run in `workdir` (its config.yaml), None when it has none. A tokenizer
  copy that moved with the workdir is found there."""
  path = pathlib.Path(workdir) / CONFIG
  if not path.is_file():
    return None
  cfg = load_config(path)
  local = pathlib.Path(workdir).absolute() / TOKENIZER
  if cfg.train.tokenizer != "bytes" and not os.path.isfile(cfg.train.tokenizer) and local.is_file():
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokenizer=str(local)))
  return cfg


def run_tokenizer(path: str | pathlib.Path) -> str | None:
  """The tokenizer a run trained with ('bytes' or a tokenizer.json path), for a workdir or any of
  its checkpoints: `tokenizer.json` beside the checkpoints, else config.yaml's or the checkpoint
  record's `train.tokenizer`; None when nothing says."""
  workdir = workdir_of(path)
  if workdir is None:
    return None
  if (workdir / TOKENIZER).is_file():
    return str(workdir / TOKENIZER)
  if (workdir / CONFIG).is_file():
    return run_config(workdir).train.tokenizer
  step = step_dir(path)
  try:
    return json.loads((step / META / META_FILE).read_text())["config"]["train"]["tokenizer"]
  except (OSError, TypeError, KeyError, json.JSONDecodeError):
    return None


def step_dirs(path: str | pathlib.Path) -> list[pathlib.Path]:
  """The `checkpoints/<step>` directories under a workdir or a checkpoints dir, newest first; a
  step dir itself alone."""
  path = pathlib.Path(path)
  if (path / STATE).is_dir() and (path / META).is_dir():
    return [path]
  root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
  steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit() and p.is_dir()
                 and (p / STATE).is_dir()) if root.is_dir() else []
  return [p for _, p in reversed(steps)]


def step_dir(path: str | pathlib.Path) -> pathlib.Path | None:
  """The newest `checkpoints/<step>` under a workdir, a checkpoints dir or a step dir itself."""
  steps = step_dirs(path)
  return steps[0] if steps else None


def read_model_config(step: pathlib.Path) -> ModelConfig:
  """The model config of the JSON record beside a step's state, validated like a config file."""
  meta_file = step / META / META_FILE
  try:
    model = json.loads(meta_file.read_text())["config"]["model"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError):
    raise ConfigError(f"{meta_file}: no readable model config (expected the JSON record "
                      "train.py writes beside each checkpoint)") from None
  try:
    return config_from_dict({"model": model}).model
  except ConfigError as e:
    raise ConfigError(f"{meta_file}: the saved model config is invalid here ({e})") from None


def newest_readable(path: str | pathlib.Path, read, who: str = "checkpoint"):
  """(step dir, read(step dir)) of the newest step under `path` that `read` can read; an unreadable
  one is told in one line on stderr and the next older tried (nothing on disk is changed, unlike
  `Checkpointer.restore`). ConfigError when none can be read."""
  steps = step_dirs(path)
  if not steps:
    raise ConfigError(f"{path}: no checkpoints/<step>/state here")
  for i, step in enumerate(steps):
    try:
      return step, read(step)
    except ConfigError:
      if len(steps) == 1:
        raise
      problem = "its record is unreadable"
    except Exception as e:  # noqa: BLE001 (any unreadable checkpoint falls back the same way)
      problem = f"{type(e).__name__}: {errors.first_line(e, 120)}"
    if i + 1 < len(steps):
      print(f"{who}: checkpoint step {step.name} is unreadable ({problem}); using step "
            f"{steps[i + 1].name}", file=sys.stderr, flush=True)
  raise ConfigError(f"{path}: none of its {len(steps)} checkpoint(s) can be read (newest: "
                    f"{steps[0]}: {problem})")


def restore_weights(step: pathlib.Path) -> dict:
  """{'params', 'router_state'} of a step's TrainState on the first device (a partial restore:
  the optimizer moments never leave the disk)."""
  step = pathlib.Path(step).absolute()     # orbax refuses relative paths
  tree = ocp.PyTreeCheckpointHandler().metadata(step / STATE)
  if "params" not in tree:
    raise ConfigError(f"{step / STATE}: holds no 'params' (not a train.py TrainState)")
  want = {k: tree[k] for k in ("params", "router_state") if k in tree}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(dtype=m.dtype, sharding=device), want)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), want)
  out = ocp.PyTreeCheckpointer().restore(step / STATE, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=args, partial_restore=True))
  variables = {"params": out["params"]}
  if out.get("router_state"):
    variables["router_state"] = out["router_state"]
  return variables


def _with_defaults(model: dict) -> dict:
  """A saved model section with today's defaults for the fields it predates (as written by
  `config_to_dict`), or as saved when it no longer validates."""
  try:
    return config_to_dict(config_from_dict({"model": model}))["model"]
  except ConfigError:
    return model


def tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _warn(msg: str) -> None:
  print(f"train: {msg}", file=sys.stderr, flush=True)


class CheckpointWriteError(errors.Fault):
  """A checkpoint could not be written; the message names the newest good one."""


def _failed_step(e: BaseException, default: int | None) -> int | None:
  """The step whose save failed, from orbax's message (it names `<step>.orbax-checkpoint-tmp`)."""
  m = re.search(rf"{CHECKPOINTS}/(\d+)(?:\.orbax-checkpoint-tmp|/)", str(e))
  return int(m.group(1)) if m else default


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str | pathlib.Path, keep: int, async_save: bool, config: dict):
    self.root = pathlib.Path(workdir).absolute()
    self.directory = self.root / CHECKPOINTS
    self.config = config
    self._finite = jax.jit(tree_all_finite)
    self._in_flight: int | None = None     # the step of the save started last
    self.failed = False
    try:
      self._manager = self._make_manager(keep, async_save)
    except Exception as e:  # noqa: BLE001 (orbax creates the directory: unwritable, full disk)
      raise self._fault(e, None) from e

  def _make_manager(self, keep: int, async_save: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                        create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(self.directory, options=opts, item_names=(STATE, META))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def params_finite(self, state) -> bool:
    return bool(self._finite(state.params))

  def save(self, state, *, force: bool = False) -> bool:
    """Starts an async save of `state` at its step; False (with a message) if not saved."""
    step = int(state.step)
    if step in self._manager.all_steps():
      return False
    if int(state.bad_streak) > 0:
      _warn(f"step {step}: not checkpointed, the last {int(state.bad_streak)} step(s) were not "
            "finite")
      return False
    if not self.params_finite(state):
      _warn(f"step {step}: parameters are not finite; checkpoint not written")
      return False
    meta = {"config": self.config, "step": step, "time": time.time()}
    previous, self._in_flight = self._in_flight, step
    try:   # also reports the previous (async) save's failure
      return self._manager.save(step, force=force, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}))
    except Exception as e:  # noqa: BLE001 (told in one line by _fault)
      raise self._fault(e, _failed_step(e, previous if previous is not None else step)) from e

  def good_steps(self, exclude: int | None = None) -> list[int]:
    """The finished checkpoints on disk (what survives a failed save), oldest first."""
    return sorted(int(p.name) for p in step_dirs(self.directory) if int(p.name) != exclude)

  def _fault(self, e: BaseException, step: int | None) -> CheckpointWriteError:
    """The one line for a failed save of `step`: what failed, and the newest good checkpoint."""
    self.failed = True
    code = errors.os_errno(e)
    which = f"checkpoint {step}" if step is not None else "checkpoints"
    if code == errno.ENOSPC:
      what = f"disk full while writing {which}"
    elif code is not None:
      what = f"{errors.os_what(code)}: cannot write {which} in {self.directory}"
    else:
      what = f"writing {which} failed ({type(e).__name__}: {errors.first_line(e, 160)})"
    try:
      good = self.good_steps(exclude=step)
    except OSError:
      good = []
    kept = (f"the newest good checkpoint is {good[-1]} in {self.directory}" if good else
            "no checkpoint of this run was written")
    return CheckpointWriteError(f"{what}; {kept}")

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (told in one line by _fault)
      raise self._fault(e, _failed_step(e, self._in_flight)) from e

  def close(self) -> None:
    """Waits for the save in flight and closes; after a failed save, leaves orbax's threads be
    (the process exits without them)."""
    if self.failed:
      return
    self.wait()
    self._manager.close()

  def _check_config(self, step: int, meta: dict) -> None:
    saved = meta.get("config", {})
    saved_model = _with_defaults(saved.get("model", {}))
    diff = sorted(k for k in set(saved_model) | set(self.config.get("model", {}))
                  if k not in IMPLEMENTATION_FIELDS
                  and saved_model.get(k) != self.config["model"].get(k))
    if diff:
      raise ConfigError(f"--resume: checkpoint {self.directory / str(step)} holds a different "
                        f"model (changed: model.{', model.'.join(diff[:4])}); use its config or a "
                        "new --workdir")
    changed = sorted(k for k, v in self.config.get("train", {}).items()
                     if saved.get("train", {}).get(k) != v)
    if changed:
      _warn(f"resuming step {step} with changed train.{', train.'.join(changed)}")

  def _check_layout(self, step: int, abstract_state) -> None:
    """ConfigError (nothing moved) when the step's state has other fields than this version's
    TrainState: a checkpoint of another version is not a corrupt one."""
    try:
      tree = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / STATE)
      saved = set(tree.tree if hasattr(tree, "tree") else tree)
    except Exception:  # noqa: BLE001 (unreadable metadata: the restore below reports it)
      return
    want = set(flax.serialization.to_state_dict(abstract_state))
    if saved != want:
      raise ConfigError(f"--resume: checkpoint {self.directory / str(step)} holds a TrainState "
                        f"with other fields (only there: {sorted(saved - want)}, only here: "
                        f"{sorted(want - saved)}); resume it with the version that wrote it")

  def _move_aside(self, step: int) -> pathlib.Path:
    dest_root = self.root / "checkpoints_corrupt"
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / f"{step}-{int(time.time())}"
    shutil.move(str(self.directory / str(step)), str(dest))
    self._manager.reload()
    return dest

  def restore(self, abstract_state) -> Any | None:
    """Newest readable checkpoint restored into `abstract_state`'s shapes and shardings, or None.

    `abstract_state`: a `TrainState` of `jax.ShapeDtypeStruct`s carrying shardings.
    Raises ConfigError when the checkpoints belong to a different model.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))[META]
        self._check_config(step, meta)
        self._check_layout(step, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]
        if int(restored.step) != step:
          raise ValueError(f"holds step {int(restored.step)}")
        if not self.params_finite(restored):
          raise ValueError("parameters are not finite")
        return restored
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001 (any unreadable checkpoint falls back the same way)
        try:
          where = f"moved to {self._move_aside(step)}"
        except OSError as moving:     # a read-only directory: leave it, and still fall back
          where = f"left in place ({moving.strerror or type(moving).__name__})"
        _warn(f"checkpoint step {step} is unreadable ({type(e).__name__}: "
              f"{errors.first_line(e, 120)}); {where}, falling back to the previous one")
    return None
