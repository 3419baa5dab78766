"""A continuous-batching engine on the paged latent cache (V3 report §2.1.1; Orca's iteration-level
scheduling, Sarathi's chunked prefill, vLLM's paged blocks).

`Engine(cfg, variables).submit(prompt_ids, ...)` queues a request and returns a `Request`, an
iterator of its tokens that drives the engine while it waits. Every `step()` admits queued requests
into free slots (when the pool can promise their worst-case blocks), runs one prefill chunk of the
oldest request still prefilling and one decode step of every running slot (in one call), or, while
no prompt waits, up to `decode_steps` decode steps, and retires the finished ones (their blocks go
back to the pool). Each program compiles once, over a fixed number of slots, one fixed-size chunk
and the fixed block pool: the chunk with a decode step, several decode steps, and with MTP
speculation the chunk alone and a speculative step.
Sampling parameters, seeds, stop ids and budgets are per-slot arrays. The host reads each step's
tokens one step late, so the device never waits for Python.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Sequence

import flax
import jax
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.generate import paged
from deepseek_jax.generate import speculative as spec
from deepseek_jax.generate.decode import Sampling
from deepseek_jax.generate.steps import (Params, decode_slots, decode_slots_many, init_slots,
                                         prefill_chunk, prefill_then_decode, speculate_slots)
from deepseek_jax.layers import dtype_of
from deepseek_jax.mla import ABSORBED, absorbed_weights


class Request:
  """A submitted request: `tokens` so far (stop token excluded), `finished`, `stopped`, the
  times its tokens arrived (`token_times`, perf_counter), MTP drafts `drafted`/`accepted`;
  iterating it streams its tokens and runs the engine while it waits."""

  def __init__(self, engine: "Engine", rid: int, prompt: list[int], max_new_tokens: int,
               sampling: Sampling, stop: Sequence[int], seed: int, speculative: bool):
    self.engine, self.id, self.prompt = engine, rid, prompt
    self.max_new_tokens, self.sampling, self.stop, self.seed = max_new_tokens, sampling, stop, seed
    self.speculative = speculative
    self.drafted = self.accepted = 0   # speculative: drafts verified and accepted
    self.tokens: list[int] = []
    self.token_times: list[float] = []
    self.submitted = time.perf_counter()
    self.finished = self.stopped = False
    self.slot: int | None = None
    self.prefilled = 0        # prompt tokens dispatched to prefill
    self.next_pos = 0         # running: the position the next dispatched decode step writes

  def __iter__(self):
    i = 0
    while True:
      while i < len(self.tokens):
        i += 1
        yield self.tokens[i - 1]
      if self.finished:
        return
      self.engine.step()

  def result(self) -> list[int]:
    for _ in self:
      pass
    return self.tokens


class Engine:
  """Continuous batching over `slots` decode rows and a pool of `num_blocks` blocks of
  `block_size` tokens (default: enough for every slot at `max_seq_len`). `prefill_chunk`
  prompt tokens are prefilled per step; `stops` is the most stop ids a request may give. While
  no prompt is being prefilled, one call runs up to `decode_steps` decode steps (one host round
  trip; it ends early when a request finishes, so the next is admitted at once).
  `speculative=True` lets requests ask for MTP speculation (the drafter's cache is a second pool
  of one layer: (C + R) more per token); the cache is (C + R)·L per token otherwise."""

  def __init__(self, cfg: ModelConfig, variables, *, slots: int = 8, block_size: int = 16,
               num_blocks: int | None = None, max_seq_len: int | None = None,
               prefill_chunk: int = 64, group: int = 8, stops: int = 8, cache_dtype=None,
               speculative: bool = False, decode_steps: int = 8):
    if speculative:
      spec.check_speculative(cfg)
    for name, value in (("slots", slots), ("block_size", block_size),
                        ("prefill_chunk", prefill_chunk), ("group", group), ("stops", stops),
                        ("decode_steps", decode_steps)):
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    self.max_seq_len = max_seq_len or cfg.max_position_embeddings
    if not 1 <= self.max_seq_len <= cfg.max_position_embeddings:
      raise ValueError(f"max_seq_len={self.max_seq_len}: must lie in [1, "
                       f"max_position_embeddings={cfg.max_position_embeddings}]")
    # W_UK / W_UV laid out once (mla.absorbed_weights), not in every step. The layers stay
    # stacked: unrolled (block.unstacked), every call would pass 97 leaves instead of 59 at
    # tiny.yaml, and the engine measured slower (bench/results/ENGINE.md).
    variables = flax.core.meta.unbox(variables)
    self.cfg, self.variables = cfg, (variables if ABSORBED in variables
                                     else absorbed_weights(cfg, variables))
    self.slots, self.chunk, self.group, self.stops = slots, prefill_chunk, group, stops
    self.decode_steps = decode_steps
    self.max_blocks = -(-self.max_seq_len // block_size)
    num_blocks = num_blocks or slots * self.max_blocks + 1
    self.blocks = paged.BlockPool(num_blocks, block_size)
    self.cache_dtype = cache_dtype or dtype_of(cfg.dtype)
    self.speculative = speculative
    self.pools = paged.init_model_pools(cfg, num_blocks, block_size, self.cache_dtype)
    self.pools["mtp"] = (paged.init_pools(cfg, num_blocks, block_size, self.cache_dtype, 0)
                         if speculative else None)
    self.state = init_slots(slots, stops, cfg.vocab_size if speculative else 0)
    # Committed to the device like every call's outputs: a program's first call (on arrays
    # made here, uncommitted) would otherwise lower and compile it a second time.
    device = jax.devices()[0]
    self.pools, self.state = jax.device_put((self.pools, self.state), device)
    self.queue: collections.deque[Request] = collections.deque()
    self.slot_of: list[Request | None] = [None] * slots
    self._ids = itertools.count()
    self._in_flight: list = []     # the last step's emits, read at the next step
    self.steps = 0

  @property
  def cache_bytes(self) -> int:
    """The pool's bytes (what the engine holds for the cache)."""
    return sum(a.nbytes for p in self.pools.values() if p is not None for a in p)

  @property
  def block_bytes(self) -> int:
    return self.cache_bytes // self.blocks.num_blocks

  def submit(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop: Sequence[int] = (),
             seed: int = 0, speculative: bool = False) -> Request:
    """Queues a request; returns its `Request` (iterate it to stream its tokens). With
    `speculative` the MTP module drafts a token per step (greedy output unchanged)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
      raise ValueError("prompt_ids: must hold at least one token")
    if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
      raise ValueError(f"prompt_ids: token ids must lie in [0, vocab_size={self.cfg.vocab_size})")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
      raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if len(prompt) + max_new_tokens > self.max_seq_len:
      raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"max_seq_len={self.max_seq_len}")
    if len(set(stop)) > self.stops:
      raise ValueError(f"stop: {len(set(stop))} ids, more than the engine's stops={self.stops}")
    if self.blocks.blocks_for(len(prompt) + max_new_tokens) > self.blocks.num_blocks - 1:
      raise ValueError(f"prompt + max_new_tokens ({len(prompt) + max_new_tokens} tokens) needs "
                       f"more blocks than the pool holds ({self.blocks.num_blocks - 1})")
    if speculative and not self.speculative:
      raise ValueError("speculative=True: this engine holds no drafter cache; build it with "
                       "Engine(..., speculative=True)")
    req = Request(self, next(self._ids), prompt, max_new_tokens,
                  Sampling(temperature, top_k, top_p), tuple(sorted(set(int(s) for s in stop))),
                  seed, bool(speculative))
    self.queue.append(req)
    return req

  @property
  def busy(self) -> bool:
    return bool(self.queue or self._in_flight or any(self.slot_of))

  def run(self) -> None:
    """Steps until every submitted request has finished."""
    while self.busy:
      self.step()

  # ---- one iteration ----

  def step(self) -> None:
    """Admit, one prefill chunk, decode (one step beside a prefill chunk, else up to
    `decode_steps`); then read the previous call's tokens."""
    self._admit()
    emits = []
    prefilling = [r for r in self.slot_of if r is not None and r.prefilled < len(r.prompt)]
    prefill = self._prefill(min(prefilling, key=lambda r: r.id)) if prefilling else None
    running = [r if r is not None and r.prefilled == len(r.prompt) and not r.finished else None
               for r in self.slot_of]
    if prefill and not self._speculating(running):
      # The chunk and one decode step of the running slots in one call: one launch per step, and
      # one program fewer to compile (with no slot running, the decode step emits nothing).
      req, args = prefill
      self._ensure_ahead(running, 1, False)
      self.pools, self.state, emit_p, emit_d = prefill_then_decode(
          self.cfg, self.variables, self.pools, self._table(running), *args)
      emits += [([req], emit_p), (running, emit_d)]
    else:
      if prefill:
        req, args = prefill
        self.pools, self.state, emit = prefill_chunk(self.cfg, self.variables, self.pools, *args)
        emits.append(([req], emit))
      if any(running):   # (with a prompt waiting only speculation comes here: one step)
        emits.append(self._decode(running, self.decode_steps))
    previous, self._in_flight = self._in_flight, emits
    for emit in previous:
      self._deliver(*emit)
    if not emits:            # nothing dispatched: read what is left now
      for emit in self._in_flight:
        self._deliver(*emit)
      self._in_flight = []
    self.steps += 1

  def _admit(self) -> None:
    while self.queue and None in self.slot_of:
      req = self.queue[0]
      if not self.blocks.reserve(req.id, len(req.prompt) + req.max_new_tokens):
        return
      self.queue.popleft()
      req.slot = self.slot_of.index(None)
      self.slot_of[req.slot] = req

  def _table(self, reqs) -> np.ndarray:
    return np.stack([self.blocks.table_row(r.id, self.max_blocks) if r is not None
                     else np.zeros(self.max_blocks, np.int32) for r in reqs])

  def _prefill(self, req: Request):
    """(req, the arguments of `prefill_chunk` after the pools) for its next chunk; its blocks
    are ensured and `prefilled` advanced."""
    start, n = req.prefilled, len(req.prompt)
    end = min(start + self.chunk, n)
    self.blocks.ensure(req.id, end)
    tokens = np.zeros((1, self.chunk + 1), np.int32)
    tokens[0, :min(end + 1, n) - start] = req.prompt[start:end + 1]
    stop_K = np.full(self.stops, -1, np.int32)
    stop_K[:len(req.stop)] = req.stop
    s = req.sampling
    params = Params(np.int32(n), np.int32(req.max_new_tokens), np.int32(req.seed),
                    np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p), stop_K,
                    np.bool_(req.speculative))
    args = (self._table([req]), self.state, np.int32(req.slot), tokens[:, :-1], tokens[:, 1:],
            np.int32(start), params, self.group, req.speculative)
    req.prefilled, req.next_pos = end, n
    return req, args

  @staticmethod
  def _speculating(running) -> bool:
    return any(r is not None and r.speculative for r in running)

  def _ensure_ahead(self, running, steps: int, speculate: bool) -> None:
    for r in running:
      if r is not None:   # blocks through the positions this call may write (within the budget)
        ahead = 2 if speculate and r.speculative else steps
        self.blocks.ensure(r.id, min(r.next_pos + ahead, len(r.prompt) + r.max_new_tokens))
        r.next_pos += ahead

  def _decode(self, running, steps: int):
    speculate = self._speculating(running)
    steps = 1 if speculate else steps
    self._ensure_ahead(running, steps, speculate)
    args = (self.cfg, self.variables, self.pools, self._table(running), self.state, self.group)
    if speculate:
      self.pools, self.state, emit = speculate_slots(*args)
    elif steps == 1:
      self.pools, self.state, emit = decode_slots(*args)
    else:
      self.pools, self.state, emit = decode_slots_many(*args, steps)
    return running, emit

  def _deliver(self, reqs, emit) -> None:
    tokens, counts, dones = jax.device_get(emit[:3])
    accepted = jax.device_get(emit[3]) if len(emit) > 3 else np.full(len(reqs), -1)
    now = time.perf_counter()
    for req, toks, count, done, acc in zip(reqs, tokens, counts, dones, accepted):
      if req is None or req.finished or not count:
        continue
      if acc >= 0:
        req.drafted, req.accepted = req.drafted + 1, req.accepted + int(acc)
      for tok in toks[:count]:
        if int(tok) in req.stop:
          req.stopped = True
          break
        req.tokens.append(int(tok))
        req.token_times.append(now)
      if done:
        self._retire(req)

  def _retire(self, req: Request) -> None:
    req.finished = True
    self.blocks.free(req.id)
    self.slot_of[req.slot] = None
