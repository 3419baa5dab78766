"""Issue 17: every fault a user can cause ends in one line (exit 2 for bad input, 1 for a fault,
saying what survived), never a traceback or a hang; one writer per workdir.

Cases 2, 8, 13 and 14 are tested where they were fixed (tests/inference/test_export.py,
tests/training/test_cli.py); the fuzz test is tests/test_fuzz.py. Runs that need a full training
subprocess on a real full or read-only filesystem are `slow` (and need root to mount).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from deepseek_jax import errors
from deepseek_jax import train as trainer
from deepseek_jax.generate import __main__ as gen_cli
from deepseek_jax.generate import load_for_inference
from deepseek_jax.hf import __main__ as hf_cli
from deepseek_jax.training import build as build_lib
from deepseek_jax.training import checkpoint as ckpt_lib
from deepseek_jax.training import loop as loop_lib
from deepseek_jax.training.lock import WorkdirLock
from tests import fault_driver
from tests.training.conftest import SMALL, run_train

REPO = pathlib.Path(__file__).resolve().parents[1]
HF = REPO / "tests" / "fixtures" / "hf" / "v3_tiny"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def one_line(err: str) -> str:
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


# --- the error path --------------------------------------------------------------------------

@pytest.mark.parametrize("exc, code, words", [
    (errors.UserError("--x 3: bad"), 2, "--x 3: bad"),
    (errors.Fault("disk full while writing checkpoint 4"), 1, "checkpoint 4"),
    (OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl"), 1,
     "disk full writing /w/metrics.jsonl"),
    (ValueError("RESOURCE_EXHAUSTED: ... Read-only file system [os_error_code='30']"), 1,
     "read-only file system"),
    (ZeroDivisionError("division by zero"), 1, "unexpected ZeroDivisionError"),
])
def test_describe(exc, code, words):
  got_code, line = errors.describe(exc)
  assert got_code == code and words in line and "\n" not in line


def _python(code: str, *args: str, env=None, timeout=60):
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env or ENV,
                        capture_output=True, text=True, timeout=timeout)


FAILING = ("import sys, threading, time\nfrom deepseek_jax import errors\n"
           "def main(argv, prog):\n"
           "  threading.Thread(target=time.sleep, args=(600,)).start()  # never joins\n"
           "  return 1 / 0\n"
           "errors.command(main, 'demo')\n")


def test_unexpected_error_is_one_line_and_never_waits_for_threads():
  proc = _python(FAILING, timeout=30)          # a non-daemon thread would hold exit 600 s
  assert proc.returncode == 1
  line = one_line(proc.stderr)
  assert line.startswith("demo: error: unexpected ZeroDivisionError") and "--debug" in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how):
  env = {**ENV, errors.DEBUG_ENV: "1"} if how == "env" else ENV
  proc = _python(FAILING, *(["--debug"] if how == "flag" else []), env=env, timeout=30)
  assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_the_entry_point_gives_one_line():
  proc = subprocess.run([sys.executable, "-m", "deepseek_jax", "info", str(HF / "no_such_file")],
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "no_such_file: no such directory" in one_line(proc.stderr)    # case 15


# --- case 1: the workdir lock ------------------------------------------------------------------

HOLD = ("import sys, time\nfrom deepseek_jax.training.lock import WorkdirLock\n"
        "lock = WorkdirLock(sys.argv[1], 'holder').acquire()\nprint('held', flush=True)\n"
        "time.sleep(600)\n")


def test_a_second_writer_is_refused_and_a_killed_holders_lock_taken_over(tmp_path, capsys):
  workdir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert trainer.main(["--workdir", str(workdir), "--steps", "3", *SMALL]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"is in use by process {holder.pid}" in line and "(holder)" in line
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]     # nothing else written
  finally:
    holder.kill()                                                        # kill -9: no release
    holder.wait()
  with WorkdirLock(workdir, "next"):
    err = capsys.readouterr().err
    assert f"stale lock of {workdir} left by process {holder.pid}" in err and "no longer" in err
    assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
  assert (workdir / ".lock").read_text() == ""          # released: nothing stale left behind


def test_a_lock_only_workdir_is_removed_again(tmp_path):
  with WorkdirLock(tmp_path / "new"):
    assert (tmp_path / "new" / ".lock").is_file()
  assert not (tmp_path / "new").exists()


# --- cases 3 and 6: a checkpoint that cannot be written ----------------------------------------

class _FailingManager:
  def __init__(self, exc):
    self.exc = exc

  def wait_until_finished(self):
    raise self.exc

  def close(self):
    raise AssertionError("close() after a failed save must not wait on orbax")


@pytest.mark.parametrize("text, words", [
    ("No space left on device [os_error_code='28']", "disk full while writing checkpoint 15"),
    ("Read-only file system [os_error_code='30']",
     "read-only file system: cannot write checkpoint 15"),
])
def test_a_failed_save_names_the_newest_good_checkpoint(tmp_path, text, words):
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=3, async_save=True, config={})
  for step in (5, 10):
    (tmp_path / "checkpoints" / str(step) / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / str(step) / "meta").mkdir()
  ckpt._in_flight = 20
  ckpt._manager = _FailingManager(ValueError(
      f"RESOURCE_EXHAUSTED: Error writing {tmp_path}/checkpoints/15.orbax-checkpoint-tmp/state: "
      + text))
  with pytest.raises(ckpt_lib.CheckpointWriteError) as e:
    ckpt.wait()
  assert str(e.value) == f"{words}" + ("" if "disk" in words else f" in {ckpt.directory}") + (
      f"; the newest good checkpoint is 10 in {ckpt.directory}")
  ckpt.close()                                            # told already: returns at once


def _mount(*args: str) -> bool:
  return os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
      ["mount", *args], capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_and_read_only_runs(tmp_path):
  xla_cache = tmp_path / "xla"
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  if not _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)):
    pytest.skip("needs root to mount a small tmpfs")
  try:
    proc = run_train(xla_cache, mnt / "w", "--steps", "30", *SMALL, "train.checkpoint_every=5",
                     check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert "disk full while writing" in last and "the newest good checkpoint is" in last
    good = last.split("newest good checkpoint is ")[1].split()[0]
    assert (mnt / "w" / "checkpoints" / good / "state").is_dir()
  finally:
    subprocess.run(["umount", str(mnt)])
  run = tmp_path / "run"
  run_train(xla_cache, run, "--steps", "5", *SMALL, "train.checkpoint_every=5")
  ckpts = run / "checkpoints"
  assert _mount("--bind", str(ckpts), str(ckpts)) and _mount("-o", "remount,bind,ro", str(ckpts))
  try:
    proc = run_train(xla_cache, run, "--resume", "--steps", "10", check=False, timeout=300)
  finally:
    subprocess.run(["umount", str(ckpts)])
  assert proc.returncode == 1 and "Traceback" not in proc.stdout
  assert "read-only file system: cannot write checkpoint 10" in proc.stdout.splitlines()[-1]


# --- case 4: a state that cannot fit -----------------------------------------------------------

def test_a_state_larger_than_memory_is_refused_before_allocation():
  devices = np.array(jax.devices()[:1])
  huge = types.SimpleNamespace(mesh=types.SimpleNamespace(devices=devices), abstract={
      "w": jax.ShapeDtypeStruct((2 ** 40,), np.float32)})
  with pytest.raises(errors.ConfigError, match=r"needs 4096\.00 GiB"):
    build_lib.check_memory(huge)
  build_lib.check_memory(types.SimpleNamespace(     # a small one passes
      mesh=huge.mesh, abstract={"w": jax.ShapeDtypeStruct((1024,), np.float32)}))


def test_train_refuses_a_billion_token_vocabulary_in_one_line(tmp_path, capsys):
  workdir = tmp_path / "w"
  assert trainer.main(["--workdir", str(workdir), "--steps", "3", *SMALL,
                       "train.batch_size=8", "model.vocab_size=1000000000"]) == 2
  assert "GiB" in one_line(capsys.readouterr().err) and not workdir.exists()   # case 7 too


# --- cases 10, 11, 15, 16: bad Hugging Face files -----------------------------------------------

@pytest.mark.parametrize("content, words", [
    ("null", "holds a JSON null"), ("[1, 2]", "holds a JSON list"),
])
def test_config_json_that_is_not_an_object(tmp_path, capsys, content, words):
  hf = tmp_path / "hf"
  shutil.copytree(HF, hf)
  (hf / "config.json").write_text(content)
  assert hf_cli.main(["info", str(hf)]) == 2
  assert words in one_line(capsys.readouterr().err)
  assert gen_cli.main(["--checkpoint", str(hf), "--prompt", "hi"]) == 2
  assert words in one_line(capsys.readouterr().err)


def test_a_wrong_type_field_is_named(tmp_path, capsys):
  hf = tmp_path / "hf"
  shutil.copytree(HF, hf)
  raw = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": "three"}))
  assert hf_cli.main(["info", str(hf)]) == 2
  assert "num_hidden_layers='three': must be an integer" in one_line(capsys.readouterr().err)


def test_info_on_a_file_says_so(capsys):
  assert hf_cli.main(["info", str(HF / "config.json")]) == 2
  assert "a file, not a directory" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("content", ['{"model": 5}', "{", "\xff"])
def test_a_malformed_tokenizer_is_one_line(tmp_path, capsys, content):
  bad = tmp_path / "tokenizer.json"
  bad.write_text(content, errors="surrogateescape")
  assert gen_cli.main(["--checkpoint", str(HF), "--prompt", "hi", "--tokenizer", str(bad)]) == 2
  assert "not a readable tokenizer.json" in one_line(capsys.readouterr().err)


# --- case 12: inference falls back past a corrupt newest checkpoint ----------------------------

def test_generate_and_convert_fall_back_without_touching_the_run(tmp_path, capsys):
  run = fault_driver.make_run(tmp_path)
  for f in (run / "checkpoints" / "7" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\x00" * 16)
  before = fault_driver.hashes(run)
  _, _, info = load_for_inference(run)
  assert info == {"step": 5}
  err = capsys.readouterr().err
  assert "checkpoint step 7 is unreadable" in err and "using step 5" in err
  assert hf_cli.main(["convert", str(run), str(tmp_path / "out")]) == 0
  assert fault_driver.hashes(run) == before               # nothing moved aside or rewritten


def test_resume_falls_back_even_where_the_corrupt_step_cannot_be_moved(tmp_path, monkeypatch,
                                                                      capsys):
  run = fault_driver.make_run(tmp_path)
  (run / "checkpoints" / "7" / "meta" / "metadata").write_bytes(b"\xff")
  cfg, state = fault_driver.make_state(0)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)
  ckpt = ckpt_lib.Checkpointer(run, keep=3, async_save=False,
                               config=ckpt_lib.config_to_dict(ckpt_lib.Config(model=cfg)))

  def read_only(*_):
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(ckpt_lib.shutil, "move", read_only)
  assert int(ckpt.restore(abstract).step) == 5
  err = capsys.readouterr().err
  assert "checkpoint step 7 is unreadable" in err and "left in place (Read-only file system)" in err
  ckpt.close()


# --- case 17: the advice after non-finite steps ----------------------------------------------

def test_non_finite_advice_tells_gradient_from_loss():
  fresh = loop_lib.advice({"loss": 0, "gradient": 3}, never_updated=True)
  assert fresh.startswith("The gradient was non-finite") and "not the learning rate" in fresh
  assert "model.init_std" in fresh and "lower train.learning_rate" not in fresh
  later = loop_lib.advice({"loss": 2, "gradient": 0}, never_updated=False)
  assert "loss was non-finite" in later and "lower train.learning_rate" in later


def test_without_flock_the_pid_decides(tmp_path, monkeypatch, capsys):
  import fcntl  # noqa: PLC0415

  def no_flock(*_):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_flock)
  workdir = tmp_path / "nfs"
  workdir.mkdir()
  (workdir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                             "time": 0, "command": "me"}))
  with pytest.raises(errors.UserError, match=f"in use by process {os.getpid()}"):
    WorkdirLock(workdir).acquire()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
  with WorkdirLock(workdir):
    assert "no longer running" in capsys.readouterr().err
