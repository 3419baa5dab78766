"""Hugging Face DeepSeek checkpoints in and out (V2, V2-Lite, V3; safetensors, FP8 block scales).

`load_hf` reads tensor by tensor from memory-mapped files into preallocated arrays (FP8 weights
dequantised by the exact rule of `fp8_blocks`), so at most one checkpoint tensor is in flight
beside the result. `save_hf` streams tensors back in the layout of `names`; loading and saving
round-trip bit for bit (FP8 included). Pickle checkpoints are refused.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import naming
from deepseek_jax.config import ModelConfig
from deepseek_jax.hf import fp8_blocks, names
from deepseek_jax.hf.config import from_hf_config, to_hf_config
from deepseek_jax.hf.files import Checkpoint, CheckpointError, TensorPlan, write_checkpoint
from deepseek_jax.model import abstract_variables


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(dict(tree)))


def read_config(path: pathlib.Path) -> dict:
  cfg_path = (path if path.is_dir() else path.parent) / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{cfg_path}: missing (a Hugging Face checkpoint directory holds "
                          "config.json beside its safetensors files)")
  try:
    raw = json.loads(cfg_path.read_bytes().decode("utf-8"))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{cfg_path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                          f"offset {e.start})") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{cfg_path}: holds a JSON {type(raw).__name__.replace('NoneType', 'null')}"
                          ", not an object of model fields")
  return raw


def load_hf(path, dtype: str = "float32", mtp: bool | None = None,
            scan_layers: bool = True) -> tuple[ModelConfig, dict]:
  """Loads a Hugging Face DeepSeek checkpoint directory -> (ModelConfig, variables).

  `dtype` sets the parameter and compute dtype (the router stays f32). `mtp`: None loads the MTP
  layers the checkpoint holds, False drops them, True requires them. FP8 weights are dequantised
  by the exact block rule; `.bin`/`.pt` files are refused.
  """
  path = pathlib.Path(path)
  ckpt = Checkpoint(path)
  raw = read_config(path)
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
  table = {e.hf_name: e for k, s in shapes.items() for e in names.entries(cfg, k, s.shape)}
  mtp_prefix = re.compile(rf"^model\.layers\.(\d+)\.")
  filled = set()
  for name in ckpt.keys():
    if name.endswith("_scale_inv") or name in filled:
      continue
    e = table.get(name)
    if e is None:
      m = mtp_prefix.match(name)
      if names.IGNORED.search(name) or (m and int(m.group(1)) >= cfg.num_layers + n_mtp):
        continue
      raise CheckpointError(f"{path}: unexpected tensor {name!r} (not a parameter of the model "
                            "that config.json describes)")
    a = ckpt.get(name)
    if name + "_scale_inv" in ckpt:
      try:
        a = fp8_blocks.dequantize(a, ckpt.get(name + "_scale_inv"))
      except ValueError as err:
        raise CheckpointError(f"{path}: {name}: {err}") from None
    leaf = arrays[e.leaf]
    want = names.hf_shape(e, leaf.shape)
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


NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


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
  if dtype not in NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}: must be one of {sorted(NP_DTYPES)}")
  flat = _flat(variables)
  plans: list[TensorPlan] = []
  table = sorted((e for k, v in flat.items() for e in names.entries(cfg, k, tuple(v.shape))),
                 key=lambda e: _natural(e.hf_name))
  for e in table:
    plans.extend(_plans_for(e, flat[e.leaf], NP_DTYPES[dtype], fp8))
  for k in range(cfg.num_mtp_layers):
    pre = f"model.layers.{cfg.num_layers + k}."
    for copy_of, name in ((("params", naming.EMBED, "embedding"), "embed_tokens.weight"),
                          (("params", naming.HEAD, "kernel"), "shared_head.head.weight")):
      e = names.Entry(pre + name, copy_of, (), copy_of[-1] == "kernel", 1)
      plans.extend(_plans_for(e, flat[copy_of], NP_DTYPES[dtype], False))
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


def _plans_for(e: names.Entry, leaf, dtype: np.dtype, fp8: bool) -> list[TensorPlan]:
  shape = names.hf_shape(e, tuple(leaf.shape))

  def tensor() -> np.ndarray:
    a = np.asarray(leaf[e.index] if e.index else leaf)
    return a.reshape(shape[1], shape[0]).T if e.linear else a

  if e.hf_name.endswith("e_score_correction_bias"):
    return [TensorPlan(e.hf_name, np.dtype(np.float32), shape, tensor)]
  if fp8 and e.linear and not names.NOT_FP8.search(e.hf_name):
    cache = {}

    def weight():
      cache["q"], cache["s"] = fp8_blocks.quantize(np.asarray(tensor(), np.float32))
      return cache.pop("q")

    return [TensorPlan(e.hf_name, fp8_blocks.E4M3, shape, weight),
            TensorPlan(e.hf_name + "_scale_inv", np.dtype(np.float32),
                       fp8_blocks.grid_shape(shape), lambda: cache.pop("s"))]
  return [TensorPlan(e.hf_name, dtype, shape, lambda: np.asarray(tensor(), dtype))]


# Fields of a source config.json that ModelConfig does not hold but a converted copy should keep.
PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")
