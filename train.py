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
import os
import pathlib
import signal
import sys
import time

T_START = time.perf_counter()

import jax  # noqa: E402

from deepseek_jax import training  # noqa: E402
from deepseek_jax.config import Config, ConfigError, config_to_dict, load_config  # noqa: E402
from deepseek_jax.training import build as build_lib  # noqa: E402
from deepseek_jax.training import loop as loop_lib  # noqa: E402
from sharding import distributed  # noqa: E402
from sharding import mesh as mesh_lib  # noqa: E402

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
  ap.add_argument("--distributed", choices=distributed.MODES,
                  help="auto: detect SLURM/TPU/Kubernetes/Open MPI; explicit: the three flags or "
                       "JAX_* variables, required; off: one process (default: explicit if given)")
  ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=2")
  return ap.parse_intermixed_args(argv)


def init_distributed(args) -> None:
  """Multi-process start (flags, JAX_* variables or, with --distributed auto, the cluster)."""
  launch = distributed.plan(args.distributed, args.coordinator_address, args.num_processes,
                            args.process_id)
  if distributed.start(launch):
    print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
          f"{launch.describe()}", flush=True)


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


# The sharded program (mesh, model, shardings, jitted steps) is built by the library, so that
# `python -m deepseek_jax.aot` compiles exactly this for devices that are not here.
Built = build_lib.Built
build = build_lib.build


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
  # Every "auto" choice (compute dtype, kernels) made once, for this backend: the saved run
  # config, the step and the report all see the concrete values.
  cfg = build_lib.resolve(cfg, jax.devices())
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
