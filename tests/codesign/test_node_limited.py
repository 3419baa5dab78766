"""Node-limited routing: exact expectations, the 3.2x argument, routing sampled from the router."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.codesign import node_limited as nl
from deepseek_jax.codesign.hardware import get_hardware
from deepseek_jax.codesign.report import reference_model
from deepseek_jax.config import ConfigError

V3 = reference_model("deepseek_v3_671b")


@given(nodes=st.integers(1, 4), per=st.integers(1, 3), k=st.integers(1, 6))
def test_expected_nodes_matches_enumeration(nodes, per, k):
  e = nodes * per
  k = min(k, e)
  subsets = list(itertools.combinations(range(e), k))
  brute = sum(len({x // per for x in s}) for s in subsets) / len(subsets)
  assert nl.expected_nodes_spanned(e, nodes, k) == pytest.approx(brute, rel=1e-12)


def test_v3_unrestricted_spans_5_3_nodes():
  assert nl.expected_nodes_spanned(256, 8, 8) == pytest.approx(5.2947, abs=1e-4)


def test_the_3_2x_argument():
  h800 = get_hardware("h800")
  free = nl.free_experts_per_node(h800.scale_up_achievable, h800.scale_out_bandwidth)
  assert free == pytest.approx(3.2)
  assert nl.max_experts_at_equal_cost(4, 160e9, 50e9) == pytest.approx(12.8)   # "up to 13"
  assert round(nl.max_experts_at_equal_cost(4, 160e9, 50e9)) == 13


@given(experts=st.integers(1, 16), ratio=st.floats(1.0, 8.0))
def test_nvlink_is_hidden_while_experts_per_node_stay_below_the_ratio(experts, ratio):
  t = nl.token_dispatch_traffic(nodes=1, experts_per_token=experts, hidden=7168,
                                bytes_per_element=1, ib_bandwidth=50e9,
                                nvlink_bandwidth=ratio * 50e9)
  assert (t.time_s == t.ib_s) == (experts <= ratio) or math.isclose(t.ib_s, t.nvlink_s)


def test_ib_traffic_grows_with_the_node_cap():
  rows = nl.node_limit_table(V3, limits=(1, 2, 4, None))
  b = [r.ib_bytes_per_token for r in rows]
  assert b == sorted(b) and b[0] == 7168 and rows[-1].analytic_nodes == pytest.approx(5.2947, 1e-4)


def test_router_samples_match_the_exact_expectation_when_unrestricted():
  free = dataclasses.replace(V3, topk_group=V3.n_group)
  n = nl.sample_nodes_spanned(free, n_tokens=8192, seed=1)
  se = n.std() / np.sqrt(n.size)
  assert abs(n.mean() - nl.expected_nodes_spanned(256, 8, 8)) < 4 * se


@pytest.mark.parametrize("m", [1, 2, 4])
def test_router_never_exceeds_the_node_cap(m):
  capped = dataclasses.replace(V3, topk_group=m)
  n = nl.sample_nodes_spanned(capped, n_tokens=2048, seed=2, bias_scale=0.5)
  assert n.max() <= m and n.min() >= 1
  assert n.mean() > m - 0.1    # top-K inside M nodes nearly always touches all M


def test_bad_layouts_are_user_errors():
  with pytest.raises(ConfigError, match="divide"):
    nl.expected_nodes_spanned(10, 3, 2)
  with pytest.raises(ConfigError, match="node limit"):
    nl.node_limit_table(V3, limits=(9,))
