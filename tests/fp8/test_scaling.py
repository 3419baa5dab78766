"""The quantiser, bitwise against the NumPy reference, and the pow2 re-tiling property."""

import functools
import inspect

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.fp8 import comm, logfmt, scaling
from deepseek_jax.fp8.dot import GemmSpec
from deepseek_jax.fp8.formats import E4M3, E5M2, min_normal
from deepseek_jax.fp8.scaling import BLOCK, TILE, Scaling, quantize, requantize
from tests.fp8 import reference as ref

NP_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def _assert_same_bits(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype
  nan_g, nan_w = np.isnan(got.astype(np.float32)), np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(nan_g, nan_w)
  np.testing.assert_array_equal(got.view(np.uint8 if got.itemsize == 1 else np.uint32)[~nan_g],
                                want.view(np.uint8 if want.itemsize == 1 else np.uint32)[~nan_w])


def _check_against_reference(x, fmt, sc, contract):
  q = jax.jit(lambda a: quantize(a, fmt, sc, contract))(jnp.asarray(x))
  blk = ref.blocks(sc.granularity, x.shape, contract, sc.tile)
  data, s = ref.quantize(x, NP_DTYPES[fmt.name], fmt.max, blk, sc.amax_floor, sc.pow2)
  assert q.blocks == blk
  _assert_same_bits(q.data, data)
  _assert_same_bits(q.scale_inv, s)
  return q


@st.composite
def _operands(draw):
  B = draw(st.integers(1, 2))
  R = draw(st.integers(1, 200))
  C = draw(st.integers(1, 300))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
  mag = 10.0 ** rng.integers(-12, 12, size=(B, R, 1))          # row magnitudes over 24 decades
  x = (rng.standard_normal((B, R, C)) * mag).astype(np.float32)
  x[:, :, rng.integers(0, C)] *= 100                             # outlier channel
  if draw(st.booleans()):                                         # edge tiles and values
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 3)] = [0.0, -0.0, 448.0 * 2 ** 20]
    x[0, 0, :128] = 0.0                                           # all-zero tile
    if R > 1:
      x[0, 1, :128] = rng.standard_normal(min(C, 128)) * 1e-39    # f32-subnormal-only tile
    if R > 2:
      x[0, 2, :128] = rng.standard_normal(min(C, 128)) * 1e-6     # below the amax floor
  return x


@given(_operands(), st.sampled_from(["tensor", "axis", "tile", "block"]), st.sampled_from([1, 2]),
       st.booleans(), st.sampled_from(["e4m3", "e5m2"]))
def test_quantizer_bitwise_vs_numpy(x, granularity, contract, pow2, fmt_name):
  fmt = E4M3 if fmt_name == "e4m3" else E5M2
  _check_against_reference(x, fmt, Scaling(granularity, pow2=pow2), contract)


@given(_operands(), st.sampled_from(["tensor", "axis", "tile", "block"]), st.sampled_from([1, 2]),
       st.booleans(), st.sampled_from(["e4m3", "e5m2"]))
def test_values_without_fp8_bytes_equal_dequantize(x, granularity, contract, pow2, fmt_name):
  """`fake_quantize` and `quantize_with_values` (no FP8 read-back) are `quantize(...)
  .dequantize()` bit for bit, and the bytes `quantize_with_values` keeps are `quantize`'s."""
  fmt = E4M3 if fmt_name == "e4m3" else E5M2
  sc = Scaling(granularity, pow2=pow2)
  q, (q2, v2), v3 = jax.jit(lambda a: (quantize(a, fmt, sc, contract),
                                       scaling.quantize_with_values(a, fmt, sc, contract),
                                       scaling.fake_quantize(a, fmt, sc, contract)))(
      jnp.asarray(x))
  _assert_same_bits(q2.data, q.data)
  _assert_same_bits(q2.scale_inv, q.scale_inv)
  want = jax.jit(lambda q: q.dequantize())(q)   # one program, not one per eager op and shape
  _assert_same_bits(v2, want)
  _assert_same_bits(v3, want)


def test_nonfinite_tiles_dequantise_to_nan_and_stay_local():
  x = np.random.default_rng(0).standard_normal((1, 4, 300)).astype(np.float32)
  x[0, 0, 5] = np.nan
  x[0, 1, 140] = np.inf
  x[0, 2, 299] = -np.inf                                          # in the ragged last tile
  q = _check_against_reference(x, E4M3, Scaling("tile"), 2)
  y = np.asarray(q.dequantize())
  assert np.isnan(y[0, 0, :128]).all() and np.isfinite(y[0, 0, 128:]).all()
  assert np.isnan(y[0, 1, 128:256]).all() and np.isfinite(y[0, 1, :128]).all()
  assert np.isnan(y[0, 2, 256:]).all() and np.isfinite(y[0, 2, :256]).all()
  assert np.isfinite(y[0, 3]).all()


