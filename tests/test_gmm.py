"""Grouped matmul (`gmm.gmm`) and the "gmm" dispatch: every kernel equals the dense oracle in values
and gradients (Pallas kernels in interpret mode on CPU), rows in no group cost and give nothing,
the expert-parallel shards pass true group sizes, and (marked `aot`) the MoE compiled for an H200
and a v5p runs the kernel with no [E, A, ...] intermediate."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from deepseek_jax import dispatch, gmm as gmm_lib
from deepseek_jax.config import MeshConfig, ModelConfig
from deepseek_jax.aot import targets
from sharding import expert_parallel as ep
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from tests.helpers import HAS_TOKAMAX, HAS_GPU_COMPILER, HAS_TPU_COMPILER

fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def _close(got, want, tol, what=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.max(np.abs(want)), 1e-30)
  err = np.max(np.abs(got - want)) / scale
  assert err <= tol, f"{what}: max error {err:.2e} (relative to max |value| {scale:.2e})"


def _moe_inputs(seed, X, E, K, D, M, routing="random", dtype=jnp.float32):
  """x, weights, expert ids ("random": K distinct experts per token, the last K experts empty
  when E > 2K; "one": every token's first slot on expert 0; "none": "random" with a third of the
  slots on id E, no expert). NumPy draws them: eager jax ops would compile per shape."""
  rng = np.random.default_rng(seed)
  if routing == "one":
    rest_XK = np.argsort(rng.random((X, E - 1)), axis=1)[:, :K - 1] + 1
    experts_XK = np.concatenate([np.zeros((X, 1), rest_XK.dtype), rest_XK], axis=1)
  else:
    pool = E - K if E > 2 * K else E
    experts_XK = np.argsort(rng.random((X, pool)), axis=1)[:, :K]
  if routing == "none":
    experts_XK = np.where(rng.random((X, K)) < 0.33, E, experts_XK)
  weights_XK = rng.uniform(0.1, 1.0, (X, K)).astype(np.float32)
  arrays = [rng.standard_normal((X, D))] + [0.3 * rng.standard_normal(sh) for sh in
                                            [(E, D, M), (E, D, M), (E, M, D)]]
  x_XD, *ws = (jnp.asarray(a, dtype) for a in arrays)
  return (x_XD, jnp.asarray(weights_XK), jnp.asarray(experts_XK, jnp.int32), *ws)


def _value_and_grads(fn, args, ct_XD):
  """y and d(sum(y * ct))/d(x, gate, up, down): the oracle and the path under test alike."""
  x, w, e, *ws = args
  def loss(x, *ws):
    y = fn(x, w, e, *ws)
    return jnp.sum(y.astype(jnp.float32) * ct_XD), y
  (_, y), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, *ws)
  return y, g


@functools.lru_cache(maxsize=None)
def _compiled(fn):
  """One compiled value-and-gradients per function (hypothesis draws values, not shapes)."""
  return fast_jit(functools.partial(_value_and_grads, fn))


@functools.lru_cache(maxsize=None)
def _runner_fn(runner):
  return lambda *a: runner(*a)[0]


def _check_against_dense(fn, args, tol):
  ct_XD = jnp.asarray(np.random.default_rng(7).standard_normal(args[0].shape), jnp.float32)
  f32 = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
  y, g = _compiled(fn)(args, ct_XD)
  y_ref, g_ref = _compiled(dispatch.dense_ffn)(f32, ct_XD)
  _close(y, y_ref, tol, "y")
  for name, a, b in zip(("dx", "dgate", "dup", "ddown"), g, g_ref):
    _close(a, b, tol, name)


# ---- the XLA kernel (CPU), through gmm and through the dispatch ----

def _oracle_gmm(x_AD, w_EDM, sizes):
  group_A = np.repeat(np.arange(len(sizes)), sizes)
  group_A = np.concatenate([group_A, np.full(x_AD.shape[0] - len(group_A), len(sizes))])
  onehot_AE = jnp.asarray(group_A[:, None] == np.arange(len(sizes))[None], x_AD.dtype)
  return jnp.einsum("AD,EDM,AE->AM", x_AD, w_EDM, onehot_AE)


@functools.lru_cache(maxsize=None)
def _gmm_value_and_vjp(block):
  def run(x, w, sizes, dy):
    y, vjp = jax.vjp(lambda x, w: gmm_lib.gmm(x, w, sizes, platform="cpu", block=block), x, w)
    return y, vjp(dy)
  return fast_jit(run)


# (A, E, D, M, block): hypothesis draws a case, the group sizes and values; each compiles once.
GMM_CASES = [(24, 4, 5, 3, None), (7, 1, 2, 9, 1), (33, 6, 8, 8, 4)]


@given(st.sampled_from(GMM_CASES), st.data())
def test_xla_gmm_equals_dense_rows_past_the_groups_give_zero(case, data):
  A, E, D, M, block = case
  cuts = sorted(data.draw(st.lists(st.integers(0, A), min_size=E, max_size=E), "cuts"))
  sizes = np.diff([0] + cuts).astype(np.int32)          # empty groups, rows past the last cut
  rng = np.random.default_rng(data.draw(st.integers(0, 99), "seed"))
  x, w, dy = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in [(A, D), (E, D, M),
                                                                          (A, M)])
  y, g = _gmm_value_and_vjp(block)(x, w, jnp.asarray(sizes), dy)
  y_ref, vjp_ref = jax.vjp(lambda x, w: _oracle_gmm(x, w, sizes), x, w)
  _close(y, y_ref, 1e-5, "y")
  assert not np.any(np.asarray(y)[cuts[-1]:])
  for name, a, b in zip(("dx", "dw"), g, vjp_ref(dy)):
    _close(a, b, 1e-5, name)


# (X, E, K, D, M, fuse_gate_up): spread with empty experts, two experts, K = 3, one token.
MOE_CASES = [(24, 12, 4, 8, 6, True), (9, 2, 2, 3, 5, False), (16, 8, 3, 4, 8, True),
             (1, 6, 2, 8, 8, False)]


@given(st.sampled_from(MOE_CASES), st.sampled_from(["random", "one", "none"]), st.integers(0, 99))
def test_dropless_gmm_equals_dense(case, routing, seed):
  """dispatch "gmm" (XLA kernel) == dense_ffn, values and gradients, fused gate+up or not, over
  spread routings with empty experts, all tokens on one expert, and slots with no expert."""
  X, E, K, D, M, fuse = case
  run = dispatch.LocalExperts("dropless", "gmm", None, "cpu", fuse)
  _check_against_dense(_runner_fn(run), _moe_inputs(seed, X, E, K, D, M, routing), 1e-5)


# ---- the Pallas kernels in interpret mode (CPU) ----

def _interpreted(monkeypatch, kernel):
  """dispatch's gmm calls forced onto `kernel` in interpret mode."""
  monkeypatch.setattr(gmm_lib, "gmm", functools.partial(gmm_lib.gmm, kernel=kernel,
                                                         interpret=True))


