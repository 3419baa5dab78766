"""The main job: config -> mesh -> sharded init -> data -> train loop -> checkpoints -> summary.

    python train.py                                   # configs/tiny.yaml, a few minutes on a CPU
    python train.py --config configs/tiny.yaml --steps 100 --workdir runs/a model.num_layers=2
    python train.py --workdir runs/a --resume         # continue a run exactly where it stopped

Trains DeepSeek-V3 (MLA, DeepSeekMoE with aux-loss-free balancing, MTP; V3 report §2, §4) on the
embedded corpus (this Python's standard library) by default. Writes `<workdir>/metrics.jsonl`,
TensorBoard logs in `<workdir>/tb`, orbax checkpoints, `curves.png` and `summary.txt`. User errors
exit with code 2 and one line; SIGINT/SIGTERM checkpoint and exit with 128 + the signal number;
too many consecutive non-finite steps exit with code 1.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

T_START = time.perf_counter()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

from deepseek_jax import training  # noqa: E402
from deepseek_jax.config import Config, ConfigError, config_to_dict, load_config  # noqa: E402
from deepseek_jax.fp8 import policy_from_config  # noqa: E402
from deepseek_jax.model import Transformer  # noqa: E402
from deepseek_jax.training import loop as loop_lib  # noqa: E402
from sharding import distributed, expert_parallel, specs  # noqa: E402
from sharding import mesh as mesh_lib  # noqa: E402
from sharding import rules as rules_lib  # noqa: E402

DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "tiny.yaml"


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2
    print(f"train: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
  ap = _Parser(prog="train.py", description="Train DeepSeek-V3 (see the module docstring).")
  ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default tiny.yaml)")
  ap.add_argument("--steps", type=int, help="shorthand for train.steps=N")
  ap.add_argument("--workdir", help="output directory (default runs/<config name>)")
  ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
  ap.add_argument("--coordinator_address", help="jax.distributed: host:port of process 0")
  ap.add_argument("--num_processes", type=int, help="jax.distributed: number of processes")
  ap.add_argument("--process_id", type=int, help="jax.distributed: this process's index")
  ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=2")
  return ap.parse_intermixed_args(argv)


def init_distributed(args) -> None:
  """Multi-process start from the flags, else the JAX_* environment; a no-op for one process."""
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def fp8_policy(cfg: Config):
  return policy_from_config(cfg.fp8)                # None unless fp8.recipe quantises something


def make_mesh(cfg: Config):
  """The mesh and logical rules of `cfg.mesh` (sharding/), checked against the model and batch."""
  mesh = mesh_lib.make_mesh(cfg.mesh)
  rules = rules_lib.rules_from_config(cfg.mesh)
  mesh_lib.check_model(cfg.model, mesh, rules)
  mesh_lib.check_batch(cfg.train.batch_size // cfg.train.grad_accum, mesh, rules,
                       field="train.batch_size / train.grad_accum")
  return mesh, rules


def enable_compilation_cache() -> None:
  """Reuse compiled steps across runs (a resumed run starts in seconds) unless the user chose."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir",
                      str(pathlib.Path.home() / ".cache" / "deepseek-jax" / "xla"))


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  enable_compilation_cache()
  try:
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    cfg = load_config(args.config, overrides)
    init_distributed(args)
    workdir = pathlib.Path(args.workdir or f"runs/{pathlib.Path(args.config).stem}")
    return run(cfg, workdir, resume=args.resume)
  except ConfigError as e:
    print(f"train: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:   # before the loop took over SIGINT: nothing new to save
    print("train: interrupted before training started", file=sys.stderr)
    return 128 + signal.SIGINT


class Built(NamedTuple):
  """The run's static pieces: model, optimizer, init, mesh, shardings and the jitted steps.

  Trace under `activate()` (init, lowering): flax then resolves logical axes through the rules.
  """
  model: Any
  tx: Any
  init_fn: Callable
  mesh: Mesh
  activate: Callable
  state_sh: Any            # TrainState of NamedShardings
  batch_sh: NamedSharding
  abstract: Any            # TrainState of ShapeDtypeStructs with shardings
  batch_abstract: dict
  step_fn: Any             # jitted (state, batch) -> (state, metrics), state donated
  eval_fn: Any             # jitted (model variables, batch) -> mean CE


def build(cfg: Config) -> Built:
  t = cfg.train
  mesh, rules = make_mesh(cfg)
  activate = functools.partial(mesh_lib.activate, mesh, rules)
  model = Transformer(cfg.model, fp8_policy=fp8_policy(cfg),
                      experts=expert_parallel.runner(cfg.model, cfg.mesh, mesh, rules))
  tx = training.make_optimizer(t)
  init_fn = training.make_init_fn(model, tx, (t.batch_size, t.seq_len), t.seed)
  with activate():
    boxed = training.abstract_state(init_fn)   # leaves boxed with their logical axis names
  state_sh = specs.state_shardings(boxed, mesh, rules)
  batch_sh = specs.batch_sharding(mesh, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.unbox(boxed), state_sh)
  batch_abstract = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.int32, sharding=batch_sh)
                    for k in ("tokens", "targets")}
  replicated = specs.replicated(mesh)
  step_fn = jax.jit(functools.partial(training.train_step, model=model, tx=tx, cfg=cfg),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                    donate_argnames=("state",))
  eval_fn = jax.jit(functools.partial(training.eval_step, model=model),
                    in_shardings=(training.variables_of(state_sh), batch_sh),
                    out_shardings=replicated)
  return Built(model, tx, init_fn, mesh, activate, state_sh, batch_sh, abstract, batch_abstract,
               step_fn, eval_fn)


