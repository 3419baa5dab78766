"""`codesign.step_memory.step_plan` against the program it models: the arguments term by term
against the built state's own shardings (exact), and the FLOP split of `aot.crosscheck` against the
module's total and the forward/backward ratio a matmul has."""

import dataclasses

import jax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.aot import crosscheck, hlo
from deepseek_jax.codesign.step_memory import step_plan
from deepseek_jax.config import Config, MeshConfig, TrainConfig
from deepseek_jax.training.build import build
from tests.helpers import small_config


def _cfg(mesh, *, bf16_moments=False, grad_accum=1, remat="none", **model):
  m = small_config(**{"num_mtp_layers": 1, "n_routed_experts": 8, **model}, remat=remat)
  return Config(model=m, train=TrainConfig(batch_size=8 * grad_accum, seq_len=16,
                                           grad_accum=grad_accum, bf16_moments=bf16_moments),
                mesh=MeshConfig(*mesh))


@given(mesh=st.sampled_from([(1, 8, 1, 1), (1, 2, 4, 1), (2, 2, 2, 1), (1, 2, 2, 2), (8, 1, 1, 1)]),
       bf16=st.booleans(), accum=st.sampled_from([1, 2]))
def test_plan_arguments_are_the_built_states_shards(mesh, bf16, accum):
  """Parameters, optimizer and the rest of the state: the plan's bytes per device are the bytes of
  the shards the built step is given, to the byte."""
  b = build(_cfg(mesh, bf16_moments=bf16, grad_accum=accum))
  got = crosscheck.state_bytes(b.abstract)
  plan = step_plan(b.cfg, dict(zip(b.mesh.axis_names, b.mesh.axis_sizes)))
  assert plan.params == got["params"]
  assert plan.optimizer == pytest.approx(got["opt_state"], rel=0, abs=64)   # + Adam's step count
  assert plan.grad_accumulator == (plan.micro_gradients if accum > 1 else 0)
  assert plan.micro_gradients == got["params"]          # f32 gradients of f32 masters


def test_plan_activations_follow_remat_and_attention():
  sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
  cfg = _cfg((1, 1, 1, 1))
  plans = {(r, a): step_plan(dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, remat=r, attention_impl=a).resolved("gpu")), sizes)
      for r in ("none", "full") for a in ("fused", "materialized")}
  assert plans[("full", "fused")].activations < plans[("none", "fused")].activations
  assert plans[("none", "fused")].activations < plans[("none", "materialized")].activations
  assert plans[("none", "fused")].params == plans[("full", "materialized")].params


@pytest.mark.parametrize("remat", ["none", "full"])
def test_flop_split_adds_up_and_backward_is_twice_forward(remat):
  """Every dot is counted once in the split (it sums to `hlo.summarize`'s total); the backward of a
  matmul is two matmuls of its size; full remat recomputes the blocks' forward once."""
  cfg = _cfg((1, 1, 1, 1), remat=remat, moe_dispatch="dense", num_mtp_layers=0)
  b = build(cfg, jax.devices()[:1])
  with b.activate():
    text = b.step_fn.lower(b.abstract, b.batch_abstract).compile().as_text()
  split = crosscheck.flops_by_phase(text)
  assert sum(split.values()) == pytest.approx(hlo.summarize(text).dot_flops)
  phase = {p: sum(v for (ph, _), v in split.items() if ph == p)
           for p in ("forward", "remat", "backward")}
  assert 1.7 <= phase["backward"] / phase["forward"] <= 2.3, phase
  if remat == "full":
    layers_fwd = sum(v for (ph, part), v in split.items() if ph == "forward" and part != "head")
    assert phase["remat"] == pytest.approx(layers_fwd, rel=0.2), phase
  else:
    assert phase["remat"] == 0
