"""One of the processes of test_launch (2 fake CPU devices each); prints one JSON line.

Its settings come from the environment (`distributed.plan("auto")`): JAX_* variables, SLURM's or a
Kubernetes Job's, as the test sets them. Every device contributes its global index to one sum
across the processes.
"""

import json
import os

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2"   # and a fast backend
                             " --xla_backend_optimization_level=0")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  from sharding import distributed

  launch = distributed.plan("auto")
  assert distributed.start(launch, timeout_s=60)
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  ids = jax.make_array_from_callback((jax.device_count(),), NamedSharding(mesh, P("d")),
                                     lambda idx: np.arange(jax.device_count())[idx])
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ids)
  pids = multihost_utils.process_allgather(jnp.int32(jax.process_index()))
  print(json.dumps({"pid": jax.process_index(), "processes": jax.process_count(),
                    "kind": launch.kind, "devices": jax.device_count(), "total": int(total),
                    "pids": pids.tolist()}), flush=True)
  jax.distributed.shutdown()
