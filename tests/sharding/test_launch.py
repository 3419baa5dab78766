"""Launching on a cluster: settings from each launcher's environment (4 processes on 127.0.0.1),
one stop step for all processes after a signal reaches one of them, and one-line errors for bad
environments."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st
from jax._src.clusters import SlurmCluster

from deepseek_jax.config import ConfigError
from sharding import distributed
from tests.training.conftest import SMALL      # the training tests' small model

ROOT = pathlib.Path(__file__).resolve().parents[2]
N = 4
READY = "stop_worker: in the loop"      # what stop_worker prints once inside the loop
# Launcher variables of the outer environment must not leak into the processes' own.
LAUNCH_VARS = ("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "JAX_LOCAL_DEVICE_IDS", "JOB_COMPLETION_INDEX", "KUBERNETES_", "OMPI_", "TPU_")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def style_env(style: str, pid: int, port: int, n: int = N) -> dict:
  """What each launcher would set for process `pid` of n (all on 127.0.0.1)."""
  addr = f"127.0.0.1:{port}"
  if style == "explicit":
    return {"JAX_COORDINATOR_ADDRESS": addr, "JAX_NUM_PROCESSES": str(n),
            "JAX_PROCESS_ID": str(pid)}
  if style == "slurm":      # what `srun --ntasks=4` sets on one node; the port as on a real cluster
    return {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(n), "SLURM_PROCID": str(pid),
            "SLURM_LOCALID": str(pid), "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "127.0.0.1",
            "SLURM_JOB_NODELIST": "127.0.0.1", "JAX_COORDINATOR_PORT": str(port)}
  if style == "kubernetes":  # an Indexed Job with a headless service
    return {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "JOB_COMPLETION_INDEX": str(pid),
            "HOSTNAME": f"train-{pid}", "JAX_COORDINATOR_ADDRESS": addr,
            "JAX_NUM_PROCESSES": str(n)}
  if style == "statefulset":  # pods named <set>-<ordinal>
    return {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": f"train-{pid}",
            "JAX_COORDINATOR_ADDRESS": addr, "JAX_NUM_PROCESSES": str(n)}
  raise ValueError(style)


def spawn(style: str, worker: str, *args: str, n: int = N) -> list[subprocess.Popen]:
  port = _free_port()
  base = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
  base.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
  base.pop("XLA_FLAGS", None)
  return [subprocess.Popen([sys.executable, "-m", f"tests.sharding.{worker}", *args], cwd=ROOT,
                           env={**base, **style_env(style, pid, port, n)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for pid in range(n)]


def result_line(out: str) -> dict:
  # Gloo's C++ logging shares stdout and its lines arrive in pieces: find the worker's own line.
  (line,) = [line for line in out.splitlines() if '{"pid"' in line]
  return json.loads(line[line.index('{"pid"'):])


def results(procs: list[subprocess.Popen], timeout: float = 120) -> list[dict]:
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      assert p.returncode == 0, err[-3000:]
      outs.append(result_line(out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return sorted(outs, key=lambda o: o["pid"])


@pytest.mark.parametrize("style", ["explicit", "slurm", "kubernetes"])
def test_four_processes_agree(style):
  outs = results(spawn(style, "launch_worker"))
  assert [o["pid"] for o in outs] == list(range(N))
  for o in outs:
    assert (o["kind"], o["processes"], o["devices"]) == (style, N, 2 * N)
    assert o["total"] == sum(range(2 * N))      # every device's index, summed across processes
    assert o["pids"] == list(range(N))


# SIGTERM is the cluster's notice (4 processes); Ctrl-C is forwarded to it (2 suffice to show it).
@pytest.mark.parametrize("sig, n", [(signal.SIGTERM, N), (signal.SIGINT, 2)])
def test_one_signal_stops_every_process_at_the_same_step(sig, n):
  steps = 20_000                                # minutes of steps: only the signal ends the run
  procs = spawn("explicit", "stop_worker", str(steps), n=n)
  try:
    for p in procs:                             # wait until every process is inside the loop
      for line in p.stdout:
        if READY in line:
          break
      else:
        raise AssertionError(f"a process ended before its loop: {p.stderr.read()[-3000:]}")
    procs[1].send_signal(sig)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  outs = results(procs)
  stop_steps = {o["step"] for o in outs}
  assert len(stop_steps) == 1, outs
  (step,) = stop_steps
  assert 5 < step < steps
  assert [o["pid"] for o in outs] == list(range(n))
  for o in outs:
    assert o["total"] == step * 2 * n           # each step ran on all processes, none beyond
    assert o["stopped_by"] == (sig.name if o["pid"] == 1 else "SIGTERM")


# --- detect / plan on fake environments -----------------------------------------------------

def test_detect_finds_each_launcher():
  assert distributed.detect({}, on_tpu_vm=False) is None
  for style, kind, method in [("explicit", "explicit", "deactivate"), ("slurm", "slurm", "slurm"),
                              ("kubernetes", "kubernetes", "deactivate"),
                              ("statefulset", "kubernetes", "deactivate")]:
    launch = distributed.detect(style_env(style, 3, 1234), on_tpu_vm=False)
    assert (launch.kind, launch.jax_method) == (kind, method), style
    assert launch.settings.num_processes == N and launch.settings.process_id == 3
  slurm = distributed.detect(style_env("slurm", 3, 1234), on_tpu_vm=False)
  assert slurm.settings.coordinator_address is None          # JAX reads the node list itself
  tpu = distributed.detect({"TPU_WORKER_HOSTNAMES": "t0,t1", "TPU_WORKER_ID": "1"}, on_tpu_vm=True)
  assert (tpu.kind, tpu.settings, tpu.jax_method) == ("tpu", None, None)
  ompi = distributed.detect({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5",
                             "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, on_tpu_vm=False)
  assert (ompi.kind, ompi.settings.process_id, ompi.jax_method) == ("openmpi", 5, "ompi")


def test_single_process_environments_are_not_launches():
  batch_script = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}
  one_task_step = {**style_env("slurm", 0, 1), "SLURM_NTASKS": "1"}
  plain_pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": "notebook-0"}
  for env in (batch_script, one_task_step, plain_pod):
    assert distributed.detect(env, on_tpu_vm=False) is None, env


def test_precedence_explicit_over_slurm_over_kubernetes():
  both = {**style_env("slurm", 1, 1), **style_env("kubernetes", 2, 1)}
  assert distributed.detect(both, on_tpu_vm=False).kind == "slurm"
  explicit = {**both, "JAX_PROCESS_ID": "3"}
  assert distributed.detect(explicit, on_tpu_vm=False).settings.process_id == 3


def test_slurm_settings_match_jax_own_reading(monkeypatch):
  env = {**style_env("slurm", 2, 1), "SLURM_STEP_NODELIST": "node[07-10],gpu1"}
  env.pop("JAX_COORDINATOR_PORT")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  s = distributed.detect(env, on_tpu_vm=False).settings
  assert SlurmCluster.is_env_present()
  assert (s.num_processes, s.process_id) == (SlurmCluster.get_process_count(),
                                              SlurmCluster.get_process_id())
  assert SlurmCluster.get_coordinator_address(None, None) == f"node07:{4242 % 4096 + 61440}"


def test_plan_modes():
  env = style_env("slurm", 1, 1)
  assert distributed.plan(None, env=env, on_tpu_vm=False) is None           # default: explicit only
  assert distributed.plan("off", env=style_env("explicit", 1, 1)) is None
  assert distributed.plan("auto", env=env, on_tpu_vm=False).kind == "slurm"
  flags = distributed.plan("auto", "10.0.0.1:9", 2, 1, env=env, on_tpu_vm=False)
  assert (flags.kind, flags.settings) == ("explicit", distributed.Settings("10.0.0.1:9", 2, 1))
  assert distributed.plan("explicit", env=style_env("explicit", 1, 1)).settings.process_id == 1


@pytest.mark.parametrize("style, env, match", [
    ("slurm", {"SLURM_NTASKS": "four"},
     r"SLURM_NTASKS='four': must be an integer"),
    ("slurm", {"SLURM_NTASKS": "0"},
     r"SLURM_NTASKS=0: must be >= 1"),
    ("slurm", {"SLURM_PROCID": "4"},
     r"SLURM_PROCID=4: must be in \[0, 4\) \(SLURM_NTASKS=4\)"),
    ("slurm", {"SLURM_LOCALID": None},
     r"SLURM_LOCALID not set: srun sets it"),
    ("slurm", {"SLURM_STEP_NODELIST": None},
     r"SLURM_STEP_NODELIST not set but SLURM_NTASKS=4"),
    ("slurm", {"SLURM_STEP_NODELIST": "[01-04]"},
     r"SLURM_STEP_NODELIST='\[01-04\]': must start"),
    ("slurm", {"JAX_COORDINATOR_PORT": None, "SLURM_JOB_ID": "12a"},
     r"SLURM_JOB_ID='12a': must be an integer"),
    ("slurm", {"JAX_COORDINATOR_PORT": "70000"},
     r"JAX_COORDINATOR_PORT=70000: must be in \[1, 65536\)"),
    ("slurm", {"JAX_NUM_PROCESSES": "8"},
     r"JAX_NUM_PROCESSES=8: disagrees with SLURM_NTASKS=4"),
    ("slurm", {"JAX_COORDINATOR_ADDRESS": "node1"},
     r"JAX_COORDINATOR_ADDRESS='node1': must read host:port"),
    ("kubernetes", {"JOB_COMPLETION_INDEX": "x"},
     r"JOB_COMPLETION_INDEX='x': must be an integer"),
    ("kubernetes", {"JOB_COMPLETION_INDEX": "4"},
     r"JOB_COMPLETION_INDEX=4: must lie in \[0, JAX_NUM_PROCESSES=4\)"),
    ("kubernetes", {"JAX_NUM_PROCESSES": None},
     r"JAX_NUM_PROCESSES not set: a Kubernetes launch \(JOB_COMPLETION_INDEX=1\)"),
    ("kubernetes", {"JAX_COORDINATOR_ADDRESS": "svc:port"},
     r"JAX_COORDINATOR_ADDRESS='svc:port': must read host:port"),
    ("statefulset", {"HOSTNAME": "train"},
     r"HOSTNAME='train': has no pod ordinal"),
    ("explicit", {"JAX_PROCESS_ID": "9"},
     r"JAX_PROCESS_ID=9: must lie in \[0, JAX_NUM_PROCESSES=4\)"),
    ("explicit", {"JAX_NUM_PROCESSES": "many"},
     r"JAX_NUM_PROCESSES='many': must be an integer"),
    ("explicit", {"JAX_COORDINATOR_ADDRESS": None},
     r"coordinator_address \(JAX_COORDINATOR_ADDRESS\) not set"),
])
def test_bad_environments_raise_one_line(style, env, match):
  full = {k: v for k, v in {**style_env(style, 1, 1234), **env}.items() if v is not None}
  with pytest.raises(ConfigError, match=match) as e:
    distributed.detect(full, on_tpu_vm=False)
  assert "\n" not in str(e.value)


def test_plan_refuses_contradictions():
  with pytest.raises(ConfigError, match=r"distributed='off': drop --coordinator_address"):
    distributed.plan("off", "h:1", 2, 0, env={})
  with pytest.raises(ConfigError, match=r"distributed='explicit': no settings"):
    distributed.plan("explicit", env={})
  with pytest.raises(ConfigError, match=r"distributed='sometimes': must be one of auto"):
    distributed.plan("sometimes", env={})


@given(n=st.integers(1, 4096), data=st.data(),
       style=st.sampled_from(["explicit", "slurm", "kubernetes", "statefulset"]))
def test_any_valid_rank_is_read_back(n, data, style):
  pid = data.draw(st.integers(0, n - 1))
  launch = distributed.detect(style_env(style, pid, 1234, n), on_tpu_vm=False)
  if n == 1 and style == "slurm":
    assert launch is None                         # one task: nothing to start
  else:
    assert (launch.settings.num_processes, launch.settings.process_id) == (n, pid)


def _not_int(text: str) -> bool:
  try:
    int(text)
  except ValueError:
    return True
  return False


@given(value=st.text(min_size=1, max_size=8).filter(_not_int),
       var=st.sampled_from(["SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"]))
def test_any_non_integer_slurm_variable_is_named_with_its_value(value, var):
  env = {**style_env("slurm", 1, 1234), var: value}
  with pytest.raises(ConfigError) as e:
    distributed.detect(env, on_tpu_vm=False)
  message = str(e.value)
  assert message.startswith(f"{var}={value!r}: must be an integer") and "\n" not in message


@pytest.mark.slow      # ~4 minutes on 2 cores: four processes compile the small model side by side
def test_train_py_four_processes_stop_together(tmp_path):
  """`python train.py` itself, 4 processes from SLURM-style variables, SIGTERM to one of them."""
  port, workdir = _free_port(), tmp_path / "run"
  base = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
  base.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
              XLA_FLAGS=("--xla_force_host_platform_device_count=1"
                         " --xla_backend_optimization_level=0"))
  logs = [tmp_path / f"process{i}.txt" for i in range(N)]
  cmd = [sys.executable, str(ROOT / "train.py"), "--distributed", "auto", "--workdir", str(workdir),
         "--steps", "100000", *SMALL, "train.eval_every=100000", "train.checkpoint_every=100000"]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env={**base, **style_env("slurm", i, port)},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
           for i, log in enumerate(logs)]
  try:
    deadline = time.monotonic() + 900
    while not all("compiled train and eval steps" in log.read_text() for log in logs):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          "\n".join(log.read_text()[-2000:] for log in logs)
      time.sleep(1)
    time.sleep(10)                              # some steps into the loop
    procs[2].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [log.read_text() for log in logs]
  assert codes == [128 + signal.SIGTERM] * N, "\n".join(t[-2000:] for t in texts)
  stops = {re.search(r"stopped by SIGTERM at step (\d+)", t).group(1) for t in texts}
  assert len(stops) == 1, stops
  assert "distributed: process 2 of 4, slurm" in texts[2]
  assert (workdir / "checkpoints" / stops.pop()).is_dir()     # one checkpoint, of that step
