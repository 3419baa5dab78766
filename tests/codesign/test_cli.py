"""`python -m deepseek_jax.codesign`: the report, the plots, and user errors (exit 2, one line)."""

import subprocess
import sys

import pytest

from deepseek_jax.codesign.__main__ import main


def test_report_and_plots(tmp_path, capsys):
  assert main(["--plot", str(tmp_path / "plots"), "--sample-tokens", "256"]) == 0
  out = capsys.readouterr().out
  for needle in ("70.272", "327.680", "516.096", "7.34", "7.28", "120.96", "14.757", "0.820",
                 "671.03B", "36.63B", "37.55B", "agrees with the config exactly", "250.4",
                 "Qwen-72B does not reproduce", "3.20 experts per node", "12.8 experts",
                 "data=1,fsdp=32,expert=64,tensor=1 (2048 devices)", "Table 3: topology cost",
                 "272.80B", "with the latency term", "Paper numbers by status",
                 "Adam moments 2 B each"):  # the V3 config's train.bf16_moments
    assert needle in out, needle
  pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
  assert pngs == ["kv_cache_table1.png", "memory_by_mesh.png", "tpot_vs_bandwidth.png"]
  assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_other_config_hardware_and_mesh(capsys):
  assert main(["--config", "configs/deepseek_v2_lite.yaml", "--hardware", "gb200-nvl72",
               "--ep-size", "72", "--mesh", "data=1,fsdp=8,expert=8,tensor=1",
               "--sample-tokens", "0"]) == 0
  out = capsys.readouterr().out
  assert "scale-up 900 GB/s" in out and "(64 devices)" in out and "15.71B" in out
  assert "one routing group: node-limited routing is off" in out


def test_planning_rules_and_bf16_moments(capsys):
  assert main(["--rules", "planning", "--bf16-moments", "--no-zero1", "--sample-tokens", "0"]) == 0
  out = capsys.readouterr().out
  assert "codesign planning rules" in out and "data=2,fsdp=16,expert=64,tensor=1" in out
  assert "Adam moments 2 B each" in out and "ZeRO-1" not in out


def test_moments_follow_the_config_unless_the_flag_says_bf16(capsys):
  assert main(["--set", "train.bf16_moments=false", "--sample-tokens", "0"]) == 0
  assert "Adam moments 4 B each" in capsys.readouterr().out
  assert main(["--set", "train.bf16_moments=false", "--bf16-moments", "--sample-tokens", "0"]) == 0
  assert "Adam moments 2 B each" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--config", "no/such.yaml"], "does not exist"),
    (["--hardware", "a100"], "unknown"),
    (["--bandwidth", "-5"], "--bandwidth"),
    (["--bandwidth", "fast"], "not a number"),
    (["--seq-len", "0"], "--seq-len"),
    (["--mesh", "data=two"], "mesh"),
    (["--mesh", "data=2,pipe=4"], "'pipe' is not one of"),
    (["--set", "model.num_layers=-1"], "num_layers"),
    (["--roofline", "2"], "BATCH,SEQ"),
    (["--sample-tokens", "-1"], "sample-tokens"),
    (["--frobnicate"], "unrecognized"),
])
def test_user_errors_exit_2_with_one_line(argv, needle, capsys):
  assert main(argv + ["--sample-tokens", "0"] if "--sample-tokens" not in argv else argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_paper_only_and_markdown(tmp_path, capsys):
  md = tmp_path / "paper.md"
  assert main(["--paper-only", "--markdown", str(md)]) == 0
  out = capsys.readouterr().out
  for needle in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "DualPipe", "MTP",
                 "DeepSeek 67B", "16,384", "14.757 -> 15.660 ms"):
    assert needle in out, needle
  assert "Memory plan" not in out and "Node-limited" not in out
  text = md.read_text()
  assert text.count("| Quantity | Paper | Project | Status | Note |") == 7 and "272.80B" in text


def test_logfmt_flag_is_one_line_when_unavailable(capsys):
  from deepseek_jax.codesign import paper_report
  if paper_report.logfmt_group() is not None:
    pytest.skip("lab.wires.logfmt_claim exists: the flag works")
  assert main(["--paper-only", "--logfmt"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--logfmt" in err


def test_logfmt_flag_adds_the_wires_rows_when_available(capsys):
  from deepseek_jax.codesign import paper_report
  if paper_report.logfmt_group() is None:
    pytest.skip("lab.wires.logfmt_claim is not there yet")
  assert main(["--paper-only", "--logfmt"]) == 0
  out = capsys.readouterr().out
  assert "== LogFMT" in out and "LogFMT-8" in out


def test_plot_into_a_file_is_a_user_error(tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  assert main(["--plot", str(f), "--sample-tokens", "0", "--no-eval-shape"]) == 2
  assert "not a directory" in capsys.readouterr().err
  assert main(["--plot", str(f / "sub"), "--sample-tokens", "0", "--no-eval-shape"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err


def test_subprocess_exit_code_and_no_traceback():
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.codesign", "--hardware", "nope"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().startswith("error: hardware 'nope'") and "Traceback" not in r.stderr
  assert r.stdout == ""
