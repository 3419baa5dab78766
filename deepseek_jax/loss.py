"""The training loss without [B, T, V] logits: cross-entropy of the main head and of each MTP depth
(V3 report §2.2: L = CE + lambda / D * sum_k CE_k) from hidden states, chunk by chunk.

The output head runs on `chunk` positions of every row at a time, so at most [B, chunk, V] logits
exist. Each chunk's gradient is computed right away, in the forward pass (a custom VJP: softmax
minus one-hot, pulled back through the head's own VJP, so through `Dense` and its FP8 dot); the
backward pass only scales the sums. Nothing of [B, T, V] is saved and no logit is computed twice.
`mtp.cross_entropy` / `mtp.mtp_loss` on full logits are the reference (eval and tests use them).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from deepseek_jax.fp8 import delayed
from deepseek_jax.mtp import depth_targets

Head = Callable[[dict, jax.Array], jax.Array]   # (head variables, hidden [X, D]) -> [X, V]
# Auto chunks keep one chunk's f32 logits near this size. CPU: measured fastest (the chunk's
# logits and exponentials stay in cache; 1.7x faster than one [B, T, V] pass at V=4096, and 4 MiB
# beat 2 and 16 MiB); GPU/TPU: bounds the transient memory while the head matmul of a chunk stays
# compute-bound (V3's 129,280 vocab: ~500 tokens per chunk, each reading the whole kernel).
CHUNK_BYTES = {"cpu": 4 * 2**20, "gpu": 256 * 2**20, "tpu": 256 * 2**20}
FP8_STATE = "fp8_state"   # its cotangents are delayed-scaling observations: merged by max, unscaled


def chunk_positions(loss_chunk: int, batch: int, seq_len: int, vocab: int, platform: str) -> int:
  """Positions per chunk: `train.loss_chunk` tokens over the batch rows, or for 0 (auto) as many
  as keep [batch, chunk, vocab] f32 logits within CHUNK_BYTES[platform]; in [1, seq_len]."""
  tokens = loss_chunk or CHUNK_BYTES[platform] // (4 * vocab)
  return max(1, min(seq_len, tokens // batch))


def _split(x, chunk: int):
  """[B, T, ...] -> [n, B, chunk, ...] over the first n * chunk positions."""
  B, n = x.shape[0], x.shape[1] // chunk
  return jnp.moveaxis(x[:, :n * chunk].reshape((B, n, chunk) + x.shape[2:]), 1, 0)


def _unsplit(x):
  """[n, B, chunk, ...] -> [B, n * chunk, ...]."""
  n, B, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((B, n * c) + x.shape[3:])


# One chunk's tokens flattened, [X, D] -> [X, V] (a 2-d head matmul: XLA:CPU then runs its weight
# gradient without transposing the [X, V] cotangent first, measured 1.2x faster).
def _nll_parts(logits_XV, targets_X, weight_X):
  """(sum of weight * nll, exp(z - max), sum of it, one-hot) in f32."""
  z_XV = logits_XV.astype(jnp.float32)
  m_X1 = jnp.max(z_XV, axis=-1, keepdims=True)
  e_XV = jnp.exp(z_XV - m_X1)
  s_X1 = jnp.sum(e_XV, axis=-1, keepdims=True)
  # A comparison with iota, not a gather: its transpose would be a scatter into [X, V].
  onehot_XV = jax.lax.broadcasted_iota(targets_X.dtype, z_XV.shape, 1) == targets_X[:, None]
  nll_X = (m_X1 + jnp.log(s_X1))[:, 0] - jnp.sum(jnp.where(onehot_XV, z_XV, 0.0), axis=-1)
  return jnp.sum(nll_X * weight_X), e_XV, s_X1, onehot_XV


def _flat(h_BTD, targets_BT, weight_BT):
  return h_BTD.reshape(-1, h_BTD.shape[-1]), targets_BT.reshape(-1), weight_BT.reshape(-1)


def _chunk_value(head: Head, variables, h_BTD, targets_BT, weight_BT):
  h_XD, targets_X, weight_X = _flat(h_BTD, targets_BT, weight_BT)
  return _nll_parts(head(variables, h_XD), targets_X, weight_X)[0]


def _chunk_value_and_grads(head: Head, variables, h_BTD, targets_BT, weight_BT):
  h_XD, targets_X, weight_X = _flat(h_BTD, targets_BT, weight_BT)
  logits_XV, pullback = jax.vjp(head, variables, h_XD)
  total, e_XV, s_X1, onehot_XV = _nll_parts(logits_XV, targets_X, weight_X)
  dz_XV = (e_XV / s_X1 - onehot_XV) * weight_X[:, None]
  d_vars, dh_XD = pullback(dz_XV.astype(logits_XV.dtype))
  return total, d_vars, dh_XD.reshape(h_BTD.shape)


def _merge(acc, d_vars):
  """Adds one chunk's parameter gradients into f32 sums; FP8 observations merge by max."""
  out = {col: jax.tree.map(lambda a, d: a + d.astype(a.dtype), acc[col], d)
         for col, d in d_vars.items() if col != FP8_STATE}
  if FP8_STATE in d_vars:
    out[FP8_STATE] = delayed.merge(acc[FP8_STATE], d_vars[FP8_STATE])
  return out


