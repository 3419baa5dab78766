"""Strict YAML loading and dotted overrides for the frozen config dataclasses.

Unknown keys, wrong types and impossible values raise `ConfigError` naming the field, the value
and the rule; nothing is coerced silently except an integer given for a float field.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
import types
import typing
from typing import Any, Literal

import yaml

from deepseek_jax.config.schema import Config, ConfigError

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
  return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, field: str):
  """Checks `value` against the annotation `tp`; builds nested dataclasses."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _convert(value, a, field)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else
                      f"{field}={value!r}: must be one of {[_type_name(a) for a in args]}")
  if origin is Literal:
    allowed = typing.get_args(tp)
    if value not in allowed:
      raise ConfigError(f"{field}={value!r}: must be one of {list(allowed)}")
    return value
  if origin is tuple:
    (item,) = typing.get_args(tp)[:1]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{field}={value!r}: must be a list")
    return tuple(_convert(v, item, f"{field}[{i}]") for i, v in enumerate(value))
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{field}={value!r}: must be a mapping of {tp.__name__} fields")
    return _build(tp, value, field)
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{field}={value!r}: must be true or false")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{field}={value!r}: must be an integer")
    return value
  if tp is float:
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
      value = float(value)  # YAML 1.1 reads '1e-4' (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{field}={value!r}: must be a number")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{field}={value!r}: must be a string")
    return value
  raise TypeError(f"unsupported config annotation {tp} for {field}")


def _build(cls, data: dict, prefix: str):
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  for k in data:
    if k not in names:
      raise ConfigError(f"{prefix}.{k}: unknown key (valid keys: {', '.join(sorted(names))})")
  kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}") for k, v in data.items()}
  try:
    return cls(**kwargs)
  except TypeError as e:  # pragma: no cover - defensive
    raise ConfigError(f"{prefix}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
  keys = dotted.split(".")
  node = tree
  for k in keys[:-1]:
    child = node.get(k)
    if child is None:
      child = node[k] = {}
    if not isinstance(child, dict):
      raise ConfigError(f"{dotted}: '{k}' is a value, not a section")
    node = child
  node[keys[-1]] = value


def _as_dict(obj) -> Any:
  if dataclasses.is_dataclass(obj):
    return {f.name: _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, tuple):
    return [_as_dict(v) for v in obj]
  return obj


def config_to_dict(cfg) -> dict:
  """Plain nested dict of a config (YAML- and JSON-serialisable)."""
  return _as_dict(cfg)


def parse_override(item: str) -> tuple[str, Any]:
  if "=" not in item:
    raise ConfigError(f"override {item!r}: must read section.field=value (e.g. model.num_layers=4)")
  key, raw = item.split("=", 1)
  key = key.strip()
  if not key or key.startswith(".") or key.endswith("."):
    raise ConfigError(f"override {item!r}: bad key {key!r}")
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    value = raw
  return key, value


def load_config(path=None, overrides=()) -> Config:
  """Loads `path` (YAML; None = all defaults), applies `key=value` overrides, validates."""
  data: dict = {}
  if path is not None:
    p = pathlib.Path(path)
    if not p.is_file():
      raise ConfigError(f"config file {str(path)!r}: does not exist")
    try:
      loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
      raise ConfigError(f"config file {str(path)!r}: not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                        f"at offset {e.start})") from None
    except yaml.YAMLError as e:
      raise ConfigError(f"config file {str(path)!r}: not valid YAML ({e.__class__.__name__})") from None
    if loaded is not None and not isinstance(loaded, dict):
      raise ConfigError(f"config file {str(path)!r}: top level must be a mapping of sections")
    data = loaded or {}
  return config_from_dict(data, overrides)


def config_from_dict(data: dict, overrides=()) -> Config:
  """A validated `Config` from nested sections (as `config_to_dict` writes them), with the
  same checks and messages as a YAML file; `overrides` as in `load_config`."""
  if not isinstance(data, dict):
    raise ConfigError(f"config: top level must be a mapping of sections, got {type(data).__name__}")
  data = copy.deepcopy(data)
  for item in overrides:
    key, value = parse_override(item)
    _set_dotted(data, key, value)
  for section in ("model", "train", "mesh", "fp8"):
    if section in data and data[section] is None:
      data[section] = {}
  return Config(**_build_sections(data))


def _build_sections(data: dict) -> dict:
  hints = typing.get_type_hints(Config)
  names = {f.name for f in dataclasses.fields(Config)}
  for k in data:
    if k not in names:
      raise ConfigError(f"{k}: unknown section (valid sections: {', '.join(sorted(names))})")
  return {k: _convert(v, hints[k], k) for k, v in data.items()}
