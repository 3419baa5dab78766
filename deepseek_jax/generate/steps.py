"""The engine's compiled steps over a fixed number of slots and a fixed block pool (paged.py),
MTP self-speculation per slot optional (V3 report §2.2; speculative.py).

Each slot carries its request's sampling parameters, seed, stop ids and budget on the device, so
one program serves any mix. Random draws use keys of (seed, position) only: a request samples
the same tokens whatever shares its batch. `decode_slots` feeds one token per slot;
`speculate_slots` verifies [token, draft] for every slot, accepting drafts only in the slots whose
request speculates (the others sample exactly as in `decode_slots`), then drafts again with the
MTP module through its own pool; `prefill_chunk` writes one request's prompt chunk and, on its
last chunk, samples its first token (and draft) and puts the request into its slot;
`prefill_then_decode` is a chunk and a `decode_slots` step in one call (the engine's usual step
while prompts wait), `decode_slots_many` several decode steps in one call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.generate import paged
from deepseek_jax.generate import speculative as spec
from deepseek_jax.generate.decode import SamplingArrays, sampling_probs
from deepseek_jax.model import OutputHead, Transformer, head_variables

MAIN = ("dense", "moe")   # the Transformer's pools; "mtp" holds the drafter's (or None)
_SAMPLE, _DRAFT, _ACCEPT = 0, 1, 2   # independent key streams per (seed, position)


class Slots(NamedTuple):
  """Per-slot state ([S] each; stop ids [S, K] padded with -1; q [S, V], or [S, 0] without
  speculation)."""
  tokens_S: jax.Array       # the last emitted token: the next input
  positions_S: jax.Array    # the position it is fed at
  done_S: jax.Array
  remaining_S: jax.Array    # tokens the slot may still emit
  seed_S: jax.Array
  temperature_S: jax.Array
  top_k_S: jax.Array
  top_p_S: jax.Array
  stop_SK: jax.Array
  spec_S: jax.Array         # the slot's request speculates
  draft_S: jax.Array        # its pending draft for positions_S + 1
  q_SV: jax.Array           # the draft's distribution


class Params(NamedTuple):
  """One request's parameters (scalars; stop ids [K])."""
  length: jax.Array
  max_new: jax.Array
  seed: jax.Array
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  stop_K: jax.Array
  spec: jax.Array


def init_slots(slots: int, stops: int, vocab: int = 0) -> Slots:
  z = jnp.zeros(slots, jnp.int32)
  return Slots(z, z, jnp.ones(slots, bool), z, z, jnp.zeros(slots, jnp.float32), z,
               jnp.ones(slots, jnp.float32), jnp.full((slots, stops), -1, jnp.int32),
               jnp.zeros(slots, bool), z, jnp.zeros((slots, vocab), jnp.float32))


def _key(seed, position, stream):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), position), stream)


def _probs(logits_V, temperature, top_k, top_p):
  return sampling_probs(logits_V[None], SamplingArrays(temperature, top_k, top_p))[0]


def _sample(logits_V, seed, position, temperature, top_k, top_p):
  """The token for `position`: the argmax at temperature 0, else a draw keyed by (seed, position)."""
  drawn = jax.random.categorical(_key(seed, position, _SAMPLE),
                                 jnp.log(_probs(logits_V, temperature, top_k, top_p)))
  return jnp.where(temperature > 0, drawn, jnp.argmax(logits_V)).astype(jnp.int32)


def _sample_slots(logits_SV, seed_S, position_S, temperature_S, top_k_S, top_p_S):
  """`_sample` of every slot. While every slot is greedy the draws are skipped: under vmap the
  per-slot `cond` in `sampling_probs` runs both branches (a sort of the vocabulary and a draw per
  slot in every step); this `cond` on the whole batch does not."""
  def drawn():
    return jax.vmap(_sample)(logits_SV, seed_S, position_S, temperature_S, top_k_S, top_p_S)
  return jax.lax.cond(jnp.any(temperature_S > 0), drawn,
                      lambda: jnp.argmax(logits_SV, axis=-1).astype(jnp.int32))