# Mosaic-TPU/GPU tiles want D and M multiples of 128; E = 6 > 2K leaves two experts empty.
KERNEL_CASE = dict(X=40, E=6, K=2, D=128, M=128)


@pytest.mark.parametrize("routing", ["random", "none"])
def test_megablox_interpreted_equals_dense(monkeypatch, routing):
  _interpreted(monkeypatch, "megablox")
  run = dispatch.LocalExperts("dropless", "gmm", None, "tpu")
  _check_against_dense(_runner_fn(run), _moe_inputs(1, routing=routing, **KERNEL_CASE),
                       1e-5)


@pytest.mark.skipif(not HAS_TOKAMAX, reason="tokamax is not installed")
@pytest.mark.parametrize("routing", ["one", "none"])
def test_triton_interpreted_equals_dense(monkeypatch, routing):
  _interpreted(monkeypatch, "triton")
  run = dispatch.LocalExperts("dropless", "gmm", None, "gpu")
  _check_against_dense(_runner_fn(run), _moe_inputs(2, routing=routing, **KERNEL_CASE),
                       1e-5)


@pytest.mark.skipif(not HAS_TOKAMAX, reason="tokamax is not installed")
def test_mosaic_gpu_interpreted_forward_and_input_gradient():
  """The sm90 kernel in bf16: forward (gmm) and the input gradient (the same kernel on rhs.T).
  The weight gradient (tokamax's ragged-contracting kernel) cannot run in the Mosaic-GPU
  interpreter of jax 0.10 (no CPU rule for `layout_cast`); the AOT test compiles it instead."""
  A, E, D, M = 72, 3, 128, 128   # A not a multiple of the 64-row tile; group 1 empty
  sizes = jnp.array([30, 0, 35], jnp.int32)              # 7 rows in no group
  rng = np.random.default_rng(3)
  x, w, dy = (jnp.asarray(scale * rng.standard_normal(sh), jnp.bfloat16)
              for scale, sh in [(1, (A, D)), (0.1, (E, D, M)), (1, (A, M))])
  y = jax.jit(lambda x, w: gmm_lib.gmm(x, w, sizes, platform="gpu", kernel="mosaic_gpu",
                                       interpret=True))(x, w)
  spec = gmm_lib._Spec("mosaic_gpu", 0, True)  # noqa: SLF001 (the backward's input gradient)
  dlhs = lambda dy, w: gmm_lib._kernel_gmm(spec, dy, (w,), sizes, True)  # noqa: E731, SLF001
  dx = jax.jit(dlhs)(dy, w)
  dx = np.where(np.arange(A)[:, None] < int(sizes.sum()), np.asarray(dx, np.float32), 0)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  y_ref, vjp = jax.vjp(lambda x: _oracle_gmm(x, f32(w), np.asarray(sizes)), f32(x))
  _close(y, y_ref, 1e-2, "y")
  _close(dx, vjp(f32(dy))[0], 1e-2, "dx")


# ---- choices, errors and the expert-parallel caller ----

def test_kernel_choice_is_by_platform_not_backend():
  assert gmm_lib.select_kernel("cpu", jnp.bfloat16, 2048, 1408) == ("xla", None)
  assert gmm_lib.select_kernel("tpu", jnp.bfloat16, 2048, 1408) == ("megablox", None)
  kernel, why = gmm_lib.select_kernel("tpu", jnp.float32, 64, 1408)
  assert kernel == "xla" and "D=64" in why
  if HAS_TOKAMAX:
    assert gmm_lib.select_kernel("gpu", jnp.bfloat16, 2048, 1408) == ("mosaic_gpu", None)
    assert gmm_lib.select_kernel("gpu", jnp.float32, 2048, 1408) == ("triton", None)
  assert dispatch.default_dropless_impl("gpu") == "gmm"     # the host here is a CPU
  assert dispatch.default_dropless_impl("cpu") == "block"
  assert dispatch.default_dropless_impl() == "block"
  cfg = ModelConfig(platform="tpu", fuse_gate_up=False, dropless_impl="gmm")
  assert dispatch.LocalExperts.from_config(cfg) == dispatch.LocalExperts(
      "dropless", "gmm", None, "tpu", False)


def test_without_tokamax_a_gpu_falls_back_with_a_note(monkeypatch):
  monkeypatch.setattr(gmm_lib, "_tokamax", lambda: None)
  gmm_lib._note.cache_clear()  # noqa: SLF001
  kernel, why = gmm_lib.select_kernel("gpu", jnp.bfloat16, 128, 128)
  assert kernel == "xla" and "tokamax" in why
  x, w = jnp.ones((4, 3)), jnp.ones((2, 3, 5))
  with pytest.warns(UserWarning, match="tokamax is not installed"):
    y = gmm_lib.gmm(x, w, jnp.array([1, 2]), platform="gpu")
  np.testing.assert_array_equal(y, np.array([3.0] * 3 + [0.0])[:, None] * np.ones(5))
  with pytest.raises(ValueError, match="kernel='triton' needs tokamax"):
    gmm_lib.gmm(x, w, jnp.array([1, 2]), platform="gpu", kernel="triton")


@pytest.mark.parametrize("call, needle", [
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((2, 4, 5)), jnp.ones(2, int),
                         platform="cpu"), "must be [A, D] and [E, D, M]"),
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.ones(3, int),
                         platform="cpu"), "group_sizes (3,)"),
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.ones(2, int),
                         platform="auto"), "platform='auto'"),
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.ones(2, int),
                         platform="cpu", kernel="cuda"), "kernel='cuda'"),
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.ones(2, int),
                         platform="gpu", kernel="mosaic_gpu"), "not float32"),
    (lambda: dispatch.LocalExperts(platform="cuda"), "platform='cuda'"),
])
def test_errors_name_the_value_and_the_rule(call, needle):
  with pytest.raises(ValueError) as e:
    call()
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_expert_parallel_shards_pass_true_group_sizes(monkeypatch):
  """Each shard's experts see only its real rows (padding rows and empty slots are in no group);
  the result equals one device. (XLA:CPU has no ragged all-to-all; its unfilled rows arrive as
  id 0 on the wire, which decodes to "no expert" the same way.)"""
  X, E, K, D, M = 32, 8, 2, 8, 8
  args = _moe_inputs(4, X, E, K, D, M)
  counts = []
  real = gmm_lib.gmm

  def recording(x, w, group_sizes_E, **kw):
    if isinstance(w, tuple):   # gate and up, fused: one call per shard and forward
      jax.debug.callback(lambda n: counts.append(int(n)), jnp.sum(group_sizes_E))
    return real(x, w, group_sizes_E, **kw)

  monkeypatch.setattr(gmm_lib, "gmm", recording)
  want = dispatch.dense_ffn(*args)
  for alltoall in ("dense",):
    counts.clear()
    mesh_cfg = MeshConfig(2, 1, 4, 1, capacity_factor=None, alltoall=alltoall)
    run = ep.ExpertParallel(mesh_lib.make_mesh(mesh_cfg), rules_lib.DEFAULT_RULES, 1, 1,
                            ep.EPOptions.from_config(mesh_cfg),
                            dispatch.LocalExperts("dropless", "gmm", None, "cpu"))
    y, stats = jax.jit(run)(*args)
    jax.effects_barrier()
    _close(y, want, 1e-5, f"y ({alltoall})")
    assert sum(counts) == int(stats.assignments) == X * K, (alltoall, counts)


# ---- compiled for an H200 and a v5p ----

def _moe_hlo(platform, devices, X=256, E=64, K=6, D=256, M=256):
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("d",))
  s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  bf = jnp.bfloat16
  shapes = [((X, D), bf), ((X, K), jnp.float32), ((X, K), jnp.int32), ((E, D, M), bf),
            ((E, D, M), bf), ((E, M, D), bf)]
  run = dispatch.LocalExperts("dropless", "gmm", None, platform)
  def fwd_bwd(x, w, e, wg, wu, wd):
    y, vjp = jax.vjp(lambda x, wg, wu, wd: run(x, w, e, wg, wu, wd)[0], x, wg, wu, wd)
    return y, vjp(y)
  args = [jax.ShapeDtypeStruct(sh, dt, sharding=s) for sh, dt in shapes]
  return jax.jit(fwd_bwd).lower(*args).compile().as_text(), E, X * K


def _assert_kernel_and_no_dense_intermediate(text, target, E, A):
  assert f'custom_call_target="{target}"' in text
  for dims in re.findall(r"\[([0-9,]+)\]", text):
    d = [int(v) for v in dims.split(",") if v]
    assert not (E in d and any(v >= A for v in d)), f"a [{dims}] array: dense over E and A"


@pytest.mark.aot
@pytest.mark.skipif(not (HAS_GPU_COMPILER and HAS_TOKAMAX), reason="needs the [gpu] extra")
def test_moe_for_h200_runs_the_mosaic_kernel():
  text, E, A = _moe_hlo("gpu", targets.devices(targets.parse_target("h200:1")))
  _assert_kernel_and_no_dense_intermediate(text, "mosaic_gpu_v2", E, A)


@pytest.mark.aot
@pytest.mark.skipif(not HAS_TPU_COMPILER, reason="needs the [tpu] extra (libtpu)")
def test_moe_for_v5p_runs_megablox():
  text, E, A = _moe_hlo("tpu", targets.devices(targets.parse_target("tpu-v5p:2x2x1")))
  _assert_kernel_and_no_dense_intermediate(text, "tpu_custom_call", E, A)
