"""`fp8_dot_general`: one custom_vjp holding all FP8 GEMM numerics (V3 report §3.3, Fig. 6).

A drop-in for `jax.lax.dot_general` at the seam of `layers.Dense`. Operands are canonicalised to
`[batch, rows, k] x [batch, k, cols]`; fprop (y = x w), dgrad (dx = g w^T) and wgrad (dw = x^T g)
quantise their two operands each as a `GemmSpec`'s six slots say, and accumulate per its `Accum`.
`fp8_swiglu_dot_general` multiplies silu(gate) * up, caching gate and up in FP8 (V3 §3.3.3).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax.fp8 import delayed
from deepseek_jax.fp8.accumulate import BACKENDS, Accum, gemm, promote
from deepseek_jax.fp8.formats import E4M3, Format
from deepseek_jax.fp8.scaling import (BLOCK, QArray, Scaling, fake_quantize, fp8_bytes,
                                     loop_bytes, quantize, quantize_with_values, tensor_amax,
                                     unquantized)

SLOTS = ("fprop_x", "fprop_w", "dgrad_g", "dgrad_w", "wgrad_x", "wgrad_g")
_COLUMN = {"fprop_x": 0, "wgrad_x": 0, "fprop_w": 1, "dgrad_w": 1, "dgrad_g": 2, "wgrad_g": 2}


@dataclasses.dataclass(frozen=True)
class Operand:
  """How one GEMM operand slot is quantised."""
  fmt: Format = E4M3
  scaling: Scaling = Scaling()


# DeepSeek-V3's operands: E4M3 everywhere, 1x128 tiles for activations and gradients, 128x128
# blocks for weights, power-of-two scales. DeepGEMM floors amax at 1e-4, which assumes gradients
# near 1 (a loss scale); our losses are means with gradients down to ~1e-8, so gradient slots
# use the smallest floor instead (a 1e-4 floor would push such tiles into E4M3's subnormals).
GRAD_AMAX_FLOOR = 1e-30
X_TILE = Operand(E4M3, Scaling("tile"))
W_BLOCK = Operand(E4M3, Scaling("block", tile=BLOCK))
G_TILE = Operand(E4M3, Scaling("tile", amax_floor=GRAD_AMAX_FLOOR))


@dataclasses.dataclass(frozen=True)
class GemmSpec:
  """Formats and scaling of the six operand slots, accumulation, activation cache, backend.

  The defaults are DeepSeek-V3's recipe (policy preset `deepseek_v3`)."""
  fprop_x: Operand | None = X_TILE
  fprop_w: Operand | None = W_BLOCK
  dgrad_g: Operand | None = G_TILE
  dgrad_w: Operand | None = W_BLOCK
  wgrad_x: Operand | None = X_TILE
  wgrad_g: Operand | None = G_TILE
  accum: Accum = promote(128)
  cache: str = "fp8"                # backward reads x from fprop's FP8 copy ('fp8') or x ('hp')
  cache_fmt: Format | None = None   # cache x in this format (1x128, pow2) instead of fprop's copy
  backend: str = "emulate"
  # x = silu(gate) * up (a SwiGLU's down projection): cache gate and up in this format (1x128,
  # pow2) and recompute x in the backward instead of caching x (V3 §3.3.3); None: cache x.
  swiglu_cache: Format | None = None

  def __post_init__(self):
    for s in SLOTS:
      v = getattr(self, s)
      if v is not None and not isinstance(v, Operand):
        raise ValueError(f"GemmSpec.{s}={v!r}: must be an Operand or None (high precision)")
    for name in ("cache_fmt", "swiglu_cache"):
      if getattr(self, name) is not None and not isinstance(getattr(self, name), Format):
        raise ValueError(f"GemmSpec.{name}={getattr(self, name)!r}: must be a Format or None")
    if self.cache not in ("fp8", "hp"):
      raise ValueError(f"GemmSpec.cache={self.cache!r}: must be 'fp8' or 'hp'")
    if self.backend not in BACKENDS:
      raise ValueError(f"GemmSpec.backend={self.backend!r}: must be one of {BACKENDS}")
    hist = {o.scaling.history for o in self.operands() if o.scaling.mode == "delayed"}
    if len(hist) > 1:
      raise ValueError(f"GemmSpec: delayed slots disagree on history length {sorted(hist)}; "
                       "one site keeps one history")
    if hist and self.swiglu_cache is not None:
      raise ValueError("GemmSpec: swiglu_cache with delayed scaling: the SwiGLU path carries no "
                       "amax history; use current scaling")

  def operands(self):
    return [getattr(self, s) for s in SLOTS if getattr(self, s) is not None]

  @property
  def delayed(self) -> bool:
    return any(o.scaling.mode == "delayed" for o in self.operands())

  @property
  def history(self) -> int:
    return max((o.scaling.history for o in self.operands() if o.scaling.mode == "delayed"),
               default=0)

  @property
  def reuse_weight(self) -> bool:
    w = self.fprop_w
    return (w is not None and w == self.dgrad_w and
            (w.scaling.granularity == "tensor" or w.scaling.granularity == "block"))