def _row_params(st: Slots):
  return st.temperature_S, st.top_k_S, st.top_p_S


def _live_params(st: Slots):
  """`_row_params` with done slots greedy (they emit nothing): a finished sampled request does
  not keep `_sample_slots` drawing for the greedy ones until its slot is refilled."""
  return jnp.where(st.done_S, 0.0, st.temperature_S), st.top_k_S, st.top_p_S


def _settle(emitted_Ss, want_S, stop_SK, done_S, remaining_S):
  """(count, done, remaining): tokens emitted, cut after a stop id and by the budget, 0 once done."""
  s = emitted_Ss.shape[1]
  is_stop_Ss = jnp.any(emitted_Ss[:, :, None] == stop_SK[:, None, :], axis=-1)
  first_stop_S = jnp.where(jnp.any(is_stop_Ss, axis=1), jnp.argmax(is_stop_Ss, axis=1), s)
  count_S = jnp.minimum(jnp.minimum(want_S, first_stop_S + 1), remaining_S)
  count_S = jnp.where(done_S, 0, count_S).astype(jnp.int32)
  remaining_S = remaining_S - count_S
  return count_S, done_S | (first_stop_S < count_S) | (remaining_S <= 0), remaining_S


def _main(cfg, variables, pools, table, tokens_BT, positions_BT, group, logits=True):
  cache = paged.model_cache({k: pools[k] for k in MAIN}, table, group)
  out = Transformer(cfg).apply(variables, tokens_BT, positions_BT, cache=cache, logits=logits)
  return out, dict(pools, **paged.pools_of(out.cache))


def _draft(cfg, variables, pools, table, hidden_BTD, next_BT, positions_BT, index_B, group,
           seed_B, temperature_B, top_k_B, top_p_B):
  """MTP depth 1 over the positions (its cache in pools['mtp']): the draft for the position
  after next of `index_B`, its distribution and the pools."""
  cache = paged.PagedLatentCache(*pools["mtp"], table, group)
  q_logits_BV, cache = spec.draft(cfg, variables, cache, hidden_BTD, next_BT, positions_BT,
                                  index_B)
  q_BV = jax.vmap(_probs)(q_logits_BV, temperature_B, top_k_B, top_p_B)
  pos_B = jnp.take_along_axis(positions_BT, index_B[:, None], axis=1)[:, 0] + 2
  keys = jax.vmap(_key)(seed_B, pos_B, jnp.full_like(pos_B, _DRAFT))
  draft_B = jax.vmap(jax.random.categorical)(keys, jnp.log(q_BV)).astype(jnp.int32)
  return draft_B, q_BV, dict(pools, mtp=(cache.latent_pool, cache.rope_pool))


def _decode_once(cfg, variables, pools, table_SM, st: Slots, group: int):
  out, pools = _main(cfg, variables, pools, table_SM, st.tokens_S[:, None],
                     st.positions_S[:, None], group)
  next_S = _sample_slots(out.logits_BTV[:, 0], st.seed_S, st.positions_S + 1,
                         *_live_params(st))
  count_S, done_S, remaining_S = _settle(next_S[:, None], jnp.ones_like(next_S), st.stop_SK,
                                         st.done_S, st.remaining_S)
  st = st._replace(tokens_S=jnp.where(count_S > 0, next_S, st.tokens_S),
                   positions_S=st.positions_S + count_S, done_S=done_S, remaining_S=remaining_S)
  return pools, st, next_S, count_S


@functools.partial(jax.jit, static_argnames=("cfg", "group"), donate_argnames=("pools",))
def decode_slots(cfg: ModelConfig, variables, pools, table_SM, st: Slots, group: int):
  """One token for every slot at its own position; done slots emit nothing (count 0)."""
  pools, st, next_S, count_S = _decode_once(cfg, variables, pools, table_SM, st, group)
  return pools, st, (next_S[:, None], count_S, st.done_S)


