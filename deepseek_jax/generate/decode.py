"""Generation on the absorbed MLA latent cache (V3 report §2.1.1), MTP speculation optional (§2.2).

Prefill writes each prompt's latents [c_KV ; k_R] into a cache indexed by absolute position, in
chunks of up to `prefill_chunk` tokens (each chunk is one multi-token cached call, so long prompts
never build a [T, T] score matrix). Decoding then feeds one token per row at the row's own position,
so prompts of different lengths share one batch. Sampling parameters are traced arrays (greedy when
temperature is 0, else temperature, top-k and top-p on the tempered logits), so changing them does
not recompile. Stop tokens and per-row budgets are applied on device, where finished rows freeze.

The decode steps run in one compiled on-device loop (`decode_loop`: a `lax.while_loop` over the
step, the cache donated and updated in place, emitted tokens appended to a buffer), with no host
round-trip between steps: the whole generation is one call, or with `on_tokens` one call per
`stream_every` steps, the next call in flight while the host reads the last one's tokens. W_UK
and W_UV are laid out for decoding once per call (`mla.absorbed_weights`), not in every step.
With `speculative=True` each step is an MTP draft-and-verify step (`speculative`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.block import UNROLL_DECODE_LAYERS, unstacked
from deepseek_jax.config import ModelConfig
from deepseek_jax.generate import speculative as spec
from deepseek_jax.mla import absorbed_weights
from deepseek_jax.model import Transformer, init_model_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off (both act on the tempered logits)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"top_k={self.top_k}: must be an integer >= 0 (0 disables it)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}: must lie in (0, 1] (1 disables it)")

  def arrays(self) -> "SamplingArrays":
    return SamplingArrays(jnp.float32(self.temperature), jnp.int32(self.top_k),
                          jnp.float32(self.top_p))


class SamplingArrays(NamedTuple):
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array


def sampling_probs(logits_BV: jax.Array, s: SamplingArrays) -> jax.Array:
  """The distribution a token is drawn from: one-hot argmax when greedy, else the tempered
  softmax restricted to the top-k tokens and then to the smallest prefix holding top_p mass."""
  logits_BV = logits_BV.astype(jnp.float32)
  V = logits_BV.shape[-1]

  def greedy():
    return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), V, dtype=jnp.float32)

  def filtered():
    x_BV = logits_BV / s.temperature
    desc_BV = -jnp.sort(-x_BV, axis=-1)
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    desc_BV = jnp.where(jnp.arange(V)[None, :] < k, desc_BV, -jnp.inf)
    p_BV = jax.nn.softmax(desc_BV, axis=-1)
    keep_BV = (jnp.cumsum(p_BV, axis=-1) - p_BV) < s.top_p  # the top token is always kept
    n_keep_B1 = jnp.sum(keep_BV & (p_BV > 0), axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(desc_BV, jnp.maximum(n_keep_B1 - 1, 0), axis=-1)
    return jax.nn.softmax(jnp.where(x_BV >= cutoff_B1, x_BV, -jnp.inf), axis=-1)

  return jax.lax.cond(s.temperature > 0, filtered, greedy)


def sample(rng, logits_BV: jax.Array, s: SamplingArrays) -> jax.Array:
  return jax.random.categorical(rng, jnp.log(sampling_probs(logits_BV, s))).astype(jnp.int32)


class Carry(NamedTuple):
  """Per-row decoding state besides the caches."""
  tokens_B: jax.Array      # last emitted token: the next input
  positions_B: jax.Array   # the position it is fed at
  done_B: jax.Array
  remaining_B: jax.Array   # tokens the row may still emit
  rng: jax.Array
  draft_B: jax.Array       # speculative: the MTP draft for positions_B + 1
  q_BV: jax.Array          # speculative: the draft distribution ([B, 0] otherwise)


class Emit(NamedTuple):
  """What one step produced: row b emitted tokens_Bs[b, :count_B[b]]."""
  tokens_Bs: jax.Array
  count_B: jax.Array
  done_B: jax.Array
  accepted_B: jax.Array    # speculative: accepted drafts (0 or 1)
  drafted_B: jax.Array     # speculative: the row had a draft verified this step


def _settle(emitted_Bs, want_B, carry: Carry, stop_S):
  """Tokens actually emitted (cut after the first stop token, by the budget, 0 once done)."""
  per_step = emitted_Bs.shape[1]
  is_stop_Bs = jnp.isin(emitted_Bs, stop_S)
  first_stop_B = jnp.where(jnp.any(is_stop_Bs, axis=1), jnp.argmax(is_stop_Bs, axis=1), per_step)
  count_B = jnp.minimum(jnp.minimum(want_B, first_stop_B + 1), carry.remaining_B)
  count_B = jnp.where(carry.done_B, 0, count_B).astype(jnp.int32)
  remaining_B = carry.remaining_B - count_B
  done_B = carry.done_B | (first_stop_B < count_B) | (remaining_B <= 0)
  return count_B, done_B, remaining_B


@functools.partial(jax.jit, static_argnames=("cfg", "speculative"), donate_argnames=("cache",))
def _prefill_chunk(cfg: ModelConfig, variables, cache, carry: Carry, tokens_BT, next_BT, start,
                   lengths_B, sampling: SamplingArrays, speculative: bool):
  """Writes one prompt chunk into the cache; rows whose prompt ends in it sample their first
  token (and, speculating, run the drafter over the chunk and draft the second)."""
  variables = absorbed_weights(cfg, variables)
  B, T = tokens_BT.shape
  pos_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
  out = Transformer(cfg).apply(variables, tokens_BT, pos_BT, cache=cache["main"])
  idx_B = lengths_B - 1 - start
  here_B = (idx_B >= 0) & (idx_B < T)
  idx_B = jnp.clip(idx_B, 0, T - 1)
  rng, k_first, k_draft = jax.random.split(carry.rng, 3)
  last_BV = jnp.take_along_axis(out.logits_BTV, idx_B[:, None, None], axis=1)[:, 0]
  tokens_B = jnp.where(here_B, sample(k_first, last_BV, sampling), carry.tokens_B)
  carry = carry._replace(tokens_B=tokens_B, rng=rng,
                         positions_B=jnp.where(here_B, lengths_B, carry.positions_B))
  cache = dict(cache, main=out.cache)
  if speculative:
    next_BT = jnp.where(pos_BT == (lengths_B - 1)[:, None], tokens_B[:, None], next_BT)
    q_logits_BV, cache["mtp"] = spec.draft(cfg, variables, cache["mtp"], out.hidden_BTD, next_BT,
                                           pos_BT, idx_B)
    q_BV = sampling_probs(q_logits_BV, sampling)
    draft_B = jax.random.categorical(k_draft, jnp.log(q_BV)).astype(jnp.int32)
    carry = carry._replace(draft_B=jnp.where(here_B, draft_B, carry.draft_B),
                           q_BV=jnp.where(here_B[:, None], q_BV, carry.q_BV))
  return cache, carry


class Tokens(NamedTuple):
  """What the decode loop emitted so far: row b's tokens are tokens_BW[b, :count_B[b]] (a stop
  token, if any, last)."""
  tokens_BW: jax.Array
  count_B: jax.Array
  steps: jax.Array         # decode steps run (after the prefill)
  drafted: jax.Array       # speculative: drafts verified
  accepted: jax.Array      # speculative: drafts accepted


def _append(out: Tokens, emit: "Emit", steps: int = 1) -> Tokens:
  B, s = emit.tokens_Bs.shape
  W = out.tokens_BW.shape[1]
  i_1s = jnp.arange(s, dtype=jnp.int32)[None, :]
  col_Bs = jnp.where(i_1s < emit.count_B[:, None], out.count_B[:, None] + i_1s, W)  # W: dropped
  tokens_BW = out.tokens_BW.at[jnp.arange(B)[:, None], col_Bs].set(emit.tokens_Bs, mode="drop")
  return Tokens(tokens_BW, out.count_B + emit.count_B, out.steps + steps,
                out.drafted + jnp.sum(emit.drafted_B, dtype=jnp.int32),
                out.accepted + jnp.sum(emit.accepted_B, dtype=jnp.int32))


@jax.jit
def _first_emit(carry: Carry, stop_S, tokens_BW):
  """The prefill's sampled token as the first emitted one; -> (carry, Tokens)."""
  ones_B = jnp.ones_like(carry.remaining_B)
  count_B, done_B, remaining_B = _settle(carry.tokens_B[:, None], ones_B, carry, stop_S)
  zeros_B = jnp.zeros_like(count_B)
  zero = jnp.zeros((), jnp.int32)
  out = _append(Tokens(tokens_BW, zeros_B, zero, zero, zero),
                Emit(carry.tokens_B[:, None], count_B, done_B, zeros_B, zeros_B.astype(bool)), 0)
  return carry._replace(done_B=done_B, remaining_B=remaining_B), out


