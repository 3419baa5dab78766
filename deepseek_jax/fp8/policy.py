"""FP8 policy: named recipes and a layer-path map onto the Dense seam (V3 report §3.3).

A `Policy` is a frozen, hashable list of `(path_pattern, GemmSpec | None)` rules (first match wins;
`fnmatch` patterns over the '/'-joined flax module path) and a default spec. `Dense` asks it
`dot_general_for(path)` and gets an `Fp8Dot` or None (keep `lax.dot_general`). User overrides come
first, then the layers V3 keeps high precision, then the recipe's layer refinements.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools

from deepseek_jax.config import ConfigError, FP8Config
from deepseek_jax.fp8.accumulate import F32, Accum, hopper, limited, promote
from deepseek_jax.fp8.dot import GRAD_AMAX_FLOOR, Fp8Dot, GemmSpec, Operand
from deepseek_jax.fp8.formats import E4M3, E5M2, E5M6
from deepseek_jax.fp8.scaling import Scaling

# What V3 keeps high precision whatever the recipe: output head, router ('gate' without '_proj', or
# 'router'), MTP eh_proj, embedding and norms (these two never reach Dense). The module names are
# `deepseek_jax.naming.HIGH_PRECISION`; fp8/ imports nothing of the model, so tests/test_naming.py
# checks these patterns against every Dense of a real model instead.
HIGH_PRECISION_PATTERNS = ("*lm_head*", "*output_head*", "*gate", "*router*", "*eh_proj*",
                           "*embed*", "*norm*")


def _per_tensor(mode: str) -> GemmSpec:
  x = Operand(E4M3, Scaling("tensor", mode=mode, pow2=False))
  g = Operand(E5M2, Scaling("tensor", mode=mode, pow2=False, amax_floor=GRAD_AMAX_FLOOR))
  return GemmSpec(fprop_x=x, fprop_w=x, dgrad_g=g, dgrad_w=x, wgrad_x=x, wgrad_g=g, accum=F32)


def _rowwise() -> GemmSpec:
  o = Operand(E4M3, Scaling("axis"))
  g = Operand(E4M3, Scaling("axis", amax_floor=GRAD_AMAX_FLOOR))
  return GemmSpec(fprop_x=o, fprop_w=o, dgrad_g=g, dgrad_w=o, wgrad_x=o, wgrad_g=g, accum=F32)


# name               operands                                                    accumulation
# deepseek_v3        E4M3; x, g 1x128 tiles, w 128x128 blocks; pow2; FP8 x cache promote/128
#                    (SwiGLU inputs cached in E4M3, the product recomputed: §3.3.3)
# deepseek_v3_fused  as deepseek_v3 (one f32 dot of the dequantised operands)    f32
# deepseek_v3_hopper as deepseek_v3                                              H100 FMA, promote/128
# tensor_current     per-tensor current, E4M3 x/w, E5M2 g (TE "HYBRID")          f32
# tensor_delayed     per-tensor delayed (amax history 16), E4M3 x/w, E5M2 g      f32
# rowwise            E4M3 per-row (axis) scales everywhere, pow2 (torchao)       f32
# With power-of-two scales deepseek_v3_fused differs from deepseek_v3 only in f32 summation order
# (tested within 4e-6 of the |x|.|w| bound) at about 60% of its cost on CPU.
RECIPES: dict[str, GemmSpec | None] = {
    "none": None,
    "deepseek_v3": GemmSpec(accum=promote(128), swiglu_cache=E4M3),
    "deepseek_v3_fused": GemmSpec(accum=F32, swiglu_cache=E4M3),
    "deepseek_v3_hopper": GemmSpec(accum=hopper(13, round_toward_zero=True, promote=128),
                                   swiglu_cache=E4M3),
    "tensor_current": _per_tensor("current"),
    "tensor_delayed": _per_tensor("delayed"),
    "rowwise": _rowwise(),
}
# Layer-specific refinements of a recipe, applied after the user's overrides and the high-
# precision layers: V3 caches the input of the post-attention linear (o_proj) in E5M6 (§3.3.2);
# an override naming a recipe gives that recipe's plain spec.
RECIPE_RULES: dict[str, tuple[tuple[str, GemmSpec], ...]] = {
    name: (("*o_proj", dataclasses.replace(RECIPES[name], cache_fmt=E5M6)),)
    for name in ("deepseek_v3", "deepseek_v3_fused", "deepseek_v3_hopper")
}
if tuple(RECIPES) != FP8Config.RECIPES:  # config.py validates names without importing fp8/
  raise ImportError(f"fp8 recipes {tuple(RECIPES)} != FP8Config.RECIPES {FP8Config.RECIPES}")


def recipe(name: str) -> GemmSpec | None:
  if name not in RECIPES:
    raise ValueError(f"fp8 recipe {name!r}: unknown (valid: {', '.join(RECIPES)})")
  return RECIPES[name]


@dataclasses.dataclass(frozen=True)
class Policy:
  """Ordered `(pattern, spec)` rules, first match wins, else `default` (None = high precision)."""
  rules: tuple[tuple[str, GemmSpec | None], ...] = ()
  default: GemmSpec | None = RECIPES["deepseek_v3"]

  def spec_for(self, path: str) -> GemmSpec | None:
    return _resolve(self, path)

  def dot_general_for(self, path: str) -> Fp8Dot | None:
    spec = self.spec_for(path)
    return None if spec is None else Fp8Dot(spec)

  @property
  def enabled(self) -> bool:
    return self.default is not None or any(s is not None for _, s in self.rules)


@functools.lru_cache(maxsize=4096)
def _resolve(policy: Policy, path: str) -> GemmSpec | None:
  for pattern, spec in policy.rules:
    if fnmatch.fnmatchcase(path, pattern):
      return spec
  return policy.default


def parse_override(item: str) -> tuple[str, GemmSpec | None]:
  """'pattern=recipe' -> (pattern, spec)."""
  pattern, sep, name = item.partition("=")
  if not sep or not pattern.strip() or "=" in name:
    raise ValueError(f"fp8.overrides entry {item!r}: must read 'path_pattern=recipe'")
  return pattern.strip(), recipe(name.strip())


# `fp8.backend` -> `GemmSpec.backend`: 'native' feeds the FP8 bytes to dot_general.
BACKEND_OF = {"emulate": "emulate", "native": "fp8"}
if tuple(BACKEND_OF) != FP8Config.BACKENDS:
  raise ImportError(f"fp8 backends {tuple(BACKEND_OF)} != FP8Config.BACKENDS {FP8Config.BACKENDS}")


def _with_backend(spec: GemmSpec | None, backend: str) -> GemmSpec | None:
  if spec is None or spec.backend == BACKEND_OF[backend]:
    return spec
  if spec.accum.mode in ("limited", "hopper"):
    raise ConfigError(f"fp8.backend={backend!r}: a recipe with the emulated Hopper accumulator "
                      f"(accum {spec.accum.mode!r}) runs only with fp8.backend='emulate'")
  return dataclasses.replace(spec, backend=BACKEND_OF[backend])


def make_policy(name: str = "deepseek_v3", overrides=(),
                keep_high_precision=HIGH_PRECISION_PATTERNS, backend: str = "emulate") -> Policy:
  """The policy of recipe `name` with user `overrides` first, then the high-precision layers;
  every spec runs on `backend` ('emulate' or 'native', as `fp8.backend`)."""
  if backend not in BACKEND_OF:
    raise ConfigError(f"fp8.backend={backend!r}: must be one of {list(BACKEND_OF)}")
  rules = tuple(parse_override(o) for o in overrides)
  rules += tuple((p, None) for p in keep_high_precision)
  rules += RECIPE_RULES.get(name, ())
  rules = tuple((p, _with_backend(s, backend)) for p, s in rules)
  return Policy(rules=rules, default=_with_backend(recipe(name), backend))


def accum_from_config(fp8_cfg: FP8Config) -> Accum | None:
  """`fp8.accumulator*` as an `Accum`; None: each recipe keeps its own."""
  c = fp8_cfg
  every = c.accumulator_promote or None
  rz = c.accumulator_rounding == "rz"
  return {"recipe": lambda: None, "f32": lambda: F32, "promote": lambda: promote(every),
          "hopper": lambda: hopper(c.accumulator_bits, rz, every, c.accumulator_block),
          "limited": lambda: limited(c.accumulator_bits, rz, every, c.accumulator_block),
          }[c.accumulator]()


def with_accum(policy: Policy, accum: Accum | None) -> Policy:
  """`policy` with every FP8 spec accumulating per `accum` (None: unchanged)."""
  if accum is None:
    return policy
  specs = [s for _, s in policy.rules if s is not None] + [policy.default]
  if accum.mode in ("limited", "hopper") and any(s and s.backend != "emulate" for s in specs):
    raise ConfigError(f"fp8.accumulator={accum.mode!r}: emulates the tensor core's accumulator; "
                      "it runs only with fp8.backend='emulate'")
  swap = lambda s: None if s is None else dataclasses.replace(s, accum=accum)  # noqa: E731
  return Policy(rules=tuple((p, swap(s)) for p, s in policy.rules), default=swap(policy.default))


def policy_from_config(fp8_cfg: FP8Config) -> Policy | None:
  """The policy for `fp8.recipe` / `fp8.overrides` / `fp8.backend` / `fp8.accumulator*`; None
  when nothing is quantised."""
  policy = make_policy(fp8_cfg.recipe, fp8_cfg.overrides, backend=fp8_cfg.backend)
  policy = with_accum(policy, accum_from_config(fp8_cfg))
  return policy if policy.enabled else None
