"""HF export: a complete directory (weights, config, tokenizer files, generation config) that loads
back to the same weights; convert refuses to replace a directory unless told, and then replaces it
only when the new one is complete (training's exports: tests/training/test_workdir.py)."""

import json

import jax
import numpy as np
import pytest

from deepseek_jax.generate.load import load_for_inference
from deepseek_jax.hf import __main__ as hf_cli
from deepseek_jax.hf.export import export_hf
from deepseek_jax.model import Transformer
from tests.helpers import small_config


def _variables(cfg):
  toks = jax.numpy.zeros((1, 8), jax.numpy.int32)
  return jax.device_get(Transformer(cfg).init(jax.random.key(0), toks))


def test_export_is_complete_and_loads_back(tmp_path):
  cfg = small_config(vocab_size=300)
  variables = _variables(cfg)
  src = tmp_path / "src"
  src.mkdir()
  (src / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
  (src / "tokenizer_config.json").write_text('{"chat_template": "x"}')
  dst = export_hf(tmp_path / "out", cfg, variables, tokenizer_dir=src,
                  extra={"eos_token_id": 1, "bos_token_id": 0})
  names = {p.name for p in dst.iterdir()}
  assert {"config.json", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= names and any(n.endswith(".safetensors") for n in names)
  assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == 1
  _, back, extra = load_for_inference(dst)
  assert extra["eos_token_id"] == 1
  for a, b in zip(jax.tree.leaves(back["params"]), jax.tree.leaves(variables["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not list(tmp_path.glob(".out.*"))              # no temporary left behind


def test_convert_refuses_an_existing_destination_without_overwrite(tmp_path, capsys):
  cfg = small_config(vocab_size=300)
  src = export_hf(tmp_path / "src", cfg, _variables(cfg))
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  assert hf_cli.main(["convert", str(src), str(dst)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--overwrite" in err[0]
  assert (dst / "keep.txt").read_text() == "mine"        # nothing touched
  assert hf_cli.main(["convert", str(src), str(dst), "--overwrite"]) == 0
  assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
