"""The installed distribution's version (`deepseek-jax --version`); a checkout that was never
installed reads pyproject.toml's."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re


def _version() -> str:
  try:
    return importlib.metadata.version("deepseek-jax")
  except importlib.metadata.PackageNotFoundError:
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    text = pyproject.read_text() if pyproject.is_file() else ""
    found = re.search(r'^version = "([^"]+)"', text, re.M)
    return found.group(1) if found else "0+unknown"


__version__ = _version()
