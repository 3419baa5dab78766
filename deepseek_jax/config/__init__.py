"""Configuration: frozen, self-validating dataclasses (`schema`) and strict YAML with overrides (`io`).

V3 report §4.2 gives the 671B values; YAML files hold values only. Mistakes raise `ConfigError`
naming the field, the value and the rule.
"""

from deepseek_jax.config.io import config_from_dict, config_to_dict, load_config, parse_override
from deepseek_jax.config.schema import (IMPLEMENTATION_FIELDS, PLATFORMS, REMAT_POLICIES, Config,
                                        ConfigError, FP8Config, MeshConfig, ModelConfig,
                                        TrainConfig, YarnConfig, yarn_mscale)

__all__ = ["IMPLEMENTATION_FIELDS", "PLATFORMS", "REMAT_POLICIES", "Config", "ConfigError", "FP8Config", "MeshConfig", "ModelConfig", "TrainConfig",
           "YarnConfig", "config_from_dict", "config_to_dict", "load_config", "parse_override",
           "yarn_mscale"]
