"""One of the processes of test_launch's stop test (2 fake CPU devices each): `train_loop` of a
toy step whose every update sums over all processes' devices, until a signal stops it; prints one
JSON line with the step it stopped at.

    python -m tests.sharding.stop_worker STEPS     # settings from the JAX_* variables
"""

import json
import os
import sys
import time
from types import SimpleNamespace
from typing import NamedTuple

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2"   # and a fast backend
                           " --xla_backend_optimization_level=0")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from deepseek_jax.training import loop  # noqa: E402
from sharding import distributed  # noqa: E402

READY_AT = 5          # at this step each process says it is in the loop (the test then signals)


class ToyState(NamedTuple):
  step: jax.Array
  data_position: jax.Array
  total: jax.Array


def run_until_stopped(steps: int) -> dict:
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  batch_sh, rep = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
  rows = distributed.local_batch_rows(batch_sh, (jax.device_count(),))

  @jax.jit
  def step_fn(state, batch):
    total = state.total + jnp.sum(batch["x"])
    metrics = {"loss": total, "finite": jnp.bool_(True), "bad_streak": jnp.int32(0)}
    return ToyState(state.step + 1, state.data_position + 1, total), metrics

  def train_batch(position):
    if position == READY_AT:
      print("stop_worker: in the loop", flush=True)
    time.sleep(0.005)           # a step of a few ms, as a small model's
    return {"x": np.ones(jax.device_count(), np.float32)}

  def to_device(batch):
    return {k: distributed.to_global(v[rows], batch_sh, v.shape) for k, v in batch.items()}

  t = SimpleNamespace(steps=steps, batch_size=jax.device_count(), seq_len=1, log_every=10**9,
                      eval_every=10**9, checkpoint_every=10**9, max_bad_steps=3)
  run = loop.Run(cfg=SimpleNamespace(train=t), step_fn=step_fn, eval_fn=None,
                 data=SimpleNamespace(train_batch=train_batch), checkpointer=None,
                 writer=SimpleNamespace(write=lambda step, kind, row: row),
                 to_device=to_device, flops_per_token=1.0, peak_flops=1.0)
  state = jax.device_put(ToyState(jnp.int32(0), jnp.int32(0), jnp.float32(0)), rep)
  bar = SimpleNamespace(update=lambda *a: None, note=lambda *a: None)
  with loop.StopSignal() as signals:
    result = loop.train_loop(run, state, signals, bar)
  # Every step added device_count ones: the total says how many steps really ran, everywhere.
  return {"stopped_by": result.stopped_by, "step": int(result.state.step),
          "total": float(result.state.total)}


if __name__ == "__main__":
  assert distributed.initialize(mode="explicit", timeout_s=60)
  out = run_until_stopped(int(sys.argv[1]))
  print(json.dumps({"pid": jax.process_index(), **out}), flush=True)
  jax.distributed.shutdown()
