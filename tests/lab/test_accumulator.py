"""`lab accumulator`: the runs and their configs, the GEMM-error predictions' properties, a
two-run study on a small model, and one-line errors."""

import numpy as np
import pytest

from deepseek_jax.fp8 import accumulate as acc
from deepseek_jax.fp8.policy import policy_from_config
from deepseek_jax.lab import accumulator as study
from tests.training.conftest import SMALL_MODEL


def test_runs_and_their_accumulators():
  labelled = study.runs()
  assert [lab for lab, _ in labelled] == ["f32", "13b none", "14b none", "16b none", "22b none",
                                          "13b /32", "13b /64", "13b /128"]
  assert len(study.runs(grid=True)) == 1 + 4 + 4 * 3
  want = {"f32": acc.F32, "14b none": acc.hopper(14, True, None),
          "13b /64": acc.hopper(13, True, 64)}
  for label, overrides in labelled:
    if label in want:
      cfg = study.study_config(overrides, batch=2, seq=16, steps=1)
      policy = policy_from_config(cfg.fp8)
      assert policy.default.accum == want[label]
      assert policy.default.fprop_x == policy_from_config(
          study.study_config([], 2, 16, 1).fp8).default.fprop_x   # deepseek_v3's operands


def test_predictions_have_the_models_properties():
  """Same-sign data: the Hopper model's error grows with K and exceeds the old model's (it cuts
  every product toward zero); zero-mean data: it is milder than the old model's (which cuts the
  running sum toward zero after every block); promotion every 128 cuts it at least 5x at
  K = 4096."""
  rows = {(d, k): e for d, k, e in study.k_sweep(ks=(1024, 4096), rows=4, cols=32,
                                                 dists=("N(0,1)", "U(0,1)"))}
  for d in ("N(0,1)", "U(0,1)"):
    for k in (1024, 4096):
      fro, mx = rows[d, k]["hopper"]
      assert 0 < fro < 0.5 and 0 < mx < 0.5
      assert rows[d, k]["hopper /128"][0] * 5 < fro or k == 1024
  assert rows["U(0,1)", 4096]["hopper"][0] > 2 * rows["U(0,1)", 1024]["hopper"][0]
  assert rows["U(0,1)", 4096]["hopper"][0] > 5 * rows["U(0,1)", 4096]["limited"][0]
  assert rows["N(0,1)", 4096]["hopper"][0] < rows["N(0,1)", 4096]["limited"][0]


@pytest.mark.slow   # two train-step compilations: over 15 minutes on a loaded 2-core machine
def test_study_on_a_small_model_starts_alike_and_trains():
  """Two runs from one initialisation on the same batches: the first step's loss differs only by
  the accumulator's error, and both train."""
  results = study.study(study.runs(bits=(13,), promote=())[:2], steps=3, batch=2, seq=16,
                        extra=SMALL_MODEL, log=lambda *_: None)
  (_, _, f32), (_, _, hop) = results
  assert abs(f32["ce"][0] - hop["ce"][0]) < 1e-2
  for r in (f32, hop):
    assert np.all(np.isfinite(r["ce"])) and r["ce"][-1] < r["ce"][0]
  lines = study.table_lines(results) + study.summary_lines(results)
  assert any(line.strip().startswith("13b none") for line in lines)


@pytest.mark.parametrize("argv, field", [(["--bits", "13,30"], "--bits"),
                                         (["--promote", "48"], "--promote"),
                                         (["--steps", "0"], "--steps"),
                                         (["--bits", "x"], "--bits")])
def test_bad_input_is_one_line(argv, field, capsys):
  assert study.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert field in err and "\n" not in err


def test_plot_path_that_is_a_file(tmp_path, capsys):
  f = tmp_path / "f"
  f.write_text("")
  assert study.main(["--plot", str(f)]) == 2
  assert "--plot" in capsys.readouterr().err
