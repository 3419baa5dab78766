"""The command lines' shared parts: one-line errors, dashed flags, shipped configs, config keys.

Every command (`deepseek-jax train|generate|eval|convert|info|codesign|aot|prepare`) takes
`--config` and positional dotted overrides `section.field=value`, spells its flags with dashes
(the old underscore spellings stay as hidden aliases) and lists the config keys it accepts, with
their help (`schema` field metadata), in `--help`. Bad input prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import pathlib
import sys
import textwrap
import typing

from deepseek_jax.config.io import config_from_dict, config_to_dict
from deepseek_jax.config.schema import IMPLEMENTATION_FIELDS, Config, ConfigError, ModelConfig

REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def config_path(name: str) -> pathlib.Path:
  """A shipped config by name ('tiny'): the checkout's configs/ when running from one, else the
  copy installed inside the package (`deepseek_jax/configs`, package data of the wheel)."""
  if (REPO_CONFIGS / f"{name}.yaml").is_file():
    return REPO_CONFIGS / f"{name}.yaml"
  return pathlib.Path(str(importlib.resources.files("deepseek_jax") / "configs" / f"{name}.yaml"))


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line on stderr and exit 2 (its default prints the usage)."""

  def error(self, message):
    print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def add_flag(ap: argparse.ArgumentParser, name: str, *more: str, **kw) -> None:
  """`--a-b` (with `more` spellings); `--a_b` is accepted too, hidden from --help."""
  action = ap.add_argument(name, *more, **kw)
  if "-" in name[2:]:
    hidden = {k: v for k, v in kw.items() if k in ("type", "action", "choices", "nargs")}
    ap.add_argument("--" + name[2:].replace("-", "_"), dest=action.dest, help=argparse.SUPPRESS,
                    **hidden)


def _type(tp) -> str:
  origin = typing.get_origin(tp)
  if origin is typing.Literal:
    return "|".join(map(str, typing.get_args(tp)))
  if origin is tuple:
    return f"list[{_type(typing.get_args(tp)[0])}]"
  args = typing.get_args(tp)
  if args:
    return " | ".join("null" if a is type(None) else _type(a) for a in args)
  return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field):
  if f.default is not dataclasses.MISSING:
    return f.default
  return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def config_keys(cls=Config, prefix: str = "") -> list[tuple[str, str, object, str]]:
  """(dotted key, type, default, help) of every leaf field, in declaration order."""
  out = []
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    sub = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
    if sub is not None:
      out += config_keys(sub, f"{prefix}{f.name}.")
    else:
      out.append((prefix + f.name, _type(tp), _default(f), f.metadata.get("help", "")))
  return out


def keys_help(keep=lambda key: True, title: str = "config keys (section.field=value)") -> str:
  """An argparse epilog listing the config keys `keep` accepts, with type, default and help."""
  lines = [f"{title}:"]
  for key, tp, default, text in config_keys():
    if keep(key):
      value = ("null" if default is None else str(default).lower() if isinstance(default, bool)
               else list(default) if isinstance(default, tuple) else default)
      lines.append(f"  {key}={value}  ({tp})")
      lines += textwrap.wrap(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
  return "\n".join(lines)


def parser(prog: str, description: str, keep=lambda key: True, config: str | None = None,
           title: str = "config keys (section.field=value)", overrides: bool = True):
  """A `Parser` listing the config keys `keep` accepts after the options; with `config` (the
  --config help) it takes `--config` and (with `overrides`) positional `overrides`."""
  ap = Parser(prog=prog, description=description, epilog=keys_help(keep, title),
              formatter_class=argparse.RawDescriptionHelpFormatter)
  if config is not None:
    ap.add_argument("--config", help=config)
  if config is not None and overrides:
    ap.add_argument("overrides", nargs="*", metavar="section.field=value",
                    help="dotted config overrides, e.g. model.num_layers=2 (see below)")
  return ap


def check_overrides(overrides, keep, what: str) -> None:
  """Refuses an override of a key `keep` does not accept, naming it and what is accepted."""
  for item in overrides:
    key = item.split("=", 1)[0].strip()
    if "=" not in item or not keep(key):
      raise ConfigError(f"override {item!r}: {what} takes section.field=value for the keys "
                        "listed in --help")


# What generate and eval may change in a loaded model: how it computes, not what it is
# (`--dtype` sets the compute and parameter dtype).
INFERENCE_KEYS = tuple(f"model.{f}" for f in IMPLEMENTATION_FIELDS
                       if f not in ("dtype", "platform"))


def model_overrides(model: ModelConfig, overrides, what: str) -> ModelConfig:
  """`model` (a loaded checkpoint's) with `INFERENCE_KEYS` overrides, validated as in a YAML."""
  check_overrides(overrides, INFERENCE_KEYS.__contains__, what)
  if not overrides:
    return model
  return config_from_dict({"model": config_to_dict(model), "train": {"seq_len": 2}},
                          overrides).model
