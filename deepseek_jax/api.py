"""The Python API: `load(path_or_id) -> LM`, then `LM.generate`, `stream`, `score`, `perplexity`.

`load` reads a train.py workdir (its newest checkpoint), a Hugging Face DeepSeek directory or a
hub id ("ORG/NAME[@REV]") already in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub;
nothing is downloaded). The tokenizer comes with the model: the directory's tokenizer.json, else
the run's `train.tokenizer`, else bytes for a 256-token vocabulary; beyond that nothing is guessed
and prompts must be token ids. Generation is `generate.decode.generate`, stopping at the
checkpoint's `eos_token_id` (else the tokenizer's EOS) and before the first `stop` string. Scores
are natural-log likelihoods of every token after the first (a BOS, when the tokenizer adds one)
given those before it, from one causal forward pass.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import numbers
import os
import pathlib
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.generate.decode import Sampling, generate as _generate
from deepseek_jax.generate.engine import Engine
from deepseek_jax.generate.load import load_for_inference, tokenizer_for
from deepseek_jax.hf import CheckpointError
from deepseek_jax.model import Transformer
from deepseek_jax.tokenizer import HFTokenizer, IdsTokenizer, Tokenizer

Messages = list[dict[str, Any]]
Prompt = Union[str, Sequence[int], Messages]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_cache() -> pathlib.Path:
  """The Hugging Face hub cache, as huggingface_hub finds it (read from the environment now)."""
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    if os.environ.get(var):
      return pathlib.Path(os.environ[var]).expanduser()
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
  return pathlib.Path(home).expanduser() / "hub"


def cached_snapshot(repo: str, revision: str | None, cache: pathlib.Path) -> pathlib.Path | None:
  """`<cache>/models--ORG--NAME/snapshots/<commit>` of a branch, tag or commit (default main)."""
  root = cache / ("models--" + repo.replace("/", "--"))
  ref = root / "refs" / (revision or "main")
  commit = ref.read_text().strip() if ref.is_file() else revision
  if commit and (root / "snapshots" / commit).is_dir():
    return root / "snapshots" / commit
  snaps = sorted((root / "snapshots").iterdir()) if (root / "snapshots").is_dir() else []
  return snaps[0] if revision is None and len(snaps) == 1 else None


def resolve(path_or_id: str | os.PathLike) -> pathlib.Path:
  """A local directory for a path or a hub id already cached; never touches the network."""
  path = pathlib.Path(path_or_id).expanduser()
  if path.exists():
    return path.absolute()          # orbax reads absolute paths only
  name = str(path_or_id)
  repo, _, revision = name.partition("@")
  if not HUB_ID.fullmatch(repo) or repo.count("/") != 1:
    raise CheckpointError(f"{name}: no such file or directory (nor a hub id such as ORG/NAME)")
  cache = hub_cache()
  try:
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (optional dependency)
  except ImportError:
    found = cached_snapshot(repo, revision or None, cache)
  else:
    try:
      found = pathlib.Path(snapshot_download(repo, revision=revision or None, cache_dir=cache,
                                             local_files_only=True))
    except Exception:  # noqa: BLE001 (LocalEntryNotFoundError, bad ids, unreadable caches)
      found = None
  if found is None:
    raise CheckpointError(f"{name}: not a local path and not in the Hugging Face cache {cache} "
                          f"(load never downloads: fetch it first, e.g. `hf download {repo}`)")
  return found


def find_tokenizer(path: pathlib.Path, vocab: int, spec: Any = "auto") -> tuple[Any, str]:
  """(tokenizer or None, why there is none): a tokenizer object as given, else the choice of
  `generate.load.tokenizer_for` ("auto", "bytes", "ids" or a tokenizer.json path), except that
  "auto" finding nothing (or only ids for a vocabulary under 256) leaves token ids as prompts."""
  if not isinstance(spec, (str, os.PathLike)):
    return spec, ""
  try:
    tok = tokenizer_for(str(spec), path, vocab)
  except ValueError as e:
    if spec != "auto":
      raise ValueError(f"load(tokenizer={str(spec)!r}): {e}") from None
    return None, (f"text needs a tokenizer: {e} (load(..., tokenizer=...) takes the same "
                  "values; token ids need none)")
  if spec == "auto" and isinstance(tok, IdsTokenizer):
    return None, (f"{path}: a {vocab}-token model with no tokenizer.json (bytes need 256 ids); "
                  "pass token ids or load(..., tokenizer='PATH/tokenizer.json')")
  return tok, ""


def _chat_config(tok) -> tuple[str | None, dict[str, str]]:
  """(chat template, special tokens) beside a tokenizer.json: chat_template.jinja or
  tokenizer_config.json's `chat_template` (a string or a list of named templates)."""
  if not isinstance(tok, HFTokenizer):
    return None, {}
  file = pathlib.Path(tok.name)
  conf_file, jinja = file.parent / "tokenizer_config.json", file.parent / "chat_template.jinja"
  conf = json.loads(conf_file.read_text()) if conf_file.is_file() else {}
  special = {}
  for k, v in conf.items():
    if k.endswith("_token") and isinstance(v, (str, dict)):   # not add_bos_token's bool
      special[k] = v.get("content", "") if isinstance(v, dict) else str(v)
  template = jinja.read_text() if jinja.is_file() else conf.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default", next(iter(named.values()), None))
  return template, special