def test_special_tiles():
  x = np.zeros((1, 3, 200), np.float32)
  x[0, 1, :] = 1e-39                                               # f32 subnormals: flushed
  x[0, 2, :] = 2e-9                                                # amax far below the floor
  q = _check_against_reference(x, E4M3, Scaling("tile"), 2)
  y = np.asarray(q.dequantize())
  assert (y[0, :2] == 0).all() and np.isfinite(np.asarray(q.scale_inv)).all()
  s = float(q.scale_inv[0, 2, 0])
  assert s == 2.0 ** -22                                           # pow2_ceil(1e-4 / 448)
  # The floor pushes such tiles into E4M3's subnormals (why gradient slots use a tiny floor).
  assert np.asarray(q.data[0, 2]).astype(np.float32)[0] < min_normal(E4M3)
  np.testing.assert_allclose(y[0, 2], 2e-9, rtol=0.15)


def test_pow2_scales_and_saturation():
  x = np.random.default_rng(1).standard_normal((2, 130, 257)).astype(np.float32) * 37
  for g in ("tile", "block", "axis", "tensor"):
    q = jax.jit(lambda a: quantize(a, E4M3, Scaling(g), 2))(jnp.asarray(x))
    m, _ = np.frexp(np.asarray(q.scale_inv))
    assert (m == 0.5).all()                                        # powers of two
    d = np.abs(np.asarray(q.data).astype(np.float32))
    assert d.max() <= 448 and d.max() > 224                        # never clips, uses the range


def test_ragged_tiles_scale_only_their_own_values():
  x = np.ones((1, 1, 130), np.float32)
  x[0, 0, 128:] = 768.0                                           # exact in E4M3 at any pow2 scale
  q = jax.jit(lambda a: quantize(a, E4M3, Scaling("tile"), 2))(jnp.asarray(x))
  assert q.scale_inv.shape == (1, 1, 2)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), x)


@given(st.integers(0, 2 ** 31))
def test_pow2_retiling_1x128_to_128x1_is_lossless(seed):
  """Re-tiling the cached 1x128 FP8 activation into 128x1 tiles (wgrad) changes no value that
  stays in E4M3's normal range; with non-pow2 scales most values change."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((1, 256, 384)) * np.exp(rng.standard_normal((1, 256, 1)))).astype(
      np.float32)
  for pow2 in (True, False):
    v, retiled, direct, scales = (np.asarray(a) for a in _retile(jnp.asarray(x), pow2))
    changed = retiled != v
    if pow2:
      in_subnormals = np.abs(v) < min_normal(E4M3) * scales
      assert not (changed & ~in_subnormals).any()
      assert changed.mean() < 0.01
      np.testing.assert_allclose(np.linalg.norm(retiled - x), np.linalg.norm(direct - x),
                                 rtol=0.05)
    else:
      assert changed.mean() > 0.5


@functools.partial(jax.jit, static_argnums=1)
def _retile(x, pow2):
  sc = Scaling("tile", pow2=pow2)
  q = quantize(x, E4M3, sc, contract=2)                              # fprop: tiles along K
  r = requantize(q, E4M3, sc, contract=1)                            # wgrad: tiles along M
  direct = quantize(x, E4M3, sc, contract=1)
  return q.dequantize(), r.dequantize(), direct.dequantize(), r.scales_full()


def test_pow2_ceil_exact():
  s = np.array([1.0, 1.5, 2.0 ** -30, 3 * 2.0 ** -30, 0.75, np.inf, 1e30], np.float32)
  got = np.asarray(scaling.pow2_ceil(jnp.asarray(s)))
  np.testing.assert_array_equal(got, ref.pow2_ceil(s))
  assert np.isnan(np.asarray(scaling.pow2_ceil(jnp.float32(np.nan))))


@pytest.mark.parametrize("kw, msg", [
    (dict(granularity="row"), "granularity='row'"),
    (dict(tile=0), "tile=0"),
    (dict(amax_floor=0.0), "amax_floor=0.0"),
    (dict(granularity="tile", mode="delayed"), "delayed"),
    (dict(mode="static"), "mode='static'"),
])
def test_scaling_validation_names_the_field(kw, msg):
  with pytest.raises(ValueError, match=msg):
    Scaling(**kw)


def test_every_fp8_default_reads_the_declared_tile_and_block():
  """Changing the activation tile is one edit (`scaling.TILE`): GEMM operands, the E5M6 cache,
  the dispatch and LogFMT wire tiles all default to it; weights to `scaling.BLOCK`."""
  spec = GemmSpec()
  for slot in ("fprop_x", "wgrad_x", "dgrad_g", "wgrad_g"):
    assert getattr(spec, slot).scaling.granularity == "tile"
    assert getattr(spec, slot).scaling.tile == TILE
  for slot in ("fprop_w", "dgrad_w"):
    assert getattr(spec, slot).scaling.tile == BLOCK
  assert Scaling().tile == TILE and comm.Codec().tile == TILE
  assert comm.FP8_DISPATCH.scaling.tile == TILE
  for fn in (logfmt.encode, logfmt.roundtrip, logfmt.bits_per_element):
    assert inspect.signature(fn).parameters["tile"].default == TILE
