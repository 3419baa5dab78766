"""HF checkpoint files: safetensors I/O, the FP8 block rule, config mapping, round trips."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax import hf
from deepseek_jax.hf import __main__ as hf_cli
from deepseek_jax.hf import fp8_blocks as hf_fp8
from deepseek_jax.config import load_config
from deepseek_jax.hf.config import HFConfigError, from_hf_config, to_hf_config
from deepseek_jax.hf.files import (Checkpoint, CheckpointError, SafetensorsFile, TensorPlan,
                                         write_checkpoint)
from tests.inference.conftest import FIXTURES, fixture_dir, load, reference

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _plans(tensors: dict[str, np.ndarray]) -> list[TensorPlan]:
  return [TensorPlan(k, v.dtype, v.shape, lambda v=v: v) for k, v in tensors.items()]


def test_safetensors_write_read_all_dtypes_and_shards(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "a.f32": rng.normal(size=(3, 5)).astype(np.float32),
      "b.bf16": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
      "c.f8": rng.normal(size=(4, 4)).astype(ml_dtypes.float8_e4m3fn),
      "d.i64": np.arange(6, dtype=np.int64).reshape(2, 3),
      "e.scalar": np.array(2.5, np.float32),
  }
  files = write_checkpoint(tmp_path, _plans(tensors), max_shard_bytes=64)
  assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
  ckpt = Checkpoint(tmp_path)
  assert sorted(ckpt.keys()) == sorted(tensors)
  for k, v in tensors.items():
    got = ckpt.get(k)
    assert got.dtype == v.dtype and got.shape == v.shape
    assert got.tobytes() == v.tobytes()
  # The reference library reads what we write (dtypes it knows), and vice versa.
  single = tmp_path / "single"
  write_checkpoint(single, _plans({k: tensors[k] for k in ("a.f32", "d.i64")}))
  theirs = safetensors.numpy.load_file(single / "model.safetensors")
  np.testing.assert_array_equal(theirs["a.f32"], tensors["a.f32"])
  safetensors.numpy.save_file({"x": tensors["a.f32"]}, tmp_path / "theirs.safetensors")
  np.testing.assert_array_equal(SafetensorsFile(tmp_path / "theirs.safetensors").get("x"),
                                tensors["a.f32"])


def test_truncated_file_is_rejected(tmp_path):
  write_checkpoint(tmp_path, _plans({"w": np.ones((64, 64), np.float32)}))
  f = tmp_path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match="truncated"):
    Checkpoint(tmp_path)


class _Boom:
  """Unpickling this would create a marker file."""
  marker = ""

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_checkpoints_are_refused_unread(tmp_path, capsys):
  boom = _Boom()
  boom.marker = str(tmp_path / "unpickled")
  (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(boom))
  (tmp_path / "config.json").write_text((fixture_dir("v2_tiny") / "config.json").read_text())
  for target in (tmp_path, tmp_path / "pytorch_model.bin"):
    with pytest.raises(CheckpointError, match="pickle"):
      hf.load_hf(target)
  assert hf_cli.main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert "pickle" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "unpickled").exists()


def test_fp8_dequant_is_the_exact_rule_on_unaligned_weight():
  """kv_a_proj_with_mqa [200, 144] has a (2, 2) grid of partial blocks; the torch reference
  computed f32(q) * scale_inv[r // 128, c // 128]."""
  ref = reference("v3_fp8_tiny")
  name = str(ref["kv_a_name"])
  ckpt = Checkpoint(fixture_dir("v3_fp8_tiny"))
  q, s = ckpt.get(name), ckpt.get(name + "_scale_inv")
  assert q.dtype == hf_fp8.E4M3 and q.shape == (200, 144) and s.shape == (2, 2)
  got = hf_fp8.dequantize(q, s)
  assert got.tobytes() == ref["kv_a_dequant"].tobytes()
  # transformers' CPU rule (block = rows // grid rows = 100) would scale rows 100..127 wrongly.
  wrong = q.astype(np.float32) * np.repeat(np.repeat(s, 100, 0), 72, 1)[:200, :144]
  assert not np.array_equal(wrong, got)
  # Quantizing the dequantized weight reproduces the reference quantizer's q and scales.
  q2, s2 = hf_fp8.quantize(got)
  assert q2.tobytes() == q.tobytes() and s2.tobytes() == np.asarray(s).tobytes()


@given(rows=st.integers(1, 300), cols=st.integers(1, 300), log_scale=st.floats(-8, 8),
       seed=st.integers(0, 2**16))
def test_fp8_quantize_dequantize_quantize_is_bitwise_stable(rows, cols, log_scale, seed):
  w = np.random.default_rng(seed).standard_normal((rows, cols)) * 2.0**log_scale
  w = w.astype(np.float32)
  q, s = hf_fp8.quantize(w)
  assert s.shape == hf_fp8.grid_shape((rows, cols))
  blocks = np.abs(np.pad(q.astype(np.float32), ((0, -rows % 128), (0, -cols % 128))))
  assert np.all(blocks.reshape(s.shape[0], 128, s.shape[1], 128).max(axis=(1, 3)) == 448.0)
  q2, s2 = hf_fp8.quantize(hf_fp8.dequantize(q, s))
  assert q2.tobytes() == q.tobytes() and s2.tobytes() == s.tobytes()
  assert np.max(np.abs(hf_fp8.dequantize(q, s) - w)) <= np.max(np.abs(w)) * 2.0**-3


def test_fp8_dequant_rejects_a_wrong_grid():
  with pytest.raises(ValueError, match="ceil grid"):
    hf_fp8.dequantize(np.zeros((576, 256), hf_fp8.E4M3), np.ones((4, 2), np.float32))


@pytest.mark.parametrize("name", ["v3_tiny", "v2_tiny", "v3_fp8_tiny"])
def test_load_save_round_trip_is_bit_exact(name, tmp_path):
  """Same tensor names, dtypes and bytes (FP8 weights and scales included) and the same config."""
  cfg, variables = load(name)
  fp8 = name == "v3_fp8_tiny"
  hf.save_hf(tmp_path, cfg, variables, fp8=fp8, max_shard_bytes=100_000)
  src, out = Checkpoint(fixture_dir(name)), Checkpoint(tmp_path)
  assert sorted(src.keys()) == sorted(out.keys())
  for k in src.keys():
    a, b = src.get(k), out.get(k)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), k
    assert a.tobytes() == b.tobytes(), k
  saved = json.loads((tmp_path / "config.json").read_text())
  assert ("quantization_config" in saved) == fp8
  assert from_hf_config(saved, num_mtp_layers=cfg.num_mtp_layers) == dataclasses.replace(
      cfg, scan_layers=True)


