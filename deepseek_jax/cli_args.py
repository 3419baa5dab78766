"""Argument parsing shared by the report commands (`codesign`, the `lab` studies): a parser whose
errors are `UserError`s (one line, exit 2 under `errors.call`) and the value types they check.

`config/cli.py` holds what the config-driven commands share (--config, overrides, config keys);
this module holds what commands that are called in-process and return their lines need: bad input
raised, not printed, so the caller (`errors.call`, or a test) decides what the user sees.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import pathlib

from deepseek_jax.errors import UserError


class ArgParser(argparse.ArgumentParser):
  """argparse that raises `UserError` (its default prints the usage and exits)."""

  def error(self, message):
    raise UserError(f"{message} (see --help)")


def positive_int(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if v <= 0:
    raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
  return v


def positive_float(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not (math.isfinite(v) and v > 0):
    raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
  return v


def int_list(flag: str, text: str, lo: int = 1, hi: int | None = None,
             step: int = 1) -> list[int]:
  """'13,14,16' as ints, each >= lo (and <= hi) and a multiple of `step`; a `UserError` naming
  `flag`, the value and the rule otherwise."""
  rule = f"must be >= {lo}" if hi is None else f"must lie in [{lo}, {hi}]"
  rule += f" and be a multiple of {step}" if step > 1 else ""
  out = []
  for part in text.split(","):
    try:
      v = int(part)
    except ValueError:
      raise UserError(f"{flag} {text!r}: {part!r} is not an integer") from None
    if not (lo <= v and (hi is None or v <= hi) and v % step == 0):
      raise UserError(f"{flag} {text!r}: {part!r} {rule}")
    out.append(v)
  return out


def float_list(flag: str, text: str, allow_zero: bool = False) -> list[float]:
  """'1.5,3' as finite floats, each > 0 (or >= 0 with `allow_zero`); a `UserError` naming `flag`,
  the value and the rule otherwise."""
  out = []
  for part in text.split(","):
    try:
      v = float(part)
    except ValueError:
      raise UserError(f"{flag} {text!r}: {part!r} is not a number") from None
    if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
      raise UserError(f"{flag} {text!r}: {part!r} must be a finite number "
                      + (">= 0" if allow_zero else "> 0"))
    out.append(v)
  return out


def output_dir(flag: str, text: str | None) -> pathlib.Path | None:
  """`text` as a directory to write into, created now (before a long study, not after it), or
  None. A `UserError` when it names an existing file; an `OSError` (a fault: exit 1 under
  `errors.call`) when it cannot be created or written."""
  if text is None:
    return None
  path = pathlib.Path(text)
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag} {text!r}: exists and is not a directory")
  path.mkdir(parents=True, exist_ok=True)
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
  return path
