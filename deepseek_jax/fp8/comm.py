"""Low-precision MoE communication: FP8 dispatch, BF16/LogFMT combine (V3 report §3.3.3;
Insights §2.3.2, §3.2).

A transfer is a pure function of its payload: `encode` before the collective, `decode` after, and
`transfer(x, fwd, bwd)` simulates the lossy round trip of a tensor (`fwd` codec) and of its
cotangent (`bwd` codec) in one custom_vjp. Codecs: 'none', 'bf16', 'fp8' (1x128 tiles, power-of-two scales:
the GEMMs' quantiser) and 'logfmt' (`logfmt.py`; widths other than 8 and 16 bit-packed).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from deepseek_jax.fp8 import logfmt
from deepseek_jax.fp8.formats import E4M3, Format
from deepseek_jax.fp8.scaling import TILE, QArray, Scaling, quantize

KINDS = ("none", "bf16", "fp8", "logfmt")


@dataclasses.dataclass(frozen=True)
class Codec:
  """Wire format of one direction of a transfer."""
  kind: str = "fp8"
  fmt: Format = E4M3
  tile: int = TILE
  n_bits: int = 8               # logfmt only
  amax_floor: float = 1e-30     # fp8 only: dispatch carries activations and gradients alike

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"codec.kind={self.kind!r}: must be one of {KINDS}")
    if not (isinstance(self.tile, int) and self.tile > 0):
      raise ValueError(f"codec.tile={self.tile!r}: must be a positive integer")
    if self.kind == "logfmt":
      logfmt._check(self.n_bits, self.tile)

  @property
  def scaling(self) -> Scaling:
    return Scaling("tile", tile=self.tile, pow2=True, amax_floor=self.amax_floor)

  def bits_per_element(self, hp_bits: int = 16) -> float:
    """Wire bits per value including scales / metadata (f32 per tile)."""
    if self.kind == "none":
      return float(hp_bits)
    if self.kind == "bf16":
      return 16.0
    if self.kind == "fp8":
      return self.fmt.bits + 32 / self.tile
    return logfmt.bits_per_element(self.n_bits, self.tile)


NONE, BF16 = Codec("none"), Codec("bf16")
FP8_DISPATCH = Codec("fp8")
LOGFMT8, LOGFMT10 = Codec("logfmt", n_bits=8), Codec("logfmt", n_bits=10)


def fp8_encode(x_XD: jax.Array, codec: Codec = FP8_DISPATCH) -> QArray:
  """FP8 payload of `[..., D]` rows: data `[X, D]` (X = leading dims flattened), 1 x tile scales."""
  x_1XD = x_XD.reshape(1, -1, x_XD.shape[-1])
  return quantize(x_1XD, codec.fmt, codec.scaling, contract=2)


def fp8_decode(q: QArray, shape, dtype) -> jax.Array:
  return q.dequantize().reshape(shape).astype(dtype)


def encode(x: jax.Array, codec: Codec):
  """The payload sent over the wire (an array, QArray or LogFmtArray; all pytrees)."""
  if codec.kind == "none":
    return x
  if codec.kind == "bf16":
    return x.astype(jnp.bfloat16)
  if codec.kind == "fp8":
    return fp8_encode(x, codec)
  enc = logfmt.encode(x, codec.n_bits, codec.tile)
  return enc if codec.n_bits in (8, 16) else logfmt.pack(enc)   # n bits per code on the wire


def decode(payload, codec: Codec, shape, dtype) -> jax.Array:
  if codec.kind in ("none", "bf16"):
    return payload.astype(dtype)
  if codec.kind == "fp8":
    return fp8_decode(payload, shape, dtype)
  if isinstance(payload, logfmt.PackedLogFmt):
    payload = logfmt.unpack(payload)
  return logfmt.decode(payload).astype(dtype)


def roundtrip(x: jax.Array, codec: Codec) -> jax.Array:
  """decode(encode(x)): what the receiver gets."""
  return decode(encode(x, codec), codec, x.shape, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def transfer(x: jax.Array, fwd: Codec = FP8_DISPATCH, bwd: Codec = BF16) -> jax.Array:
  """Lossy transfer: forward through `fwd`, cotangent through `bwd` (straight through otherwise)."""
  return roundtrip(x, fwd)


def _transfer_fwd(x, fwd, bwd):
  return roundtrip(x, fwd), None


def _transfer_bwd(fwd, bwd, _, g):
  return (roundtrip(g, bwd),)


transfer.defvjp(_transfer_fwd, _transfer_bwd)

DISPATCH = (FP8_DISPATCH, BF16)   # (forward, backward) codecs, V3 report §3.3.3