@dataclasses.dataclass(frozen=True)
class _Static:
  spec: GemmSpec
  out_dtype: Any
  x_dtype: Any
  w_dtype: Any


def _amax(a, slot: Operand, est, col: int):
  if slot.scaling.mode != "delayed":
    return None
  # An empty history or no state: the current amax.
  return tensor_amax(a) if est is None else jnp.where(est[col] > 0, est[col], tensor_amax(a))


def _quantize(a, slot: Operand | None, contract: int, est, col: int) -> QArray:
  if slot is None:
    return unquantized(a, contract)
  return quantize(a, slot.fmt, slot.scaling, contract, _amax(a, slot, est, col))


def operand_values(a, slot: Operand | None, contract: int, est=None, col: int = 0) -> jax.Array:
  """f32 values of the quantised operand (`_quantize(...).dequantize()`), no FP8 bytes; `est`
  and `col` give a delayed slot its amax estimate (None: the current amax)."""
  if slot is None:
    return a.astype(jnp.float32)
  return fake_quantize(a, slot.fmt, slot.scaling, contract, _amax(a, slot, est, col))


def _with_values(a, slot: Operand | None, contract: int, est, col: int):
  if slot is None:
    return unquantized(a, contract), a.astype(jnp.float32)
  return quantize_with_values(a, slot.fmt, slot.scaling, contract, _amax(a, slot, est, col))


def _fast(spec: GemmSpec) -> bool:
  """Emulation on dequantised f32 values: equal to the QArray GEMM when scales factor exactly
  out of each partial sum (power-of-two scales) or accumulation is one f32 dot anyway. XLA:CPU
  converts FP8 in scalar code, so this skips every conversion but the cached copies' bytes."""
  return spec.backend == "emulate" and (
      spec.accum.mode == "f32" or all(o.scaling.pow2 for o in spec.operands()))


def _values_gemm(a, b, spec: GemmSpec) -> jax.Array:
  """f32 `[batch, rows, cols]` of prepared f32 `a [batch, rows, k]`, `b [batch, k, cols]`."""
  return gemm(unquantized(a, 2), unquantized(b, 1), spec.accum)


def _fwd(x, w, state, st: _Static):
  spec = st.spec
  est = None if state is None else delayed.estimates(state)
  cache_x = spec.cache == "fp8" and spec.fprop_x is not None and spec.cache_fmt is None
  if _fast(spec):
    if cache_x:
      qx, x_val = _with_values(x, spec.fprop_x, 2, est, _COLUMN["fprop_x"])
    else:
      qx, x_val = None, operand_values(x, spec.fprop_x, 2, est, _COLUMN["fprop_x"])
    if spec.reuse_weight:
      qw, w_val = _with_values(w, spec.fprop_w, 1, est, _COLUMN["fprop_w"])
    else:
      qw, w_val = None, operand_values(w, spec.fprop_w, 1, est, _COLUMN["fprop_w"])
    y = _values_gemm(x_val, w_val, spec).astype(st.out_dtype)
  else:
    qx = _quantize(x, spec.fprop_x, 2, est, _COLUMN["fprop_x"])
    qw = _quantize(w, spec.fprop_w, 1, est, _COLUMN["fprop_w"])
    y = gemm(qx, qw, spec.accum, spec.backend).astype(st.out_dtype)
  if spec.cache == "fp8" and spec.cache_fmt is not None:   # V3's E5M6 cache of o_proj's input
    x_res = quantize(x, spec.cache_fmt, Scaling("tile"), 2)
  else:
    x_res = qx if cache_x else x
  w_res = qw if spec.reuse_weight else w
  obs_xw = None if state is None else jnp.stack([tensor_amax(x), tensor_amax(w)])
  return y, (x_res, w_res, state, obs_xw)


