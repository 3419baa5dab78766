"""Multi-host start: the multi-controller runtime (`jax.distributed.initialize`) from flags or env.

Settings come from the arguments, else the environment (`JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS`), else with `auto=True` JAX's cluster
detection (TPU pods, SLURM, Open MPI); with none the run stays single-process. Each process feeds
only its own rows of the global batch (`local_batch_rows`, `to_global`).
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple, Sequence

import jax
import numpy as np

from deepseek_jax.config import ConfigError


class Settings(NamedTuple):
  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None = None


def _int(name: str, value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{name}={value!r}: must be an integer") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
            env: Mapping[str, str] | None = None) -> Settings | None:
  """Explicit settings from arguments or env; None when nothing asks for several processes.

  ConfigError when the settings are partial or inconsistent (names the flag/variable and rule).
  """
  env = os.environ if env is None else env
  addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
  ids = local_device_ids
  if ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
    ids = [_int("JAX_LOCAL_DEVICE_IDS", v) for v in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  if addr is None and n is None and pid is None:
    return None
  missing = [k for k, v in (("coordinator_address (JAX_COORDINATOR_ADDRESS)", addr),
                            ("num_processes (JAX_NUM_PROCESSES)", n),
                            ("process_id (JAX_PROCESS_ID)", pid)) if v is None]
  if missing:
    raise ConfigError(f"distributed: {', '.join(missing)} not set; give all three of "
                      "coordinator_address, num_processes and process_id (or none, or auto=True)")
  n, pid = _int("num_processes", n), _int("process_id", pid)
  if n < 1:
    raise ConfigError(f"num_processes={n}: must be >= 1")
  if not 0 <= pid < n:
    raise ConfigError(f"process_id={pid}: must lie in [0, num_processes={n})")
  if ":" not in addr:
    raise ConfigError(f"coordinator_address={addr!r}: must read host:port (e.g. 127.0.0.1:12345)")
  return Settings(addr, n, pid, None if ids is None else tuple(ids))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, auto: bool = False, cpu_collectives: str = "gloo",
               timeout_s: int = 300) -> bool:
  """Starts the multi-controller runtime when asked to; returns True if it runs multi-process.

  Call once, before any other JAX call that touches devices. `auto=True` lets JAX detect the
  cluster when nothing is given explicitly. Calling again after a successful start is a no-op.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  settings = resolve(coordinator_address, num_processes, process_id, local_device_ids)
  if settings is None and not auto:
    return False
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if settings is None:
    jax.distributed.initialize(initialization_timeout=timeout_s)
  else:
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                               settings.process_id, settings.local_device_ids,
                               initialization_timeout=timeout_s)
  return jax.process_count() > 1


def local_batch_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
  """The rows of the global batch that this process's devices hold (one contiguous range)."""
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  starts, stops = [], []
  for idx in index_map.values():
    rows = idx[0] if idx else slice(None)
    starts.append(rows.start or 0)
    stops.append(global_shape[0] if rows.stop is None else rows.stop)
  lo, hi = min(starts), max(stops)
  covered = np.zeros(hi - lo, bool)
  for a, b in zip(starts, stops):
    covered[a - lo:b - lo] = True
  if not covered.all():
    raise ValueError(f"this process's devices hold rows {sorted(set(zip(starts, stops)))} of the "
                     "batch, not one contiguous range; order the mesh so each process's devices "
                     "are adjacent on the batch axes")
  return slice(lo, hi)


def to_global(local_batch: np.ndarray, sharding: jax.sharding.Sharding,
              global_shape: tuple[int, ...]) -> jax.Array:
  """One global array from each process's rows (`local_batch` = global[local_batch_rows(...)])."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_batch),
                                                tuple(global_shape))
