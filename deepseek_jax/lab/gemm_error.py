"""The accumulator models' GEMM error, no training (`python -m deepseek_jax.lab accumulator
--predict`): the H200 measurement (bench/results/gpu_h200_fp8.log) against the Hopper block FMA
(`fp8/blockfma.py`) and the older `limited` model, and DeepSeek's "nearly 2%" at K = 4096 (V3
report §3.3.2) by input distribution and K.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.fp8 import accumulate
from deepseek_jax.fp8.formats import E4M3
from deepseek_jax.fp8.scaling import Scaling, quantize

H200_LOG = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_h200_fp8.log"
MODELS = {"hopper": accumulate.hopper(13, True, None),
          "limited": accumulate.limited(13, True, None),
          "hopper /128": accumulate.hopper(13, True, 128)}


def h200_measured(path=H200_LOG) -> float | None:
  """bench/gpu_fp8.py's 'fp8_gemm_f32out' error against the f32 emulator on an H200."""
  try:
    return json.loads(pathlib.Path(path).read_text().strip().splitlines()[-1])[
        "rel_err"]["fp8_gemm_f32out"]["vs_emulator"]
  except (OSError, ValueError, KeyError, IndexError):
    return None


def _errors(qa, qb, models) -> dict[str, tuple[float, float]]:
  """{model: (relative Frobenius error, max |error| / max |exact|)} against float64."""
  exact = np.asarray(qa.dequantize(), np.float64)[0] @ np.asarray(qb.dequantize(), np.float64)[0]
  out = {}
  for name in models:
    y = np.asarray(_gemm(qa, qb, MODELS[name])[0], np.float64)
    out[name] = (float(np.linalg.norm(y - exact) / np.linalg.norm(exact)),
                 float(np.max(np.abs(y - exact)) / np.max(np.abs(exact))))
  return out


_gemm = jax.jit(accumulate.gemm, static_argnums=2)


def _per_tensor(x, contract):
  return quantize(x[None], E4M3, Scaling("tensor", pow2=False), contract)


def h200_prediction(rows: int = 32) -> dict[str, tuple[float, float]]:
  """bench/gpu_fp8.py's operands exactly (x 2048x4096 ~ N(0,1), w ~ N(0,1)/sqrt(4096), bf16,
  per-tensor E4M3 scales, seed 0) through each model; `rows` of the 2048 output rows (the error
  is a mean over independent elements: 32 rows hold 65,536 of them)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2048, 4096)), jnp.float32).astype(jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((4096, 2048)) / np.sqrt(4096), jnp.float32)
  qx, qw = _per_tensor(x, 2), _per_tensor(w.astype(jnp.bfloat16), 1)
  qx = dataclasses.replace(qx, data=qx.data[:, :rows])
  return _errors(qx, qw, ("hopper", "limited"))


DISTRIBUTIONS = {"N(0,1)": lambda rng, s: rng.standard_normal(s),
                 "N(0.5,1)": lambda rng, s: rng.normal(0.5, 1.0, s),
                 "N(1,1)": lambda rng, s: rng.normal(1.0, 1.0, s),
                 "U(0,1)": lambda rng, s: rng.random(s)}


def k_sweep(ks=(4096, 8192), rows: int = 32, cols: int = 256, seed: int = 0,
            dists=tuple(DISTRIBUTIONS), models=tuple(MODELS)) -> list:
  """[(distribution, K, {model: (frobenius, max-relative)})]: both operands drawn from the
  distribution, per-tensor E4M3, no promotion (and /128 for the fix)."""
  out = []
  for name in dists:
    draw = DISTRIBUTIONS[name]
    for k in ks:
      rng = np.random.default_rng(seed)
      a = jnp.asarray(draw(rng, (rows, k)), jnp.float32)
      b = jnp.asarray(draw(rng, (k, cols)), jnp.float32)
      out.append((name, k, _errors(_per_tensor(a, 2), _per_tensor(b, 1), models)))
  return out


def predict_lines(rows: int = 32) -> list[str]:
  measured = h200_measured()
  h = h200_prediction(rows)
  lines = ["== The H200 measurement (bench/gpu_fp8.py 'fp8_gemm_f32out': 2048x4096x2048, N(0,1), "
           "per-tensor E4M3, cuBLASLt FP8 GEMM vs the f32 emulator; relative Frobenius) ==",
           f"  measured on H200        {measured:.3e}" if measured is not None else
           "  measured on H200        (bench/results/gpu_h200_fp8.log not found)"]
  for name, (fro, _) in h.items():
    ratio = f"  ({fro / measured:.2f}x the measurement)" if measured else ""
    lines.append(f"  model {name:<17s} {fro:.3e}{ratio}")
  lines += ["== 'Nearly 2%' at K = 4096 (V3 report §3.3.2): both operands from the distribution, "
            "per-tensor E4M3, no promotion unless '/128'; Frobenius / max-relative ==",
            "  distribution      K   " + "  ".join(f"{m:>19s}" for m in MODELS)]
  for dist, k, errs in k_sweep(rows=rows):
    lines.append(f"  {dist:<10s} {k:>6d}   " + "  ".join(
        f"{100 * f:8.3f}% /{100 * m:7.3f}%" for f, m in errs.values()))
  return lines