def _raise(msg: str):
  raise ValueError(f"chat template: {msg}")


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_logprobs(cfg: ModelConfig, variables, tokens_BT: jax.Array) -> jax.Array:
  """log p(tokens[:, t] | tokens[:, :t]) for t >= 1, [B, T - 1], from one causal forward pass."""
  logits_BTV = Transformer(cfg).apply(variables, tokens_BT, with_mtp=False).logits_BTV
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]


class _Abort(Exception):
  """Raised from the token callback: every row has stopped, or a stream was closed."""


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_messages(x) -> bool:
  return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) for m in x)


def _sampling(temperature, top_k, top_p) -> Sampling:
  for name, v in (("temperature", temperature), ("top_p", top_p)):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
      raise ValueError(f"{name}={v!r}: must be a number")
  if not _is_int(top_k):
    raise ValueError(f"top_k={top_k!r}: must be an integer >= 0 (0 disables it)")
  return Sampling(float(temperature), int(top_k), float(top_p))


def _stops(stop) -> list[str]:
  stops = [stop] if isinstance(stop, str) else list(stop or ())
  if not all(isinstance(s, str) and s for s in stops):
    raise ValueError(f"stop={stop!r}: must be a non-empty string or a list of them")
  return stops


def _held(text: str, stops: list[str]) -> int:
  """Characters at the end of `text` that may begin a stop string (not streamed yet)."""
  return max((k for s in stops for k in range(1, min(len(s), len(text) + 1))
              if text.endswith(s[:k])), default=0)


