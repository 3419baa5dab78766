"""The front door: `deepseek-jax COMMAND` dispatches every command, each `--help` lists its config
keys, bad input exits 2 with one line, and (slow) a built wheel installed in a fresh venv runs
the commands from a directory outside the checkout."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest
import yaml

from deepseek_jax import __main__ as entry
from deepseek_jax.config import Config, cli, config_from_dict, load_config
from deepseek_jax.version import __version__

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A key each command's --help must list (None: the command takes no config keys).
KEY_IN_HELP = {"train": "model.num_layers=61", "generate": "model.attention_impl=auto",
               "eval": "model.attention_impl=auto", "convert": None, "info": None,
               "codesign": "mesh.expert=1", "aot": "train.batch_size=8",
               "prepare": "train.seq_len=128", "lab": None, "serve": None}


def _run(argv, capsys) -> tuple[int, str, str]:
  try:
    rc = entry.main(argv)
  except SystemExit as e:
    rc = e.code
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_every_command_is_dispatched():
  assert set(KEY_IN_HELP) == set(entry.COMMANDS)


@pytest.mark.parametrize("command", sorted(KEY_IN_HELP))
def test_help_exits_0_and_lists_the_config_keys(command, capsys):
  rc, out, _ = _run([command, "--help"], capsys)
  assert rc == 0 and out.startswith(f"usage: deepseek-jax {command}"), out[:200]
  key = KEY_IN_HELP[command]
  if key is not None:
    assert key in out, out[-2000:]
  assert "--num_processes" not in out and "_" not in " ".join(re.findall(r"--[\w-]+", out))


@pytest.mark.parametrize("argv, needle", [
    ([], "usage: deepseek-jax COMMAND"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["train", "--steps", "many"], "--steps"),
    (["train", "model.no_such_field=1"], "model.no_such_field: unknown key"),
    (["train", "--config", "no/such.yaml"], "does not exist"),
    (["generate", "--checkpoint", "/no/such/run", "--prompt", "x"], "/no/such/run"),
    (["generate", "--checkpoint", "/no/such/run", "--prompt", "x", "model.d_model=8"],
     "model.d_model=8"),
    (["eval", "--checkpoint", "/no/such/run"], "--data"),
    (["convert", "/no/such/run"], "dst"),
    (["info", "/no/such/dir"], "/no/such/dir"),
    (["codesign", "--frobnicate"], "unrecognized"),
    (["codesign", "model.num_layers=-1"], "num_layers"),
    (["aot", "--target", "nope:1"], "nope"),
    (["prepare", "--out", "x", "train.seq_len=8"], "no sources"),
    (["prepare", "a.txt", "--out", "x"], "--seq-len"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))
  rc, _, err = _run(argv, capsys)
  assert rc == 2 and needle in err, err
  assert err.count("\n") == (len(entry.usage().splitlines()) if not argv else 1), err


def test_underscore_flags_stay_as_hidden_aliases(capsys, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))
  for flag in ("--coordinator_address", "--coordinator-address"):
    rc, _, err = _run(["train", "--workdir", str(tmp_path / "w"), flag, "localhost:1"], capsys)
    assert rc == 2 and "give all three" in err, err


def test_codesign_positional_overrides_equal_the_deprecated_set(capsys):
  from deepseek_jax.codesign import __main__ as codesign  # noqa: PLC0415
  quick = ["--sample-tokens", "0", "--no-eval-shape"]
  assert codesign.run(["model.num_layers=4", *quick]) == codesign.run(
      ["--set", "model.num_layers=4", *quick]) != codesign.run(quick)


def test_config_keys_are_every_field_and_take_their_defaults():
  keys = cli.config_keys()
  assert len(keys) == len({k for k, *_ in keys}) > 80
  for key, _, default, _ in keys:   # each listed key=default is accepted and changes nothing
    value = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                           default_flow_style=True).strip().removesuffix("...").strip()
    assert config_from_dict({}, [f"{key}={value}"]) == Config(), key
  helped = {k for k, *_, text in keys if text}
  assert {"train.data", "train.data_workers", "model.attention_impl", "mesh.rules"} <= helped


def test_shipped_configs_resolve_inside_the_package():
  assert cli.config_path("tiny") == ROOT / "configs" / "tiny.yaml"
  import importlib.resources  # noqa: PLC0415
  packaged = importlib.resources.files("deepseek_jax") / "configs"
  assert sorted(p.name for p in packaged.iterdir()) == sorted(
      p.name for p in (ROOT / "configs").glob("*.yaml"))
  assert load_config(packaged / "tiny.yaml") == load_config(ROOT / "configs" / "tiny.yaml")


def test_version_is_the_project_version(capsys):
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert __version__ == meta["project"]["version"]
  assert meta["project"]["scripts"]["deepseek-jax"] == "deepseek_jax.__main__:main"
  assert _run(["--version"], capsys)[:2] == (0, f"deepseek-jax {__version__}\n")


# A 2-layer model that trains in seconds (tests/training/conftest.py's SMALL).
TINY = ["model.d_model=32", "model.num_layers=2", "model.first_k_dense_replace=1",
        "model.num_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
        "model.ffn_dim=64", "model.n_routed_experts=4", "model.num_experts_per_tok=2",
        "model.moe_ffn_dim=16", "model.n_group=2", "model.topk_group=1",
        "train.batch_size=4", "train.seq_len=32", "train.eval_every=2", "train.eval_batches=1"]


@pytest.mark.slow
def test_wheel_runs_every_command_outside_the_checkout(tmp_path):
  """Build the wheel, install it (not editable) into a venv that sees the installed dependencies,
  then run the commands from a directory outside the checkout."""
  src = tmp_path / "src"
  shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
      ".git", "runs", "build", "*.egg-info", "__pycache__", ".ci-venv", ".venv", "tests", "bench",
      "notebooks", ".hypothesis", ".pytest_cache"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist",
                  src], check=True, timeout=600)
  (wheel,) = (tmp_path / "dist").glob("deepseek_jax-*.whl")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
  bin_ = venv / "bin"
  # The dependencies already installed here (this interpreter may itself be a venv, as in CI):
  # after the new venv's own site-packages, so the wheel's package comes first.
  site_dir = subprocess.run([bin_ / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                             "['purelib'])"], capture_output=True, text=True, check=True).stdout
  here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (pathlib.Path(site_dir.strip()) / "outer-environment.pth").write_text("\n".join(sorted(here)))
  subprocess.run([bin_ / "python", "-m", "pip", "install", "-q", "--no-deps", wheel], check=True,
                 timeout=300)
  work = tmp_path / "elsewhere"
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
             PATH=f"{bin_}{os.pathsep}{env['PATH']}")

  def run(*argv):
    proc = subprocess.run(["deepseek-jax", *argv], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    print(f"$ deepseek-jax {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

  where = subprocess.run([bin_ / "python", "-c", "import deepseek_jax.train as t; print(t.__file__)"],
                         cwd=work, env=env, capture_output=True, text=True, check=True).stdout
  assert str(venv) in where and str(ROOT) not in where, where
  out = run("train", "--steps", "4", "--workdir", "run", *TINY)
  assert "validation loss" in out and (work / "run" / "config.yaml").is_file()
  run("generate", "--checkpoint", "run", "--prompt", "def ", "--max-new-tokens", "8")
  (work / "doc.txt").write_text("def main():\n  return 0\n" * 20)
  assert "bits/byte" in run("eval", "--checkpoint", "run", "--data", "doc.txt")
  out = run("codesign", "--sample-tokens", "0")
  assert "Table 1: KV cache per token" in out and "configs/deepseek_v3_671b.yaml" in out
  assert str(venv) in out.splitlines()[0], out.splitlines()[0]   # the wheel's own config
