"""`lab accumulator`: the runs and their configs, the GEMM-error predictions' properties, the
table, text and plot from results, a two-run study on a small model, and one-line errors."""

import json

import numpy as np
import pytest

from deepseek_jax.fp8 import accumulate as acc
from deepseek_jax.fp8.policy import policy_from_config
from deepseek_jax.lab import accumulator as study
from deepseek_jax.lab import gemm_error


def test_runs_and_their_accumulators():
  labelled = study.runs()
  assert [lab for lab, _ in labelled] == ["f32", "f32 /32", "13b none", "14b none", "16b none",
                                          "22b none", "13b /32", "13b /64", "13b /128"]
  assert len(study.runs(grid=True)) == 2 + 4 + 4 * 3
  want = {"f32": acc.F32, "f32 /32": acc.promote(32), "14b none": acc.hopper(14, True, None),
          "13b /64": acc.hopper(13, True, 64)}
  for label, overrides in labelled:
    if label in want:
      cfg = study.study_config(overrides, batch=2, seq=16, steps=1)
      policy = policy_from_config(cfg.fp8)
      assert policy.default.accum == want[label]
      assert policy.spec_for("blocks/layers_0/mlp/down_proj").accum == want[label]
      assert policy.spec_for("blocks/layers_0/self_attn/o_proj") is None   # K <= 256: f32
      assert policy.default.fprop_x == policy_from_config(
          study.study_config([], 2, 16, 1).fp8).default.fprop_x   # deepseek_v3's operands
  m = study.study_config([], 2, 16, 1).model
  assert (m.num_layers, m.first_k_dense_replace, m.ffn_dim, m.num_mtp_layers) == (1, 1, 4096, 0)


def test_predictions_have_the_models_properties():
  """Same-sign data: the Hopper model's error grows with K and exceeds the old model's (it cuts
  every product toward zero); zero-mean data: it is milder than the old model's (which cuts the
  running sum toward zero after every block); promotion every 128 cuts it at least 5x at
  K = 4096."""
  dists = ("N(0,1)", "U(0,1)")
  rows = {(d, k): e for d, k, e in
          gemm_error.k_sweep(ks=(1024,), rows=4, cols=32, dists=dists, models=("hopper",))
          + gemm_error.k_sweep(ks=(4096,), rows=4, cols=32, dists=dists)}
  for d in dists:
    for k in (1024, 4096):
      fro, mx = rows[d, k]["hopper"]
      assert 0 < fro < 0.5 and 0 < mx < 0.5
    assert rows[d, 4096]["hopper /128"][0] * 5 < rows[d, 4096]["hopper"][0]
  assert rows["U(0,1)", 4096]["hopper"][0] > 2 * rows["U(0,1)", 1024]["hopper"][0]
  assert rows["U(0,1)", 4096]["hopper"][0] > 5 * rows["U(0,1)", 4096]["limited"][0]
  assert rows["N(0,1)", 4096]["hopper"][0] < rows["N(0,1)", 4096]["limited"][0]


def _fake(label, ce, ref=None):
  ref = ref or ce
  return (label, [], {"ce": ce, "final": study.final_ce(ce), "seconds": 1.0,
                      "step0": ce[0] - ref[0], "mean_gap": float(np.mean(np.subtract(ce, ref))),
                      "final_gap": study.final_ce(ce) - study.final_ce(ref)})


def test_table_text_and_plot_from_results(tmp_path):
  """The f32 control is the noise floor; runs beyond twice it are named; the plot is written."""
  f32 = [5.0, 4.0, 3.0]
  results = [_fake("f32", f32), _fake("f32 /32", [5.0, 4.0, 3.02], f32),
             _fake("13b none", [5.01, 4.1, 3.2], f32),
             _fake("22b none", [5.0, 4.01, 3.01], f32), _fake("13b /128", [5.0, 4.0, 3.005], f32)]
  table = study.table_lines(results)
  assert table[3].split()[:3] == ["13b", "none", "+0.01000"]
  text = "\n".join(study.summary_lines(results))
  assert "Noise floor (f32 /32, 22b none" in text and "up to 0.0067 (mean gap)" in text
  assert "twice the noise floor (mean gap): 13b none." in text
  path = study.plot(results, tmp_path / "sub" / "accumulator.png", ffn=256)
  assert path.stat().st_size > 1000
  rows = json.loads(study.save_results(results, tmp_path / "runs.json").read_text())
  assert [r["label"] for r in rows] == [lab for lab, _, _ in results] and rows[2]["ce"][1] == 4.1


@pytest.mark.slow   # two train-step compilations with the emulated accumulator: minutes
def test_study_on_a_small_model_starts_alike_and_trains():
  """Two runs from one initialisation on the same batches: the first step's loss differs only by
  the accumulator's error, and both train."""
  labelled = [study.F32_RUN, study.runs(bits=(13,), promote=())[2]]
  results = study.study(labelled, steps=5, batch=2, seq=16, ffn=128, log=lambda *_: None)
  (_, _, f32), (lab, _, hop) = results
  assert lab == "13b none" and abs(hop["step0"]) < 1e-2 and f32["step0"] == 0
  for r in (f32, hop):
    assert np.all(np.isfinite(r["ce"])) and min(r["ce"][1:]) < r["ce"][0]
  lines = study.table_lines(results) + study.summary_lines(results)
  assert any(line.strip().startswith("13b none") for line in lines)


@pytest.mark.parametrize("argv, field", [(["--bits", "13,30"], "--bits '13,30'"),
                                         (["--bits", "-13"], "--bits '-13'"),
                                         (["--promote", "48"], "--promote '48'"),
                                         (["--steps", "0"], "--steps"),
                                         (["--bits", "x"], "--bits"),
                                         (["--frobnicate"], "unrecognized")])
def test_bad_input_is_one_line_exit_2(argv, field, capsys):
  assert study.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and field in err and "Traceback" not in err
  assert err.startswith("python -m deepseek_jax.lab accumulator: error: ")


def test_plot_path_that_is_a_file_or_under_one(tmp_path, capsys):
  """A file named as the plot directory is the user's error (2); a directory that cannot be made
  (under a file) an OS fault (1), told before any run starts."""
  f = tmp_path / "f"
  f.write_text("")
  assert study.main(["--plot", str(f)]) == 2
  err = capsys.readouterr().err
  assert "--plot" in err and "not a directory" in err and err.count("\n") == 1
  assert study.main(["--plot", str(f / "sub")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and str(f / "sub") in err and "Traceback" not in err
