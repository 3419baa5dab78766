"""Formats: saturating casts at the edges, and the emulated formats against exact references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.fp8 import formats
from deepseek_jax.fp8.formats import E4M3, E5M2, E5M6


def _cast(fmt, values):
  y = jax.jit(fmt.cast)(jnp.asarray(values, jnp.float32))
  assert y.dtype == fmt.dtype
  return np.asarray(y.astype(jnp.float32))


def test_maxima():
  assert (E4M3.max, E5M2.max, E5M6.max) == (448.0, 57344.0, 65024.0)
  assert formats.E4M3FNUZ.max == 240.0
  assert formats.min_normal(E4M3) == 2.0 ** -6 and formats.min_normal(E5M2) == 2.0 ** -14


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_cast_edges(fmt):
  m = fmt.max
  sub = formats.min_normal(fmt) / 2 ** fmt.mantissa_bits           # smallest subnormal
  vals = [m, -m, m * 1.01, -m * 1.01, 1e30, np.inf, -np.inf, np.nan, 0.0, -0.0,
          sub, -sub, 3 * sub, sub / 2, sub * 0.51, 1e-40]
  y = _cast(fmt, vals)
  np.testing.assert_array_equal(y[:7], [m, -m, m, -m, m, m, -m])   # saturate, never NaN/inf
  assert np.isnan(y[7])                                            # NaN propagates
  assert y[8] == 0 and not np.signbit(y[8]) and y[9] == 0 and np.signbit(y[9])
  np.testing.assert_array_equal(y[10:13], [sub, -sub, 3 * sub])    # subnormals kept exactly
  assert y[13] == 0 and y[14] == sub                              # half the min: ties to even (0)
  assert y[15] == 0                                                # f32 subnormal


def test_unsaturated_astype_is_what_we_guard_against():
  """The reason for clipping: XLA's plain conversion turns e4m3 overflow into NaN."""
  y = jnp.asarray([465.0, np.inf], jnp.float32).astype(jnp.float8_e4m3fn).astype(jnp.float32)
  assert np.isnan(np.asarray(y)).all()


@given(st.lists(st.floats(-1e5, 1e5, width=32, allow_subnormal=False), min_size=1, max_size=64))
def test_real_formats_match_ml_dtypes(values):
  x = np.asarray(values, np.float32)
  for fmt, dt in ((E4M3, ml_dtypes.float8_e4m3fn), (E5M2, ml_dtypes.float8_e5m2)):
    ref = np.clip(x, -fmt.max, fmt.max).astype(dt).astype(np.float32)
    np.testing.assert_array_equal(_cast(fmt, x), ref)


def _round_ieee(x, e_bits, m_bits):
  """Float64 reference: RNE to m_bits, IEEE-like exponent range, target subnormals flushed."""
  x = np.asarray(x, np.float64)
  bias = 2 ** (e_bits - 1) - 1
  with np.errstate(divide="ignore"):
    e = np.floor(np.log2(np.abs(x)))
  ulp = 2.0 ** (np.where(np.isfinite(e), e, 0) - m_bits)
  y = np.round(x / ulp) * ulp                     # numpy rounds half to even
  return np.where(np.abs(y) < 2.0 ** (1 - bias), 0.0 * np.sign(x), y)


@given(st.lists(st.floats(-6e4, 6e4, width=32, allow_subnormal=False), min_size=1, max_size=64))
def test_emulated_e5m6_matches_reference(values):
  x = np.asarray(values, np.float32)
  y = _cast(E5M6, x)
  assert E5M6.dtype == jnp.bfloat16                 # E5M6 values fit bf16 exactly
  np.testing.assert_array_equal(y, _round_ieee(x, 5, 6).astype(np.float32))


def test_emulated_e5m2_equals_real_e5m2_on_normals():
  emu = formats.emulated("e5m2_emulated", 5, 2)
  x = np.geomspace(2.0 ** -14, 57344, 4001).astype(np.float32) * np.resize([1, -1], 4001)
  np.testing.assert_array_equal(_cast(emu, x), _cast(E5M2, x))
  assert _cast(emu, [2.0 ** -15])[0] == 0          # reduce_precision flushes target subnormals


def test_bad_emulated_format_names_the_field():
  with pytest.raises(ValueError, match="mantissa_bits=30"):
    formats.emulated("x", 5, 30)
  with pytest.raises(ValueError, match="unknown"):
    formats.format_by_name("e3m4")


_EDGES = [0.0, -0.0, np.inf, -np.inf, np.nan, 448.0, 464.0, 465.0, -465.0, 57344.0, 61440.0,
          61441.0, 1e30, 2.0 ** -6, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -14,
          2.0 ** -16, 2.0 ** -17, 3 * 2.0 ** -18, 1e-39, -1e-39]


@pytest.mark.parametrize("fmt", list(formats.FORMATS.values()), ids=lambda f: f.name)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1,
                max_size=64), st.integers(-40, 20))
def test_round_is_cast_read_back_bitwise(fmt, values, log2_scale):
  """`Format.round` (the emulator's conversion-free path) equals `cast(x).astype(f32)` bit for
  bit, over every binade, subnormals, ties, saturation, infinities and NaN."""
  with np.errstate(over="ignore"):   # overflow to inf is one of the cases
    x = jnp.asarray(np.asarray(values + _EDGES, np.float32) * np.float32(2.0 ** log2_scale))
  got = np.asarray(jax.jit(fmt.round)(x))
  want = np.asarray(jax.jit(lambda a: fmt.cast(a).astype(jnp.float32))(x))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  ok = ~np.isnan(want)
  np.testing.assert_array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_integer_codec_is_the_conversion_bitwise(fmt):
  """`decode` reads all 256 bit patterns as `astype(float32)` does (from uint8 or FP8 bytes), and
  `encode` writes every finite value, and `round` of values over all binades, as the narrowing
  conversion does (NaN to the conversion's NaN pattern)."""
  assert fmt.bit_codec and not E5M6.bit_codec and not formats.E4M3FNUZ.bit_codec
  b = np.arange(256, dtype=np.uint8)
  ref = b.view(fmt.dtype).astype(np.float32)
  for data in (jnp.asarray(b), jnp.asarray(b).view(fmt.dtype)):
    got = np.asarray(jax.jit(fmt.decode)(data))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(got[ok].view(np.uint32), ref[ok].view(np.uint32))
  encode = jax.jit(fmt.encode)
  np.testing.assert_array_equal(np.asarray(encode(jnp.asarray(ref[ok]))), b[ok])
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(20000) * np.exp2(rng.uniform(-30, 20, 20000))).astype(np.float32)
  x = jnp.asarray(np.concatenate([x, np.asarray(_EDGES, np.float32)]))
  want = np.asarray(jax.jit(fmt.cast)(x)).view(np.uint8)
  np.testing.assert_array_equal(np.asarray(encode(jax.jit(fmt.round)(x))), want)
