"""Test setup: 8 fake CPU devices and a fast XLA:CPU backend (set before jax is imported), strict rank
promotion."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite is compile-bound (hundreds of small programs): skip LLVM's backend optimisation. The HLO
# passes, buffer assignment and numerics are XLA's usual ones; only the machine code is less tuned
# (the suite takes ~40% less time). Set XLA_FLAGS yourself to test with the full pipeline.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                              " --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# CI: fixed examples and no shrinking (a failing model-sized example can take minutes to shrink).
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate))
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
