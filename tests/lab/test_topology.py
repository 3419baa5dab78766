"""`lab topology`: cost per endpoint against scale, reach by radix, plot and one-line errors."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.codesign import topology
from deepseek_jax.lab import topology as study


def test_table_at_the_paper_sizes_matches_table3_prices():
  port, link = topology.prices_from_paper()
  for t in topology.table3():
    if t.name == "DF":       # the study's Dragonfly is the canonical 513 groups, not 511
      continue
    c = study.cost_per_endpoint(t.name, 64, t.endpoints, 8)
    assert c == pytest.approx(t.cost_per_endpoint(port, link), rel=1e-12), t.name


@given(n=st.integers(2049, 300_000))
def test_reach_limits(n):
  assert study.cost_per_endpoint("FT2", 64, n, 8) is None
  assert (study.cost_per_endpoint("MPFT", 64, n, 8) is None) == (n > 16384)
  assert (study.cost_per_endpoint("FT3", 64, n, 8) is None) == (n > 65536)


def test_full_fat_trees_are_flat_and_ft3_costs_more():
  ft2 = [study.cost_per_endpoint("FT2", 64, n, 8) for n in (256, 512, 1024, 2048)]
  ft3 = [study.cost_per_endpoint("FT3", 64, n, 8) for n in (2048, 8192, 65536)]
  assert max(ft2) == pytest.approx(min(ft2)) and max(ft3) == pytest.approx(min(ft3))
  assert ft3[0] > ft2[-1]


def test_cheapest_ranges_cover_in_order():
  ranges = study.cheapest_ranges(64, 8, [512, 2048, 4096, 16384, 20000, 32928, 40000, 262144])
  assert [r[0] for r in ranges] == ["FT2", "MPFT", "SF", "DF"]
  assert all(a[2] < b[1] for a, b in zip(ranges, ranges[1:]))


def test_main_table_and_plot(tmp_path, capsys):
  assert study.main(["--plot", str(tmp_path), "--scales", "1024,16384,100000"]) == 0
  out = capsys.readouterr().out
  assert "cheapest" in out and "Reach by switch radix" in out and "16,384 @ 4.39" in out
  assert (tmp_path / "topology_cost.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, needle", [
    (["--radix", "7"], "radix 7"), (["--scales", "10,a"], "--scales"),
    (["--radixes", "0"], "'0' must be >= 1"), (["--planes", "-2"], "--planes")])
def test_errors_are_one_line(argv, needle, capsys):
  assert study.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and needle in err and "Traceback" not in err