@functools.partial(jax.jit, static_argnames=("cfg", "group", "steps"), donate_argnames=("pools",))
def decode_slots_many(cfg: ModelConfig, variables, pools, table_SM, st: Slots, group: int,
                      steps: int):
  """Up to `steps` of `decode_slots` in one call (one host round trip), ending after a step in
  which a slot finished, so that the scheduler retires it and admits the next request: each
  slot's tokens [S, steps] (its first `count` valid), counts, done. The table must cover
  `steps` positions past each running slot's."""
  S = st.tokens_S.shape[0]

  def cond(c):   # (a call dispatched after every slot finished on the device runs no step)
    return (c[4] < steps) & ~c[5] & ~jnp.all(c[1].done_S)

  def body(c):
    pools, st, toks_Sn, count_S, i, _ = c
    was_done = st.done_S
    pools, st, next_S, c_S = _decode_once(cfg, variables, pools, table_SM, st, group)
    at_Sn = (jnp.arange(steps)[None] == count_S[:, None]) & (c_S[:, None] > 0)
    return (pools, st, jnp.where(at_Sn, next_S[:, None], toks_Sn), count_S + c_S, i + 1,
            jnp.any(st.done_S & ~was_done))

  init = (pools, st, jnp.zeros((S, steps), jnp.int32), jnp.zeros(S, jnp.int32), jnp.int32(0),
          jnp.bool_(False))
  pools, st, toks_Sn, count_S, _, _ = jax.lax.while_loop(cond, body, init)
  return pools, st, (toks_Sn, count_S, st.done_S)


