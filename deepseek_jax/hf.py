"""Hugging Face DeepSeek checkpoints in and out (V2, V2-Lite, V3; safetensors, FP8 block scales).

Parameter names were chosen to map one-to-one onto checkpoint names (semantics §4), so this module
is a table: `model.layers.{i}.X` is layer i of `dense_blocks` (i < first_k_dense_replace) or of
`moe_blocks`, stacked on a leading layer axis; MTP depth k is `model.layers.{num_layers + k}`.
Linear weights are [out, in] in the checkpoint and kernels [in..., out...] here; routed experts are
stored per expert (`mlp.experts.{j}.gate_proj.weight` [M, D]) and stacked here ([E, D, M]).

`load_hf` reads tensor by tensor from memory-mapped files into preallocated arrays (FP8 weights
dequantised by the exact rule of `hf_fp8`), so at most one checkpoint tensor is in flight beside
the result. `save_hf` streams tensors back in the same layout; loading and saving round-trip
bit for bit (FP8 included). Pickle checkpoints are refused.

Command line: `python -m deepseek_jax.hf convert SRC DST [--dtype bfloat16] [--fp8]` and
`python -m deepseek_jax.hf info SRC`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Iterator, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import hf_fp8
from deepseek_jax.config import ModelConfig
from deepseek_jax.hf_config import HFConfigError, from_hf_config, to_hf_config
from deepseek_jax.hf_safetensors import Checkpoint, CheckpointError, TensorPlan, write_checkpoint

# Multi-axis inputs of a kernel (all other kernels contract one leading axis).
_N_IN = {"o_proj": 2}
# Never quantized in DeepSeek's FP8 release (semantics §3): output head, router, MTP projection.
_NOT_FP8 = re.compile(r"(^lm_head\.|mlp\.gate\.weight$|eh_proj\.weight$)")
# Present in released checkpoints but not parameters here (MTP copies of the shared embed/head).
_IGNORED = re.compile(r"(\.(embed_tokens|shared_head\.head)\.weight$|rotary_emb\.inv_freq$)")


class Entry(NamedTuple):
  """One checkpoint tensor: where it lives in a leaf (`index` into the leading axes) and how."""
  hf_name: str
  leaf: tuple[str, ...]
  index: tuple[int, ...]
  linear: bool          # [out, in] in the checkpoint, [in..., out...] here
  n_in: int


def _block_sub(sub: tuple[str, ...]) -> tuple[str, bool, int]:
  """A block-relative param path -> (HF name, linear?, number of input axes)."""
  if sub[-1] == "e_score_correction_bias":
    return "mlp.gate.e_score_correction_bias", False, 0
  if sub[-1] == "kernel":
    return ".".join(sub[:-1]) + ".weight", True, _N_IN.get(sub[-2], 1)
  if sub[-1] == "weight":
    return ".".join(sub) if sub[-2] != "shared_head_norm" else "shared_head.norm.weight", False, 0
  raise KeyError(f"no checkpoint name for parameter {'/'.join(sub)}")


def _entries(cfg: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...]) -> Iterator[Entry]:
  """Checkpoint tensors of one leaf (`path` = (collection, *module path, name))."""
  p = path[1:]
  if p == ("embed_tokens", "embedding"):
    yield Entry("model.embed_tokens.weight", path, (), False, 0)
    return
  if p == ("norm", "weight"):
    yield Entry("model.norm.weight", path, (), False, 0)
    return
  if p == ("lm_head", "kernel"):
    yield Entry("lm_head.weight", path, (), True, 1)
    return
  if p[0] in ("dense_blocks", "moe_blocks"):
    offset = 0 if p[0] == "dense_blocks" else cfg.first_k_dense_replace
    if p[1] == "layers":
      layers, lead, sub = [(offset + i, (i,)) for i in range(shape[0])], 1, p[2:]
    else:
      layers, lead, sub = [(offset + int(p[1].split("_")[1]), ())], 0, p[2:]
  elif p[0] == "mtp":
    k = int(p[1].split("_")[1])
    layers, lead, sub = [(cfg.num_layers + k, ())], 0, p[3:] if p[2] == "block" else p[2:]
  else:
    raise KeyError(f"no checkpoint name for parameter {'/'.join(p)}")
  for layer, idx in layers:
    pre = f"model.layers.{layer}."
    if sub[:2] == ("mlp", "experts"):
      n_experts = shape[lead]
      for j in range(n_experts):
        yield Entry(f"{pre}mlp.experts.{j}.{sub[2]}.weight", path, idx + (j,), True, 1)
      continue
    name, linear, n_in = _block_sub(sub)
    yield Entry(pre + name, path, idx, linear, n_in)


def _hf_shape(e: Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
  s = leaf_shape[len(e.index):]
  return (math.prod(s[e.n_in:]), math.prod(s[:e.n_in])) if e.linear else s


def abstract_variables(cfg: ModelConfig) -> dict:
  """Shapes and dtypes of every variable of `Transformer(cfg)` (nothing allocated)."""
  from deepseek_jax.model import Transformer  # noqa: PLC0415 (keeps `hf_config` users light)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)
  return flax.core.meta.unbox(boxed)


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(dict(tree)))


def _read_config(path: pathlib.Path) -> dict:
  cfg_path = (path if path.is_dir() else path.parent) / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{cfg_path}: missing (a Hugging Face checkpoint directory holds "
                          "config.json beside its safetensors files)")
  try:
    return json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def load_hf(path, dtype: str = "float32", mtp: bool | None = None,
            scan_layers: bool = True) -> tuple[ModelConfig, dict]:
  """Loads a Hugging Face DeepSeek checkpoint directory -> (ModelConfig, variables).

  `dtype` sets the parameter and compute dtype (the router stays f32). `mtp`: None loads the MTP
  layers the checkpoint holds, False drops them, True requires them. FP8 weights are dequantised
  by the exact block rule; `.bin`/`.pt` files are refused.
  """
  path = pathlib.Path(path)
  ckpt = Checkpoint(path)
  raw = _read_config(path)
  base = from_hf_config(raw, dtype, num_mtp_layers=0)
  declared = int(raw.get("num_nextn_predict_layers") or raw.get("num_mtp_layers") or 0)
  present = 0
  while f"model.layers.{base.num_layers + present}.eh_proj.weight" in ckpt:
    present += 1
  if mtp is True and present == 0:
    raise CheckpointError(f"{path}: mtp=True but the checkpoint holds no MTP layer "
                          f"(model.layers.{base.num_layers}.eh_proj.weight; config.json declares "
                          f"{declared})")
  n_mtp = 0 if mtp is False else present
  cfg = dataclasses.replace(base, num_mtp_layers=n_mtp, scan_layers=scan_layers)
  shapes = _flat(abstract_variables(cfg))
  arrays = {k: np.empty(s.shape, s.dtype) for k, s in shapes.items()}
  table = {e.hf_name: e for k, s in shapes.items() for e in _entries(cfg, k, s.shape)}
  mtp_prefix = re.compile(rf"^model\.layers\.(\d+)\.")
  filled = set()
  for name in ckpt.keys():
    if name.endswith("_scale_inv") or name in filled:
      continue
    e = table.get(name)
    if e is None:
      m = mtp_prefix.match(name)
      if _IGNORED.search(name) or (m and int(m.group(1)) >= cfg.num_layers + n_mtp):
        continue
      raise CheckpointError(f"{path}: unexpected tensor {name!r} (not a parameter of the model "
                            "that config.json describes)")
    a = ckpt.get(name)
    if name + "_scale_inv" in ckpt:
      try:
        a = hf_fp8.dequantize(a, ckpt.get(name + "_scale_inv"))
      except ValueError as err:
        raise CheckpointError(f"{path}: {name}: {err}") from None
    leaf = arrays[e.leaf]
    want = _hf_shape(e, leaf.shape)
    if tuple(a.shape) != want:
      raise CheckpointError(f"{path}: {name} has shape {tuple(a.shape)}, config.json implies "
                            f"{want}")
    leaf[e.index] = a.T.reshape(leaf.shape[len(e.index):]) if e.linear else a
    filled.add(name)
  missing = sorted(set(table) - filled)
  if missing:
    raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
  out = {}
  for k in list(arrays):  # one leaf at a time onto the device, dropping the host copy
    out[k] = jnp.asarray(arrays.pop(k))
  return cfg, flax.traverse_util.unflatten_dict(out)


_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


def save_hf(path, model_cfg: ModelConfig, variables, *, dtype: str | None = None,
            fp8: bool = False, max_shard_bytes: int | None = 5 * 2**30,
            extra_config: dict | None = None) -> list[pathlib.Path]:
  """Writes `variables` as a Hugging Face checkpoint directory (config.json + safetensors).

  `dtype` (default: the model's param dtype; bfloat16 with `fp8`) applies to every tensor except
  the routing bias (always f32) and, with `fp8`, the quantized linears (E4M3 plus f32 128x128
  `weight_scale_inv`; output head, router and MTP eh_proj stay unquantized as in the release).
  The MTP layers carry copies of the shared embedding and head, as released checkpoints do.
  """
  cfg = model_cfg
  dtype = dtype or ("bfloat16" if fp8 else cfg.param_dtype)
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}: must be one of {sorted(_NP_DTYPES)}")
  flat = _flat(variables)
  plans: list[TensorPlan] = []
  entries = sorted((e for k, v in flat.items() for e in _entries(cfg, k, tuple(v.shape))),
                   key=lambda e: _natural(e.hf_name))
  for e in entries:
    plans.extend(_plans_for(e, flat[e.leaf], _NP_DTYPES[dtype], fp8))
  for k in range(cfg.num_mtp_layers):
    pre = f"model.layers.{cfg.num_layers + k}."
    for copy_of, name in ((("params", "embed_tokens", "embedding"), "embed_tokens.weight"),
                          (("params", "lm_head", "kernel"), "shared_head.head.weight")):
      e = Entry(pre + name, copy_of, (), copy_of[-1] == "kernel", 1)
      plans.extend(_plans_for(e, flat[copy_of], _NP_DTYPES[dtype], False))
  path = pathlib.Path(path)
  files = write_checkpoint(path, sorted(plans, key=lambda p: _natural(p.name)), max_shard_bytes)
  config = to_hf_config(cfg, torch_dtype=dtype, extra=extra_config)
  if fp8:
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                     "quant_method": "fp8", "weight_block_size": [128, 128]}
  else:
    config.pop("quantization_config", None)
  (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return files


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _plans_for(e: Entry, leaf, dtype: np.dtype, fp8: bool) -> list[TensorPlan]:
  shape = _hf_shape(e, tuple(leaf.shape))

  def tensor() -> np.ndarray:
    a = np.asarray(leaf[e.index] if e.index else leaf)
    return a.reshape(shape[1], shape[0]).T if e.linear else a

  if e.hf_name.endswith("e_score_correction_bias"):
    return [TensorPlan(e.hf_name, np.dtype(np.float32), shape, tensor)]
  if fp8 and e.linear and not _NOT_FP8.search(e.hf_name):
    cache = {}

    def weight():
      cache["q"], cache["s"] = hf_fp8.quantize(np.asarray(tensor(), np.float32))
      return cache.pop("q")

    return [TensorPlan(e.hf_name, hf_fp8.E4M3, shape, weight),
            TensorPlan(e.hf_name + "_scale_inv", np.dtype(np.float32),
                       hf_fp8.grid_shape(shape), lambda: cache.pop("s"))]
  return [TensorPlan(e.hf_name, dtype, shape, lambda: np.asarray(tensor(), dtype))]


# Fields of a source config.json that ModelConfig does not hold but a converted copy should keep.
PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")


def _parse_size(text: str) -> int:
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
  if not m:
    raise ValueError(f"--max-shard-size {text!r}: write a size such as 5GB or 500MB")
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def main(argv=None) -> int:
  """`convert SRC DST [--dtype D] [--fp8] [--no-mtp] [--max-shard-size 5GB]` | `info SRC`."""
  import argparse  # noqa: PLC0415
  import sys  # noqa: PLC0415
  ap = argparse.ArgumentParser(prog="python -m deepseek_jax.hf", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  conv = sub.add_parser("convert", help="re-write a checkpoint (dtype, FP8, shards)")
  conv.add_argument("src", help="Hugging Face checkpoint directory or train.py workdir")
  conv.add_argument("dst", help="output directory")
  conv.add_argument("--dtype", choices=sorted(_NP_DTYPES), default=None)
  conv.add_argument("--fp8", action="store_true", help="E4M3 weights with 128x128 block scales")
  conv.add_argument("--no-mtp", action="store_true", help="drop the MTP layers")
  conv.add_argument("--max-shard-size", default="5GB")
  info = sub.add_parser("info", help="print the model config and parameter counts")
  info.add_argument("src")
  args = ap.parse_args(argv)
  try:
    if args.cmd == "info":
      cfg = from_hf_config(_read_config(pathlib.Path(args.src)))
      print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
      print(json.dumps(cfg.param_counts(), indent=2))
      return 0
    shard = _parse_size(args.max_shard_size)
    src = pathlib.Path(args.src)
    if pathlib.Path(args.dst).resolve() == src.resolve():
      raise ValueError("DST must differ from SRC (the source is memory-mapped while writing)")
    from deepseek_jax.restore import load_for_inference  # noqa: PLC0415
    cfg, variables, extra = load_for_inference(src)
    extra.pop("step", None)
    if args.no_mtp and cfg.num_mtp_layers:
      cfg = dataclasses.replace(cfg, num_mtp_layers=0)
      variables = {c: {k: v for k, v in t.items() if k != "mtp"} for c, t in variables.items()}
    files = save_hf(args.dst, cfg, variables, dtype=args.dtype, fp8=args.fp8,
                    max_shard_bytes=shard, extra_config=extra)
    print(f"wrote {len(files)} file(s) to {args.dst}")
    return 0
  except (CheckpointError, HFConfigError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  raise SystemExit(main())