def _plain_step(cfg: ModelConfig, variables, cache, carry: Carry, sampling: SamplingArrays,
                stop_S, absorb: bool = True):
  out = Transformer(cfg, absorb=absorb).apply(variables, carry.tokens_B[:, None],
                                              carry.positions_B[:, None], cache=cache["main"])
  rng, key = jax.random.split(carry.rng)
  next_B = sample(key, out.logits_BTV[:, 0], sampling)
  count_B, done_B, remaining_B = _settle(next_B[:, None], jnp.ones_like(next_B), carry, stop_S)
  carry = carry._replace(tokens_B=jnp.where(count_B > 0, next_B, carry.tokens_B),
                         positions_B=carry.positions_B + count_B, done_B=done_B,
                         remaining_B=remaining_B, rng=rng)
  zeros_B = jnp.zeros_like(count_B)
  return dict(cache, main=out.cache), carry, Emit(next_B[:, None], count_B, done_B, zeros_B,
                                                  zeros_B.astype(bool))


def _speculative_step(cfg: ModelConfig, variables, cache, carry: Carry, sampling: SamplingArrays,
                      stop_S):
  rng, k_verify, k_draft = jax.random.split(carry.rng, 3)
  probs_fn = functools.partial(sampling_probs, s=sampling)
  main, emitted_B2, accepted_B, hidden_B2D, pos_B2 = spec.verify(
      cfg, variables, cache["main"], carry.tokens_B, carry.draft_B, carry.positions_B,
      carry.q_BV, k_verify, probs_fn)
  a_B = accepted_B.astype(jnp.int32)
  count_B, done_B, remaining_B = _settle(emitted_B2, a_B + 1, carry, stop_S)
  q_logits_BV, mtp = spec.draft(cfg, variables, cache["mtp"], hidden_B2D, emitted_B2, pos_B2, a_B)
  q_BV = probs_fn(q_logits_BV)
  draft_B = jax.random.categorical(k_draft, jnp.log(q_BV)).astype(jnp.int32)
  bonus_B = jnp.take_along_axis(emitted_B2, a_B[:, None], axis=1)[:, 0]
  active_B = ~carry.done_B
  new = Carry(jnp.where(active_B, bonus_B, carry.tokens_B), carry.positions_B + count_B, done_B,
              remaining_B, rng, draft_B, q_BV)
  emit = Emit(emitted_B2, count_B, done_B, jnp.where(active_B, a_B, 0), active_B)
  return {"main": main, "mtp": mtp}, new, emit


