"""Exact resume: a run killed with SIGKILL (or stopped by SIGTERM) at an arbitrary step and resumed
(with its command line, or with --workdir alone) ends bitwise identical to an uninterrupted run; a corrupt newest checkpoint falls back to the
previous one."""

import json
import pathlib
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np

from tests.training.conftest import (REPO, RUN, STEPS, metric_rows, restore_state, run_train,
                                     subprocess_env, train_cmd)


def assert_same_state(workdir_a, workdir_b):
  step_a, a = restore_state(workdir_a)
  step_b, b = restore_state(workdir_b)
  assert step_a == step_b == STEPS
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves_with_path(b)
  assert [k for k, _ in leaves_a] == [k for k, _ in leaves_b]
  for (k, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(k))


def start_and_stop_at(xla_cache, workdir: pathlib.Path, step: int, sig: int):
  """Starts the shared run and sends `sig` once it has logged `step`; returns the process."""
  proc = subprocess.Popen(train_cmd(workdir, "--steps", str(STEPS), *RUN), cwd=REPO,
                          env=subprocess_env(xla_cache), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l).get("step", 0) >= step
                                for l in metrics.read_text().splitlines()[-3:] if l.endswith("}")):
      proc.send_signal(sig)
      break
    time.sleep(0.01)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def test_sigkill_at_an_arbitrary_step_then_resume_is_exact(run_a, xla_cache, tmp_path):
  workdir_a, _ = run_a
  kill_at = random.randrange(45, 100)
  code, out = start_and_stop_at(xla_cache, tmp_path, kill_at, signal.SIGKILL)
  assert code == -signal.SIGKILL, f"the run was not killed (exit {code}); kill_at={kill_at}"
  assert not (tmp_path / "summary.txt").exists()
  proc = run_train(xla_cache, tmp_path, "--steps", str(STEPS), *RUN, "--resume")
  assert "resumed at step " in proc.stdout, (kill_at, out[-1500:], proc.stdout[-1500:])
  resumed = int(proc.stdout.split("resumed at step ")[1].split()[0])
  assert resumed % 20 == 0 and 20 <= resumed <= kill_at + 1, (resumed, kill_at)
  assert_same_state(workdir_a, tmp_path)
  # The log was cut back to the checkpoint and continues exactly like the uninterrupted run's.
  assert [r["loss"] for r in metric_rows(tmp_path)] == [r["loss"] for r in metric_rows(workdir_a)]


def test_sigterm_checkpoints_and_resume_is_exact(run_a, xla_cache, tmp_path):
  workdir_a, _ = run_a
  code, out = start_and_stop_at(xla_cache, tmp_path, random.randrange(25, 100), signal.SIGTERM)
  assert code == 128 + signal.SIGTERM, out[-2000:]
  assert "stopped by SIGTERM" in out and "--resume" in out
  stopped, _ = restore_state(tmp_path)
  assert (tmp_path / "checkpoints" / str(stopped)).is_dir()
  # Only --workdir: the run's config.yaml holds the rest.
  proc = run_train(xla_cache, tmp_path, "--resume")
  assert f"resumed at step {stopped}" in proc.stdout
  assert_same_state(workdir_a, tmp_path)
  log = (tmp_path / "train.log").read_text()      # both commands' output, one after the other
  assert log.count("\n--- ") + log.startswith("--- ") == 2 and "stopped by SIGTERM" in log
  assert log.rstrip().endswith(proc.stdout.rstrip().splitlines()[-1])


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(run_a, xla_cache, tmp_path):
  workdir_a, _ = run_a
  work = tmp_path / "run"
  shutil.copytree(workdir_a, work)
  ckpts = work / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [80, 100, STEPS]
  for f in (ckpts / str(STEPS) / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage" * 7)
  # A half-written save (what a kill during an async save leaves) is ignored.
  half = ckpts / f"{STEPS + 20}.orbax-checkpoint-tmp-1"
  (half / "state").mkdir(parents=True)
  (half / "state" / "_METADATA").write_text("{")
  proc = run_train(xla_cache, work, "--steps", str(STEPS), *RUN, "--resume")
  warnings = [l for l in proc.stdout.splitlines() if "is unreadable" in l]
  assert len(warnings) == 1 and f"checkpoint step {STEPS} is unreadable" in warnings[0]
  assert "falling back to the previous one" in warnings[0]
  assert "resumed at step 100" in proc.stdout
  assert len(list((work / "checkpoints_corrupt").iterdir())) == 1
  assert_same_state(workdir_a, work)
