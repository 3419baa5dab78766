"""Accelerators that need not be present: their numbers and their devices for `jax.jit(...).lower`.

A target is `NAME:SHAPE`: `h100:8` (8 GPUs on one host), `h800:256x8` (256 nodes of 8: the
paper's cluster), `tpu-v5p:2x2x1` (a TPU slice by its torus shape; v5p-8 has 4 chips),
`tpu-v5p:8x8x16/2` (two such slices joined by DCN: multislice). GPU devices come from a device description
written here from the table (XLA's `GpuTargetConfigProto` text: the numbers XLA:GPU compiles by),
TPU devices from libtpu's topology of that name. Peak FLOP/s and bandwidths are the vendors'
dense bf16 and HBM figures; they feed the roofline estimate only.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jax.experimental import topologies

GiB = 1024 ** 3


class TargetError(ValueError):
  """A target string that names no known accelerator or shape."""


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str            # "gpu" or "tpu"
  hbm_bytes: int           # device memory
  peak_bf16: float         # dense bf16 FLOP/s
  hbm_bw: float            # bytes/s
  link_bw: float           # bytes/s per chip for collectives (NVLink / ICI), one direction
  dcn_bw: float            # bytes/s per chip across nodes (InfiniBand NIC / TPU DCN), one direction
  # GPU only: what XLA:GPU compiles by
  sm_count: int = 0
  compute_capability: tuple[int, int] = (0, 0)
  clock_ghz: float = 0.0
  l2_bytes: int = 0
  tpu_kind: str = ""       # TPU only: libtpu's topology prefix ("v5p")


CHIPS = {
    "h100": Chip("NVIDIA H100 80GB HBM3", "gpu", 84942979072, 989e12, 3.35e12, 450e9, 50e9,
                 132, (9, 0), 1.98, 50 * 2 ** 20),
    # The paper's GPU (Insights §2.2.2, §4.1): an H100 die with NVLink cut to 400 GB/s (the paper's
    # figure; ~160 GB/s achievable) and one 400 Gb/s InfiniBand NIC per GPU (50 GB/s, ~40 achievable).
    "h800": Chip("NVIDIA H800 80GB HBM3", "gpu", 84942979072, 989e12, 3.35e12, 400e9, 50e9,
                 132, (9, 0), 1.98, 50 * 2 ** 20),
    "h200": Chip("NVIDIA H200 141GB HBM3e", "gpu", 151397597184, 989e12, 4.8e12, 450e9, 50e9,
                 132, (9, 0), 1.98, 50 * 2 ** 20),
    "a100": Chip("NVIDIA A100-SXM4-80GB", "gpu", 85899345920, 312e12, 2.04e12, 300e9, 25e9,
                 108, (8, 0), 1.41, 40 * 2 ** 20),
    # TPU DCN per chip: the host's NICs shared by its chips (assumed: v5p 4 x 200 Gb/s per 4 chips).
    "tpu-v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459e12, 2.765e12, 600e9, 25e9, tpu_kind="v5p"),
    "tpu-v5e": Chip("TPU v5 lite", "tpu", 16 * GiB, 197e12, 0.819e12, 200e9, 6.25e9,
                    tpu_kind="v5e"),
    "tpu-v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, 1.2e12, 300e9, 12.5e9, tpu_kind="v4"),
    "tpu-v6e": Chip("TPU v6 lite", "tpu", 32 * GiB, 918e12, 1.64e12, 400e9, 12.5e9,
                    tpu_kind="v6e"),
}

# JAX preallocates this share of GPU memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_PREALLOCATE = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  key: str                 # "h200"
  chip: Chip
  shape: tuple[int, ...]   # GPUs: (hosts, per host); TPUs: the torus of one slice
  slices: int = 1          # TPU multislice: slices joined by DCN

  @property
  def num_devices(self) -> int:
    return math.prod(self.shape) * self.slices

  @property
  def nodes(self) -> int:
    """Units joined by the slower network: GPU hosts, TPU slices."""
    return self.shape[0] if self.chip.platform == "gpu" else self.slices

  @property
  def usable_bytes(self) -> int:
    """What a JAX process can use by default: 75% of HBM on GPU (preallocation), all on TPU."""
    frac = GPU_PREALLOCATE if self.chip.platform == "gpu" else 1.0
    return int(self.chip.hbm_bytes * frac)

  def __str__(self) -> str:
    return (f"{self.key}:{'x'.join(map(str, self.shape))}"
            + (f"/{self.slices}" if self.slices > 1 else ""))


def parse_target(text: str) -> Target:
  """'h200:1', 'h100:2x8', 'tpu-v5p:2x2x1' -> Target; TargetError naming the rule otherwise."""
  key, _, shape = text.partition(":")
  if key not in CHIPS:
    raise TargetError(f"--target={text!r}: unknown accelerator {key!r}; known: "
                      f"{', '.join(sorted(CHIPS))}")
  chip = CHIPS[key]
  shape, _, slices_text = shape.partition("/")
  try:
    dims = tuple(int(d) for d in (shape or "1").split("x"))
  except ValueError:
    dims = ()
  try:
    slices = int(slices_text or "1")
  except ValueError:
    slices = 0
  if not dims or any(d <= 0 for d in dims):
    raise TargetError(f"--target={text!r}: shape {shape!r} must be positive integers joined by "
                      "'x' (GPUs: N or HOSTSxN; TPUs: the torus, e.g. 2x2x1)")
  if slices < 1 or (slices > 1 and chip.platform != "tpu"):
    raise TargetError(f"--target={text!r}: '/SLICES' must be a positive integer, and only TPUs "
                      "have slices (GPU nodes: HOSTSxN)")
  if chip.platform == "gpu" and len(dims) > 2:
    raise TargetError(f"--target={text!r}: a GPU shape is N or HOSTSxN")
  if chip.platform == "gpu" and len(dims) == 1:
    dims = (1, dims[0])
  return Target(key, chip, dims, slices)


def gpu_spec(chip: Chip) -> str:
  """XLA's GpuTargetConfigProto text for `chip` (the fields XLA:GPU compiles by)."""
  major, minor = chip.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {233472 if major >= 9 else 167936}
  threads_per_core_limit: 2048
  core_count: {chip.sm_count}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bw)}
  l2_cache_size: {chip.l2_bytes}
  clock_rate_ghz: {chip.clock_ghz}
  device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {232448 if major >= 9 else 166912}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{chip.name}"
