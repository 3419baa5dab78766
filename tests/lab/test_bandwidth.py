"""`lab bandwidth`: the knees, the fabric rows, monotonicity, plot and one-line errors."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.codesign import training_run
from deepseek_jax.lab import bandwidth as bw


@given(b=st.floats(1e9, 1e13), factor=st.floats(1.01, 10), lat=st.floats(0, 2e-5))
def test_tpot_falls_with_bandwidth_and_rises_with_latency(b, factor, lat):
  assert bw.tpot(b * factor, lat, 32, 7168) < bw.tpot(b, lat, 32, 7168)
  assert bw.tpot(b, lat + 1e-6, 32, 7168) > bw.tpot(b, lat, 32, 7168)
  floor = 2 * bw.MICRO_BATCHES * bw.LAYERS * lat
  assert bw.tpot(b, lat, 32, 7168) > floor


@given(lat=st.floats(1e-7, 1e-4))
def test_decode_knee_is_where_bytes_meet_latency(lat):
  knee = bw.decode_knee(lat, 32, 7168)
  with_lat, without = bw.tpot(knee, lat, 32, 7168), bw.tpot(knee, 0.0, 32, 7168)
  assert with_lat == pytest.approx(2 * without, rel=1e-9)


@given(lat=st.floats(0, 1e-5), peak=st.floats(5e14, 5e15))
def test_training_knee_separates_hidden_from_exposed(lat, peak):
  knee = training_run.knee_bandwidth(lat, peak)
  assert training_run.step_estimate(knee * 1.001, lat, peak).exposed_comm_s == 0
  assert training_run.step_estimate(knee * 0.99, lat, peak).exposed_comm_s > 0


def test_fabric_rows_and_main(tmp_path, capsys):
  rows = {r[0]: r for r in bw.fabric_rows(32, 7000)}
  # H800 at the paper's nominal 50 GB/s and hidden 7000: the paper's 14.76 ms without latency
  assert float(rows["H800, IB nominal"][3]) == pytest.approx(14.757, abs=1e-3)
  assert float(rows["ideal unified fabric"][3]) == pytest.approx(0.820, abs=1e-3)
  assert float(rows["H800, IB nominal"][8]) == pytest.approx(19.926, abs=0.01)  # Table 4's step
  assert bw.main(["--plot", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "decode knee" in out and "training knee" in out and "What it shows" in out
  assert (tmp_path / "bandwidth_latency.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, needle", [
    (["--latencies", "1,x"], "--latencies"), (["--latencies", "-1"], ">= 0"),
    (["--bandwidths", "0"], "> 0"), (["--tokens-per-device", "0"], "tokens-per-device"),
    (["--frobnicate"], "unrecognized")])
def test_errors_are_one_line(argv, needle, capsys):
  assert bw.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and needle in err and "Traceback" not in err
