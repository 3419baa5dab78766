"""Per-device training memory on any mesh, without allocating (V3 report §3.2.3, §3.4; DESIGN.md).

Parameters come from `jax.eval_shape` of the real model with their logical axis names; the rules
of `sharding/rules.py` map them onto the mesh through `sharding.specs.mesh_spec`, and each leaf's
per-device shard is ceil(dim / mesh size) along every sharded dimension. Per device:

  params     master weights in `model.param_dtype` (+ the f32 router biases)
  gradients  same sharding, `grad_bytes` per element (default: the master dtype)
  optimizer  AdamW m and v, `moment_bytes` each (4, or 2 with bf16 moments), optionally split
             further over `opt_shard_axes` (ZeRO-1 over data parallelism, as DeepSeek-V3 trains)
  activations  tokens per device x `activations.activation_bytes_per_token` (analytic; see there)

Tokens per device = (micro-batch sequences / shards of 'act_batch') x (seq_len / shards of
'act_seq'). Pipeline parallelism (V3 used PP16) is not one of this project's mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh

from deepseek_jax.codesign.activations import activation_bytes_per_token
from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.model import abstract_variables
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding import specs

Rule = rules_lib.Rule

# "Shard everything", for asking how far FSDP can go: the project table with the model width of
# non-expert weights also over `expert` (the routed experts' own width is `expert_embed`), so no
# weight is replicated across expert-parallel ranks, and the MLA up-projections' head dims over
# `expert` too. `experts` moves first: flax gives a contested mesh axis to the earlier rule, so the
# router kernel [D, E] keeps E on `expert` and leaves D replicated.
PLANNING_OVERRIDES = ("embed=fsdp,expert", "qk_head_dim=expert", "kv_head_dim=expert")
_PLANNING = rules_lib.with_overrides(rules_lib.DEFAULT_RULES, PLANNING_OVERRIDES)
PLANNING_RULES: rules_lib.Rules = (tuple(r for r in _PLANNING if r[0] == "experts")
                                   + tuple(r for r in _PLANNING if r[0] != "experts"))

_BYTES = {"float32": 4, "bfloat16": 2}


def mesh_axis_sizes(mesh) -> dict[str, int]:
  """{axis: size} from a `jax.sharding.AbstractMesh`, a `Mesh` or a mapping."""
  if isinstance(mesh, Mapping):
    sizes = dict(mesh)
  elif isinstance(mesh, (Mesh, AbstractMesh)):
    sizes = mesh_lib.axis_sizes(mesh)
  else:
    raise ConfigError(f"mesh={mesh!r}: must be a jax.sharding.AbstractMesh or a mapping "
                      "axis -> size")
  for k, v in sizes.items():
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"mesh axis {k!r}={v!r}: must be a positive integer")
  return sizes


def check_rules(rules: Sequence[Rule], sizes: Mapping[str, int]) -> None:
  """Every rule is a (name, axes) pair and names only axes of this mesh."""
  for r in rules:
    if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
      raise ConfigError(f"sharding rule {r!r}: must be a (logical_name, mesh_axis or None) pair")
    for a in rules_lib.as_axes(r[1]):
      if a not in sizes:
        raise ConfigError(f"sharding rule {tuple(r)!r}: mesh axis {a!r} is not in the mesh "
                          f"(axes: {', '.join(sizes)})")


def shard_elements(shape, spec, sizes: Mapping[str, int]) -> tuple[int, bool]:
  """(elements of the largest per-device shard, whether every sharded dimension divides evenly)."""
  n, even = 1, True
  for d, entry in zip(shape, spec):
    ways = math.prod(sizes[a] for a in rules_lib.as_axes(entry))
    n *= math.ceil(d / ways)
    even = even and d % ways == 0
  return n, even


def _logical_leaves(variables):
  """(path, collection, shape, logical names) for every leaf; unboxed leaves are replicated."""
  table = specs.logical_table(variables)
  for path, leaf in jax.tree_util.tree_flatten_with_path(specs.strip_boxes(variables))[0]:
    keys = specs.path_names(path)
    yield "/".join(keys), keys[0], leaf.shape, table.get(keys, (None,) * len(leaf.shape))


def moment_bytes(train, bf16: bool = False) -> int:
  """Bytes of each AdamW moment: 2 with `train.bf16_moments` (the config's `TrainConfig`) or
  `bf16` (a command's --bf16-moments), else 4."""
  return 2 if bf16 or train.bf16_moments else 4


def batch_shards(rules: Sequence[Rule], sizes: Mapping[str, int], name: str = "act_batch") -> int:
  """How many ways the rules split the logical axis `name` on this mesh."""
  spec = specs.mesh_spec((name,), tuple(tuple(r) for r in rules), sizes)
  return math.prod(sizes[a] for a in rules_lib.as_axes(spec[0]))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  mesh: dict
  params: float          # bytes per device
  gradients: float
  optimizer: float
  activations: float
  tokens_per_device: float
  param_elements: int    # elements of the largest params shard (all leaves) per device
  uneven: tuple[str, ...] = ()  # leaves with a sharded dimension the mesh does not divide (padded)

  @property
  def total(self) -> float:
    return self.params + self.gradients + self.optimizer + self.activations

  def rows(self) -> list[tuple[str, float]]:
    return [("params", self.params), ("gradients", self.gradients),
            ("optimizer", self.optimizer), ("activations", self.activations),
            ("total", self.total)]


def memory_plan(model: ModelConfig, mesh, rules: Sequence[Rule] | None = None, *,
                micro_batch: int, seq_len: int, grad_bytes: float | None = None,
                moment_bytes: float = 4, opt_shard_axes: Sequence[str] = (),
                remat: str | None = None, variables=None, fused_attention: bool = False,
                logits: bool = True) -> MemoryPlan:
  """Bytes per device for one training micro-step of `micro_batch` sequences of `seq_len`.

  `rules` default: the repository's table (`project_rules()`). `fused_attention`, `logits`: as
  `activations.activation_elements_per_token` (the defaults are the unfused, unchunked program).
  """
  rules = project_rules() if rules is None else rules
  sizes = mesh_axis_sizes(mesh)
  check_rules(rules, sizes)
  rules = tuple(tuple(r) for r in rules)
  for a in opt_shard_axes:
    if a not in sizes:
      raise ConfigError(f"opt_shard_axes: {a!r} is not a mesh axis (axes: {', '.join(sizes)})")
  for n, v in (("micro_batch", micro_batch), ("seq_len", seq_len)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"{n}={v!r}: must be a positive integer")
  if variables is None:
    variables = abstract_variables(model)
  pbytes = _BYTES[model.param_dtype]
  gbytes = pbytes if grad_bytes is None else grad_bytes
  params = grads = opt = 0.0
  elements, uneven = 0, []
  for path, coll, shape, names in _logical_leaves(variables):
    spec = specs.mesh_spec(names, rules, sizes)
    n, even = shard_elements(shape, spec, sizes)
    elements += n
    if not even:
      uneven.append(path)
    if coll != "params":      # router_state: f32 biases, no gradient or optimizer state
      params += n * 4
      continue
    params += n * pbytes
    grads += n * gbytes
    used = {a for e in spec for a in rules_lib.as_axes(e)}
    extra = math.prod(sizes[a] for a in opt_shard_axes if a not in used)
    opt += 2 * moment_bytes * math.ceil(n / extra)
  tokens = (math.ceil(micro_batch / batch_shards(rules, sizes, "act_batch"))
            * math.ceil(seq_len / batch_shards(rules, sizes, "act_seq")))
  acts = tokens * activation_bytes_per_token(model, seq_len, remat,
                                             fused_attention=fused_attention, logits=logits)
  return MemoryPlan(sizes, params, grads, opt, acts, tokens, elements, tuple(uneven))


def auto_mesh(model: ModelConfig, devices: int, rules: Sequence[Rule] | None = None,
              max_expert: int = 64) -> dict[str, int]:
  """An FSDP + EP mesh for `devices`.

  expert = gcd(E, devices), halved down to `max_expert` (V3 trained with EP64); fsdp = the rest,
  halved into `data` until the axes `rules` (default `project_rules()`) shard the model width
  over divide d_model evenly.
  """
  rules = project_rules() if rules is None else rules
  if not isinstance(devices, int) or isinstance(devices, bool) or devices <= 0:
    raise ConfigError(f"devices={devices!r}: must be a positive integer")
  expert = math.gcd(model.n_routed_experts, devices)
  while expert > max_expert and expert % 2 == 0:
    expert //= 2
  fsdp, data = devices // expert, 1

  def width_shards() -> int:
    return batch_shards(rules, {"data": data, "fsdp": fsdp, "expert": expert, "tensor": 1},
                        "embed")

  while fsdp > 1 and model.d_model % width_shards() and fsdp % 2 == 0:
    fsdp //= 2
    data *= 2
  return {"data": data, "fsdp": fsdp, "expert": expert, "tensor": 1}


def project_rules(mesh_cfg=None) -> rules_lib.Rules:
  """`sharding.rules.DEFAULT_RULES`, with `mesh_cfg.rules` overrides applied when given."""
  if mesh_cfg is None:
    return rules_lib.DEFAULT_RULES
  try:
    return rules_lib.rules_from_config(mesh_cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def parse_mesh(text: str, axes: Sequence[str] | None = rules_lib.MESH_AXES) -> dict[str, int]:
  """'data=2,fsdp=16,expert=64' -> {axis: size}; each axis once, sizes >= 1. With `axes`, names
  must come from it and the missing ones get size 1 (in `axes` order)."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or not name or not value.strip().isdigit() or int(value) < 1:
      raise ConfigError(f"mesh {text!r}: each entry must read axis=size with size >= 1 "
                        f"(e.g. data=2,fsdp=16,expert=64,tensor=1), got {part!r}")
    if name in sizes:
      raise ConfigError(f"mesh {text!r}: axis {name!r} given twice")
    sizes[name] = int(value)
  if not sizes:
    raise ConfigError(f"mesh {text!r}: empty (e.g. data=2,fsdp=16,expert=64,tensor=1)")
  if axes is None:
    return sizes
  unknown = [a for a in sizes if a not in axes]
  if unknown:
    raise ConfigError(f"mesh {text!r}: axis {unknown[0]!r} is not one of {', '.join(axes)}")
  return {a: sizes.get(a, 1) for a in axes}
