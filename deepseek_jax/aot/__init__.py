"""Compiling for accelerators that are not here (`python -m deepseek_jax.aot`).

XLA:GPU and XLA:TPU compile on a CPU-only host: `targets` gives the devices of an H100/H200/TPU
slice, `training.build` builds the real sharded step over them, and `report` reads what XLA made of
it: per-device memory against HBM, FLOPs against the model's, kernels, collectives and a roofline
step-time estimate. Speed from here is an estimate; memory and FLOPs are XLA's own.
This package's `__init__` imports nothing, so the command can set JAX_PLATFORMS before jax loads.
"""
