"""Topology cost (Insights Table 3): the counting formulas, the solved prices, and the paper rows."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.codesign import topology as tp
from deepseek_jax.config import ConfigError

EVEN_K = st.integers(2, 64).map(lambda h: 2 * h)


@given(k=EVEN_K)
def test_fat_tree_counts(k):
  ft2, ft3 = tp.fat_tree_2(k), tp.fat_tree_3(k)
  assert (ft2.endpoints, ft2.switches, ft2.links) == (k * k // 2, 3 * k // 2, k * k // 2)
  assert (ft3.endpoints, ft3.switches, ft3.links) == (k ** 3 // 4, 5 * k * k // 4, k ** 3 // 2)
  # every switch port is used exactly once: endpoints + 2 x links = switches x k
  for t in (ft2, ft3):
    assert t.endpoints + 2 * t.links == t.switches * k


@given(k=EVEN_K, planes=st.integers(1, 16))
def test_mpft_is_planes_copies_of_ft2(k, planes):
  one, many = tp.fat_tree_2(k), tp.fat_tree_2(k, planes=planes)
  assert many.endpoints == planes * one.endpoints
  assert (many.switches, many.links) == (planes * one.switches, planes * one.links)
  assert many.cost_per_endpoint(1280, 550) == pytest.approx(one.cost_per_endpoint(1280, 550))


@given(k=st.integers(4, 64).map(lambda h: 2 * h))
def test_slim_fly_and_dragonfly_fit_the_radix(k):
  sf = tp.slim_fly(k)
  q = int(round((sf.switches / 2) ** 0.5))
  assert 2 * q * q == sf.switches and q % 4 != 2
  net = 2 * sf.links // sf.switches            # network radix k'
  assert net + sf.endpoints // sf.switches <= k
  p, a, h = tp.dragonfly_shape(k)
  assert a == 2 * p == 2 * h and a - 1 + p + h <= k
  df = tp.dragonfly(k)
  assert df.switches == a * (a * h + 1) and df.endpoints == df.switches * p
  # each router: a - 1 local + h global ports, every port cabled once from each end
  assert 2 * df.links == df.switches * (a - 1 + h)


def test_prices_solve_ft2_and_ft3_exactly():
  port, link = tp.prices_from_paper()
  ft2, ft3 = tp.fat_tree_2(64), tp.fat_tree_3(64)
  assert ft2.cost_per_endpoint(port, link) == pytest.approx(4390, rel=1e-12)
  assert ft3.cost_per_endpoint(port, link) == pytest.approx(7500, rel=1e-12)
  assert port > 0 and link > 0


def test_table3_counts_match_the_paper():
  for t in tp.table3():
    n, sw, ln, _, _ = tp.PAPER_TABLE3[t.name]
    assert (t.endpoints, t.switches, t.links) == (n, sw, ln), t.name


def test_table3_costs_are_predicted_within_two_percent():
  port, link = tp.prices_from_paper()
  for t in tp.table3():
    cost_m = tp.PAPER_TABLE3[t.name][3]
    assert t.cost(port, link) / 1e6 == pytest.approx(cost_m, rel=0.02), t.name


def test_two_layer_limit_is_16384_gpus():
  with pytest.raises(ConfigError, match="at most 16384"):
    tp.fat_tree_2(64, 16385, planes=8)
  assert tp.fat_tree_2(64, 16384, planes=8).endpoints == 16384
  with pytest.raises(ConfigError, match="at most 2048"):
    tp.fat_tree_2(64, 2049)


@given(n=st.integers(64, 2048))
def test_pruned_builds_cover_the_endpoints(n):
  for name in tp.PAPER_TABLE3:
    t = tp.build(name, 64, n)
    assert t.endpoints == n
    full = tp.build(name, 64)
    assert t.switches <= full.switches and t.links <= full.links


def test_full_fat_trees_cost_least_per_endpoint_when_full():
  # cost per endpoint of the pruned fat-tree never drops below the full one's
  port, link = tp.prices_from_paper()
  for name, cap in (("FT2", 2048), ("FT3", 65536), ("MPFT", 16384)):
    full = tp.build(name, 64).cost_per_endpoint(port, link)
    for n in (100, 1000, cap // 3, cap - 1):
      assert tp.build(name, 64, n).cost_per_endpoint(port, link) >= full - 1e-9


@pytest.mark.parametrize("call, needle", [
    (lambda: tp.fat_tree_2(7), "radix=7"), (lambda: tp.fat_tree_3(64, 0), "endpoints=0"),
    (lambda: tp.slim_fly_q(6), "q=6"), (lambda: tp.slim_fly_q(29, 64), "needs radix 65"),
    (lambda: tp.dragonfly(64, groups=600), "groups=600"), (lambda: tp.build("torus", 64), "torus")])
def test_bad_input_is_a_config_error(call, needle):
  with pytest.raises(ConfigError, match=needle):
    call()
