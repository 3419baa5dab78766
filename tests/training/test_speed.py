"""Honest speed: tokens/s and MFU count step time only, however often the loop evaluates.

The loop runs a stand-in step whose work is known (matmuls of one size) and an evaluation much
longer than a step; evaluating every step must not raise the reported speed above what the same
steps give without evaluations, and MFU stays under the peak measured on that very matmul.
"""

import io
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.training import TrainState, loop
from deepseek_jax.training.metrics import MetricsWriter, ProgressBar
from tests.training.conftest import small_config

N, STEP_MATMULS, EVAL_MATMULS = 256, 24, 96
STEP_FLOPS = 2 * N ** 3 * STEP_MATMULS


def _matmuls(w, count):
  return jax.lax.fori_loop(0, count, lambda _, x: jnp.tanh(x @ w), w)


@jax.jit
def _step(state, batch):
  w = _matmuls(state.params["w"], STEP_MATMULS) + 0 * batch["tokens"].sum()
  metrics = {"loss": jnp.mean(w), "finite": jnp.asarray(True), "bad_streak": jnp.asarray(0)}
  return state.replace(step=state.step + 1, params={"w": w * 0.5 + state.params["w"] * 0.5},
                       data_position=state.data_position + 1), metrics


@jax.jit
def _eval(variables, batch):
  return jnp.mean(_matmuls(variables["params"]["w"], EVAL_MATMULS)) + 0 * batch["tokens"].sum()


def _state():
  zero = jnp.asarray(0, jnp.int32)
  w = jax.random.normal(jax.random.PRNGKey(0), (N, N)) / N ** 0.5
  return TrainState(step=zero, params={"w": w}, opt_state=(), router_state={}, fp8_state={},
                    rng=jax.random.PRNGKey(1), data_position=zero, bad_streak=zero,
                    bad_total=zero)


class _NoStop:
  stopped_by = None

  def should_stop(self, _count):
    return False


def _run(tmp_path, steps: int, eval_every: int) -> tuple[list[dict], float]:
  cfg = small_config(f"train.steps={steps}", f"train.eval_every={eval_every}",
                     "train.checkpoint_every=100000", "train.log_every=1")
  t = cfg.train
  batch = {"tokens": jnp.zeros((t.batch_size, t.seq_len), jnp.int32)}
  data = types.SimpleNamespace(train_batch=lambda _: batch, val_batches=[batch],
                               tokens_per_byte=None, unigram_bits=None)
  ckpt = types.SimpleNamespace(save=lambda *a, **k: True, latest_step=lambda: None,
                               directory=tmp_path)
  writer = MetricsWriter(tmp_path, tensorboard=False)
  fpt = STEP_FLOPS / (t.batch_size * t.seq_len)
  run = loop.Run(cfg, _step, _eval, data, ckpt, writer, lambda b: b, fpt, PEAK)
  t0 = time.perf_counter()
  result = loop.train_loop(run, _state(), _NoStop(), ProgressBar(steps, stream=io.StringIO()))
  jax.block_until_ready(result.state)
  wall = time.perf_counter() - t0
  writer.close()
  rows = [r for r in MetricsWriter.read(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
  return [r for r in rows if "tokens_per_s" in r], wall


def _peak() -> float:
  w = _state().params["w"]
  f = jax.jit(lambda w: _matmuls(w, STEP_MATMULS))
  f(w).block_until_ready()
  best = 0.0
  for _ in range(10):
    t0 = time.perf_counter()
    f(w).block_until_ready()
    best = max(best, STEP_FLOPS / (time.perf_counter() - t0))
  return best


PEAK = 0.0


@pytest.fixture(autouse=True, scope="module")
def _measured_peak():
  global PEAK
  PEAK = _peak()


def test_evaluating_every_step_does_not_inflate_tokens_per_s(tmp_path):
  steps = 12
  # Plain runs on both sides of the evaluating one: on a shared 2-core machine (CI runs two
  # test workers) one 12-step run can be 1.6x slower than the next for no reason of its own.
  plain, _ = _run(tmp_path / "plain", steps, eval_every=100000)
  evals, wall = _run(tmp_path / "evals", steps, eval_every=1)
  again, _ = _run(tmp_path / "again", steps, eval_every=100000)
  tps_plain = max(np.median([r["tokens_per_s"] for r in rows]) for rows in (plain, again))
  tps_evals = np.median([r["tokens_per_s"] for r in evals])
  # Before the fix each evaluated step's device time was left out with the evaluation: the
  # window held almost nothing and tokens/s came out many times too high (MFU read 34x). The
  # bound leaves room for the machine's noise (1.57x once in CI with a single plain run).
  assert tps_evals < 3.0 * tps_plain, (tps_evals, tps_plain)
  # Per-step MFU against a peak measured on this (shared) machine is noisy (one step of 24 read
  # 3.13 in a fresh-clone CI run on a quiet host); the bug it guards against read 34x too high.
  # The peak is measured again after the runs and the higher one counts.
  scale = PEAK / max(PEAK, _peak())
  mfus = [r["mfu"] * scale for r in plain + evals + again]
  assert np.median(mfus) < 1.25 and max(mfus) < 6.0, mfus
  # All steps' tokens over the whole wall time (evaluations included) is a floor.
  t = small_config().train
  assert tps_evals > 0.8 * steps * t.batch_size * t.seq_len / wall
