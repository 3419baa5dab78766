"""The CPU latent decode kernel (`latent_decode.cc`): built, loaded, registered, and called.

XLA:CPU runs the absorbed decode attention as a loop of blocks whose dynamic slices it copies
before two separate dots, about two passes over the cache plus a fixed cost per op
(bench/results/DECODE.md). `latent_decode.cc` reads each cached slot once and folds it into an
online softmax while it sits in L1, split over XLA's intra-op threads.

Built on first use with the system C++ compiler (`$CXX`, else `c++`) against jaxlib's FFI headers,
into `$DEEPSEEK_JAX_KERNEL_CACHE` (default `~/.cache/deepseek_jax/kernels`), one file per source,
flags, jax version and machine, written under a temporary name and renamed (two processes building
at once both succeed). Where no compiler is found, the build fails, or `DEEPSEEK_JAX_CPU_KERNELS=0`,
`available()` is False and the model keeps XLA's path: the two compute the same function
(tests/test_latent_kernel.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from deepseek_jax.vma import varying_like

SOURCES = tuple(pathlib.Path(__file__).with_name(f) for f in ("latent_decode.cc", "moe_decode.cc"))
HEADERS = tuple(pathlib.Path(__file__).with_name(f) for f in ("simd.h", "parallel.h"))
TARGET = "deepseek_jax_latent_decode"
WRITE_TARGET = "deepseek_jax_latent_write"
MOE_TARGET = "deepseek_jax_moe_decode"
ENABLE_ENV = "DEEPSEEK_JAX_CPU_KERNELS"
CACHE_ENV = "DEEPSEEK_JAX_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
CACHE_DTYPES = {(jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)),
                (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16)),
                (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.bfloat16))}
MAX_ROWS = 64   # query rows (T x N) per batch row; above it the scores are a matmul: XLA's job
_DISABLED = contextvars.ContextVar("deepseek_jax_cpu_kernels_disabled", default=False)


@contextlib.contextmanager
def disabled():
  """Functions traced inside keep XLA's path (tests and benchmarks compare the two). The choice is
  made when tracing and is not part of jit's cache key: a function already traced outside keeps
  the kernel inside (and the reverse); trace a new function, or `jax.clear_caches()` first."""
  token = _DISABLED.set(True)
  try:
    yield
  finally:
    _DISABLED.reset(token)


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(CACHE_ENV) or
                      pathlib.Path.home() / ".cache" / "deepseek_jax" / "kernels")


def _host() -> bytes:
  """What `-march=native` compiles for: the machine and its CPU's feature flags."""
  try:
    flags = [line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith(("flags", "Features", "model name"))][:2]
  except OSError:
    flags = []
  return "\n".join([platform.machine(), platform.processor(), *flags]).encode()


def _build() -> pathlib.Path | None:
  """The shared library, built if missing; None when it cannot be built here."""
  cxx = shlex.split(os.environ.get("CXX", "c++"))
  if not cxx or shutil.which(cxx[0]) is None:
    return None
  key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in SOURCES + HEADERS),
                                   " ".join(cxx + list(FLAGS)).encode(),
                                   jax.__version__.encode(), _host()])).hexdigest()[:16]
  out = _cache_dir() / f"latent_decode-{key}.so"
  if out.exists():
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
      part = pathlib.Path(tmp) / out.name
      subprocess.run([*cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o",
                      str(part)],
                     check=True, capture_output=True, timeout=300)
      os.replace(part, out)
  except (OSError, subprocess.SubprocessError) as e:
    global build_error
    stderr = getattr(e, "stderr", None) or b""
    build_error = f"{e}: {stderr.decode(errors='replace')[-2000:]}"
    return None
  return out


build_error: str | None = None   # why the last build failed (the compiler's last words)


@functools.cache
def available() -> bool:
  """True when the kernel is built, loaded and registered for the CPU platform."""
  if os.environ.get(ENABLE_ENV, "1") == "0":
    return False
  path = _build()
  if path is None:
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LatentDecode), platform="cpu")
    jax.ffi.register_ffi_target(WRITE_TARGET, jax.ffi.pycapsule(lib.LatentWrite), platform="cpu")
    jax.ffi.register_ffi_target(MOE_TARGET, jax.ffi.pycapsule(lib.MoeDecode), platform="cpu")
  except (OSError, AttributeError):
    return False
  return True


def choose(use: bool, cpu, default, *args):
  """`cpu(*args)` where the program runs on the CPU and `use` holds, else `default(*args)`: the
  one switch between a kernel of this module and XLA's path (`jax.lax.platform_dependent`).
  Inside a `shard_map` the kernel's outputs are typed as varying over every manual axis an
  input varies over, as XLA's path's are (a custom call's result carries no such type)."""
  if not use:
    return default(*args)

  def kernel(*a):
    refs = jax.tree.leaves(a)
    return jax.tree.map(lambda out: varying_like(out, refs), cpu(*a))
  return jax.lax.platform_dependent(*args, cpu=kernel, default=default)


