"""The `fp8` config section: the FP8 recipe by name and per-layer overrides (V3 report §3.3)."""

from __future__ import annotations

import dataclasses

from deepseek_jax.config.base import _check, _f


@dataclasses.dataclass(frozen=True)
class FP8Config:
  """FP8 recipe by name, with per-layer-path overrides ("pattern=recipe" strings).

  Recipes are defined in `deepseek_jax.fp8.policy` (which checks that `RECIPES` lists exactly
  its names); patterns are `fnmatch` globs over '/'-joined module paths, e.g. "*attn*=none".
  """
  # A plain class attribute (no annotation), so not a config field.
  RECIPES = ("none", "deepseek_v3", "deepseek_v3_fused", "deepseek_v3_hopper", "tensor_current",
             "tensor_delayed", "rowwise")
  recipe: str = _f("none", "one of " + ", ".join(RECIPES))
  overrides: tuple[str, ...] = _f((), "'path_glob=recipe' per layer path")

  def __post_init__(self):
    _check(self.recipe in self.RECIPES, "fp8.recipe", self.recipe,
           f"must be one of {list(self.RECIPES)}")
    for o in self.overrides:
      _check(isinstance(o, str) and o.count("=") == 1, "fp8.overrides", o,
             "each entry must read 'path_pattern=recipe'")
      pattern, name = o.split("=")
      _check(pattern.strip() != "", "fp8.overrides", o, "the path pattern must not be empty")
      _check(name.strip() in self.RECIPES, "fp8.overrides", o,
             f"the recipe after '=' must be one of {list(self.RECIPES)}")
