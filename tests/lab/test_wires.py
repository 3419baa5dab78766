"""`lab wires`: the LogFMT claim's rows and the codecs' ordering, wire bytes, a short
expert-parallel study (slow) and one-line errors."""

import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.lab import wires


@pytest.fixture(scope="module")
def table():
  return wires.codec_table(wires.activation_sets(tokens=32, width=512))


def test_codec_error_follows_the_bits(table):
  """More bits, less noise: BF16 > E4M3 > E5M2 (7, 3, 2 mantissa bits) and LogFMT-10 > LogFMT-8
  on every data set; every round trip is lossy but close (SQNR > 20 dB)."""
  for name, row in table.items():
    assert row["BF16"] > row["E4M3"] > row["E5M2"] > 20, name
    assert row["LogFMT-10"] > row["LogFMT-8"] > 20, name


def test_logfmt_claim_rows(table):
  rows = wires.logfmt_claim(table)
  assert [r[0] for r in rows[:3]] == ["LogFMT-8 more accurate than E4M3",
                                      "LogFMT-8 more accurate than E5M2",
                                      "LogFMT-10 close to BF16"]
  for claim, paper, project, status in rows:
    assert claim and paper and project
    assert status.split()[0] in ("reproduced", "partly", "not", "derived")
  wins = sum(table[s]["LogFMT-8"] > table[s]["E4M3"] for s in table)
  assert rows[0][3].startswith("reproduced") == (wins == len(table))


def test_sqnr_against_a_float64_reference():
  x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
  got = wires.sqnr_db(x, wires.CODECS["BF16"])
  r = x.astype(ml_dtypes.bfloat16).astype(np.float64)
  want = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - r) ** 2))
  assert got == pytest.approx(want, rel=1e-9)


def test_wire_bytes_per_row():
  d = 256
  b = {w: wires.wire_bytes(w, d) for w in ("model", "bfloat16", "fp8", "logfmt8", "logfmt10")}
  assert b["model"] == 4 * d and b["bfloat16"] == 2 * d
  assert b["fp8"] == d + 4 * d / 128                      # E4M3 and an f32 scale per 128
  assert b["logfmt8"] == d + 8 * d / 128                  # 8 bits and f32 min, max per 128
  assert b["fp8"] < b["logfmt8"] < b["logfmt10"] < b["bfloat16"] < b["model"]


@pytest.mark.slow
def test_expert_parallel_study_runs():
  results = wires.study(steps=2, batch=8, seq=16, log=lambda *_: None)
  assert [r[0] for r in results] == [r[0] for r in wires.RUNS]
  for _, _, _, r, b in results:
    assert np.all(np.isfinite(r["ce"])) and b > 0


@pytest.mark.parametrize("argv, field", [(["--steps", "0"], "--steps"),
                                         (["--batch", "x"], "--batch"),
                                         (["--batch", "12"], "--batch 12")])
def test_bad_input_is_one_line(argv, field, capsys):
  assert wires.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert field in err and "\n" not in err
