"""The paper's remaining numbers: Table 4, latency, ratio, DualPipe, MTP, V2 vs 67B, the report."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.codesign import claims, paper_report, pipeline, training_run
from deepseek_jax.codesign.ep import ep_tpot_bound
from deepseek_jax.codesign.flops import train_flops_per_token
from deepseek_jax.codesign.hardware import LATENCIES, get_hardware
from deepseek_jax.codesign.report import reference_model
from deepseek_jax.config import ConfigError

V2, V3 = reference_model("deepseek_v2_236b"), reference_model("deepseek_v3_671b")
TOKENS = 15360 * 4096


def test_table4_tokens_per_day_and_tflops():
  for fabric, r in training_run.PAPER_TABLE4.items():
    m = training_run.run_metrics(r["step_s"], TOKENS, 2048, 250e9, 989e12)
    assert m.tokens_per_day / 1e9 == pytest.approx(r["tokens_per_day"] / 1e9, abs=0.011), fabric
  fpt = train_flops_per_token(V3, 4096, mtp=False)
  m = training_run.run_metrics(19.926, TOKENS, 2048, fpt, 989e12)
  assert m.flops_per_gpu / 1e12 == pytest.approx(385, rel=0.01)
  assert 100 * m.mfu == pytest.approx(38.94, rel=0.01)
  # the paper's cross-check: 385 TFLOPS x 2048 / 3.157M tok/s against the calculator
  assert 385e12 * 2048 / 3.157e6 == pytest.approx(fpt, rel=0.005)


@given(step=st.floats(1, 100), tokens=st.integers(1, 10**9), flops=st.floats(1e6, 1e12))
def test_run_metrics_identities(step, tokens, flops):
  m = training_run.run_metrics(step, tokens, 64, flops, 1e15)
  np.testing.assert_allclose(m.tokens_per_day, tokens / step * 86400, rtol=1e-12)
  np.testing.assert_allclose(m.mfu * 1e15 * 64, m.tokens_per_s * flops, rtol=1e-12)


@given(lat=st.floats(0, 1e-4), hops=st.integers(1, 4), layers=st.integers(1, 100),
       mb=st.integers(1, 4))
def test_latency_term_adds_exactly_hops_times_latency_per_all_to_all(lat, hops, layers, mb):
  kw = dict(num_layers=layers, micro_batches=mb)
  extra = (ep_tpot_bound(50e9, latency_s=hops * lat, **kw).tpot_s
           - ep_tpot_bound(50e9, **kw).tpot_s)
  assert extra == pytest.approx(2 * mb * layers * hops * lat, abs=1e-15)


def test_presets_read_table5_and_ratio():
  h800 = get_hardware("h800")
  assert h800.ep_latency(257) == LATENCIES["IB cross leaf"]
  assert h800.ep_latency(8) == LATENCIES["NVLink"]
  assert get_hardware("tpu_v5p").ep_latency(8) == 0.0
  assert h800.scale_ratio() == pytest.approx(4.0) and h800.scale_ratio(True) == pytest.approx(4.0)
  rows = {c.quantity: c for c in claims.ratio_claims(h800)}
  assert rows["scale-up : scale-out (achievable)"].status == "reproduced"


@given(pp=st.integers(2, 64).map(lambda h: 2 * h), f=st.floats(0.1, 10), b_f=st.floats(1, 3),
       w_b=st.floats(0, 1))
def test_dualpipe_bubble_below_1f1b(pp, f, b_f, w_b):
  b = f * b_f
  w = b * w_b
  one = pipeline.bubble("1F1B", pp, f, b, w)
  zb = pipeline.bubble("ZB1P", pp, f, b, w)
  dp = pipeline.bubble("DualPipe", pp, f, b, w)
  assert zb <= one and dp < one
  assert pipeline.bubble("DualPipe", pp, f, b, w, fb=0.5 * (f + b)) <= dp


def test_dualpipe_memory_and_v3_numbers():
  rows = {r.schedule: r for r in pipeline.schedule_table(16, 1, 2, 1, model=V3)}
  assert [(r.param_copies, r.activation_microbatches) for r in rows.values()] == [
      (1, 16), (1, 16), (2, 17)]
  assert (rows["1F1B"].bubble, rows["ZB1P"].bubble, rows["DualPipe"].bubble) == (45, 15, 14)
  assert rows["DualPipe"].params_per_device == 2 * rows["1F1B"].params_per_device
  with pytest.raises(ConfigError, match="even"):
    pipeline.bubble("DualPipe", 15, 1, 2, 1)
  with pytest.raises(ConfigError, match="W="):
    pipeline.bubble("ZB1P", 16, 1, 1, 2)


@given(p=st.floats(0, 1), depth=st.integers(0, 5))
def test_mtp_tokens_per_step(p, depth):
  t = claims.mtp_tokens_per_step(p, depth)
  assert 1 <= t <= depth + 1 + 1e-12
  assert claims.mtp_tokens_per_step(p) == pytest.approx(1 + p)
  assert claims.mtp_tokens_per_step(p, depth + 1) >= t


def test_v2_vs_67b():
  rows = {c.quantity: c for c in claims.v2_vs_67b_claims(V2, 989e12)}
  kv = rows["KV cache per token vs 67B"]
  assert kv.our_value == pytest.approx(-93.3, abs=0.05)
  assert rows["max generation throughput vs 67B"].status == "bounded"
  assert rows["training cost vs 67B"].our_value < -42.5   # FLOPs fall more than GPU-hours


def test_step_estimate_hides_comm_above_the_knee_and_grows_below():
  knee = training_run.knee_bandwidth()
  at = training_run.step_estimate(knee * 1.01)
  assert at.exposed_comm_s == 0 and at.step_s == pytest.approx(19.926)
  slow = [training_run.step_estimate(knee * f).step_s for f in (0.9, 0.5, 0.25)]
  assert slow[0] > at.step_s and slow == sorted(slow)
  assert training_run.knee_bandwidth(peak_flops=2.5e15) > knee   # faster compute hides less


def test_every_section_has_rows_with_known_statuses():
  sections = paper_report.paper_sections(V2, V3, TOKENS)
  assert len(sections) == 7
  counts = paper_report.status_counts(sections)
  assert set(counts) <= set(claims.STATUSES) and counts["reproduced"] >= 15
  text = "\n".join(paper_report.section_lines(sections))
  for needle in ("272.80B", "16,384", "1,280 $/port", "-93.3%", "244 all-to-alls", "1.80x"):
    assert needle in text, needle
  md = paper_report.markdown(sections)
  assert md.count("| Quantity |") == 7


def test_extra_group_hook_turns_rows_into_claims():
  rows = [("LogFMT-8 vs E4M3", "better", "better", "reproduced"),
          ("LogFMT-10 vs BF16", "close", "0.1% worse", "differs: a reason"),
          ("odd", "a", "b", "???"), ("five", 1.0, 2.0, "explained: why", "more"),
          ("p", "a", "b", "partly (1/3 data sets)"), ("q", "a", "b", "reproduced (3/3)")]
  sections = paper_report.paper_sections(V2, V3, TOKENS, extra=[("LogFMT", lambda: rows)])
  title, _, cl = sections[-1]
  assert title == "LogFMT"
  assert [c.status for c in cl] == ["reproduced", "differs", "new", "explained", "differs",
                                    "reproduced"]
  assert cl[4].note == "partly (1/3 data sets)" and cl[5].note == "(3/3)"
  assert cl[1].note == "a reason" and cl[2].note == "???" and cl[3].note == "why; more"
  assert cl[3].paper == "1.0"


@pytest.mark.parametrize("printed, half", [(4.39, 0.005), (7.5, 0.05), (9, 0.5), (1522, 0.5)])
def test_half_unit_of_printed_values(printed, half):
  assert claims.half_unit(printed) == pytest.approx(half)
  assert claims.within(printed + 0.99 * half, printed, 0, half)
  assert not claims.within(printed + 1.01 * half, printed, 0, half)
