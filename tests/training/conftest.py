"""Shared pieces for the training tests: a small config, and train.py runs in- and out-of-process.

Out-of-process runs share a persistent XLA compilation cache (one per test session), so runs of
one config compile once.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# A 2-layer model (1 dense + 1 MoE block, 4 experts top-2 in 2 groups, MTP depth 1) that
# compiles in seconds; every feature of tiny.yaml stays on.
SMALL_MODEL = [
    "model.d_model=32", "model.num_layers=2", "model.first_k_dense_replace=1",
    "model.num_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
    "model.ffn_dim=64", "model.n_routed_experts=4", "model.num_experts_per_tok=2",
    "model.moe_ffn_dim=16", "model.n_group=2", "model.topk_group=1", "model.num_mtp_layers=1",
]
SMALL_TRAIN = ["train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2",
               "train.log_every=1", "train.eval_batches=2", "train.bias_update_gamma=0.001"]
SMALL = SMALL_MODEL + SMALL_TRAIN


# Tests compile far more than they run: skip LLVM's optimisations (speed only, not semantics).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fast(jitted, *args):
  """`jitted` lowered for `args` and compiled without backend optimisations."""
  return jitted.lower(*args).compile(compiler_options=FAST_COMPILE)


def small_config(*extra: str):
  from deepseek_jax.config import load_config  # noqa: PLC0415
  return load_config(REPO / "configs" / "tiny.yaml", SMALL + list(extra))


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("xla_cache")


def subprocess_env(xla_cache: pathlib.Path) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_COMPILATION_CACHE_DIR"] = str(xla_cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # Compile time dominates these tiny runs; LLVM's optimisations change speed, not semantics.
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0")
  env["PYTHONUNBUFFERED"] = "1"
  return env


# The run most end-to-end tests share (one compilation, cached for the other processes):
# 120 steps of the small model on the embedded corpus, checkpoints every 20 steps.
STEPS = 120
RUN = SMALL + ["train.checkpoint_every=20", "train.keep_checkpoints=3", "train.eval_every=40",
               "train.max_bad_steps=3"]


def train_cmd(workdir: pathlib.Path, *args: str) -> list[str]:
  return [sys.executable, str(REPO / "train.py"), "--workdir", str(workdir), *args]


def run_train(xla_cache, workdir, *args, check=True, timeout=300,
              env_extra=None) -> subprocess.CompletedProcess:
  """train.py in a subprocess; stdout and stderr interleaved in `.stdout`."""
  env = {**subprocess_env(xla_cache), **(env_extra or {})}
  proc = subprocess.run(train_cmd(workdir, *args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stdout[-3000:]}")
  return proc


def restore_state(workdir: pathlib.Path, step: int | None = None):
  """(step, the whole TrainState as a nested dict of arrays) of a checkpoint (newest if None)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  ckpts = pathlib.Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  step = steps[-1] if step is None else step
  tree = ocp.StandardCheckpointer().restore(ckpts / str(step) / "state")
  return step, tree


def metric_rows(workdir: pathlib.Path, kind: str = "train") -> list[dict]:
  from deepseek_jax.training.metrics import MetricsWriter  # noqa: PLC0415
  return [r for r in MetricsWriter.read(pathlib.Path(workdir) / "metrics.jsonl")
          if r["kind"] == kind]


@pytest.fixture(scope="session")
def run_a(xla_cache, tmp_path_factory):
  """The shared run, logging every compilation."""
  workdir = tmp_path_factory.mktemp("run_a")
  proc = run_train(xla_cache, workdir, "--steps", str(STEPS), *RUN,
                   env_extra={"JAX_LOG_COMPILES": "1"})
  return workdir, proc
