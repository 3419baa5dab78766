"""Fixtures for the inference tests: the committed Hugging Face checkpoints and their references.

`tests/fixtures/hf/*` were written by `scripts/make_hf_fixtures.py` with transformers 5.24 (fp32,
torch single-threaded); the tests only read them, so the suite needs no torch.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def fixture_dir(name: str) -> pathlib.Path:
  return FIXTURES / name


def reference(name: str) -> dict[str, np.ndarray]:
  with np.load(FIXTURES / name / "reference.npz") as z:
    return dict(z)


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


_LOADED: dict = {}


def load(name: str, **kw):
  """load_hf once per (fixture, options) for the whole session."""
  from deepseek_jax.hf import load_hf  # noqa: PLC0415
  key = (name, tuple(sorted(kw.items())))
  if key not in _LOADED:
    _LOADED[key] = load_hf(FIXTURES / name, **kw)
  return _LOADED[key]


@pytest.fixture(scope="session")
def v3():
  return load("v3_tiny")
