"""Config: every file in configs/ loads; strict YAML; overrides; invalid values give clear errors."""

import pathlib

import pytest
from hypothesis import given, strategies as st

from deepseek_jax.config import ConfigError, ModelConfig, load_config

CONFIGS = sorted(pathlib.Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
  cfg = load_config(path)
  assert cfg.model.param_counts()["total"] > 0
  assert path.read_text().lstrip().startswith("#"), "each config opens with the command that runs it"


def test_configs_present():
  names = {p.name for p in CONFIGS}
  assert {"tiny.yaml", "deepseek_v3_671b.yaml", "deepseek_v2_lite.yaml"} <= names


def test_dotted_overrides():
  cfg = load_config("configs/tiny.yaml", ["model.num_layers=6", "train.learning_rate=1e-4",
                                          "model.q_lora_rank=null", "model.yarn.factor=4"])
  assert cfg.model.num_layers == 6 and cfg.train.learning_rate == 1e-4
  assert cfg.model.q_lora_rank is None and cfg.model.yarn.factor == 4.0


def test_v3_counts():
  p = load_config("configs/deepseek_v3_671b.yaml").model.param_counts()
  assert abs(p["total"] / 671e9 - 1) < 0.005
  assert abs(p["active"] / 36.6e9 - 1) < 0.005                 # without the embedding lookup
  assert abs(p["active_with_embedding"] / 37.5e9 - 1) < 0.005  # with it
  assert abs(p["mtp_total"] / 11.5e9 - 1) < 0.015              # report: 11.5B unique (we count 11.61B)


def test_v3_flops_per_token_table2():
  f = load_config("configs/deepseek_v3_671b.yaml").model.flops_per_token(4096, mtp=False)
  assert abs(f / 250e9 - 1) < 0.02


def test_cache_values_per_token_v3():
  assert ModelConfig().cache_values_per_token == 576 * 61


INVALID = [
    ("model.num_layers=0", "model.num_layers"),
    ("model.d_model=-4", "model.d_model"),
    ("model.vocab_size=1.5", "model.vocab_size"),
    ("model.num_heads=abc", "model.num_heads"),
    ("model.qk_rope_head_dim=7", "model.qk_rope_head_dim"),
    ("model.q_lora_rank=0", "model.q_lora_rank"),
    ("model.first_k_dense_replace=99", "model.first_k_dense_replace"),
    ("model.num_experts_per_tok=99", "model.num_experts_per_tok"),
    ("model.n_group=3", "model.n_group"),
    ("model.topk_group=9", "model.topk_group"),
    ("model.scoring_func=relu", "model.scoring_func"),
    ("model.moe_dispatch=magic", "model.moe_dispatch"),
    ("model.dropless_impl=megablocks", "model.dropless_impl"),
    ("model.dropless_block=0", "model.dropless_block"),
    ("model.dropless_block=-8", "model.dropless_block"),
    ("model.dropless_block=2.5", "model.dropless_block"),
    ("model.rms_norm_eps=0", "model.rms_norm_eps"),
    ("model.routed_scaling_factor=-1", "model.routed_scaling_factor"),
    ("model.dtype=float16", "model.dtype"),
    ("model.yarn.factor=0.5", "model.yarn.factor"),
    ("model.yarn.beta_fast=0.5", "model.yarn.beta_fast"),
    ("model.remat=sometimes", "model.remat"),
    ("model.bogus=1", "model.bogus"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.decay_start_frac=2", "train.decay_start_frac"),
    ("fp8.recipe=fp4", "fp8.recipe"),
    ("train.seq_len=100000", "train.seq_len"),
    ("mesh.data=0", "mesh.data"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("model.scan_layers=maybe", "model.scan_layers"),
]


@pytest.mark.parametrize("override,field", INVALID, ids=[o for o, _ in INVALID])
def test_invalid_configs_are_rejected_clearly(override, field):
  with pytest.raises(ConfigError) as e:
    load_config("configs/tiny.yaml", [override])
  msg = str(e.value)
  assert field in msg and "\n" not in msg
  assert "must" in msg or "unknown" in msg


def test_dispatch_fields_reach_the_expert_runner():
  from deepseek_jax.dispatch import LocalExperts  # noqa: PLC0415
  cfg = load_config("configs/tiny.yaml").model
  assert (cfg.dropless_impl, cfg.dropless_block) == ("auto", None)
  assert LocalExperts.from_config(cfg) == LocalExperts("dropless", None, None)
  cfg = load_config("configs/tiny.yaml", ["model.moe_dispatch=dense", "model.dropless_impl=ragged",
                                          "model.dropless_block=16"]).model
  assert LocalExperts.from_config(cfg) == LocalExperts("dense", "ragged", 16)
  assert load_config("configs/tiny.yaml", ["model.dropless_block=null"]).model.dropless_block is None


def test_topk_group_must_hold_enough_experts():
  with pytest.raises(ConfigError, match="topk_group"):
    load_config("configs/tiny.yaml", ["model.topk_group=1", "model.num_experts_per_tok=8"])


def test_missing_and_malformed_files(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(tmp_path / "nope.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [1, 2\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(bad)
  bad.write_text("- 1\n- 2\n")
  with pytest.raises(ConfigError, match="mapping"):
    load_config(bad)


@given(layers=st.integers(1, 8), dense=st.integers(0, 8))
def test_param_counts_scale_with_layers(layers, dense):
  if dense > layers:
    with pytest.raises(ConfigError):
      ModelConfig(num_layers=layers, first_k_dense_replace=dense)
    return
  c = ModelConfig(num_layers=layers, first_k_dense_replace=dense)
  c2 = ModelConfig(num_layers=layers + 1, first_k_dense_replace=dense)
  assert c2.param_counts()["total"] > c.param_counts()["total"]
  assert c.param_counts()["active"] < c.param_counts()["total"]


def test_config_from_dict_round_trips_and_validates_like_a_file():
  from deepseek_jax.config import config_from_dict, config_to_dict  # noqa: PLC0415
  cfg = load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny.yaml"))
  data = config_to_dict(cfg)
  assert config_from_dict(data) == cfg
  assert config_from_dict(data, ["model.num_layers=2"]).model.num_layers == 2
  assert data["model"]["num_layers"] == cfg.model.num_layers          # the input is not mutated
  with pytest.raises(ConfigError, match=r"model.n_layers: unknown key"):
    config_from_dict({"model": {"n_layers": 3}})
  with pytest.raises(ConfigError, match="top level must be a mapping"):
    config_from_dict([1, 2])
