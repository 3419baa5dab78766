"""Multi-host start: the multi-controller runtime (`jax.distributed.initialize`) on a real cluster.

`plan(mode, ...)` says how this process was launched: explicit flags or `JAX_*` variables
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS`), or with
`mode="auto"` what `detect` finds: SLURM (`srun`), a Cloud TPU VM (GCE or GKE), a Kubernetes
indexed Job or StatefulSet, Open MPI. Where JAX reads a cluster itself (SLURM, TPU, Open MPI, the
Kubernetes API) this module only checks the variables and hands over to it. Each process feeds
only its own rows of the global batch (`local_batch_rows`, `to_global`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax._src import cloud_tpu_init   # running_in_cloud_tpu_vm: JAX's own TPU-VM check, no network

from deepseek_jax.config import ConfigError

MODES = ("auto", "explicit", "off")


class Settings(NamedTuple):
  coordinator_address: str | None      # None: JAX derives it from the cluster (SLURM node list)
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None = None


class Launch(NamedTuple):
  """How this process was started: what to hand to `jax.distributed.initialize`."""
  kind: str                  # explicit | slurm | kubernetes | tpu | openmpi
  settings: Settings | None  # None: JAX reads the whole cluster itself
  jax_method: str | None     # JAX's cluster_detection_method; "deactivate": `settings` are complete
  source: str                # the variables it came from, for the log line

  def describe(self) -> str:
    return f"{self.kind} ({self.source})"


def _int(name: str, value, lo: int | None = None, hi: int | None = None, rule: str = "") -> int:
  try:
    n = int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{name}={value!r}: must be an integer{rule}") from None
  if (lo is not None and n < lo) or (hi is not None and n >= hi):
    bound = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
    raise ConfigError(f"{name}={n}: must be {bound}{rule}")
  return n


def _address(name: str, addr: str) -> str:
  host, _, port = addr.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"{name}={addr!r}: must read host:port (e.g. 127.0.0.1:12345)")
  return addr


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
            env: Mapping[str, str] | None = None) -> Settings | None:
  """Explicit settings from arguments, else the JAX_* variables; None when none is given.

  ConfigError when the settings are partial or inconsistent (names the flag/variable and rule).
  """
  env = os.environ if env is None else env

  def pick(arg, flag: str, var: str):   # (value, the name the user gave it under)
    return (arg, flag) if arg is not None else (env.get(var) or None, var)

  addr, addr_name = pick(coordinator_address or None, "coordinator_address",
                         "JAX_COORDINATOR_ADDRESS")
  n, n_name = pick(num_processes, "num_processes", "JAX_NUM_PROCESSES")
  pid, pid_name = pick(process_id, "process_id", "JAX_PROCESS_ID")
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
                      "coordinator_address, num_processes and process_id (or none, or "
                      "--distributed auto on a cluster)")
  n, pid = _int(n_name, n), _int(pid_name, pid)
  if n < 1:
    raise ConfigError(f"{n_name}={n}: must be >= 1")
  if not 0 <= pid < n:
    raise ConfigError(f"{pid_name}={pid}: must lie in [0, {n_name}={n})")
  return Settings(_address(addr_name, addr), n, pid, None if ids is None else tuple(ids))


def detect(env: Mapping[str, str] | None = None, on_tpu_vm: bool | None = None) -> Launch | None:
  """The launcher that started this process, read from `env`; None for a single process.

  First match wins: JAX_PROCESS_ID (explicit), SLURM_JOB_ID (SLURM), a Cloud TPU VM (JAX's
  `running_in_cloud_tpu_vm` unless `on_tpu_vm` says), JOB_COMPLETION_INDEX or a Kubernetes pod
  with JAX_COORDINATOR_ADDRESS (Kubernetes), OMPI_MCA_orte_hnp_uri (Open MPI).
  """
  env = os.environ if env is None else env
  if on_tpu_vm is None:
    on_tpu_vm = cloud_tpu_init.running_in_cloud_tpu_vm   # set by `import jax`, no network
  if env.get("JAX_PROCESS_ID"):
    return _explicit(resolve(env=env), "JAX_* variables")
  if "SLURM_JOB_ID" in env:
    return _slurm(env)
  if on_tpu_vm:
    gke = {"TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"} & set(env)
    where = "GKE: TPU_WORKER_HOSTNAMES" if gke else "GCE metadata server"
    return Launch("tpu", None, None, f"JAX's Cloud TPU detection, {where}")
  addr_or_n = env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_NUM_PROCESSES")
  if "JOB_COMPLETION_INDEX" in env or ("KUBERNETES_SERVICE_HOST" in env and addr_or_n):
    return _kubernetes(env)
  if addr_or_n:
    resolve(env=env)                     # partial JAX_* settings: raises, naming what is missing
  if "OMPI_MCA_orte_hnp_uri" in env:
    return _openmpi(env)
  return None


def _explicit(settings: Settings | None, source: str) -> Launch | None:
  return None if settings is None else Launch("explicit", settings, "deactivate", source)


def _slurm(env: Mapping[str, str]) -> Launch | None:
  ntasks = env.get("SLURM_NTASKS")
  n = None if ntasks is None else _int("SLURM_NTASKS", ntasks, 1)
  nodes = env.get("SLURM_STEP_NODELIST")
  if nodes is None:
    if n is None or n == 1:
      return None                        # e.g. `python train.py` in a batch script or salloc
    raise ConfigError(f"SLURM_STEP_NODELIST not set but SLURM_NTASKS={n}: this process is not "
                      f"a job step; start the {n} processes with srun (srun python train.py "
                      "--distributed auto)")
  for var in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
    if var not in env:
      raise ConfigError(f"{var} not set: srun sets it in every task of a job step "
                        f"(SLURM_STEP_NODELIST={nodes!r})")
  pid = _int("SLURM_PROCID", env["SLURM_PROCID"], 0, n, f" (SLURM_NTASKS={n})")
  _int("SLURM_LOCALID", env["SLURM_LOCALID"], 0)
  if n == 1:
    return None
  if not re.match(r"[A-Za-z0-9]", nodes):
    raise ConfigError(f"SLURM_STEP_NODELIST={nodes!r}: must start with a host name "
                      "(e.g. node[01-04],gpu7)")
  if env.get("JAX_COORDINATOR_PORT"):
    port = _int("JAX_COORDINATOR_PORT", env["JAX_COORDINATOR_PORT"], 1, 65536)
    port = f"port JAX_COORDINATOR_PORT={port}"
  else:
    job = _int("SLURM_JOB_ID", env["SLURM_JOB_ID"], 0,
               rule=" (JAX derives the coordinator port from it; or set JAX_COORDINATOR_PORT)")
    port = f"port from SLURM_JOB_ID={job}"
  addr = env.get("JAX_COORDINATOR_ADDRESS") or None
  if addr:
    _address("JAX_COORDINATOR_ADDRESS", addr)
  if env.get("JAX_NUM_PROCESSES") and _int("JAX_NUM_PROCESSES", env["JAX_NUM_PROCESSES"]) != n:
    raise ConfigError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']}: disagrees with "
                      f"SLURM_NTASKS={n}; unset JAX_NUM_PROCESSES")
  where = addr or f"first host of SLURM_STEP_NODELIST={nodes}, {port}"
  return Launch("slurm", Settings(addr, n, pid), "slurm",
                f"SLURM_PROCID={pid} of SLURM_NTASKS={n}; coordinator: {where}")


def _kubernetes(env: Mapping[str, str]) -> Launch:
  index = env.get("JOB_COMPLETION_INDEX")
  if index is not None:
    name, pid = "JOB_COMPLETION_INDEX", _int("JOB_COMPLETION_INDEX", index, 0)
  else:
    host = env.get("HOSTNAME", "")
    m = re.fullmatch(r".+-(\d+)", host)
    if not m:
      raise ConfigError(f"HOSTNAME={host!r}: has no pod ordinal (a name ending in -<n>, as "
                        "StatefulSet pods have); set JOB_COMPLETION_INDEX (an Indexed Job) or "
                        "JAX_PROCESS_ID")
    name, pid = "the HOSTNAME ordinal", int(m.group(1))
  addr, n = env.get("JAX_COORDINATOR_ADDRESS"), env.get("JAX_NUM_PROCESSES")
  if (not addr and not n and index is not None and "KUBERNETES_SERVICE_HOST" in env
      and importlib.util.find_spec("kubernetes") is not None):
    return Launch("kubernetes", None, None, f"JOB_COMPLETION_INDEX={pid}; process count and "
                  "coordinator from the Kubernetes API (JAX's K8sCluster)")
  for var, value in (("JAX_COORDINATOR_ADDRESS", addr), ("JAX_NUM_PROCESSES", n)):
    if not value:
      raise ConfigError(f"{var} not set: a Kubernetes launch ({name}={pid}) needs "
                        "JAX_COORDINATOR_ADDRESS=<pod 0's DNS name>:<port> and "
                        "JAX_NUM_PROCESSES=<the Job's parallelism> in the pod spec")
  n = _int("JAX_NUM_PROCESSES", n, 1)
  if pid >= n:
    raise ConfigError(f"{name}={pid}: must lie in [0, JAX_NUM_PROCESSES={n})")
  settings = resolve(_address("JAX_COORDINATOR_ADDRESS", addr), n, pid, env=env)
  return Launch("kubernetes", settings, "deactivate",
                f"{name}={pid} of JAX_NUM_PROCESSES={n}; coordinator: {addr}")


def _openmpi(env: Mapping[str, str]) -> Launch | None:
  for var in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):
    if var not in env:
      raise ConfigError(f"{var} not set: mpirun sets it in every rank (OMPI_MCA_orte_hnp_uri "
                        "is set)")
  n = _int("OMPI_COMM_WORLD_SIZE", env["OMPI_COMM_WORLD_SIZE"], 1)
  pid = _int("OMPI_COMM_WORLD_RANK", env["OMPI_COMM_WORLD_RANK"], 0, n,
             f" (OMPI_COMM_WORLD_SIZE={n})")
  _int("OMPI_COMM_WORLD_LOCAL_RANK", env["OMPI_COMM_WORLD_LOCAL_RANK"], 0)
  if n == 1:
    return None
  return Launch("openmpi", Settings(None, n, pid), "ompi",
                f"OMPI_COMM_WORLD_RANK={pid} of OMPI_COMM_WORLD_SIZE={n}; coordinator: from "
                "OMPI_MCA_orte_hnp_uri")


def plan(mode: str | None = None, coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None,
         local_device_ids: Sequence[int] | None = None, env: Mapping[str, str] | None = None,
         on_tpu_vm: bool | None = None) -> Launch | None:
  """The launch for `mode`; None: run as one process.

  mode None: explicit settings when given, else one process. "explicit": they must be given.
  "auto": explicit settings when given, else `detect`. "off": one process, whatever the env says.
  """
  if mode not in (None, *MODES):
    raise ConfigError(f"distributed={mode!r}: must be one of {', '.join(MODES)}")
  given = [v for v in (coordinator_address, num_processes, process_id) if v is not None]
  if mode == "off":
    if given:
      raise ConfigError("distributed='off': drop --coordinator_address, --num_processes and "
                        "--process_id, or choose --distributed explicit")
    return None
  if mode == "auto" and not given:
    return detect(env, on_tpu_vm)
  launch = _explicit(resolve(coordinator_address, num_processes, process_id, local_device_ids,
                             env), "flags" if given else "JAX_* variables")
  if launch is None and mode == "explicit":
    raise ConfigError("distributed='explicit': no settings; give --coordinator_address, "
                      "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
                      "JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  return launch


def start(launch: Launch | None, *, cpu_collectives: str = "gloo", timeout_s: int = 300) -> bool:
  """Starts the multi-controller runtime for `launch`; True if this run has several processes.

  Call once, before any other JAX call that touches devices; again after a start is a no-op.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if launch is None:
    return False
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  addr, n, pid, ids = launch.settings or (None, None, None, None)
  jax.distributed.initialize(addr, n, pid, ids, cluster_detection_method=launch.jax_method,
                             initialization_timeout=timeout_s)
  return jax.process_count() > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, mode: str | None = None, cpu_collectives: str = "gloo",
               timeout_s: int = 300) -> bool:
  """`start(plan(mode, ...))`: True if the run has several processes (see `plan` for `mode`)."""
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  launch = plan(mode, coordinator_address, num_processes, process_id, local_device_ids)
  return start(launch, cpu_collectives=cpu_collectives, timeout_s=timeout_s)


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
