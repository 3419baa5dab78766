"""One of two processes (4 fake CPU devices each) for test_distributed; prints its loss as JSON."""

import json
import os
import sys

if __name__ == "__main__":
  pid, port = int(sys.argv[1]), int(sys.argv[2])
  shape = tuple(int(s) for s in sys.argv[3].split(","))
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4"   # and a fast backend (speed only)
                               " --xla_backend_optimization_level=0")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  from sharding import distributed

  assert distributed.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=120)
  from tests.sharding import common
  from tests.sharding.test_distributed import CFG

  loss = common.init_loss(CFG, shape)
  print(json.dumps({"pid": pid, "loss": loss, "devices": jax.device_count(),
                    "local_devices": jax.local_device_count(),
                    "processes": jax.process_count()}), flush=True)
  jax.distributed.shutdown()