decode_step = jax.jit(_plain_step, static_argnames=("cfg", "absorb"), donate_argnames=("cache",))
decode_step.__doc__ = """One token per row at its own position -> (cache, carry, Emit).
`absorb=False` expands K/V per step (the baseline). `generate` runs `decode_loop` instead."""
speculative_step = jax.jit(_speculative_step, static_argnames=("cfg",),
                           donate_argnames=("cache",))
speculative_step.__doc__ = """Verify the pending draft, emit 1-2 tokens per row, draft the next
one -> (cache, carry, Emit)."""


@functools.partial(jax.jit, static_argnames=("cfg", "speculative", "absorb"),
                   donate_argnames=("cache",))
def decode_loop(cfg: ModelConfig, variables, cache, carry: Carry, out: Tokens,
                sampling: SamplingArrays, stop_S, max_steps, speculative: bool = False,
                absorb: bool = True):
  """Decode steps in one on-device `while_loop` until every row is done or `max_steps` (traced:
  no recompile) steps ran; the cache is donated and updated in place, the tokens appended to
  `out`. -> (cache, carry, out). `absorb=False` (plain steps only) expands K/V per step."""
  variables = absorbed_weights(cfg, variables)
  if cfg.num_layers <= UNROLL_DECODE_LAYERS:   # per-layer weights, sliced once per call
    cfg, variables = unstacked(cfg, variables)
  if speculative:
    step = functools.partial(_speculative_step, cfg, variables)
  else:
    step = functools.partial(_plain_step, cfg, variables, absorb=absorb)

  def cond(state):
    _, carry, _, i = state
    return (i < max_steps) & ~jnp.all(carry.done_B)

  def body(state):
    cache, carry, out, i = state
    cache, carry, emit = step(cache, carry, sampling, stop_S)
    return cache, carry, _append(out, emit), i + 1

  cache, carry, out, _ = jax.lax.while_loop(cond, body, (cache, carry, out, jnp.int32(0)))
  return cache, carry, out


