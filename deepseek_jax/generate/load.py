"""Model weights for inference from either kind of checkpoint (generation and export).

- a Hugging Face directory (`config.json` + safetensors, FP8 included): through `hf.load_hf`;
- a `train.py` run: its workdir, its `checkpoints/` directory or one `checkpoints/<step>` directory,
  read through `training.checkpoint` (which declares that layout): `params` and `router_state`
  only, and the model config from the JSON record saved beside the state.

`load_for_inference(path, dtype) -> (ModelConfig, variables, info)`; `info` holds the source
config.json fields worth keeping (token ids) for HF checkpoints and the training step otherwise.
`tokenizer_for(arg, path, vocab)` picks the tokenizer of either kind. The commands that load a
checkpoint (generate, serve, eval) share their flags (`parser`, `add_sampling_flags`,
`add_tokenizer_flags`, `finish_parser`), `load_model` and `stop_ids`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib

import flax
import jax

from deepseek_jax import hf
from deepseek_jax.config import ConfigError, ModelConfig, cli
from deepseek_jax.hf import CheckpointError
from deepseek_jax.hf.convert import read_config
from deepseek_jax.model import abstract_variables
from deepseek_jax.tokenizer import ByteTokenizer, HFTokenizer, IdsTokenizer, Tokenizer
from deepseek_jax.training import checkpoint


# The kernels `ModelConfig.resolved` picks for a platform: train.py saves them resolved for the
# machine it trained on; inference runs here, so they go back to "auto" (this backend's choice).
# The compute dtype is the caller's `dtype`, else the run's.
HOST_FIELDS = ("platform", "attention_impl", "dropless_impl")


def load_trained(path, dtype: str | None = None) -> tuple[ModelConfig, dict, int]:
  """(ModelConfig, {'params', 'router_state'}, step) from a train.py checkpoint; the config's
  kernel choices (HOST_FIELDS) are "auto" again, for this host; `dtype` sets the compute and
  parameter dtype (None: the run's)."""
  path = pathlib.Path(path)
  if checkpoint.step_dir(path) is None:
    raise CheckpointError(f"{path}: neither a Hugging Face directory (config.json) nor a train.py "
                          "workdir with checkpoints/<step>/state")
  try:   # the newest readable step: an unreadable one is told, and the next older one used
    step_dir, (cfg, variables) = checkpoint.newest_readable(
        path, lambda s: (checkpoint.read_model_config(s), checkpoint.restore_weights(s)), "load")
  except ConfigError as e:
    raise CheckpointError(str(e)) from None
  cfg = dataclasses.replace(cfg, **{f: "auto" for f in HOST_FIELDS})
  if dtype is not None:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  if dtype is not None and dtype != cfg.param_dtype:
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
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
    raw = read_config(path)
    return cfg, variables, {k: raw[k] for k in hf.PASSTHROUGH if k in raw}
  cfg, variables, step = load_trained(path, dtype)
  return cfg, variables, {"step": step}


def tokenizer_for(arg: str, ckpt: str | os.PathLike, vocab: int) -> Tokenizer:
  """--tokenizer: auto (the checkpoint's tokenizer.json, else the run's, else bytes or ids for a
  vocabulary of at most 256), bytes, ids, or a tokenizer.json path."""
  ckpt = pathlib.Path(ckpt)
  if arg == "auto":
    if (ckpt / "tokenizer.json").is_file():
      return HFTokenizer(ckpt / "tokenizer.json", "--tokenizer")
    spec = checkpoint.run_tokenizer(ckpt)
    if spec not in (None, "bytes"):
      if not os.path.isfile(spec):
        raise ValueError(f"{ckpt}: the run's tokenizer {spec} is missing; pass --tokenizer "
                         "PATH/tokenizer.json")
      return HFTokenizer(spec, "--tokenizer")
    if spec is None and vocab > ByteTokenizer.vocab_size:
      raise ValueError(f"{ckpt}: a {vocab}-token model with no tokenizer.json and no record of "
                       "its tokenizer; pass --tokenizer PATH/tokenizer.json, bytes or ids")
    arg = "bytes" if vocab >= ByteTokenizer.vocab_size else "ids"
  if arg == "ids":
    return IdsTokenizer()
  if arg == "bytes":
    if vocab < ByteTokenizer.vocab_size:
      raise ValueError(f"byte tokenizer needs vocab_size >= 256, the model has {vocab}; "
                       "use --tokenizer ids")
    return ByteTokenizer()
  path = pathlib.Path(arg)
  if not path.is_file():
    raise ValueError(f"--tokenizer {arg!r}: not 'auto', 'bytes', 'ids' or a tokenizer.json file")
  return HFTokenizer(path, "--tokenizer")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
  """A command's parser with --checkpoint; the command adds its own flags, then `finish_parser`."""
  ap = cli.parser(prog, description, cli.INFERENCE_KEYS.__contains__,
                  title="model keys a loaded checkpoint may change (model.field=value)")
  ap.add_argument("--checkpoint", "--workdir", dest="checkpoint", required=True,
                  help="a train.py workdir, one of its checkpoints/<step>, or a HF directory")
  return ap


def add_sampling_flags(ap: argparse.ArgumentParser) -> None:
  cli.add_flag(ap, "--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  cli.add_flag(ap, "--top-k", type=int, default=0)
  cli.add_flag(ap, "--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)


def add_tokenizer_flags(ap: argparse.ArgumentParser, stops: bool = True,
                        ignore_eos_help: str | None = None) -> None:
  """--tokenizer, and with `stops` --stop-id and --ignore-eos (read by `stop_ids`)."""
  ap.add_argument("--tokenizer", default="auto", help=(
      "auto (the checkpoint's or the run's), bytes, ids or PATH/tokenizer.json" if stops else
      "auto (the checkpoint's or the run's), bytes, or PATH/tokenizer.json"))
  if stops:
    cli.add_flag(ap, "--stop-id", type=int, action="append", default=[])
    cli.add_flag(ap, "--ignore-eos", action="store_true", help=ignore_eos_help)


def finish_parser(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("overrides", nargs="*", metavar="model.field=value",
                  help="how the loaded model computes (the keys listed below)")
  return ap


def load_model(args, command: str) -> tuple[ModelConfig, dict, dict, Tokenizer]:
  """(config, variables, info, tokenizer) of `args.checkpoint`, with the model overrides applied;
  `command` names the command in errors."""
  cli.check_overrides(args.overrides, cli.INFERENCE_KEYS.__contains__, command)
  cfg, variables, info = load_for_inference(args.checkpoint, args.dtype)
  cfg = cli.model_overrides(cfg, args.overrides, command)
  return cfg, variables, info, tokenizer_for(args.tokenizer, args.checkpoint, cfg.vocab_size)


def stop_ids(args, info: dict, tok: Tokenizer) -> list[int]:
  """--stop-id, plus the checkpoint's eos_token_id (else the tokenizer's EOS) unless --ignore-eos."""
  stops = list(args.stop_id)
  eos = info.get("eos_token_id", tok.eos_id)
  if not args.ignore_eos and eos is not None:
    stops += eos if isinstance(eos, list) else [eos]
  return stops