def _bwd(st: _Static, res, g):
  spec = st.spec
  x_res, w_res, state, obs_xw = res
  est = None if state is None else delayed.estimates(state)
  g = g.astype(jnp.float32)
  x_hp = x_res.dequantize() if isinstance(x_res, QArray) else x_res
  if _fast(spec):
    g_val = operand_values(g, spec.dgrad_g, 2, est, _COLUMN["dgrad_g"])
    w_val = (w_res.dequantize() if isinstance(w_res, QArray)
             else operand_values(w_res, spec.dgrad_w, 2, est, _COLUMN["dgrad_w"]))
    dx = _values_gemm(g_val, w_val.swapaxes(1, 2), spec)
    x_t = operand_values(x_hp, spec.wgrad_x, 1, est, _COLUMN["wgrad_x"])
    g_t = operand_values(g, spec.wgrad_g, 1, est, _COLUMN["wgrad_g"])
    dw = _values_gemm(x_t.swapaxes(1, 2), g_t, spec)
  else:
    qg = _quantize(g, spec.dgrad_g, 2, est, _COLUMN["dgrad_g"])
    qw = w_res if isinstance(w_res, QArray) else _quantize(w_res, spec.dgrad_w, 2, est,
                                                          _COLUMN["dgrad_w"])
    dx = gemm(qg, qw.T, spec.accum, spec.backend)
    qx_t = _quantize(x_hp, spec.wgrad_x, 1, est, _COLUMN["wgrad_x"])
    qg_t = _quantize(g, spec.wgrad_g, 1, est, _COLUMN["wgrad_g"])
    dw = gemm(qx_t.T, qg_t, spec.accum, spec.backend)
  obs = None
  if state is not None:
    obs = delayed.observation(jnp.concatenate([obs_xw, tensor_amax(g)[None]]), state)
  return dx.astype(st.x_dtype), dw.astype(st.w_dtype), obs


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_gemm(x, w, state, st: _Static):
  return _fwd(x, w, state, st)[0]


_fp8_gemm.defvjp(_fwd, _bwd)

# The SwiGLU input cache's tiles: 1x128 along the down projection's contraction, pow2 scales.
SWIGLU_SCALING = Scaling("tile")


def swiglu_cache(a, fmt: Format) -> QArray:
  """`[batch, rows, k]` gate or up quantised for the SwiGLU cache (FP8 bytes and scales)."""
  return quantize(a, fmt, SWIGLU_SCALING, 2)


def swiglu(gate, up):
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up, w, st: _Static):
  y, (_, w_res, _, _) = _fwd(swiglu(gate, up), w, None, st)
  fmt = st.spec.swiglu_cache
  return y, (loop_bytes(swiglu_cache(gate, fmt)), loop_bytes(swiglu_cache(up, fmt)), w_res)


def _swiglu_bwd(st: _Static, res, g):
  q_gate, q_up, w_res = res
  gate, up = (fp8_bytes(q).dequantize().astype(st.x_dtype) for q in (q_gate, q_up))
  x, swiglu_vjp = jax.vjp(swiglu, gate, up)   # x recomputed from the cached FP8 inputs
  dx, dw, _ = _bwd(st, (x, w_res, None, None), g)
  return (*swiglu_vjp(dx), dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swiglu_gemm(gate, up, w, st: _Static):
  return _swiglu_fwd(gate, up, w, st)[0]


_swiglu_gemm.defvjp(_swiglu_fwd, _swiglu_bwd)


def _canonical_dims(lhs_ndim, rhs_ndim, dimension_numbers):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) % n for d in ds) for ds, n in
                      ((lc, lhs_ndim), (rc, rhs_ndim), (lb, lhs_ndim), (rb, rhs_ndim)))
  except (TypeError, ValueError):
    raise ValueError(f"fp8_dot_general: dimension_numbers={dimension_numbers!r} must read "
                     "((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))") from None
  if len(lc) != len(rc) or len(lb) != len(rb) or not lc:
    raise ValueError(f"fp8_dot_general: dimension_numbers={dimension_numbers!r}: contracting and "
                     "batch dims must pair up, with at least one contracting dim")
  lf = tuple(d for d in range(lhs_ndim) if d not in lc and d not in lb)
  rf = tuple(d for d in range(rhs_ndim) if d not in rc and d not in rb)
  return lc, rc, lb, rb, lf, rf


