"""EP inference bound (Insights §2.3.2): the paper's numbers and monotonicity properties."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.codesign.ep import ep_tpot_bound, ep_tpot_bound_for
from deepseek_jax.codesign.hardware import PRESETS, get_hardware
from deepseek_jax.codesign.report import reference_model
from deepseek_jax.config import ConfigError

V3 = reference_model("deepseek_v3_671b")


def test_paper_ib_numbers():
  b = ep_tpot_bound(50e9)
  assert b.step_s * 1e6 == pytest.approx(120.96, abs=1e-9)
  assert b.tpot_s * 1e3 == pytest.approx(14.757, abs=5e-4)
  assert round(b.tpot_s * 1e3, 2) == 14.76
  assert int(b.tokens_per_s) == 67


def test_paper_gb200_numbers():
  b = ep_tpot_bound(900e9)
  assert b.step_s * 1e6 == pytest.approx(6.72, abs=1e-9)
  assert round(b.tpot_s * 1e3, 2) == 0.82
  assert round(b.tokens_per_s, -2) == 1200


def test_7168_hidden_gives_123_9_us():
  assert ep_tpot_bound(50e9, hidden=7168).step_s * 1e6 == pytest.approx(123.9, abs=0.05)


def test_for_config_uses_k_plus_shared_and_the_right_tier():
  h800 = get_hardware("H800")
  b = ep_tpot_bound_for(V3, h800)              # 257 devices: beyond NVLink, IB 50 GB/s
  assert b.bytes_per_step == 3 * 32 * 9 * 7168
  assert b.step_s == pytest.approx(3 * 32 * 9 * 7168 / 50e9)
  gb = get_hardware("gb200-nvl72")
  assert ep_tpot_bound_for(V3, gb, ep_size=72).step_s == pytest.approx(3 * 32 * 9 * 7168 / 900e9)


@given(bw=st.floats(1e9, 1e13), factor=st.floats(1.01, 100), tokens=st.integers(1, 512))
def test_tpot_decreases_with_bandwidth_and_grows_linearly_with_tokens(bw, factor, tokens):
  assert ep_tpot_bound(bw * factor, tokens).tpot_s < ep_tpot_bound(bw, tokens).tpot_s
  assert ep_tpot_bound(bw, 2 * tokens).tpot_s == pytest.approx(2 * ep_tpot_bound(bw, tokens).tpot_s)


def test_latency_adds_two_hops_per_step():
  lat = ep_tpot_bound(50e9, latency_s=3.7e-6).tpot_s - ep_tpot_bound(50e9).tpot_s
  assert lat == pytest.approx(3.7e-6 * 2 * 2 * 61)   # 244 all-to-alls, ~0.9 ms


def test_presets_carry_sources():
  assert set(PRESETS) == {"h800", "h100", "h200", "gb200_nvl72", "tpu_v5p"}
  for hw in PRESETS.values():
    assert hw.source and hw.scale_up_bandwidth > hw.scale_out_bandwidth > 0
  assert get_hardware("h800").scale_up_achievable / get_hardware("h800").scale_out_bandwidth == 3.2


@pytest.mark.parametrize("kw", [
    dict(bandwidth=0), dict(bandwidth=-1e9), dict(bandwidth=float("nan")),
    dict(bandwidth=1e9, tokens_per_device=0), dict(bandwidth=1e9, hidden=1.5),
    dict(bandwidth=1e9, latency_s=-1)])
def test_bad_numbers_are_user_errors(kw):
  with pytest.raises(ConfigError):
    ep_tpot_bound(**kw)


def test_unknown_hardware_is_a_user_error():
  with pytest.raises(ConfigError, match="unknown"):
    get_hardware("a100")
