"""`python -m deepseek_jax.lab` and `deepseek_jax.cli_args`: the study list, unknown studies and
bad values as one line with exit 2, OS faults (an unwritable --plot) one line with exit 1."""

import argparse
import subprocess
import sys

import pytest

from deepseek_jax import cli_args
from deepseek_jax import __main__ as top
from deepseek_jax.errors import UserError
from deepseek_jax.lab import __main__ as lab


def test_usage_lists_every_study(capsys):
  assert lab.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(name in out for name in lab.STUDIES)
  assert lab.main([]) == 2


@pytest.mark.parametrize("main", [lab.main, lambda argv: top.main(["lab", *argv])])
def test_unknown_study_is_one_line_exit_2(main, capsys):
  assert main(["accumulater"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "unknown study 'accumulater'" in err and "topology" in err


@pytest.mark.parametrize("argv, code, needle", [
    (["topology", "--radix", "-64"], 2, "--radix"),
    (["topology", "--scales", "1024,-5"], 2, "--scales '1024,-5'"),
    (["bandwidth", "--bandwidths", "fast"], 2, "not a number"),
    (["accumulator", "--bits", "-13"], 2, "--bits"),
])
def test_bad_values_through_the_lab_entry(argv, code, needle, capsys):
  assert lab.main(argv) == code
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_unwritable_plot_dir_is_a_fault_exit_1(tmp_path, capsys):
  f = tmp_path / "f"
  f.write_text("")
  assert lab.main(["topology", "--plot", str(f / "plots")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Not a directory" in err and "Traceback" not in err


def test_subprocess_exit_codes():
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.lab", "nope"], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown study 'nope'" in r.stderr


def test_shared_parser_and_types():
  p = cli_args.ArgParser(prog="x")
  p.add_argument("--n", type=cli_args.positive_int)
  p.add_argument("--f", type=cli_args.positive_float)
  assert p.parse_args(["--n", "3", "--f", "0.5"]).n == 3
  for argv in (["--n", "0"], ["--n", "x"], ["--f", "inf"], ["--f", "-1"], ["--zzz"]):
    with pytest.raises(UserError, match="--help"):
      p.parse_args(argv)
  with pytest.raises(argparse.ArgumentTypeError):
    cli_args.positive_int("-2")
  assert cli_args.int_list("--b", "13,14", 1, 23) == [13, 14]
  with pytest.raises(UserError, match=r"--p '48': '48' must lie in \[32, 128\] and be a multiple"):
    cli_args.int_list("--p", "48", 32, 128, 32)
  assert cli_args.float_list("--x", "0,1.5", allow_zero=True) == [0.0, 1.5]
  with pytest.raises(UserError, match="must be a finite number > 0"):
    cli_args.float_list("--x", "0")
  assert cli_args.output_dir("--plot", None) is None