def applies(q_lat_BTNC, lat, rope) -> bool:
  """Whether `latent_decode` takes this call: the kernel is available, the query rows are few
  (decoding: T x N <= MAX_ROWS) and the cache dtypes are ones it reads. (Under a jit sharded over
  several devices XLA's partitioner replicates a custom call's operands: right, but gathered;
  the project's CPU meshes are for tests.)"""
  _, T, N, _ = q_lat_BTNC.shape
  return (not _DISABLED.get() and T * N <= MAX_ROWS
          and (jnp.dtype(lat.dtype), jnp.dtype(rope.dtype)) in CACHE_DTYPES and available())


def latent_decode(q_lat_BTNC, q_rope_BTNR, lat, rope, positions_BT, layer, scale, table=None):
  """softmax(scale (q_lat . c_KV + q_rope . k_R)) . c_KV over each query's slots <= its position,
  read in place. -> [B, T, N, C] in the query's dtype; a query that sees no slot gets zeros.

  Contiguous (`table=None`): the cache `lat` [B, S, C] / `rope` [B, S, R], or layer `layer` of
  `[L, B, S, .]` stacks. Paged: pools [(L,) NB, P, C] / [(L,) NB, P, R] and the block table
  [B, MB]: row b's slot s is block table[b, s // P], offset s % P (entries must lie in the pool).
  CPU only: callers choose it under `jax.lax.platform_dependent` (`mla.latent_attention`,
  `generate.paged`)."""
  B, T, N, C = q_lat_BTNC.shape
  if lat.ndim == 3 or layer is None:   # one layer, no L axis
    lat, rope, layer = (lat[None], rope[None], 0) if lat.ndim == 3 else (lat, rope, 0)
  if table is None:   # a contiguous cache: B blocks of S slots, row b's table [b]
    table = jnp.arange(B, dtype=jnp.int32)[:, None]
  q_lat = (q_lat_BTNC.astype(jnp.float32) * scale).reshape(B, T * N, C)
  q_rope = (q_rope_BTNR.astype(jnp.float32) * scale).reshape(B, T * N, -1)
  pos = jnp.repeat(positions_BT.astype(jnp.int32), N, axis=1)
  out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((B, T * N, C), jnp.float32),
                         vmap_method="sequential")(
      q_lat, q_rope, lat, rope, table.astype(jnp.int32), pos, jnp.asarray(layer, jnp.int32))
  return out.reshape(B, T, N, C).astype(q_lat_BTNC.dtype)


NARROW = {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float8_e4m3fn)}


def write_applies(cache) -> bool:
  """Whether `latent_write` takes a cache write: a bf16 or e4m3 cache (XLA:CPU widens their
  dynamic-update-slice to f32 over the whole cache; f32 updates are in place already)."""
  return not _DISABLED.get() and jnp.dtype(cache.dtype) in NARROW and available()


def latent_write(cache, new_BTW, rows_BT, layer=None):
  """`cache` [(L,) NB, P, W] with new_BTW [B, T, W] written at rows (block * P + offset) rows_BT
  of layer `layer` (rows < 0 skipped), in place (the output aliases the cache). CPU only."""
  squeeze = cache.ndim == 3
  c = cache[None] if squeeze else cache
  out = jax.ffi.ffi_call(WRITE_TARGET, jax.ShapeDtypeStruct(c.shape, c.dtype),
                         input_output_aliases={0: 0}, vmap_method="sequential")(
      c, new_BTW.astype(c.dtype), rows_BT.astype(jnp.int32),
      jnp.asarray(0 if layer is None or squeeze else layer, jnp.int32))
  return out[0] if squeeze else out


MAX_MOE_TOKENS = 64   # tokens of a decode step; above it XLA's blocks are real matmuls


def moe_applies(x_XD, w_gate_EDM) -> bool:
  """Whether `moe_decode` takes a routed-expert call: the kernel is available, the tokens few
  (decoding: <= MAX_MOE_TOKENS) and tokens and weights f32 (its sums are f32: a bf16 model
  keeps XLA's bf16 dots)."""
  f32 = jnp.dtype(jnp.float32)
  return (not _DISABLED.get() and x_XD.shape[0] <= MAX_MOE_TOKENS
          and jnp.dtype(x_XD.dtype) == f32 and jnp.dtype(w_gate_EDM.dtype) == f32 and available())


def moe_decode(x_XD, experts_XK, w_gate_EDM, w_up_EDM, w_down_EMD):
  """Each (token, k)'s expert SwiGLU FFN, silu(x W_gate[e]) * (x W_up[e]) @ W_down[e] for
  e = experts_XK[x, k] (zeros for ids outside [0, E)), each hit expert's weights read once in
  place -> y_XKD f32 [X, K, D], not yet weighted by the gates. CPU only (`dispatch.dropless_ffn`
  takes it under `choose`)."""
  X, D = x_XD.shape
  K = experts_XK.shape[1]
  return jax.ffi.ffi_call(MOE_TARGET, jax.ShapeDtypeStruct((X, K, D), jnp.float32),
                          vmap_method="sequential")(
      x_XD, experts_XK.astype(jnp.int32), w_gate_EDM, w_up_EDM, w_down_EMD)