def _canonical(lhs, rhs, dimension_numbers, preferred_element_type, spec: GemmSpec):
  """(to_x3, w3, st, out_shape): `to_x3` maps lhs-shaped arrays to `[batch, rows, k]`, `w3` is
  rhs as `[batch, k, cols]`, `out_shape` the product's shape."""
  lc, rc, lb, rb, lf, rf = _canonical_dims(lhs.ndim, rhs.ndim, dimension_numbers)
  if [lhs.shape[d] for d in lc] != [rhs.shape[d] for d in rc] or \
     [lhs.shape[d] for d in lb] != [rhs.shape[d] for d in rb]:
    raise ValueError(f"fp8_dot_general: shapes {lhs.shape} x {rhs.shape} do not match on "
                     f"dimension_numbers={dimension_numbers}")
  size = lambda a, ds: math.prod(a.shape[d] for d in ds)  # noqa: E731
  # [batch, rows, k] x [batch, k, cols]: batch, free and contracting dims each flattened to one
  to_x3 = lambda a: jnp.transpose(a, lb + lf + lc).reshape(  # noqa: E731
      size(lhs, lb), size(lhs, lf), size(lhs, lc))
  w3 = jnp.transpose(rhs, rb + rc + rf).reshape(size(rhs, rb), size(rhs, rc), size(rhs, rf))
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  st = _Static(spec, out_dtype, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))
  out_shape = ([lhs.shape[d] for d in lb] + [lhs.shape[d] for d in lf] +
               [rhs.shape[d] for d in rf])
  return to_x3, w3, st, out_shape


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                    spec: GemmSpec = GemmSpec(), fp8_state: jax.Array | None = None):
  """`lax.dot_general` with FP8 numerics per `spec` (fprop, dgrad and wgrad).

  `fp8_state` is the `[history, 3]` amax history of a spec with delayed scaling (its gradient is
  this step's observation, see `delayed.py`); without one, delayed slots scale from the current
  amax, exactly as with a fresh (all-zero) history, e.g. on call sites that carry no state.
  `precision` is ignored: quantised products are exact in f32 and emulation always accumulates
  at HIGHEST precision. The output takes `preferred_element_type` (else the inputs' result type),
  the gradients the inputs' dtypes.
  """
  del precision
  to_x3, w3, st, out_shape = _canonical(lhs, rhs, dimension_numbers, preferred_element_type, spec)
  if not spec.delayed:
    fp8_state = None
  elif fp8_state is not None and fp8_state.shape != (spec.history, len(delayed.COLUMNS)):
    raise ValueError(f"fp8_dot_general: fp8_state shape {fp8_state.shape} != "
                     f"({spec.history}, {len(delayed.COLUMNS)}) (see fp8.delayed.init_state)")
  return _fp8_gemm(to_x3(lhs), w3, fp8_state, st).reshape(out_shape)


def fp8_swiglu_dot_general(gate, up, rhs, dimension_numbers, precision=None,
                           preferred_element_type=None, *, spec: GemmSpec = GemmSpec()):
  """`fp8_dot_general(silu(gate) * up, rhs, ...)`, forward bitwise; with `spec.swiglu_cache` the
  backward reads gate and up from FP8 copies (1x128 tiles) and recomputes the product instead of
  keeping gate, up and the product (V3 §3.3.3: SwiGLU inputs cached in FP8, output recomputed)."""
  if gate.shape != up.shape or gate.dtype != up.dtype:
    raise ValueError(f"fp8_swiglu_dot_general: gate {gate.shape} {gate.dtype} and up {up.shape} "
                     f"{up.dtype} must match")
  if spec.swiglu_cache is None:
    return fp8_dot_general(swiglu(gate, up), rhs, dimension_numbers, precision,
                           preferred_element_type, spec=spec)
  to_x3, w3, st, out_shape = _canonical(gate, rhs, dimension_numbers, preferred_element_type,
                                        spec)
  return _swiglu_gemm(to_x3(gate), to_x3(up), w3, st).reshape(out_shape)


@dataclasses.dataclass(frozen=True)
class Fp8Dot:
  """The callable a policy hands to `Dense`: `lax.dot_general`'s signature, bound to a spec.

  `init_fp8_state` is None for stateless specs, else the initialiser of the `[history, 3]` amax
  history that `Dense` keeps in its `fp8_state` collection.
  """
  spec: GemmSpec

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               fp8_state=None):
    return fp8_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                           spec=self.spec, fp8_state=fp8_state)

  def swiglu(self, gate, up, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """This dot of silu(gate) * up, through the spec's SwiGLU cache (`fp8_swiglu_dot_general`)."""
    return fp8_swiglu_dot_general(gate, up, rhs, dimension_numbers, precision,
                                  preferred_element_type, spec=self.spec)

  def bind(self, fp8_state: jax.Array):
    """This dot with its delayed-scaling state bound (what `Dense` calls)."""
    return functools.partial(self.__call__, fp8_state=fp8_state)

  @property
  def init_fp8_state(self):
    if not self.spec.delayed:
      return None
    return functools.partial(delayed.init_state, self.spec.history)


def swiglu_dot(dot, gate, up, rhs, dimension_numbers):
  """`dot(silu(gate) * up, rhs, dimension_numbers)` for any dot_general callable; one with a
  `swiglu` method (`Fp8Dot`) runs that instead, which may cache gate and up in FP8."""
  method = getattr(dot, "swiglu", None)
  if method is not None:
    return method(gate, up, rhs, dimension_numbers)
  return dot(swiglu(gate, up), rhs, dimension_numbers)