def _over_chunks(fn, carry, h_BTD, targets_BT, weight_BT, chunk: int):
  """Runs fn(carry, h, targets, weight) -> (carry, y) over full chunks (a scan) and the tail;
  fn sees [B, chunk, ...] (its T is the chunk's positions)."""
  B, T, _ = h_BTD.shape
  ys = []
  if T // chunk:
    carry, y = jax.lax.scan(lambda c, xs: fn(c, *xs), carry,
                            tuple(_split(x, chunk) for x in (h_BTD, targets_BT, weight_BT)))
    ys.append(_unsplit(y) if y is not None else None)
  if T % chunk:
    tail = T // chunk * chunk
    carry, y = fn(carry, h_BTD[:, tail:], targets_BT[:, tail:], weight_BT[:, tail:])
    ys.append(y)
  return carry, ys


def nll_sum(head: Head, variables: dict, h_BTD, targets_BT, weight_BT, chunk: int,
            constrain=None) -> jax.Array:
  """sum over positions of weight * (-log p(target)) with p = softmax(head(variables, h)), f32;
  computed `chunk` positions at a time (see the module docstring for the gradient).
  `constrain`: applied to the gradient sums carried across chunks (e.g. to keep an FSDP-gathered
  head's partial sums unreduced until the end: one reduce-scatter, not one per chunk)."""
  keep = constrain or (lambda tree: tree)

  def value(variables, h_BTD, targets_BT, weight_BT):
    def step(total, h, t, w):
      return total + _chunk_value(head, variables, h, t, w), None
    return _over_chunks(step, jnp.zeros((), jnp.float32), h_BTD, targets_BT, weight_BT, chunk)[0]

  def fwd(variables, h_BTD, targets_BT, weight_BT):
    def step(carry, h, t, w):
      total, acc = carry
      part, d_vars, dh = _chunk_value_and_grads(head, variables, h, t, w)
      return (total + part, keep(_merge(acc, d_vars))), dh
    zeros = keep(jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), variables))
    (total, acc), dhs = _over_chunks(step, (jnp.zeros((), jnp.float32), zeros), h_BTD,
                                     targets_BT, weight_BT, chunk)
    d_vars = jax.tree.map(lambda a, v: a.astype(v.dtype), acc, variables)
    return total, (d_vars, jnp.concatenate(dhs, axis=1))

  def bwd(res, g):
    d_vars, dh_BTD = res
    scaled = {col: (d if col == FP8_STATE else jax.tree.map(lambda x: (g * x).astype(x.dtype), d))
              for col, d in d_vars.items()}
    return scaled, (g * dh_BTD).astype(dh_BTD.dtype), None, None

  f = jax.custom_vjp(value)
  f.defvjp(fwd, bwd)
  return f(variables, h_BTD, targets_BT, weight_BT.astype(jnp.float32))


def chunked_cross_entropy(head: Head, variables: dict, h_BTD, targets_BT, weight_BT, chunk: int,
                          constrain=None):
  """Mean token cross-entropy over positions with weight > 0 (0 when there are none): equals
  `mtp.cross_entropy(head(variables, h), targets, weight)` without its [B, T, V] logits."""
  w_BT = weight_BT.astype(jnp.float32)
  return (nll_sum(head, variables, h_BTD, targets_BT, w_BT, chunk, constrain)
          / jnp.maximum(jnp.sum(w_BT), 1.0))


def chunked_mtp_loss(head: Head, variables: dict, mtp_hidden, next_tokens_BT, weight_BT, lam: float,
             chunk: int, constrain=None):
  """lambda / D * sum_k CE_k from each depth's head input (`ModelOutput.mtp_hidden`): equals
  `mtp.mtp_loss` on the logits. Returns (loss, per-depth CE list)."""
  if not mtp_hidden:
    return jnp.zeros((), jnp.float32), []
  per_depth = [chunked_cross_entropy(head, variables, h_BTD,
                                     *depth_targets(next_tokens_BT, weight_BT, k), chunk,
                                     constrain)
               for k, h_BTD in enumerate(mtp_hidden, start=1)]
  return lam / len(per_depth) * sum(per_depth), per_depth
