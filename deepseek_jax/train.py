"""The main job: config -> mesh -> sharded init -> data -> train loop -> checkpoints -> summary.

    deepseek-jax train                                # configs/tiny.yaml, a few minutes on a CPU
    deepseek-jax train --config configs/tiny.yaml --steps 100 --workdir runs/a model.num_layers=2
    deepseek-jax train --workdir runs/a --resume      # continue a run exactly where it stopped
    deepseek-jax train --workdir runs/a --resume --steps 200 train.eval_every=20   # and extend it

(`python -m deepseek_jax.train` and the checkout's `python train.py` are the same command.)

Trains DeepSeek-V3 (MLA, DeepSeekMoE with aux-loss-free balancing, MTP; V3 report §2, §4) on the
embedded corpus (this Python's standard library) by default. The workdir holds `config.yaml` (the
run's config; `--resume` reads it), `tokenizer.json` (a HF tokenizer's copy), `train.log` (what
this command prints, appended across resumes), `metrics.jsonl`, TensorBoard logs in `tb`, orbax
checkpoints, `curves.png` and `summary.txt` / `summary.json`. On resume only `RESUMABLE` fields
(and the model's implementation choices) may be overridden. User errors exit with code 2 and one
line; SIGINT/SIGTERM checkpoint and exit with 128 + the signal number; faults (too many
consecutive non-finite steps, a checkpoint that cannot be written: disk full, read-only) exit with
code 1 and one line naming the newest good checkpoint (`deepseek_jax.errors`; --debug shows the
traceback). One process writes a workdir at a time (`training.lock`: a second is refused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import sys
import time

T_START = time.perf_counter()

import jax  # noqa: E402

from deepseek_jax import errors, training  # noqa: E402
from deepseek_jax.config import (IMPLEMENTATION_FIELDS, Config, ConfigError,  # noqa: E402
                                 config_from_dict, config_to_dict, load_config, parse_override)
from deepseek_jax.config import cli  # noqa: E402
from deepseek_jax.hf.export import export_hf  # noqa: E402
from deepseek_jax.training import checkpoint as ckpt_lib  # noqa: E402
from deepseek_jax.training import metrics as metrics_lib  # noqa: E402
from deepseek_jax.training import build as build_lib  # noqa: E402
from deepseek_jax.training import loop as loop_lib  # noqa: E402
from deepseek_jax.training.lock import WorkdirLock  # noqa: E402
from sharding import distributed  # noqa: E402
from sharding import mesh as mesh_lib  # noqa: E402

DEFAULT_CONFIG = cli.config_path("tiny")
# Fields a resumed run may change (besides model.{IMPLEMENTATION_FIELDS}): length, learning-rate
# schedule, evaluation/checkpoint/log cadence, the MFU peak and how the data-parallel width and
# collectives are laid out. Anything else (model shape, seed, batch, data, tokenizer, optimizer,
# FP8, the sharded state's layout) would make another run, and is refused.
RESUMABLE = tuple(f"train.{f}" for f in (
    "steps", "learning_rate", "min_lr_ratio", "warmup_steps", "decay_start_frac", "decay_end_frac",
    "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "async_checkpoint",
    "max_bad_steps", "log_every", "peak_flops", "loss_chunk", "export_every")) + (
    "mesh.data", "mesh.dcn_data", "mesh.alltoall")


def parse_args(argv, prog: str = "train"):
  ap = cli.parser(prog, "Train DeepSeek-V3: python -m deepseek_jax.train (see its docstring).",
                  config="YAML config (default tiny.yaml; with --resume: the run's config.yaml, "
                         "and a --config given must equal it)")
  ap.add_argument("--steps", type=int, help="shorthand for train.steps=N")
  ap.add_argument("--workdir", help="output directory (default runs/<config name>)")
  ap.add_argument("--resume", action="store_true",
                  help="continue the run in --workdir from its newest checkpoint; overrides may "
                       "change only " + ", ".join(RESUMABLE) + " and model.{"
                       + ",".join(IMPLEMENTATION_FIELDS) + "}")
  cli.add_flag(ap, "--coordinator-address", help="jax.distributed: host:port of process 0")
  cli.add_flag(ap, "--num-processes", type=int, help="jax.distributed: number of processes")
  cli.add_flag(ap, "--process-id", type=int, help="jax.distributed: this process's index")
  ap.add_argument("--distributed", choices=distributed.MODES,
                  help="auto: detect SLURM/TPU/Kubernetes/Open MPI; explicit: the three flags or "
                       "JAX_* variables, required; off: one process (default: explicit if given)")
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


def main(argv=None, prog: str = "train") -> int:
  """`prog [--config F] [--steps N] [--workdir DIR] [--resume] [section.field=value ...]`."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv, prog)
  enable_compilation_cache()
  try:
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    name = pathlib.Path(args.config or DEFAULT_CONFIG).stem
    workdir = pathlib.Path(args.workdir or f"runs/{name}")
    run_cfg = ckpt_lib.run_config(workdir) if args.resume else None
    if run_cfg is None:   # a new run (or one from before config.yaml: its checkpoint is checked)
      cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    else:
      cfg = resume_config(run_cfg, workdir, args.config, overrides)
    init_distributed(args)
    return run(cfg, workdir, resume=args.resume, command=" ".join([prog, *argv]))
  except ConfigError as e:
    print(f"train: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:   # before the loop took over SIGINT: nothing new to save
    print("train: interrupted before training started", file=sys.stderr)
    return 128 + signal.SIGINT


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _portable(cfg: Config, run: Config) -> dict:
  """`cfg` flattened, with paths as the run records them: an existing data path made absolute and
  a tokenizer.json with the same bytes as the run's copy named as that copy."""
  flat = _flat(config_to_dict(cfg))
  if os.path.exists(flat["train.data"]):
    flat["train.data"] = os.path.abspath(flat["train.data"])
  tok, mine = flat["train.tokenizer"], run.train.tokenizer
  if (tok != mine and os.path.isfile(tok) and os.path.isfile(mine)
      and pathlib.Path(tok).read_bytes() == pathlib.Path(mine).read_bytes()):
    flat["train.tokenizer"] = mine
  return flat


def resumable(field: str) -> bool:
  section, _, name = field.partition(".")
  return field in RESUMABLE or (section == "model" and name in IMPLEMENTATION_FIELDS)


def resume_config(run: Config, workdir: pathlib.Path, config_path, overrides) -> Config:
  """The run's config (its config.yaml) with the overrides that a resumed run may take.

  A --config must describe this run (with the overrides applied); an override of a field not
  `resumable` that changes its value is refused, naming the field and both values."""
  run_dict, where = config_to_dict(run), workdir / ckpt_lib.CONFIG
  want = config_from_dict(run_dict, overrides)
  if config_path is not None:
    given, mine = _portable(load_config(config_path, overrides), run), _portable(want, run)
    diff = next((k for k in mine if given.get(k) != mine[k]), None)
    if diff is not None:
      raise ConfigError(f"--resume: --config {config_path} is not this run's config: {diff} is "
                        f"{mine[diff]!r} in {where}, {given.get(diff)!r} in {config_path}; "
                        "resume with --workdir alone")
  before = _portable(run, run)
  for item in overrides:
    after = _portable(config_from_dict(run_dict, [item]), run)
    for k in before:
      if after[k] != before[k] and not resumable(k):
        raise ConfigError(f"--resume: {parse_override(item)[0]} cannot change on resume: {k} is "
                          f"{before[k]!r} in {where}, given {after[k]!r} (may change: "
                          f"{', '.join(f.split('.')[1] for f in RESUMABLE[:6])}, ... see --help)")
  return want


# The sharded program (mesh, model, shardings, jitted steps) is built by the library, so that
# `python -m deepseek_jax.aot` compiles exactly this for devices that are not here.
Built = build_lib.Built
build = build_lib.build


def check_workdir(workdir: pathlib.Path, resume: bool) -> None:
  """A new run never writes into a workdir that holds one."""
  if resume:
    return
  held = ckpt_lib.step_dir(workdir)
  if held is not None or (workdir / ckpt_lib.CONFIG).is_file():
    what = f"checkpoint at step {held.name}" if held is not None else ckpt_lib.CONFIG
    raise ConfigError(f"--workdir {workdir} already holds a run ({what}); add --resume to "
                      "continue it or pick a new --workdir")


def prepare(cfg: Config, workdir: pathlib.Path, resume: bool, data, b):
  """Checkpointer and the state (restored, or initialised sharded)."""
  m = cfg.model
  ckpt = training.Checkpointer(workdir, cfg.train.keep_checkpoints, cfg.train.async_checkpoint,
                               config_to_dict(cfg))
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
  return ckpt, state


def run(cfg: Config, workdir: pathlib.Path, resume: bool = False, command: str = "train") -> int:
  """Holds the workdir's lock (process 0), validates everything (nothing else is written
  before), saves the run's files, then trains."""
  lock = WorkdirLock(workdir, command) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _run(cfg, workdir, resume, command)


def _run(cfg: Config, workdir: pathlib.Path, resume: bool, command: str) -> int:
  check_workdir(workdir, resume)
  # Every "auto" choice (compute dtype, kernels) made once, for this backend: the checkpoints'
  # record, the step and the report see the concrete values; config.yaml keeps "auto".
  resolved = build_lib.resolve(cfg, jax.devices())
  b = build(resolved)
  build_lib.check_memory(b)         # before anything is allocated
  t = resolved.train
  # Each process reads only the rows of each global batch that its devices hold.
  data = training.make_data(resolved, rows=distributed.local_batch_rows(
      b.batch_sh, (t.batch_size, t.seq_len)))
  if jax.process_index() == 0:
    cfg = ckpt_lib.save_run_files(cfg, workdir)
  resolved = dataclasses.replace(resolved, train=dataclasses.replace(
      resolved.train, tokenizer=cfg.train.tokenizer))
  log = workdir / ckpt_lib.LOG if jax.process_index() == 0 else None
  with metrics_lib.TeeLog(log, header=f"$ {command}"):
    try:
      return train(resolved, workdir, resume, data, b)
    except ConfigError as e:        # found while restoring: still one line, and in the log
      print(f"train: error: {e}", file=sys.stderr)
      return 2
    except errors.Fault as e:       # non-finite training, a checkpoint that cannot be written
      errors.show_traceback()
      print(f"train: error: {e}", file=sys.stderr)
      return 1
    except OSError as e:            # the workdir's other files (metrics, logs, exports)
      code = errors.os_errno(e)
      if code is None:
        raise
      errors.show_traceback()
      good = ckpt_lib.step_dirs(workdir / ckpt_lib.CHECKPOINTS)
      print(f"train: error: {errors.os_what(code)} while writing {e.filename or workdir}; "
            + (f"the newest good checkpoint is {good[0].name} in {good[0].parent}" if good else
               "no checkpoint of this run was written"), file=sys.stderr)
      return 1


def train(cfg: Config, workdir: pathlib.Path, resume: bool, data, b) -> int:
  t = cfg.train
  ckpt, state = prepare(cfg, workdir, resume, data, b)
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

  def to_device(batch):
    # Each process read only its rows of the global batch (`make_data(rows=...)`).
    return {k: distributed.to_global(v, b.batch_sh, (t.batch_size, t.seq_len))
            for k, v in batch.items()}

  def export(step: int, state) -> None:
    # A HF checkpoint directory of this step (weights on the host, tokenizer, generation config).
    variables = jax.device_get(training.variables_of(state))
    variables.pop("fp8_state", None)
    dst = export_hf(workdir / "hf" / f"step_{step}", b.cfg.model, variables, tokenizer_dir=workdir,
                    overwrite=True)
    print(f"exported step {step} to {dst}", flush=True)

  if t.export_every and jax.process_count() > 1:
    raise ConfigError("train.export_every: exports from a multi-process run are not written "
                      "(use `deepseek-jax convert` on a checkpoint)")
  writer = training.MetricsWriter(workdir, resume_step=start_step)
  run_ = loop_lib.Run(cfg, step_fn, eval_fn, data, ckpt, writer, to_device, fpt, peak,
                      export=export if t.export_every else None)
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
  finally:
    bar.close()
    try:
      writer.close()
    finally:
      ckpt.close()     # waits for the save in flight (a failed one raises, unless told already)
  print(training.finish_report(cfg, workdir, result, final_eval, data, compile_s=compile_s,
                               wall_s=time.perf_counter() - T_START, peak=peak,
                               peak_src=peak_src, flops_per_token=fpt, start_step=start_step))
  if result.stopped_by:
    print(f"train: stopped by {result.stopped_by} at step {int(state.step)}; continue with "
          f"--resume --workdir {workdir}")
    return 128 + int(signal.Signals[result.stopped_by])
  return 0


if __name__ == "__main__":
  errors.command(main, "python -m deepseek_jax.train")