class Generation(NamedTuple):
  tokens: list[list[int]]   # generated tokens per row, stop token excluded
  stopped: list[bool]       # the row ended on a stop token (else on max_new_tokens)
  steps: int                # decode steps after the prefill
  drafted: int              # speculative: drafts verified
  accepted: int             # speculative: drafts accepted
  prefill_s: float
  decode_s: float

  @property
  def acceptance(self) -> float:
    return self.accepted / max(self.drafted, 1)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def generate(cfg: ModelConfig, variables, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (), seed: int = 0,
             speculative: bool = False, prefill_chunk: int = 512, pad_id: int = 0,
             on_tokens: Callable[[int, list[int]], None] | None = None, cache_dtype=None,
             stream_every: int = 8) -> Generation:
  """Generates up to `max_new_tokens` per prompt (prompts may differ in length).

  `on_tokens(row, tokens)` is called as tokens arrive (stop tokens excluded), every
  `stream_every` decode steps; without it the whole decode is one on-device loop. With
  `speculative` the MTP module drafts and the model verifies; greedy output is identical to plain
  decoding. `cache_dtype`: the latent cache's (default the compute dtype; `mla.FP8_LATENT` for an
  e4m3 latent beside a bf16 rope key).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt must hold at least one token")
  if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be a positive integer")
  if not (isinstance(stream_every, int) and stream_every >= 1):
    raise ValueError(f"stream_every={stream_every}: must be a positive integer")
  flat = [t for p in prompts for t in p]
  if min(flat) < 0 or max(flat) >= cfg.vocab_size:
    raise ValueError(f"prompt token ids must lie in [0, vocab_size={cfg.vocab_size})")
  if speculative:
    spec.check_speculative(cfg)
  B, lengths = len(prompts), np.array([len(p) for p in prompts], np.int32)
  P = int(lengths.max())
  if P + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
  chunk = min(prefill_chunk, _round_up(P, 16))
  P_pad = _round_up(P, chunk)
  S = _round_up(P_pad + max_new_tokens + 2, 64)
  tokens = np.full((B, P_pad + 1), pad_id, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  cache = {"main": init_model_cache(cfg, B, S, cache_dtype),
           "mtp": spec.init_draft_cache(cfg, B, S) if speculative else None}
  V = cfg.vocab_size if speculative else 0
  carry = Carry(jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.int32), jnp.zeros(B, bool),
                jnp.full(B, max_new_tokens, jnp.int32), jax.random.key(seed),
                jnp.zeros(B, jnp.int32), jnp.zeros((B, V), jnp.float32))
  s_arr = sampling.arrays()
  stops = sorted(set(int(t) for t in stop_tokens))
  stop_S = np.full(_round_up(max(len(stops), 1), 8), -1, np.int32)  # fixed size: no recompiles
  stop_S[:len(stops)] = stops
  len_B = jnp.asarray(lengths)
  t0 = time.perf_counter()
  for start in range(0, P_pad, chunk):
    cache, carry = _prefill_chunk(cfg, variables, cache, carry, tokens[:, start:start + chunk],
                                  tokens[:, start + 1:start + chunk + 1], jnp.int32(start), len_B,
                                  s_arr, speculative)
  carry, out = _first_emit(carry, stop_S, jnp.zeros((B, S), jnp.int32))
  jax.block_until_ready(out)
  t1 = time.perf_counter()
  loop = functools.partial(decode_loop, cfg, variables, sampling=s_arr, stop_S=stop_S,
                           speculative=speculative)
  rows: list[list[int]] = [[] for _ in range(B)]
  stopped, sent = [False] * B, [0] * B
  stop_set = set(stops)

  def deliver(out: Tokens, done_B) -> bool:
    """Hands each row's new tokens over (a final stop token dropped); True when all are done."""
    tokens_BW, count_B, done_B = jax.device_get((out.tokens_BW, out.count_B, done_B))
    for b in range(B):
      new = [int(t) for t in tokens_BW[b, sent[b]:count_B[b]]]
      sent[b] = int(count_B[b])
      if new and new[-1] in stop_set:
        new, stopped[b] = new[:-1], True
      if new:
        rows[b].extend(new)
        if on_tokens is not None:
          on_tokens(b, new)
    return bool(np.all(done_B))

  if on_tokens is None:
    cache, carry, out = loop(cache, carry, out, max_steps=jnp.int32(S))
    deliver(out, carry.done_B)
  else:
    # One call in flight while the host reads the one before; the call after the last row
    # finished runs no step.
    while True:
      cache, next_carry, next_out = loop(cache, carry, out, max_steps=jnp.int32(stream_every))
      if deliver(out, carry.done_B):
        break
      carry, out = next_carry, next_out
  steps, drafted, accepted = (int(x) for x in jax.device_get((out.steps, out.drafted,
                                                               out.accepted)))
  return Generation(rows, stopped, steps, drafted, accepted, t1 - t0, time.perf_counter() - t1)
