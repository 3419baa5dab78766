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
  BACKENDS = ("emulate", "native")
  backend: str = _f("emulate", "emulate: FP8 values in f32 GEMMs (any backend); native: float8 "
                    "operands to dot_general (FP8 GEMMs where the backend has them)")

  ACCUMULATORS = ("recipe", "f32", "promote", "hopper", "limited")
  accumulator: str = _f("recipe", "GEMM accumulation: recipe (the recipe's own), f32, promote (f32 "
                        "partial sums every accumulator_promote), hopper (the H100/H200 tensor "
                        "core bit for bit), limited (an older, milder Hopper model)")
  accumulator_bits: int = _f(13, "hopper/limited: fraction bits the accumulator keeps (1-23)")
  accumulator_block: int = _f(32, "hopper/limited: products per tensor-core block")
  accumulator_promote: int = _f(128, "promote/hopper/limited: promotion interval along k "
                                "(0: never; hopper/limited: a multiple of accumulator_block)")
  accumulator_rounding: str = _f("rz", "hopper/limited: rz (truncation, the hardware) or rne")

  def __post_init__(self):
    _check(self.recipe in self.RECIPES, "fp8.recipe", self.recipe,
           f"must be one of {list(self.RECIPES)}")
    self._check_accumulator()
    _check(self.backend in self.BACKENDS, "fp8.backend", self.backend,
           f"must be one of {list(self.BACKENDS)}")
    for o in self.overrides:
      _check(isinstance(o, str) and o.count("=") == 1, "fp8.overrides", o,
             "each entry must read 'path_pattern=recipe'")
      pattern, name = o.split("=")
      _check(pattern.strip() != "", "fp8.overrides", o, "the path pattern must not be empty")
      _check(name.strip() in self.RECIPES, "fp8.overrides", o,
             f"the recipe after '=' must be one of {list(self.RECIPES)}")

  def _check_accumulator(self):
    _check(self.accumulator in self.ACCUMULATORS, "fp8.accumulator", self.accumulator,
           f"must be one of {list(self.ACCUMULATORS)}")
    _check(self.accumulator_rounding in ("rz", "rne"), "fp8.accumulator_rounding",
           self.accumulator_rounding, "must be 'rz' or 'rne'")
    bits, block, every = self.accumulator_bits, self.accumulator_block, self.accumulator_promote
    _check(_int(bits) and 1 <= bits <= 23, "fp8.accumulator_bits", bits, "must lie in [1, 23]")
    _check(_int(block) and block > 0, "fp8.accumulator_block", block, "must be a positive integer")
    _check(_int(every) and every >= 0, "fp8.accumulator_promote", every,
           "must be a non-negative integer (0: never promote)")
    if self.accumulator == "promote":
      _check(every > 0, "fp8.accumulator_promote", every, "accumulator=promote needs N_C > 0")
    if self.accumulator in ("hopper", "limited"):
      _check(every % block == 0, "fp8.accumulator_promote", every,
             f"must be a multiple of fp8.accumulator_block={block} (or 0: never)")
    if self.accumulator == "hopper":   # fp8.blockfma.max_block: the block's int32 sum stays exact
      most = (2 ** 31 - 1 - 2 ** (bits + 1)) // 2 ** (bits + 2)
      _check(block <= most, "fp8.accumulator_block", block,
             f"at {bits} bits a block holds at most {most} products")


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)