def test_mtp_layers_are_optional_on_load():
  cfg, variables = load("v3_tiny", mtp=False)
  assert cfg.num_mtp_layers == 0 and "mtp" not in variables["params"]
  assert load("v3_tiny")[0].num_mtp_layers == 1
  with pytest.raises(CheckpointError, match="no MTP layer"):
    hf.load_hf(fixture_dir("v2_tiny"), mtp=True)


def test_shape_mismatch_and_missing_tensors_name_the_tensor(tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(fixture_dir("v2_tiny"), bad)
  raw = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps(dict(raw, kv_lora_rank=12)))
  with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.kv_a_\w+\.weight has shape"):
    hf.load_hf(bad)
  ckpt = Checkpoint(fixture_dir("v2_tiny"))
  kept = {k: np.array(ckpt.get(k)) for k in ckpt.keys() if "layers.2.mlp.experts.5" not in k}
  short = tmp_path / "short"
  write_checkpoint(short, _plans(kept))
  shutil.copy(fixture_dir("v2_tiny") / "config.json", short / "config.json")
  with pytest.raises(CheckpointError, match="3 tensors missing"):
    hf.load_hf(short)


def test_config_rope_forms_and_routing_methods():
  legacy = json.loads((fixture_dir("v3_fp8_tiny") / "config.json").read_text())
  modern = dict(legacy)
  rope = dict(modern.pop("rope_scaling"), rope_theta=modern.pop("rope_theta"))
  rope["rope_type"] = rope.pop("type")
  modern["rope_parameters"] = rope
  assert from_hf_config(legacy) == from_hf_config(modern)
  assert from_hf_config(legacy).yarn.factor == 40.0
  v2 = json.loads((fixture_dir("v2_tiny") / "config.json").read_text())
  c = from_hf_config(v2)
  assert (c.scoring_func, c.routing_bias, c.n_group, c.topk_group, c.q_lora_rank) == (
      "softmax", False, 4, 2, None)
  assert from_hf_config(dict(v2, topk_method="greedy")).n_group == 1
  for bad, match in ((dict(legacy, model_type="llama"), "model_type"),
                     (dict(legacy, tie_word_embeddings=True), "tie_word_embeddings"),
                     (dict(legacy, rope_interleave=False), "rope_interleave"),
                     (dict(legacy, rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
                     (dict(legacy, rope_scaling=dict(legacy["rope_scaling"], attention_factor=1.2)),
                      "attention_factor"),
                     (dict(legacy, num_attention_heads=0), "num_heads")):
    with pytest.raises(HFConfigError, match=match):
      from_hf_config(bad)


_NOT_IN_HF = ("dtype", "param_dtype", "scan_layers", "remat", "balance_loss_alpha", "moe_dispatch")


@pytest.mark.parametrize("yaml_name",
                         ["deepseek_v3_671b.yaml", "deepseek_v2_lite.yaml", "tiny.yaml"])
def test_config_round_trip_through_config_json(yaml_name):
  cfg = load_config(CONFIGS / yaml_name).model
  back = from_hf_config(json.loads(json.dumps(to_hf_config(cfg))))
  assert dataclasses.replace(back, **{f: getattr(cfg, f) for f in _NOT_IN_HF}) == cfg


def test_cli_converts_fp8_to_bf16_and_prints_info(tmp_path, capsys):
  out = tmp_path / "bf16"
  assert hf_cli.main(["convert", str(fixture_dir("v3_fp8_tiny")), str(out), "--dtype", "bfloat16"]) == 0
  ckpt, src = Checkpoint(out), Checkpoint(fixture_dir("v3_fp8_tiny"))
  assert not [k for k in ckpt.keys() if k.endswith("_scale_inv")]
  name = str(reference("v3_fp8_tiny")["kv_a_name"])
  want = hf_fp8.dequantize(src.get(name), src.get(name + "_scale_inv")).astype(ml_dtypes.bfloat16)
  assert ckpt.get(name).tobytes() == want.tobytes()
  cfg_out = json.loads((out / "config.json").read_text())
  assert "quantization_config" not in cfg_out and cfg_out["eos_token_id"] == 2
  capsys.readouterr()
  assert hf_cli.main(["info", str(FIXTURES / "v3_tiny")]) == 0
  assert json.loads(capsys.readouterr().out.split("\n}\n")[0] + "}")["kv_lora_rank"] == 16
  assert hf_cli.main(["convert", str(FIXTURES / "nope"), str(out)]) == 2