def prepare(cfg: Config, workdir: pathlib.Path, resume: bool):
  """Checkpointer, data, built pieces and the state (restored, or initialised sharded)."""
  t, m = cfg.train, cfg.model
  ckpt = training.Checkpointer(workdir, t.keep_checkpoints, t.async_checkpoint,
                               config_to_dict(cfg))
  if ckpt.latest_step() is not None and not resume:
    raise ConfigError(f"--workdir {workdir} already holds a run (checkpoint at step "
                      f"{ckpt.latest_step()}); add --resume to continue it or pick a new --workdir")
  data = training.make_data(cfg)
  b = build(cfg)
  state = ckpt.restore(b.abstract) if resume else None
  if resume and state is None:
    print(f"train: --resume: no usable checkpoint in {ckpt.directory}; starting from step 0")
  if state is None:
    with b.activate():
      state = training.init_state(b.init_fn, b.state_sh)
  start = int(state.step)
  print(f"model: {training.param_count(state.params):,} parameters "
        f"({m.param_counts()['active']:,} active per token without embedding), {m.num_layers} "
        f"layers ({m.first_k_dense_replace} dense), {m.n_routed_experts} experts "
        f"top-{m.num_experts_per_tok}, MTP depth {m.num_mtp_layers}")
  print(f"data: {data.description}")
  print(f"mesh: {mesh_lib.describe(b.mesh)} of {jax.devices()[0].device_kind}; workdir {workdir}"
        + (f"; resumed at step {start}" if start else ""), flush=True)
  return ckpt, data, b, state


def run(cfg: Config, workdir: pathlib.Path, resume: bool = False) -> int:
  t = cfg.train
  ckpt, data, b, state = prepare(cfg, workdir, resume)
  start_step = int(state.step)
  peak, peak_src = training.peak_flops(t.peak_flops)
  fpt = cfg.model.flops_per_token(t.seq_len, mtp=True)   # the MTP modules train too
  # Compile once, ahead of time: the loop cannot trigger another compilation of either step.
  t0 = time.perf_counter()
  with b.activate():
    step_fn = b.step_fn.lower(b.abstract, b.batch_abstract).compile()
    eval_fn = b.eval_fn.lower(training.variables_of(b.abstract), b.batch_abstract).compile()
  ckpt.params_finite(state)          # compiles the save-time guard now, not inside the loop
  compile_s = time.perf_counter() - t0
  print(f"compiled train and eval steps in {compile_s:.1f}s; peak {peak / 1e9:.1f} GFLOP/s "
        f"({peak_src}); {fpt / 1e6:.1f} MFLOP per token", flush=True)
  rows = distributed.local_batch_rows(b.batch_sh, (t.batch_size, t.seq_len))

  def to_device(batch):
    # Every process reads the same global batch and feeds the rows its devices hold.
    return {k: distributed.to_global(v[rows], b.batch_sh, v.shape) for k, v in batch.items()}

  writer = training.MetricsWriter(workdir, resume_step=start_step)
  run_ = loop_lib.Run(cfg, step_fn, eval_fn, data, ckpt, writer, to_device, fpt, peak)
  bar = training.ProgressBar(t.steps, start_step, t.log_every)
  try:
    with loop_lib.StopSignal() as stop:
      result = loop_lib.train_loop(run_, state, stop, bar)
      bar.close()
      state = result.state
      ckpt.save(state, force=True)
      ckpt.wait()
      final_eval = result.last_eval
      if not result.stopped_by:      # a signal asks for a quick exit: skip the final evaluation
        final_eval = loop_lib.evaluate(run_, state)
        writer.write(int(state.step), "eval", final_eval)
        print(loop_lib.describe_eval(int(state.step), final_eval, data.unigram_bits))
  except loop_lib.NonFiniteStop as e:
    print(f"train: error: {e}", file=sys.stderr)
    return 1
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  print(training.finish_report(cfg, workdir, result, final_eval, data, compile_s=compile_s,
                               wall_s=time.perf_counter() - T_START, peak=peak,
                               peak_src=peak_src, flops_per_token=fpt, start_step=start_step))
  if result.stopped_by:
    print(f"train: stopped by {result.stopped_by} at step {int(state.step)}; continue with "
          f"--resume --workdir {workdir}")
    return 128 + int(signal.Signals[result.stopped_by])
  return 0


if __name__ == "__main__":
  sys.exit(main())
