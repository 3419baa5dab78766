"""Policy: recipes, the path map, config parsing, the Dense seam, and delayed scaling's explicit
state through Dense under nn.scan."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, FP8Config, load_config
from deepseek_jax.fp8 import delayed, fp8_dot_general
from deepseek_jax.fp8.formats import E5M6
from deepseek_jax.fp8.policy import RECIPES, Policy, make_policy, policy_from_config
from deepseek_jax.layers import Dense


def test_recipe_names_match_the_config():
  assert tuple(RECIPES) == FP8Config.RECIPES


@pytest.mark.parametrize("path, quantised", [
    ("blocks/attn/q_b_proj", True),
    ("blocks/attn/kv_a_proj_with_mqa", True),
    ("moe_blocks/mlp/shared_experts/gate_proj", True),   # an MLP GEMM, not the router
    ("moe_blocks/mlp/experts/down_proj", True),
    ("mtp/0/block/mlp/up_proj", True),
    ("moe_blocks/mlp/gate", False),                      # the router
    ("moe_blocks/mlp/router", False),
    ("lm_head", False),
    ("mtp/0/eh_proj", False),
    ("embed_tokens", False),
])
def test_default_policy_keeps_v3_high_precision_layers(path, quantised):
  p = make_policy("deepseek_v3")
  assert (p.dot_general_for(path) is not None) == quantised


def test_overrides_come_first_and_config_round_trip():
  cfg = load_config(None, ["fp8.recipe=deepseek_v3",
                           'fp8.overrides=["*attn*=none", "lm_head=rowwise"]'])
  p = policy_from_config(cfg.fp8)
  assert p.spec_for("blocks/attn/q_b_proj") is None
  assert p.spec_for("lm_head") == RECIPES["rowwise"]
  assert p.spec_for("blocks/mlp/up_proj") == RECIPES["deepseek_v3"]
  assert hash(p) == hash(policy_from_config(cfg.fp8)) and p == policy_from_config(cfg.fp8)
  assert policy_from_config(FP8Config()) is None
  assert policy_from_config(FP8Config("none", ("*mlp*=deepseek_v3",))).spec_for(
      "blocks/mlp/up_proj") == RECIPES["deepseek_v3"]


def test_deepseek_recipes_cache_o_proj_input_in_e5m6():
  p = make_policy("deepseek_v3")
  spec = p.spec_for("moe_blocks/layers/self_attn/o_proj")
  assert spec.cache_fmt == E5M6 and spec.fprop_x == RECIPES["deepseek_v3"].fprop_x
  assert p.spec_for("moe_blocks/layers/self_attn/q_b_proj").cache_fmt is None
  assert make_policy("rowwise").spec_for("blocks/attn/o_proj") == RECIPES["rowwise"]
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 256)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((256, 128)) / 16, jnp.float32)
  leaves = jax.jit(lambda a, b: jax.tree_util.tree_leaves(jax.vjp(
      lambda u, v: fp8_dot_general(u, v, (((1,), (0,)), ((), ())), spec=spec), a, b)[1]))(x, w)
  assert any(a.dtype == jnp.bfloat16 and a.size == x.size for a in leaves)   # E5M6 in bf16


@pytest.mark.parametrize("override, msg", [
    ("fp8.recipe=fp4", "fp8.recipe='fp4'"),
    ('fp8.overrides=["*attn*"]', "path_pattern=recipe"),
    ('fp8.overrides=["*attn*=fp4"]', "recipe after '='"),
    ('fp8.overrides=["=none"]', "must not be empty"),
])
def test_config_errors_name_field_value_rule(override, msg):
  with pytest.raises(ConfigError, match=msg):
    load_config(None, [override])


class _Net(nn.Module):
  policy: Policy

  @nn.compact
  def __call__(self, x):
    h = Dense((64,), (128,), ("embed", "mlp"), fp8_policy=self.policy, name="up_proj")(x)
    return Dense((128,), (32,), ("mlp", "vocab"), fp8_policy=self.policy, name="lm_head")(h)


def test_dense_seam_uses_the_policy_per_path():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 64)), jnp.float32)
  net = _Net(make_policy("deepseek_v3"))
  variables = nn.unbox(jax.jit(net.init)(jax.random.key(0), x))
  assert set(variables) == {"params"}                                # stateless: no extra state
  params = variables["params"]
  got = jax.jit(net.apply)({"params": params}, x)
  w1, w2 = params["up_proj"]["kernel"], params["lm_head"]["kernel"]
  dn = (((2,), (0,)), ((), ()))
  want = jax.jit(lambda a, u, v: jax.lax.dot_general(
      fp8_dot_general(a, u, dn, spec=RECIPES["deepseek_v3"]), v, dn))(x, w1, w2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class _Scanned(nn.Module):
  """Two delayed-scaling layers under nn.scan, as the model stacks its blocks."""
  policy: Policy

  @nn.compact
  def __call__(self, x):
    body = lambda mdl, h, _: (jnp.tanh(Dense((32,), (32,), ("embed", "mlp"),
                                             fp8_policy=mdl.policy, name="proj")(h)), None)
    scan = nn.scan(body, variable_axes={"params": 0, "fp8_state": 0},
                   split_rngs={"params": True}, length=2,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    return scan(self, x, None)[0]


def test_delayed_state_is_explicit_and_updates_through_its_gradient():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
  net = _Scanned(make_policy("tensor_delayed"))
  variables = nn.unbox(jax.jit(net.init)(jax.random.key(0), x))
  hist = variables["fp8_state"]["ScanBody_0"]["proj"]["amax_history"] \
      if "ScanBody_0" in variables["fp8_state"] else variables["fp8_state"]["proj"]["amax_history"]
  assert hist.shape == (2, 16, 3) and not np.asarray(hist).any()

  def loss(params, state, x):
    return jnp.sum(net.apply({"params": params, "fp8_state": state}, x) ** 2)

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  params, state = variables["params"], variables["fp8_state"]
  _, obs = grad_fn(params, state, x)
  obs_leaf = jax.tree_util.tree_leaves(obs)[0]
  assert obs_leaf.shape == (2, 16, 3)
  o = np.asarray(obs_leaf)
  assert (o[:, 1:] == 0).all() and (o[:, 0] > 0).all()             # one observation per layer
  w0 = jax.tree_util.tree_leaves(params)[0][0]                      # layer 0 kernel
  np.testing.assert_allclose(o[0, 0, :2], [np.abs(x).max(), np.abs(w0).max()], rtol=0, atol=0)
  state = delayed.update_tree(state, obs)
  np.testing.assert_array_equal(np.asarray(jax.tree_util.tree_leaves(state)[0])[:, 0], o[:, 0])
  # A fresh history scales from the current amax: step 1 equals tensor_current exactly.
  y_delayed = net.apply({"params": params, "fp8_state": jax.tree_util.tree_map(
      jnp.zeros_like, state)}, x)
  y_current = _Scanned(make_policy("tensor_current")).apply({"params": params}, x)
  np.testing.assert_array_equal(np.asarray(y_delayed), np.asarray(y_current))


def test_delayed_scaling_uses_history_and_saturates_on_growth():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((1, 64, 128)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((128, 16)) / 11, jnp.float32)
  spec, dn = RECIPES["tensor_delayed"], (((2,), (0,)), ((), ()))
  state = delayed.init_state(spec.history)
  f = jax.jit(lambda a, b, s: fp8_dot_general(a, b, dn, spec=spec, fp8_state=s))
  obs = jax.grad(lambda s: jnp.sum(f(x, w, s)), allow_int=True)(state)
  state = delayed.update(state, obs)
  # The history remembers amax(x); an input 4x larger saturates at the remembered range.
  y_big = f(4 * x, w, state)
  ref = np.asarray(4 * x, np.float64)[0] @ np.asarray(w, np.float64)
  clipped = np.clip(np.asarray(4 * x)[0], -np.abs(x).max() * 1.01, np.abs(x).max() * 1.01)
  assert np.abs(np.asarray(y_big)[0] - ref).max() > 0.5 * np.abs(clipped @ w - ref).max()
  # Without a state (call sites that carry none) delayed scales like a fresh history: current.
  no_state = jax.jit(lambda a, b: fp8_dot_general(a, b, dn, spec=spec))(x, w)
  current = jax.jit(lambda a, b: fp8_dot_general(a, b, dn, spec=RECIPES["tensor_current"]))(x, w)
  np.testing.assert_array_equal(np.asarray(no_state), np.asarray(current))
  # Microbatches: the max-merge of observations equals the whole batch's observation.
  o1 = jax.grad(lambda s: jnp.sum(f(x[:, :32], w, s)))(state)
  o2 = jax.grad(lambda s: jnp.sum(f(x[:, 32:], w, s)))(state)
  np.testing.assert_array_equal(np.asarray(delayed.merge(o1, o2))[0, :2],
                                np.asarray(jax.grad(lambda s: jnp.sum(f(x, w, s)))(state))[0, :2])
