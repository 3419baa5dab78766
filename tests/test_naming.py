"""The declared naming against the tree the modules build: every leaf located, every name the one
the modules produce, the FP8 high-precision patterns matching the declared modules, the drafter a
sub-tree of the Transformer."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from deepseek_jax import naming
from deepseek_jax.fp8.formats import E5M6
from deepseek_jax.fp8.policy import make_policy
from deepseek_jax.generate.speculative import MTPDrafter, init_draft_cache
from deepseek_jax.model import Transformer, abstract_variables
from tests.helpers import small_config

CONFIGS = {f"{'scanned' if scan else 'unrolled'}-dense{dense}": small_config(
    num_layers=3, first_k_dense_replace=dense, num_mtp_layers=2, scan_layers=scan)
    for scan in (True, False) for dense in (0, 1)}
LAYER_MODULES = {naming.ATTN_NORM, naming.ATTN, naming.FFN_NORM, naming.MLP}
MTP_MODULES = {naming.MTP_ENORM, naming.MTP_HNORM, naming.MTP_PROJ, naming.MTP_BLOCK,
               naming.MTP_HEAD_NORM}


def _flat(cfg) -> dict:
  return flax.traverse_util.flatten_dict(nn.unbox(abstract_variables(cfg)))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_leaf_is_located_in_checkpoint_layer_order(name):
  cfg = CONFIGS[name]
  seen = set()
  for (_, *path), leaf in _flat(cfg).items():
    loc = naming.locate(cfg, tuple(path))
    assert loc.kind == path[0]
    assert leaf.shape[:loc.stacked] == (len(loc.layers),) * loc.stacked, path
    seen.update(loc.layers)
    if loc.kind in (naming.DENSE_STACK, naming.MOE_STACK):
      assert loc.sub[0] in LAYER_MODULES
      assert all(cfg.first_k_dense_replace <= i < cfg.num_layers for i in loc.layers) == (
          loc.kind == naming.MOE_STACK)
    if loc.kind == naming.MTP:
      assert loc.sub[0] in LAYER_MODULES | MTP_MODULES
      assert loc.layers == (cfg.num_layers + loc.index,)
    if naming.is_routed_expert(tuple(path)):
      assert loc.sub[:2] == (naming.MLP, naming.ROUTED_EXPERTS)
      assert leaf.shape[loc.stacked] == cfg.n_routed_experts
  assert seen == set(range(cfg.num_layers + cfg.num_mtp_layers))


@pytest.mark.parametrize("path", [("blocks", "layers_0", "mlp"), ("mtp", "layers_2", "enorm"),
                                  ("moe_blocks", "layers_x", "mlp"), ("dense_blocks", "layers_1")])
def test_foreign_paths_are_refused(path):
  with pytest.raises(KeyError, match="not a path"):
    naming.locate(CONFIGS["unrolled-dense1"], path)


@pytest.mark.parametrize("name", CONFIGS)
def test_constants_are_the_names_the_modules_produce(name):
  cfg = CONFIGS[name]
  flat = _flat(cfg)
  params = {tuple(k[1:]) for k in flat if k[0] == "params"}
  top = {naming.EMBED, naming.FINAL_NORM, naming.HEAD, naming.MOE_STACK, naming.MTP}
  assert {p[0] for p in params} == top | ({naming.DENSE_STACK} if cfg.first_k_dense_replace else
                                          set())
  n = {naming.DENSE_STACK: cfg.first_k_dense_replace, naming.MOE_STACK: cfg.num_moe_layers,
       naming.MTP: cfg.num_mtp_layers}
  for stack, count in n.items():
    names = {p[1] for p in params if p[0] == stack}
    scanned = cfg.scan_layers and stack != naming.MTP
    want = {naming.SCANNED_LAYERS} if scanned else {naming.unrolled_layer(i) for i in range(count)}
    assert names == (want if count else set())
  moe_layer = (naming.MOE_STACK, naming.SCANNED_LAYERS if cfg.scan_layers else
               naming.unrolled_layer(0))
  mtp_layer = (naming.MTP, naming.unrolled_layer(0))
  assert {p[2] for p in params if p[:2] == moe_layer} == LAYER_MODULES
  assert {p[2] for p in params if p[:2] == mtp_layer} == MTP_MODULES
  assert {p[3] for p in params if p[:3] == moe_layer + (naming.MLP,)} == {
      naming.ROUTER, naming.ROUTED_EXPERTS, naming.SHARED_EXPERTS}
  assert moe_layer + (naming.ATTN, naming.O_PROJ, "kernel") in params
  outside = (naming.EMBED, naming.FINAL_NORM, naming.HEAD)
  assert {p for p in params if p[0] in outside} == {
      (naming.EMBED, "embedding"), (naming.FINAL_NORM, "weight"), (naming.HEAD, "kernel")}
  router_state = {tuple(k[1:]) for k in flat if k[0] == "router_state"}
  bias = (naming.MLP, naming.ROUTER, naming.ROUTER_BIAS)
  moe_layers = [moe_layer] if cfg.scan_layers else [
      (naming.MOE_STACK, naming.unrolled_layer(i)) for i in range(cfg.num_moe_layers)]
  assert router_state == ({l + bias for l in moe_layers} | {
      (naming.MTP, naming.unrolled_layer(k), naming.MTP_BLOCK) + bias
      for k in range(cfg.num_mtp_layers)})


class _Recorder:
  """Stands in for an FP8 policy and records every module path that asks it."""

  def __init__(self):
    self.paths = set()

  def dot_general_for(self, path):
    self.paths.add(path)


@pytest.mark.parametrize("name", ["scanned-dense1", "unrolled-dense0"])
def test_fp8_policy_keeps_exactly_the_declared_modules_high_precision(name):
  cfg = CONFIGS[name]
  rec = _Recorder()
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  flat = flax.traverse_util.flatten_dict(nn.unbox(jax.eval_shape(
      lambda t: Transformer(cfg, fp8_policy=rec).init(jax.random.key(0), t), tokens)))
  # Every matmul weight asks the policy: a Dense by its module path, the routed experts per weight.
  weights = {"/".join(k[1:-1]) for k in flat if k[-1] == "kernel" and k[-2] != naming.ROUTER}
  weights |= {"/".join(k[1:]) for k in flat if naming.is_routed_expert(k[1:])}
  assert weights <= rec.paths
  asked = {p.rsplit("/", 1)[-1] for p in rec.paths}
  assert {naming.HEAD, naming.MTP_PROJ, naming.O_PROJ} <= asked
  for recipe in ("deepseek_v3", "rowwise"):
    policy = make_policy(recipe)
    for path in rec.paths:
      keep = path.rsplit("/", 1)[-1] in naming.HIGH_PRECISION
      assert (policy.spec_for(path) is None) == keep, (recipe, path)
    # The router and the embedding never reach Dense; the policy would keep them anyway.
    routers = {"/".join(k[1:-1]) for k in flat if k[-2:] == (naming.ROUTER, "kernel")}
    assert routers and all(policy.spec_for(r) is None for r in routers)
    assert policy.spec_for(naming.EMBED) is None
  o_proj = [p for p in rec.paths if p.endswith("/" + naming.O_PROJ)]
  assert all(make_policy("deepseek_v3").spec_for(p).cache_fmt == E5M6 for p in o_proj)


def test_drafter_variables_are_a_subtree_of_the_transformers():
  cfg = CONFIGS["scanned-dense1"]
  full = _flat(cfg)
  B, T = 1, 2
  hidden = jax.ShapeDtypeStruct((B, T, cfg.d_model), jnp.float32)
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
  cache = init_draft_cache(cfg, B, 4)
  drafter = flax.traverse_util.flatten_dict(nn.unbox(jax.eval_shape(
      lambda h, t: MTPDrafter(cfg).init(jax.random.key(0), h, t, t, cache), hidden, tokens)))
  assert {k[:2] for k in drafter} == {("params", naming.EMBED), ("params", naming.HEAD),
                                      ("params", naming.MTP), ("router_state", naming.MTP)}
  for k, leaf in drafter.items():
    assert k in full, k
    assert (leaf.shape, leaf.dtype) == (full[k].shape, full[k].dtype), k
