"""The host loop around the compiled step (nanodo's pattern): dispatch step s+1, then read step s.

Metrics are fetched one step late so the host never waits on the device in the middle of a
dispatch; train rows average the finite steps since the previous row. The loop evaluates, logs
(JSONL, TensorBoard, progress bar) and starts async checkpoints on schedule, stops cleanly on
SIGINT/SIGTERM (train.py then checkpoints), and stops with a clear message after `max_bad_steps`
consecutive non-finite steps (the step itself skipped their updates). Tokens/s and MFU count step
time only: before an evaluation or a checkpoint the loop waits for the step in flight, and the
time that follows, until the next step is dispatched, is left out.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepseek_jax import errors
from deepseek_jax.config import Config, ConfigError
from deepseek_jax.training.checkpoint import Checkpointer
from deepseek_jax.training.data import Data
from deepseek_jax.training.metrics import MetricsWriter, ProgressBar
from deepseek_jax.training.state import variables_of
from deepseek_jax.training.step import bits_per_byte


class NonFiniteStop(errors.Fault):
  """Too many consecutive non-finite steps; the message says where the last good state is."""


class StopSignal:
  """Records SIGINT/SIGTERM instead of dying, so the loop can checkpoint and exit.

  With several processes every step is a collective, so all must stop at the same step although
  a signal reaches one of them (or each at a different step). SIGTERM then belongs to JAX's
  preemption notifier (`jax.distributed.initialize` installs it); `should_stop` asks JAX's
  preemption sync point each step (a lock and a compare; the agreement itself runs once, in the
  background, over the coordination service). A SIGINT is forwarded to that notifier.
  """

  def __init__(self, multiprocess: bool | None = None):
    self.signum: int | None = None
    self.multiprocess = jax.process_count() > 1 if multiprocess is None else multiprocess
    self.synced = False          # multi-process: JAX's sync point was reached
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, _frame):
    self.signum = signum
    name = signal.Signals(signum).name
    if self.multiprocess:
      print(f"\ntrain: got {name}; agreeing on a step with the other processes, then saving a "
            "checkpoint and stopping", file=sys.stderr, flush=True)
      os.kill(os.getpid(), signal.SIGTERM)   # JAX's notifier owns SIGTERM
    else:
      print(f"\ntrain: got {name}; saving a checkpoint and stopping", file=sys.stderr, flush=True)

  def __enter__(self):
    if self.multiprocess and not jax.config.jax_enable_preemption_service:
      raise ConfigError("jax_enable_preemption_service=False: a run of several processes needs "
                        "JAX's preemption service to agree on the step to stop at; enable it")
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT,) if self.multiprocess else (signal.SIGINT, signal.SIGTERM):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)

  def should_stop(self, count: int) -> bool:
    """Whether to stop before the next step; `count` steps have run in this loop (0, 1, ...).

    Multi-process: call it with every count (the same sequence on every process).
    """
    if not self.multiprocess:
      return self.signum is not None
    if not self.synced and multihost_utils.reached_preemption_sync_point(count):
      self.synced = True
      print(f"\ntrain: a process got a stop signal; all {jax.process_count()} processes stop "
            f"after {count} steps of this run", file=sys.stderr, flush=True)
    return self.synced

  @property
  def stopped_by(self) -> str | None:
    """The signal that stopped the loop (multi-process: this one's, else the peer's SIGTERM)."""
    if self.multiprocess and not self.synced:
      return None
    if self.signum is None:
      return "SIGTERM" if self.multiprocess else None
    return signal.Signals(self.signum).name


@dataclasses.dataclass
class Run:
  """Everything the loop needs besides the state; built by train.py."""
  cfg: Config
  step_fn: Callable            # compiled (state, batch) -> (state, metrics); state donated
  eval_fn: Callable            # compiled (model variables, batch) -> mean CE
  data: Data
  checkpointer: Checkpointer
  writer: MetricsWriter
  to_device: Callable[[dict], dict]
  flops_per_token: float
  peak_flops: float
  val_batches: list = dataclasses.field(default_factory=list)
  export: Callable | None = None   # (step, state) -> None every train.export_every steps


@dataclasses.dataclass
class LoopResult:
  state: Any
  stopped_by: str | None       # None: ran to cfg.train.steps; else a signal name
  train_seconds: float         # wall time in steps (eval and checkpoint time excluded)
  timed_steps: int             # steps inside train_seconds (the first, warm-up step excluded)
  last_train: dict
  last_eval: dict


def evaluate(run: Run, state) -> dict:
  if not run.val_batches:
    run.val_batches = [run.to_device(b) for b in run.data.val_batches]
  variables = variables_of(state)
  losses = [float(run.eval_fn(variables, b)) for b in run.val_batches]
  val = float(np.mean(losses))
  out = {"val_loss": val}
  if run.data.tokens_per_byte is not None:
    out["val_bpb"] = bits_per_byte(val, run.data.tokens_per_byte)
  return out


# Train rows report these as means over the finite steps since the previous row (the others, e.g.
# lr and the counters, as of the row's step).
WINDOW_MEANS = ("loss", "ce", "mtp", "mtp_ce", "balance", "grad_norm", "maxvio", "mtp_maxvio")


def window_means(window: list[dict]) -> dict:
  if not window:
    return {}
  return {k: np.mean([np.asarray(m[k]) for m in window], axis=0)
          for k in WINDOW_MEANS if k in window[0]}


def describe_eval(step: int, ev: dict, unigram_bits: float | None) -> str:
  text = f"step {step}: validation loss {ev['val_loss']:.3f} nats/token"
  if "val_bpb" in ev:
    text += f", {ev['val_bpb']:.3f} bits/byte (unigram entropy {unigram_bits:.3f})"
  return text


def advice(bad_kinds: dict, never_updated: bool) -> str:
  """What to change after a run of non-finite steps. `never_updated`: no update was ever applied
  (every step from the initial parameters failed), so the learning rate played no part."""
  what = ("The gradient was non-finite while the loss was finite" if not bad_kinds["loss"] else
          "The loss was non-finite")
  if never_updated:
    return (f"{what} from the initial parameters, before any update: not the learning rate; "
            "check model.init_std (e.g. 0.006-0.02) and the data")
  if not bad_kinds["loss"]:
    return (f"{what}: lower train.learning_rate, or check model.init_std and the data")
  return f"{what}: lower train.learning_rate or check the data"


def train_loop(run: Run, state, stop: StopSignal, bar: ProgressBar) -> LoopResult:
  t = run.cfg.train
  tokens_per_step = t.batch_size * t.seq_len
  step, position = int(state.step), int(state.data_position)
  pending = None
  clock = {"t0": None, "win_t": time.perf_counter(), "win_step": step, "excluded": 0.0,
           "train_s": 0.0, "timed": 0}
  last_train, last_eval = {}, {}
  window: list[dict] = []        # finite steps since the last train row
  bad_kinds = {"loss": 0, "gradient": 0}   # non-finite steps by what was non-finite

  def consume(done_step: int, metrics) -> dict:
    m = jax.device_get(metrics)
    now = time.perf_counter()
    if clock["t0"] is None:       # first step finished: start timing here
      clock.update(t0=now, win_t=now, win_step=done_step, excluded=0.0)
    if not m["finite"]:
      loss, norm = float(m["loss"]), float(m["grad_norm"])
      what = (f"non-finite gradient (loss {loss:.4g} is finite, gradient norm {norm})"
              if np.isfinite(loss) else f"non-finite loss ({loss})")
      bad_kinds["gradient" if np.isfinite(loss) else "loss"] += 1
      print(f"\ntrain: step {done_step}: {what}; update skipped ({int(m['bad_streak'])} in a "
            "row)", file=sys.stderr, flush=True)
    else:
      window.append(m)
    if done_step % t.log_every == 0 or done_step == t.steps:
      span = now - clock["win_t"] - clock["excluded"]
      n = done_step - clock["win_step"]
      extra = {}
      if n > 0 and span > 0:
        tps = n * tokens_per_step / span
        extra = {"tokens_per_s": tps, "mfu": tps * run.flops_per_token / run.peak_flops}
        clock["train_s"] += span
        clock["timed"] += n
      row = run.writer.write(done_step, "train", {**m, **window_means(window), **extra})
      window.clear()
      loss = row["loss"] if isinstance(row["loss"], str) else f"{row['loss']:.3f}"
      speed = f" {extra['tokens_per_s']:.0f} tok/s mfu {extra['mfu']:.0%}" if extra else ""
      bar.update(done_step, f"loss {loss}{speed}")
      clock.update(win_t=now, win_step=done_step, excluded=0.0)
      last = row
    else:
      last = last_train
    if int(m["bad_streak"]) >= t.max_bad_steps:
      latest = run.checkpointer.latest_step()
      where = (f"the last good checkpoint is step {latest} in {run.checkpointer.directory}"
               if latest is not None else "no checkpoint was written")
      raise NonFiniteStop(f"{int(m['bad_streak'])} consecutive non-finite steps (to step "
                          f"{done_step}); stopped, {where}. "
                          + advice(bad_kinds, never_updated=int(m["bad_streak"]) >= done_step))
    return last

  start = step
  while step < t.steps and not stop.should_stop(step - start):
    batch = run.to_device(run.data.train_batch(position))
    state, metrics = run.step_fn(state, batch)
    step, position = step + 1, position + 1
    if pending is not None:
      last_train = consume(*pending)
    pending = (step, metrics)
    exporting = run.export is not None and step % t.export_every == 0
    if step % t.eval_every == 0 or step % t.checkpoint_every == 0 or exporting:
      # The step is still running on the device: it belongs to the timed window, only what
      # follows (evaluation, the checkpoint's copy) is left out of tokens/s and MFU.
      jax.block_until_ready(metrics)
      t_side = time.perf_counter()
      if step % t.eval_every == 0 and step < t.steps:
        ev = evaluate(run, state)
        run.writer.write(step, "eval", ev)
        bar.note(describe_eval(step, ev, run.data.unigram_bits))
        last_eval = {**ev, "step": step}
      if step % t.checkpoint_every == 0:
        run.checkpointer.save(state)
      if exporting:
        run.export(step, state)
      clock["excluded"] += time.perf_counter() - t_side
  if pending is not None:
    last_train = consume(*pending)
  return LoopResult(state, stop.stopped_by, clock["train_s"], clock["timed"], last_train, last_eval)
