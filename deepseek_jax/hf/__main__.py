"""`deepseek-jax convert SRC DST [--dtype bfloat16] [--fp8] [--no-mtp]` and `deepseek-jax info SRC`
(or `python -m deepseek_jax.hf convert|info ...`).

SRC is a Hugging Face checkpoint directory or a train.py workdir. User errors print one line and
exit with 2.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys

from deepseek_jax import errors, naming
from deepseek_jax.config import cli
from deepseek_jax.generate.load import load_for_inference
from deepseek_jax.hf.config import HFConfigError, from_hf_config
from deepseek_jax.hf.convert import NP_DTYPES, read_config
from deepseek_jax.hf.export import export_hf
from deepseek_jax.hf.files import CheckpointError


def _parse_size(text: str) -> int:
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
  if not m:
    raise ValueError(f"--max-shard-size {text!r}: write a size such as 5GB or 500MB")
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def _tokenizer_dir(src: pathlib.Path) -> pathlib.Path:
  """Where the source's tokenizer files are: a HF directory, or a run's workdir (also when given
  its checkpoints/ or one step of it)."""
  for d in (src, *src.parents[:3]):
    if (d / "tokenizer.json").is_file() or (d / "config.json").is_file():
      return d
  return src


def main(argv=None, prog: str = "python -m deepseek_jax.hf") -> int:
  """`convert SRC DST [--dtype D] [--fp8] [--no-mtp] [--max-shard-size 5GB]` | `info SRC`."""
  ap = cli.Parser(prog=prog, description="Hugging Face DeepSeek checkpoints: convert and inspect.")
  sub = ap.add_subparsers(dest="cmd", required=True, parser_class=cli.Parser)
  conv = sub.add_parser("convert", help="re-write a checkpoint (dtype, FP8, shards)",
                        description="Re-write a run or HF checkpoint as a HF checkpoint (no config "
                                    "keys: the model is the checkpoint's).")
  conv.add_argument("src", help="Hugging Face checkpoint directory or train.py workdir")
  conv.add_argument("dst", help="output directory")
  conv.add_argument("--dtype", choices=sorted(NP_DTYPES), default=None)
  conv.add_argument("--fp8", action="store_true", help="E4M3 weights with 128x128 block scales")
  cli.add_flag(conv, "--no-mtp", action="store_true", help="drop the MTP layers")
  cli.add_flag(conv, "--max-shard-size", default="5GB")
  conv.add_argument("--overwrite", action="store_true",
                    help="replace an existing DST (once the new checkpoint is complete)")
  info = sub.add_parser("info", help="print the model config and parameter counts")
  info.add_argument("src")
  args = ap.parse_args(argv)
  try:
    if args.cmd == "info":
      src = pathlib.Path(args.src)
      if not src.is_dir():
        raise ValueError(f"{args.src}: " + ("a file, not a directory: give the Hugging Face "
                                             "checkpoint's directory" if src.exists() else
                                             "no such directory (a Hugging Face checkpoint's)"))
      cfg = from_hf_config(read_config(pathlib.Path(args.src)))
      print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
      print(json.dumps(cfg.param_counts(), indent=2))
      return 0
    shard = _parse_size(args.max_shard_size)
    src = pathlib.Path(args.src)
    if pathlib.Path(args.dst).resolve() == src.resolve():
      raise ValueError("DST must differ from SRC (the source is memory-mapped while writing)")
    cfg, variables, extra = load_for_inference(src)
    extra.pop("step", None)
    if args.no_mtp and cfg.num_mtp_layers:
      cfg = dataclasses.replace(cfg, num_mtp_layers=0)
      variables = {c: {k: v for k, v in t.items() if k != naming.MTP} for c, t in variables.items()}
    dst = export_hf(args.dst, cfg, variables, tokenizer_dir=_tokenizer_dir(src), extra=extra,
                    overwrite=args.overwrite, dtype=args.dtype, fp8=args.fp8,
                    max_shard_bytes=shard)
    print(f"wrote {len(list(dst.iterdir()))} file(s) to {dst}")
    return 0
  except (CheckpointError, HFConfigError, ValueError, OSError) as e:
    if isinstance(e, OSError) and errors.os_errno(e) is not None:
      raise      # disk full, read-only DST: a fault (exit 1, `errors`), not bad input
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  errors.command(main, "python -m deepseek_jax.hf")
