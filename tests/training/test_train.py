"""train.py end to end: it learns, writes its artifacts, compiles once, is deterministic,
balances experts with the bias rule, and stops on persistent non-finite losses."""

import json
import math
import statistics

import numpy as np
import pytest

from tests.training.conftest import (RUN, STEPS, metric_rows, restore_state, run_train)


def test_run_learns_and_writes_its_artifacts(run_a):
  workdir, proc = run_a
  evals = metric_rows(workdir, "eval")
  assert [r["step"] for r in evals] == [40, 80, STEPS]
  first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
  assert last < first - 0.2 and last < math.log(256) - 1.5, evals
  train = metric_rows(workdir)
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  row = train[-1]
  for key in ("loss", "ce", "mtp", "mtp_ce", "balance", "grad_norm", "lr", "maxvio", "mtp_maxvio",
              "tokens_per_s", "mfu", "finite"):
    assert key in row, key
  assert len(row["maxvio"]) == 1 and row["finite"] is True and 0 < row["mfu"] < 1
  summary = (workdir / "summary.txt").read_text()
  for text in ("validation bits/byte", "unigram entropy", "MFU", "KV cache / token",
               "MaxVio per MoE layer"):
    assert text in summary, text
  assert summary in proc.stdout
  facts = json.loads((workdir / "summary.json").read_text())
  assert facts["val_bpb"] == evals[-1]["val_bpb"] and facts["steps"] == STEPS
  assert facts["kv_bytes_per_token_mla"] == 2 * 2 * (16 + 8)      # (C + R) * L values in BF16
  assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()


def test_nothing_compiles_inside_the_loop(run_a):
  _, proc = run_a
  marker = "compiled train and eval steps"
  assert marker in proc.stdout
  before, after = proc.stdout.split(marker, 1)
  assert "Compiling jit(train_step)" in before     # the log is on: it sees the step compile
  assert [l for l in after.splitlines() if "Compiling " in l] == []


@pytest.mark.slow   # implied by the resume tests, which compare bitwise with an uninterrupted run
def test_two_runs_with_one_seed_are_identical(run_a, xla_cache, tmp_path):
  workdir_a, _ = run_a
  run_train(xla_cache, tmp_path, "--steps", str(STEPS), *RUN)
  losses = lambda w: [r["loss"] for r in metric_rows(w)]  # noqa: E731
  assert losses(tmp_path) == losses(workdir_a)
  _, state_a = restore_state(workdir_a)
  _, state_b = restore_state(tmp_path)
  flat_a, flat_b = (dict(_flatten(s)) for s in (state_a, state_b))
  assert flat_a.keys() == flat_b.keys() and len(flat_a) > 10
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)


def test_data_parallel_run_matches_the_single_device_run(run_a, xla_cache, tmp_path):
  workdir_a, _ = run_a
  flags = ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
  # The shared run's first 40 steps, to its first eval: its learning rate is warmup then peak
  # until step 81 (decay_start_frac 0.676 of 120), as in a 40-step run with its decay at the end.
  proc = run_train(xla_cache, tmp_path, "--steps", "40", *RUN, "train.decay_start_frac=1",
                   "train.decay_end_frac=1", env_extra={"XLA_FLAGS": flags})
  assert "mesh: data=2 fsdp=1 expert=1 tensor=1 (2 devices)" in proc.stdout
  one, two = metric_rows(workdir_a)[:20], metric_rows(tmp_path)[:20]
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
  (eval_two,) = metric_rows(tmp_path, "eval")
  eval_one = next(r for r in metric_rows(workdir_a, "eval") if r["step"] == eval_two["step"] == 40)
  np.testing.assert_allclose(eval_two["val_loss"], eval_one["val_loss"], rtol=2e-2)


def test_bias_updates_lower_maxvio(run_a, xla_cache, tmp_path):
  workdir_a, _ = run_a
  # The control run checkpoints and evaluates only at its end: only its metrics are read.
  run_train(xla_cache, tmp_path, "--steps", str(STEPS), *RUN, "train.bias_update_gamma=0",
            "train.checkpoint_every=1000", "train.eval_every=1000")
  mean = lambda w, k, a: statistics.mean(r[k][0] for r in metric_rows(w)[a:])  # noqa: E731
  # The main MoE layer, once routing has settled (after 30 steps)...
  with_bias, without = mean(workdir_a, "maxvio", 30), mean(tmp_path, "maxvio", 30)
  assert with_bias < 0.8 * without, (with_bias, without)
  # ...and every MoE layer (main and MTP) over the whole run.
  with_bias = statistics.mean(mean(workdir_a, k, 0) for k in ("maxvio", "mtp_maxvio"))
  without = statistics.mean(mean(tmp_path, k, 0) for k in ("maxvio", "mtp_maxvio"))
  assert with_bias < 0.8 * without, (with_bias, without)


def test_non_finite_losses_stop_the_run_with_the_last_good_checkpoint(xla_cache, tmp_path):
  # A learning rate of 1e30 keeps the first update finite and overflows every later forward.
  proc = run_train(xla_cache, tmp_path, "--steps", "30", *RUN, "train.learning_rate=1e30",
                   "train.checkpoint_every=1", check=False)
  assert proc.returncode == 1, proc.stdout[-2000:]
  errors = [l for l in proc.stdout.splitlines() if l.startswith("train: error:")]
  assert len(errors) == 1 and "3 consecutive non-finite steps" in errors[0], proc.stdout[-2000:]
  assert "the last good checkpoint is step 1 " in errors[0]
  rows = metric_rows(tmp_path)
  assert [r["finite"] for r in rows][:4] == [True, False, False, False]
  assert len(rows) <= 5                                          # stopped at once
  step, state = restore_state(tmp_path)
  assert step == 1
  assert all(np.all(np.isfinite(v)) for _, v in _flatten(state["params"]))


def _flatten(tree):
  import jax  # noqa: PLC0415
  return [(jax.tree_util.keystr(k), np.asarray(v))
          for k, v in jax.tree_util.tree_leaves_with_path(tree)]
