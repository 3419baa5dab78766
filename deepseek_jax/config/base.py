"""The config's error and field helpers, shared by every section (`schema`, `numerics`)."""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
  """A user-facing configuration error: names the field, the value and the rule."""


def _check(ok: bool, field: str, value, rule: str) -> None:
  if not ok:
    raise ConfigError(f"{field}={value!r}: {rule}")


def _positive(section: str, obj, *names: str) -> None:
  for n in names:
    v = getattr(obj, n)
    _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{section}.{n}", v,
           "must be a positive integer")


def _f(default, help: str):
  """A field with its help: the one place a key is described (`config.cli` lists it in --help)."""
  return dataclasses.field(default=default, metadata={"help": help})