"""


def devices(target: Target) -> list:
  """The target's devices, for meshes and shardings; compiling needs only these.

  Needs the platform's plugin: `pip install 'deepseek-jax[gpu]'` or `[tpu]`, and JAX_PLATFORMS=cpu
  on a host without the accelerator (`python -m deepseek_jax.aot` sets it)."""
  try:
    if target.chip.platform == "gpu":
      hosts, per_host = target.shape
      topo = topologies.get_topology_desc(topology_name="", platform="cuda",
                                          target_config=gpu_spec(target.chip),
                                          topology=f"1x{hosts}x{per_host}")
    else:
      os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
      topo = topologies.get_topology_desc(
          topology_name=f"{target.chip.tpu_kind}:{'x'.join(map(str, target.shape))}",
          platform="tpu", **({"num_slices": target.slices} if target.slices > 1 else {}))
  except Exception as e:  # the plugin's errors are long and say little to a user
    extra = "gpu" if target.chip.platform == "gpu" else "tpu"
    why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    hint = ("" if "INVALID_ARGUMENT" in why else
            f"; install the compiler with pip install 'deepseek-jax[{extra}]' and run with "
            "JAX_PLATFORMS=cpu")
    raise TargetError(f"--target={target}: cannot build the {target.chip.platform.upper()} "
                      f"topology ({why}){hint}") from None
  devs = list(topo.devices)
  if len(devs) != target.num_devices:
    raise TargetError(f"--target={target}: the topology has {len(devs)} devices, expected "
                      f"{target.num_devices}")
  return devs
