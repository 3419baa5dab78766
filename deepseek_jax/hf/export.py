"""A complete Hugging Face checkpoint directory from a model: config.json and safetensors
(`convert.save_hf`), the tokenizer's files and `generation_config.json`, written beside the target
and moved into place at the end, so a reader sees the old directory or the new one, never half.

Used by `deepseek-jax convert` and by training every `train.export_every` steps.
"""

from __future__ import annotations

import errno
import json
import pathlib
import shutil
import tempfile

from deepseek_jax.config import ModelConfig
from deepseek_jax.hf.convert import save_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def generation_config(extra: dict) -> dict:
  """Greedy decoding with the checkpoint's special tokens (what transformers reads)."""
  out = {k: extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in extra}
  return {**out, "do_sample": False, "_from_model_config": True}


def export_hf(dst, model_cfg: ModelConfig, variables, *, tokenizer_dir=None, extra=None,
              overwrite: bool = False, **save_kw) -> pathlib.Path:
  """Writes `variables` as a HF checkpoint at `dst` with the tokenizer files found in
  `tokenizer_dir` (a run's workdir or a HF directory). An existing `dst` is replaced only with
  `overwrite`, and only once the new directory is complete."""
  dst = pathlib.Path(dst)
  if dst.exists() and not overwrite:
    raise ValueError(f"{dst}: exists; pass --overwrite to replace it (replaced only once the new "
                     "checkpoint is complete)")
  if dst.exists() and not dst.is_dir():
    raise ValueError(f"{dst}: exists and is not a directory")
  extra = dict(extra or {})
  try:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise      # a fault: the caller's error path tells it (exit 1)
    raise ValueError(f"{dst}: cannot create it here ({e.strerror})") from None
  try:
    save_hf(tmp, model_cfg, variables, extra_config=extra, **save_kw)
    for name in TOKENIZER_FILES:
      src = pathlib.Path(tokenizer_dir) / name if tokenizer_dir is not None else None
      if src is not None and src.is_file():
        shutil.copyfile(src, tmp / name)
    (tmp / "generation_config.json").write_text(
        json.dumps(generation_config(extra), indent=2, sort_keys=True) + "\n")
    old = None
    if dst.exists():
      old = dst.parent / f".{dst.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
      dst.rename(old)
    tmp.rename(dst)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst
