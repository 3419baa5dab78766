"""The AOT report: target parsing, the HLO reading (loops counted by trip count), the command's
errors, and (marked `aot`, needing the [gpu]/[tpu] extras) real compiles for an H200 and a v5p."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.aot import hlo, targets, walk
from tests.helpers import HAS_GPU_COMPILER, HAS_TPU_COMPILER



@pytest.mark.parametrize("text, platform, n", [("h200:1", "gpu", 1), ("h100:8", "gpu", 8),
                                               ("h100:2x8", "gpu", 16),
                                               ("tpu-v5p:2x2x1", "tpu", 4),
                                               ("h800:256x8", "gpu", 2048),
                                               ("tpu-v5p:8x8x16/2", "tpu", 2048)])
def test_parse_target(text, platform, n):
  t = targets.parse_target(text)
  assert t.chip.platform == platform and t.num_devices == n


@pytest.mark.parametrize("text, rule", [("b9000:1", "unknown accelerator"),
                                        ("h200:0", "positive integers"),
                                        ("h200:2x", "positive integers"),
                                        ("h100:1x2x8", "GPU shape"),
                                        ("h100:2x8/2", "only TPUs have slices"),
                                        ("tpu-v5p:2x2x1/0", "'/SLICES' must be a positive"),
                                        ("tpu-v5p:2x2x1/x", "'/SLICES' must be a positive")])
def test_bad_target_names_the_rule(text, rule):
  with pytest.raises(targets.TargetError, match=rule):
    targets.parse_target(text)


def test_gpu_preallocation_is_three_quarters():
  t = targets.parse_target("h200:1")
  assert t.usable_bytes == int(0.75 * t.chip.hbm_bytes)
  assert targets.parse_target("tpu-v5p:2x2x1").usable_bytes == targets.CHIPS["tpu-v5p"].hbm_bytes


@settings(max_examples=8, deadline=None)
@given(layers=st.integers(1, 5), rows=st.integers(1, 24), width=st.sampled_from([8, 16, 40]),
       grad=st.booleans())
def test_dot_flops_count_every_loop_iteration(layers, rows, width, grad):
  """A scanned stack of matmuls: XLA's own cost analysis counts the loop body once; the reading
  counts each of `layers` iterations (forward 1 matmul per layer, backward 2 more)."""
  def f(w_LDD, x_RD):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x_RD, w_LDD)
    return jnp.sum(h)

  fn = jax.grad(f, argnums=(0, 1)) if grad else f
  w = jnp.ones((layers, width, width))
  x = jnp.ones((rows, width))
  text = jax.jit(fn).lower(w, x).compile().as_text()
  expected = (3 if grad else 1) * 2 * rows * width * width * layers
  assert hlo.summarize(text).dot_flops == expected


@settings(max_examples=12, deadline=None)
@given(length=st.integers(3, 12), window=st.integers(2, 6), lo=st.integers(0, 6),
       hi=st.integers(0, 6), stride=st.integers(1, 3), cin=st.integers(2, 4), cout=st.integers(2, 4))
def test_convolution_flops_count_only_taps_on_real_input(length, window, lo, hi, stride, cin, cout):
  """A padded 1-D convolution compiled here: the FLOPs are the multiply-adds whose input is not
  padding (brute force), as XLA:TPU's dots written as padded convolutions need."""
  from hypothesis import assume
  n_out = (length + lo + hi - window) // stride + 1
  assume(n_out >= 1)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride,), [(lo, hi)])  # noqa: E731
  text = jax.jit(conv).lower(jnp.ones((2, cin, length)), jnp.ones((cout, cin, window))
                             ).compile().as_text()
  taps = sum(1 for o in range(n_out) for w in range(window) if 0 <= o * stride + w - lo < length)
  assert "convolution(" in text
  assert hlo.summarize(text).dot_flops == 2 * 2 * cout * cin * taps


def test_bytes_and_custom_calls_are_read():
  text = jax.jit(lambda a, b: (a @ b).sum()).lower(jnp.ones((64, 32)), jnp.ones((32, 16))
                                                   ).compile().as_text()
  s = hlo.summarize(text)
  # at least the operands are read once
  assert s.kernel_bytes >= (64 * 32 + 32 * 16) * 4
  assert not s.custom_calls


FUSION_READING_ONE_LAYER = """
%fused (p0: bf16[11,64,32], p1: s32[]) -> f32[64] {
  %p0 = bf16[11,64,32]{2,1,0} parameter(0)
  %b = bf16[64,11,32]{2,1,0} bitcast(%p0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[64,1,32]{2,1,0} dynamic-slice(%b, %z, %p1, %z), dynamic_slice_sizes={64,1,32}
  %c = f32[64,1,32]{2,1,0} convert(%ds)
  %r = f32[64,32]{1,0} bitcast(%c)
  %zero = f32[] constant(0)
  ROOT %s = f32[64]{0} reduce(%r, %zero), dimensions={1}, to_apply=%add
}

ENTRY %main (a: bf16[11,64,32], i: s32[]) -> f32[64] {
  %a = bf16[11,64,32]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %f = f32[64]{0} fusion(%a, %i), kind=kInput, calls=%fused
}
"""


def test_a_fusion_reading_a_slice_through_a_bitcast_costs_the_slice():
  """A scanned layer's backward reads one layer of a stacked residual: the bytes are that layer's,
  not the stack's (else the roofline estimate is 11x off on the reads)."""
  s = hlo.summarize(FUSION_READING_ONE_LAYER)
  assert s.kernel_bytes == 64 * 32 * 2 + 64 * 4 + 4, s.kernel_bytes


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "deepseek_jax.aot", *args], capture_output=True,
                        text=True, timeout=timeout)


@settings(max_examples=60, deadline=None)
@given(base=st.floats(0, 50), per=st.floats(0.1, 20), curve=st.floats(0, 0.05),
       limit=st.floats(1, 200), step=st.sampled_from([1, 2, 4, 8]), start=st.integers(1, 100),
       seeded=st.booleans())
def test_batch_search_finds_the_largest_fitting_multiple(base, per, curve, limit, step, start,
                                                         seeded):
  """The secant search over compiled totals agrees with walking every multiple of the step, and never
  compiles a batch twice (nor one it was given)."""
  from deepseek_jax.aot.__main__ import search_batch
  total = lambda b: base + per * b + curve * b * b
  first = max(step, start // step * step)
  known = {first: total(first)} if seeded else None
  calls = []
  got = search_batch(lambda b: calls.append(b) or total(b), limit, step, start, known=known)
  assert not (seeded and first in calls)
  want = 0
  while total(want + step) <= limit:
    want += step
  assert got == want, (got, want, calls)
  assert len(calls) == len(set(calls)), calls
  assert got == 0 or total(got) <= limit < total(got + step)


@pytest.mark.parametrize("args, needle", [
    (["--target", "b9000:1"], "unknown accelerator"),
    (["--target", "h200:1", "--decode", "4"], "--decode='4'"),
    (["--target", "h200:1", "--config", "configs/tiny.yaml", "model.num_heads=0"],
     "model.num_heads=0"),
    (["--target", "h200:1", "--batch", "0"], "train.batch_size=0"),
    (["--target", "h200:1"], "nothing left to compile"),
])
def test_command_bad_input_exits_2_with_one_line(args, needle):
  r = _run(*args, "--no-train")
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], r.stderr


@pytest.mark.aot
@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs the [gpu] extra (jax-cuda12-plugin)")
def test_tiny_train_step_for_h200(tmp_path):
  """The real train step compiles for an H200 on this host: it fits, its matmul FLOPs are the
  model's within 30% (the MoE costs tokens x K, not x E), and the decode step compiles too."""
  out = tmp_path / "r.json"
  r = _run("--config", "configs/tiny.yaml", "--target", "h200:1", "--decode", "4,256",
           "--json", str(out))
  assert r.returncode == 0, r.stderr[-2000:]
  train, decode = json.loads(out.read_text())
  assert train["fits"] and decode["fits"]
  assert 0.9 <= train["compiled_flops"] / train["model_flops"] <= 1.3


@pytest.mark.aot
@pytest.mark.skipif(not HAS_TPU_COMPILER, reason="needs the [tpu] extra (libtpu)")
def test_tiny_train_step_for_v5p(tmp_path):
  out = tmp_path / "r.json"
  r = _run("--config", "configs/tiny.yaml", "--target", "tpu-v5p:2x2x1", "--json", str(out))
  assert r.returncode == 0, r.stderr[-2000:]
  (train,) = json.loads(out.read_text())
  assert train["fits"]
  assert 0.9 <= train["compiled_flops"] / train["model_flops"] <= 1.3


def test_kernel_flops_from_operand_shapes():
  """Kernels XLA cannot see into are counted from their shapes: a grouped matmul (forward, and
  the weight gradient with x transposed) and cuDNN's causal fused attention."""
  comp = walk.Computation("c", {"x": "bf16[4096,256]", "w": "bf16[16,256,128]",
                               "xt": "bf16[256,4096]", "dy": "bf16[4096,128]", "g": "s32[16]"}, [])
  fwd = walk.Instr("k", "bf16[4096,128]{1,0}", "custom-call", ["g", "x", "w"], "")
  assert hlo.kernel_flops(comp, fwd, "mosaic_gpu_v2") == 2 * 4096 * 256 * 128
  wgrad = walk.Instr("k", "bf16[16,256,128]{2,1,0}", "custom-call", ["g", "xt", "dy"], "")
  assert hlo.kernel_flops(comp, wgrad, "mosaic_gpu_v2") == 2 * 4096 * 256 * 128
  attrs = (', operand_layout_constraints={bf16[2,64,4,48]{3,2,1,0}, bf16[2,64,4,48]{3,2,1,0}, '
           'bf16[2,64,4,32]{3,2,1,0}}, backend_config={"intermediate_tensor_shape": '
           '{"element_type": "BF16", "dimensions": ["2", "4", "64", "64"]}, "mask_type": "CAUSAL"}')
  att = walk.Instr("a", "(bf16[2,4,64,32])", "custom-call", [], attrs)
  useful = 2 * 2 * 4 * 64 * 64 * (48 + 32) / 2
  assert hlo.kernel_flops(comp, att, "__cudnn$fmhaSoftmax") == useful
  assert hlo.kernel_flops(comp, att, "__cudnn$fmhaSoftmaxBackward") == 2.5 * useful
  assert hlo.kernel_flops(comp, att, "some_other_kernel") is None


def test_collectives_by_mesh_axes_and_nodes():
  """Each collective is keyed by the mesh axes its groups span; a combined collective (several
  operands, as XLA's combiners make) counts every operand; traffic to peers on other nodes goes
  at the cross-node bandwidth."""
  from jax.sharding import Mesh, PartitionSpec as P  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from deepseek_jax.aot import collectives  # noqa: PLC0415
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))

  def f(x, y):
    a, b = jax.lax.psum((x, y), "fsdp")
    return a, b, jax.lax.all_gather(x, "data", tiled=True)

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data", "fsdp"),) * 2,
                             out_specs=(P("data"), P("data"), P(None, "fsdp")), check_vma=False))
  text = fn.lower(jnp.zeros((16, 32)), jnp.zeros((16, 32))).compile().as_text()
  nodes = np.arange(8) // 4                  # data crosses nodes, fsdp stays inside one
  got = collectives.analyze(text, {"data": 2, "fsdp": 4}, nodes, link_bw=100.0, cross_bw=10.0)
  ar, ag = got[("all-reduce", ("fsdp",))], got[("all-gather", ("data",))]
  assert ar.bytes == 2 * 8 * 8 * 4 and ar.cross_fraction == 0 and ar.cross_node_s == 0
  assert ar.in_node_s == pytest.approx(2 * 3 / 4 * ar.bytes / 100.0)
  assert ag.bytes == 16 * 8 * 4 and ag.cross_fraction == 1.0
  assert ag.cross_node_s == pytest.approx(ag.bytes / 2 / 10.0) and ag.in_node_s == 0


def test_parse_ends_computations_as_xla_tpu_prints_them():
  """XLA:TPU closes SparseCore computations with `}, execution_thread=...` and prints kernel
  sources over several lines (some starting with `}}`): neither may hide the computations after."""
  text = """HloModule m

%sc (p: f32[4]) -> f32[4] {
  ROOT %p = f32[4]{0} parameter(0)
}, execution_thread="sparsecore"

%body (a: f32[8,16], b: f32[16,32]) -> f32[8,32] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,32]{1,0} parameter(1)
  %k = f32[8,16]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"src": "x
}}, metadata={op_name="kernel"}
  ROOT %d = f32[8,32]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[8,16], b: f32[16,32]) -> f32[8,32] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,32]{1,0} parameter(1)
  ROOT %c = f32[8,32]{1,0} call(%a, %b), to_apply=%body
}
"""
  comps, entry = walk.parse(text)
  assert set(comps) == {"sc", "body", "main"} and entry == "main"
  assert hlo.summarize(text).dot_flops == 2 * 8 * 16 * 32
