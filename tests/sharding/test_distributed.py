"""Multi-controller: two processes on 127.0.0.1 (2 x 4 CPU devices, gloo) == one process of 8."""

import json
import os
import socket
import subprocess
import sys

import pytest

from deepseek_jax.config import ConfigError
from sharding import distributed
from tests.sharding import common

CFG = common.small_cfg(num_layers=2, num_mtp_layers=0)
SHAPE = (1, 1, 4, 2)   # the expert axis spans both processes: the all-to-all crosses them


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one():
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(common.ROOT))
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "tests.sharding.two_process_worker"]
  procs = [subprocess.Popen(cmd + [str(pid), str(port), ",".join(map(str, SHAPE))],
                            cwd=common.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=400)
      assert p.returncode == 0, err[-3000:]
      outs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  one = common.init_loss(CFG, SHAPE)
  for o in outs:
    assert (o["devices"], o["local_devices"], o["processes"]) == (8, 4, 2)
    assert o["loss"] == pytest.approx(one, rel=1e-6)


def test_resolve_settings():
  assert distributed.resolve(env={}) is None
  s = distributed.resolve(env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                               "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"})
  assert s == distributed.Settings("10.0.0.1:1234", 4, 3, (0, 1))
  s = distributed.resolve("127.0.0.1:99", 2, 0, env={"JAX_PROCESS_ID": "1"})
  assert s.process_id == 0


@pytest.mark.parametrize("kw, match", [
    (dict(num_processes=2, process_id=0),
     r"coordinator_address \(JAX_COORDINATOR_ADDRESS\) not set"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2),
     r"process_id=2: must lie in \[0, num_processes=2\)"),
    (dict(coordinator_address="h:1", num_processes="two", process_id=0),
     r"num_processes='two': must be an integer"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0),
     r"coordinator_address='localhost': must read host:port"),
])
def test_resolve_errors(kw, match):
  with pytest.raises(ConfigError, match=match):
    distributed.resolve(env={}, **kw)


def test_single_process_is_a_no_op():
  assert distributed.initialize() is False