class LM:
  """A DeepSeek model with its tokenizer, ready to generate and score (`load` makes one).

  `config` is the ModelConfig, `variables` the weights, `tokenizer` a `deepseek_jax.tokenizer`
  tokenizer or None (then prompts are token ids), `info` what the checkpoint recorded (the
  training step, or config.json's token ids)."""

  def __init__(self, config: ModelConfig, variables: dict, tokenizer: Tokenizer | None = None, *,
               info: dict | None = None, source: str = "model", chat_template: str | None = None,
               special_tokens: dict[str, str] | None = None, no_tokenizer: str = ""):
    self.config, self.variables, self.tokenizer = config, variables, tokenizer
    self.info, self.source = dict(info or {}), source
    self.chat_template, self.special_tokens = chat_template, dict(special_tokens or {})
    self._no_tokenizer = no_tokenizer or f"{source}: no tokenizer; pass token ids"
    eos = self.info.get("eos_token_id", None if tokenizer is None else tokenizer.eos_id)
    self.eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])

  def engine(self, **options) -> Engine:  # continuous batching on the paged latent cache
    return Engine(self.config, self.variables, **options)

  def __repr__(self) -> str:
    tok = "none (token ids)" if self.tokenizer is None else self.tokenizer.name
    c = self.config
    return (f"LM({self.source!r}: {c.num_layers} layers, d_model {c.d_model}, vocab "
            f"{c.vocab_size}, {c.dtype}; tokenizer {tok})")

  def encode(self, text: str) -> list[int]:
    """Token ids of a text, as prompts are encoded (with the tokenizer's special tokens)."""
    if self.tokenizer is None:
      raise ValueError(self._no_tokenizer)
    return self._checked(self.tokenizer.encode(text), repr(text[:40]))

  def _checked(self, ids, what: str) -> list[int]:
    ids = [int(t) for t in ids]
    if not ids:
      raise ValueError(f"{what}: no tokens")
    if min(ids) < 0 or max(ids) >= self.config.vocab_size:
      raise ValueError(f"{what}: token ids must lie in [0, {self.config.vocab_size}) (got "
                       f"{min(ids)}..{max(ids)}); is the tokenizer this model's?")
    return ids

  def apply_chat_template(self, messages: str | Messages) -> list[int]:
    """Token ids of a conversation (a string is one user message) ending in the assistant's
    turn, rendered by the tokenizer's chat template (as transformers renders it)."""
    if self.tokenizer is None or self.chat_template is None:
      raise ValueError(f"chat=True: the tokenizer of {self.source} has no chat template "
                       "(tokenizer_config.json 'chat_template' or chat_template.jinja)")
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    try:
      from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415 (chat only)
    except ImportError:
      raise ValueError("chat=True: chat templates need jinja2 (pip install jinja2)") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=_raise,
                       strftime_now=lambda f: datetime.datetime.now().strftime(f))
    env.filters["tojson"] = functools.partial(json.dumps, ensure_ascii=False)
    text = env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=True, **self.special_tokens)
    return self._checked(self.tokenizer.encode_documents([text])[0], "chat")  # BOS is in text

  def _rows(self, prompt, chat: bool) -> tuple[list[list[int]], bool, bool]:
    """(token rows, text out, single prompt) of what generate accepts."""
    if isinstance(prompt, np.ndarray):
      prompt = prompt.tolist()
    if chat:
      single = isinstance(prompt, str) or _is_messages(prompt)
      if not single and not (isinstance(prompt, (list, tuple)) and prompt and all(
          isinstance(p, str) or _is_messages(p) for p in prompt)):
        raise ValueError("chat=True: prompt must be a string, a list of {'role', 'content'} "
                         "messages, or a list of those")
      return [self.apply_chat_template(p) for p in ([prompt] if single else prompt)], True, single
    if isinstance(prompt, str):
      return [self.encode(prompt)], True, True
    if isinstance(prompt, (list, tuple)) and prompt:
      if all(isinstance(p, str) for p in prompt):
        return [self.encode(p) for p in prompt], True, False
      if all(_is_int(t) for t in prompt):
        return [self._checked(prompt, "prompt")], False, True
      rows = [p.tolist() if isinstance(p, np.ndarray) else p for p in prompt]
      if all(isinstance(p, (list, tuple)) and all(_is_int(t) for t in p) for p in rows):
        return [self._checked(p, f"prompt {i}") for i, p in enumerate(rows)], False, False
    raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list "
                     f"of such lists (got {type(prompt).__name__})")

  def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 64, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               stop: str | Sequence[str] = (), seed: int = 0, chat: bool = False,
               speculative: bool = False) -> Any:
    """The continuation of a prompt: text for text (or chat messages), token ids for ids; a list
    of prompts gives a list. Greedy when temperature is 0, else sampled (top_k, top_p on the
    tempered distribution; `seed` fixes the draw). Each row stops at EOS, after max_new_tokens
    tokens or at the first `stop` string (text only; cut before it). `chat=True` renders the
    prompt with the tokenizer's chat template. `speculative` drafts with the MTP module."""
    rows, as_text, single = self._rows(prompt, chat)
    out = self._run(rows, as_text, max_new_tokens, _sampling(temperature, top_k, top_p), seed,
                    _stops(stop), speculative)
    return out[0] if single else out

  def stream(self, prompt: str | Messages, max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop: str | Sequence[str] = (), seed: int = 0, chat: bool = False,
             speculative: bool = False) -> Iterator[str]:
    """Text pieces of one prompt's continuation as they are decoded (the tokenizer's incremental
    decoder); joined, they are what `generate` returns. Text that may begin a stop string is held
    back until it does not. Closing the iterator stops the generation."""
    rows, as_text, single = self._rows(prompt, chat)
    if not (as_text and single):
      raise ValueError("stream: one text prompt (or chat conversation); use generate for ids "
                       "or a batch")
    args = (rows, True, max_new_tokens, _sampling(temperature, top_k, top_p), seed, _stops(stop),
            speculative)
    pieces: queue.Queue = queue.Queue()
    cancel, end = threading.Event(), object()

    def work():
      try:
        self._run(*args, on_text=lambda _, s: pieces.put(s), cancel=cancel)
        pieces.put(end)
      except BaseException as e:  # noqa: BLE001 (handed to the consumer)
        pieces.put(e)

    def consume() -> Iterator[str]:
      thread = threading.Thread(target=work, name="deepseek_jax.stream", daemon=True)
      thread.start()
      try:
        while (item := pieces.get()) is not end:
          if isinstance(item, BaseException):
            raise item
          yield item
      finally:
        cancel.set()
        thread.join()
    return consume()

  def _run(self, rows, as_text, max_new_tokens, sampling, seed, stops, speculative,
           on_text=None, cancel: threading.Event | None = None) -> list:
    if stops and not as_text:
      raise ValueError("stop=: stop strings need text prompts (token ids in give ids out; the "
                       "model's EOS still stops)")
    decoders = [self.tokenizer.decoder() for _ in rows] if as_text else []
    texts, ids = [""] * len(rows), [[] for _ in rows]
    sent, done = [0] * len(rows), [False] * len(rows)
    width = max((len(s) for s in stops), default=1)

    def on_tokens(b: int, new: list[int]):
      if cancel is not None and cancel.is_set():
        raise _Abort
      if done[b]:
        return
      ids[b].extend(new)
      if as_text:
        start = max(0, len(texts[b]) - width + 1)
        texts[b] += decoders[b](new)
        hits = [i for s in stops if (i := texts[b].find(s, start)) >= 0]
        if hits:
          texts[b], done[b] = texts[b][:min(hits)], True
        if on_text is not None:
          upto = len(texts[b]) - (0 if done[b] else _held(texts[b], stops))
          if upto > sent[b]:
            on_text(b, texts[b][sent[b]:upto])
            sent[b] = upto
      if all(done):
        raise _Abort

    try:
      _generate(self.config, self.variables, rows, max_new_tokens, sampling, self.eos_ids, seed,
                speculative, on_tokens=on_tokens)
    except _Abort:
      pass
    if on_text is not None and not (cancel is not None and cancel.is_set()):
      for b, text in enumerate(texts):
        if len(text) > sent[b]:
          on_text(b, text[sent[b]:])
    return texts if as_text else ids

  def token_logprobs(self, text: str | Sequence[int] | Sequence[str | Sequence[int]]) -> Any:
    """Per-token log p (nats, float64 arrays) of every token after the first, given the ones
    before it; one array for one text (or ids), a list for a list."""
    rows, _, single = self._rows(text, chat=False)
    if any(len(r) < 2 for r in rows):
      raise ValueError("score: a text must hold at least 2 tokens (the first is the context)")
    T = -(-max(len(r) for r in rows) // 16) * 16
    if T > self.config.max_position_embeddings:
      raise ValueError(f"score: {max(len(r) for r in rows)} tokens exceed "
                       f"max_position_embeddings={self.config.max_position_embeddings}")
    tokens_BT = np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
      tokens_BT[b, :len(r)] = r
    logp_BT = np.asarray(token_logprobs(self.config, self.variables, tokens_BT), np.float64)
    out = [logp_BT[b, :len(r) - 1] for b, r in enumerate(rows)]
    return out[0] if single else out

  def score(self, text: str | Sequence[int] | Sequence[str | Sequence[int]]) -> Any:
    """Log-likelihood in nats: the sum of log p of each token after the first given the ones
    before it (one causal forward pass for the whole batch); a float, or a list for a list."""
    lp = self.token_logprobs(text)
    return float(lp.sum()) if isinstance(lp, np.ndarray) else [float(x.sum()) for x in lp]

  def perplexity(self, text: str | Sequence[int] | Sequence[str | Sequence[int]]) -> Any:
    """exp(-mean log p) over the scored tokens (see `score`); a float, or a list for a list."""
    lp = self.token_logprobs(text)
    return math.exp(-lp.mean()) if isinstance(lp, np.ndarray) else [math.exp(-x.mean()) for x in lp]


def load(path_or_id: str | os.PathLike, *, dtype: str | None = None,
         tokenizer: Any = "auto") -> LM:
  """An `LM` from a train.py workdir (its newest checkpoint, or a `checkpoints/<step>`), a
  Hugging Face DeepSeek directory, or a hub id (ORG/NAME[@REV]) already in the local Hugging Face
  cache. `dtype`: "float32" or "bfloat16" (None: a run's own; float32 for HF checkpoints).
  `tokenizer`: "auto" (the checkpoint's, see the module docstring), "bytes", a tokenizer.json
  path or a tokenizer object."""
  if dtype not in (None, "float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: must be None, 'float32' or 'bfloat16'")
  path = resolve(path_or_id)
  is_hf = (path / "config.json").is_file() or path.suffix == ".safetensors"
  cfg, variables, info = load_for_inference(path, dtype or ("float32" if is_hf else None))
  # One placement whatever the source (a run's arrays come committed to the first device, HF
  # ones not; jit caches them apart): the same compiled steps serve every LM of a config.
  variables = jax.device_put(variables, jax.devices()[0])
  tok, why = find_tokenizer(path, cfg.vocab_size, tokenizer)
  template, special = _chat_config(tok)
  return LM(cfg, variables, tok, info=info, source=str(path_or_id), chat_template=template,
            special_tokens=special, no_tokenizer=why)
