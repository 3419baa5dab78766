"""Per-device training memory on any mesh, without allocating (V3 report §3.2.3, §3.4; DESIGN.md).

Parameters come from `jax.eval_shape` of the real model with their logical axis names; a rules
table (logical name -> mesh axis or axes or None, in priority order, as `flax.linen` reads it)
maps them onto an abstract mesh, and each leaf's per-device shard is ceil(dim / mesh size) along
every sharded dimension. Per device:

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

from deepseek_jax.codesign.activations import activation_bytes_per_token
from deepseek_jax.config import ConfigError, ModelConfig

Rule = tuple[str, "str | tuple[str, ...] | None"]

# A "shard everything" alternative to `sharding/rules.py` (`project_rules`, the default), for
# asking how far FSDP can go. Beyond the project table, the model width of non-expert weights
# also takes `expert` (the routed experts' own width is `expert_embed`), so no weight is
# replicated across expert-parallel ranks, and the MLA up-projections split their head dim over
# `expert`. Order matters: the first rule whose mesh axes are still free wins (flax).
PLANNING_RULES: tuple[Rule, ...] = (
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_seq", None),
    ("act_embed", None),
    ("experts", "expert"),
    ("embed", ("fsdp", "expert")),
    ("expert_embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("moe_mlp", "tensor"),
    ("q_latent", "fsdp"),
    ("kv_latent", "fsdp"),
    ("qk_head_dim", "expert"),
    ("kv_head_dim", "expert"),
    ("layers", None),
)

_BYTES = {"float32": 4, "bfloat16": 2}


def mesh_axis_sizes(mesh) -> dict[str, int]:
  """{axis: size} from a `jax.sharding.AbstractMesh`, a `Mesh` or a mapping."""
  if isinstance(mesh, Mapping):
    sizes = dict(mesh)
  elif hasattr(mesh, "shape") and isinstance(mesh.shape, Mapping):
    sizes = dict(mesh.shape)
  else:
    raise ConfigError(f"mesh={mesh!r}: must be a jax.sharding.AbstractMesh or a mapping "
                      "axis -> size")
  for k, v in sizes.items():
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"mesh axis {k!r}={v!r}: must be a positive integer")
  return sizes


def abstract_mesh(sizes: Mapping[str, int]) -> jax.sharding.AbstractMesh:
  """An `AbstractMesh` with the given axis sizes (no devices needed)."""
  sizes = mesh_axis_sizes(sizes)
  return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes.keys()))


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def check_rules(rules: Sequence[Rule], sizes: Mapping[str, int]) -> None:
  """Every rule is a (name, axes) pair and names only axes of the mesh."""
  for r in rules:
    if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
      raise ConfigError(f"sharding rule {r!r}: must be a (logical_name, mesh_axis or None) pair")
    for a in _axes(r[1]):
      if a not in sizes:
        raise ConfigError(f"sharding rule {tuple(r)!r}: mesh axis {a!r} is not in the mesh "
                          f"(axes: {', '.join(sizes)})")


def mesh_spec(logical_axes, rules: Sequence[Rule]):
  """Logical axis names -> a mesh PartitionSpec (flax's priority rules)."""
  import flax.linen as nn  # noqa: PLC0415
  return nn.logical_to_mesh_axes(tuple(logical_axes), tuple(tuple(r) for r in rules))


def shard_elements(shape, spec, sizes: Mapping[str, int]) -> tuple[int, bool]:
  """(elements of the largest per-device shard, whether every sharded dimension divides evenly)."""
  n, even = 1, True
  for i, d in enumerate(shape):
    entry = spec[i] if spec is not None and i < len(spec) else None
    ways = math.prod(sizes[a] for a in _axes(entry))
    n *= math.ceil(d / ways)
    even = even and d % ways == 0
  return n, even


def _logical_leaves(variables):
  """(path, collection, shape, logical names) for every leaf of boxed abstract variables."""
  import flax.linen as nn  # noqa: PLC0415
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_box)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    if is_box(leaf):
      out.append(("/".join(keys), keys[0], leaf.value.shape, leaf.names))
    else:
      out.append(("/".join(keys), keys[0], leaf.shape, (None,) * len(leaf.shape)))
  return out


def batch_shards(rules: Sequence[Rule], sizes: Mapping[str, int], name: str = "act_batch") -> int:
  """How many ways the rules split the activation axis `name` on this mesh."""
  spec = mesh_spec((name,), rules)
  return math.prod(sizes[a] for a in _axes(spec[0]))


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
                remat: str | None = None, variables=None) -> MemoryPlan:
  """Bytes per device for one training micro-step of `micro_batch` sequences of `seq_len`.

  `rules` default: the repository's table (`project_rules()`).
  """
  rules = project_rules() if rules is None else rules
  sizes = mesh_axis_sizes(mesh)
  check_rules(rules, sizes)
  for a in opt_shard_axes:
    if a not in sizes:
      raise ConfigError(f"opt_shard_axes: {a!r} is not a mesh axis (axes: {', '.join(sizes)})")
  for n, v in (("micro_batch", micro_batch), ("seq_len", seq_len)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"{n}={v!r}: must be a positive integer")
  if variables is None:
    from deepseek_jax.codesign.params import abstract_variables  # noqa: PLC0415
    variables = abstract_variables(model)
  pbytes = _BYTES[model.param_dtype]
  gbytes = pbytes if grad_bytes is None else grad_bytes
  params = grads = opt = 0.0
  elements, uneven = 0, []
  for path, coll, shape, names in _logical_leaves(variables):
    spec = mesh_spec(names, rules)
    n, even = shard_elements(shape, spec, sizes)
    elements += n
    if not even:
      uneven.append(path)
    if coll != "params":      # router_state: f32 biases, no gradient or optimizer state
      params += n * 4
      continue
    params += n * pbytes
    grads += n * gbytes
    used = {a for e in (spec or ()) for a in _axes(e)}
    extra = math.prod(sizes[a] for a in opt_shard_axes if a not in used)
    opt += 2 * moment_bytes * math.ceil(n / extra)
  tokens = (math.ceil(micro_batch / batch_shards(rules, sizes, "act_batch"))
            * math.ceil(seq_len / batch_shards(rules, sizes, "act_seq")))
  acts = tokens * activation_bytes_per_token(model, seq_len, remat)
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
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": 1}
    return math.prod(sizes.get(a, 1) for a in _axes(mesh_spec(("embed",), rules)[0]))

  while fsdp > 1 and model.d_model % width_shards() and fsdp % 2 == 0:
    fsdp //= 2
    data *= 2
  return {"data": data, "fsdp": fsdp, "expert": expert, "tensor": 1}


def project_rules(mesh_cfg=None) -> tuple[Rule, ...]:
  """The repository's table (`sharding.rules`, with `mesh_cfg.rules` overrides), else
  `PLANNING_RULES` where that module is absent."""
  try:
    from sharding import rules as sharding_rules  # noqa: PLC0415
  except ImportError:
    return PLANNING_RULES
  try:
    if mesh_cfg is None:
      return tuple(sharding_rules.DEFAULT_RULES)
    return tuple(sharding_rules.rules_from_config(mesh_cfg))
  except ValueError as e:
    raise ConfigError(str(e)) from None


MESH_AXES = ("data", "fsdp", "expert", "tensor")


def parse_mesh(text: str, axes: Sequence[str] | None = MESH_AXES) -> dict[str, int]:
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
