"""Hugging Face DeepSeek checkpoints in and out: the naming table (`names`), `config.json`
(`config`), safetensors files (`files`), FP8 block scales (`fp8_blocks`), load/save (`convert`)
a complete exported directory (`export`: tokenizer files, generation_config.json, atomic) and the
`python -m deepseek_jax.hf` command."""

from deepseek_jax.hf.config import HFConfigError, from_hf_config, to_hf_config
from deepseek_jax.hf.convert import PASSTHROUGH, load_hf, save_hf
from deepseek_jax.hf.export import export_hf
from deepseek_jax.hf.files import CheckpointError

__all__ = ["PASSTHROUGH", "CheckpointError", "HFConfigError", "export_hf", "from_hf_config",
           "load_hf", "save_hf", "to_hf_config"]