@functools.partial(jax.jit, static_argnames=("cfg", "group"), donate_argnames=("pools",))
def speculate_slots(cfg: ModelConfig, variables, pools, table_SM, st: Slots, group: int):
  """Verify each speculating slot's draft (1-2 tokens), one plain token for the others."""
  pos_S2 = st.positions_S[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
  x_S2 = jnp.stack([st.tokens_S, jnp.where(st.spec_S, st.draft_S, st.tokens_S)], axis=1)
  out, pools = _main(cfg, variables, pools, table_SM, x_S2, pos_S2, group)
  p0_SV = jax.vmap(_probs)(out.logits_BTV[:, 0], *_row_params(st))
  p1_SV = jax.vmap(_probs)(out.logits_BTV[:, 1], *_row_params(st))
  keys = jax.vmap(_key)(st.seed_S, st.positions_S + 1, jnp.full_like(st.seed_S, _ACCEPT))
  one = lambda k, a, b, q, d: spec.accept(k, a[None], b[None], q[None], d[None])  # noqa: E731
  accepted_S, bonus_S = (x[:, 0] for x in jax.vmap(one)(keys, p0_SV, p1_SV, st.q_SV, st.draft_S))
  accepted_S = accepted_S & st.spec_S
  plain_S = _sample_slots(out.logits_BTV[:, 0], st.seed_S, st.positions_S + 1,
                          *_live_params(st))
  first_S = jnp.where(st.spec_S, jnp.where(accepted_S, st.draft_S, bonus_S), plain_S)
  emitted_S2 = jnp.stack([first_S, jnp.where(accepted_S, bonus_S, first_S)], axis=1)
  a_S = accepted_S.astype(jnp.int32)
  count_S, done_S, remaining_S = _settle(emitted_S2, a_S + 1, st.stop_SK, st.done_S,
                                         st.remaining_S)
  draft_S, q_SV, pools = _draft(cfg, variables, pools, table_SM, out.hidden_BTD, emitted_S2,
                                pos_S2, a_S, group, st.seed_S, *_row_params(st))
  last_S = jnp.take_along_axis(emitted_S2, a_S[:, None], axis=1)[:, 0]
  active_S = count_S > 0
  st = st._replace(tokens_S=jnp.where(active_S, last_S, st.tokens_S),
                   positions_S=st.positions_S + count_S, done_S=done_S, remaining_S=remaining_S,
                   draft_S=jnp.where(active_S, draft_S, st.draft_S),
                   q_SV=jnp.where(active_S[:, None], q_SV, st.q_SV))
  return pools, st, (emitted_S2, count_S, done_S, jnp.where(active_S & st.spec_S, a_S, -1))


@functools.partial(jax.jit, static_argnames=("cfg", "group", "speculative"),
                   donate_argnames=("pools",))
def prefill_chunk(cfg: ModelConfig, variables, pools, table_1M, st: Slots, slot, tokens_1T,
                  next_1T, start, req: Params, group: int, speculative: bool = False):
  """Writes prompt positions [start, start + T) of one request (`next_1T`: the tokens one
  position later, for the drafter); the chunk holding its last token samples the first token
  and puts the request into `slot`."""
  T = tokens_1T.shape[1]
  pos_1T = start + jnp.arange(T, dtype=jnp.int32)[None]
  out, pools = _main(cfg, variables, pools, table_1M, tokens_1T, pos_1T, group, logits=False)
  idx = req.length - 1 - start
  last = idx < T
  idx = jnp.clip(idx, 0, T - 1)
  logits_V = OutputHead(cfg).apply(head_variables(variables), out.hidden_BTD[:, idx])[0]
  sampling = (req.temperature, req.top_k, req.top_p)
  first = _sample(logits_V.astype(jnp.float32), req.seed, req.length, *sampling)
  count, done, remaining = _settle(first[None, None], jnp.ones(1, jnp.int32), req.stop_K[None],
                                   jnp.zeros(1, bool), req.max_new[None])
  draft, q_V = jnp.zeros((), jnp.int32), st.q_SV[0]
  if speculative:
    next_1T = jnp.where(pos_1T == req.length - 1, first, next_1T)
    draft_1, q_1V, pools = _draft(cfg, variables, pools, table_1M, out.hidden_BTD, next_1T,
                                  pos_1T, idx[None], group, req.seed[None],
                                  *(x[None] for x in sampling))
    draft, q_V = draft_1[0], q_1V[0]
  row = Slots(first, req.length, done[0], remaining[0], req.seed, *sampling, req.stop_K,
              req.spec, draft, q_V)
  st = jax.tree.map(lambda a, r: jnp.where(last, a.at[slot].set(r), a), st, row)
  return pools, st, (first[None, None], jnp.where(last, count, 0), done, jnp.full(1, -1))


@functools.partial(jax.jit, static_argnames=("cfg", "group", "speculative"),
                   donate_argnames=("pools",))
def prefill_then_decode(cfg: ModelConfig, variables, pools, table_SM, table_1M, st: Slots, slot,
                        tokens_1T, next_1T, start, req: Params, group: int,
                        speculative: bool = False):
  """`prefill_chunk`, then `decode_slots` of the running slots (table_SM) in the same call, skipped
  while no slot runs: an engine step that prefills launches one program, not two. -> (pools, st,
  the chunk's emit, the decode's emit)."""
  pools, st, emit_p = prefill_chunk(cfg, variables, pools, table_1M, st, slot, tokens_1T, next_1T,
                                    start, req, group, speculative)

  def idle():   # no slot running (the chunk was not its prompt's last): the step emits nothing
    S = st.tokens_S.shape[0]
    return pools, st, (jnp.zeros((S, 1), jnp.int32), jnp.zeros(S, jnp.int32), st.done_S)

  pools, st, emit_d = jax.lax.cond(
      jnp.all(st.done_S), idle, lambda: decode_slots(cfg, variables, pools, table_SM, st, group))
  return pools, st, emit_p, emit_d
