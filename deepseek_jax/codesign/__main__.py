"""`python -m deepseek_jax.codesign`: the co-design calculator's command line ("Insights" §2-4).

Prints the paper's Tables 1-2, the EP TPOT bound and node-limited routing numbers next to the
same quantities for `--config` on `--hardware`, a per-device memory plan on `--mesh` (or an
FSDP + EP mesh for `--devices`), and the paper's remaining numbers (Tables 3-5, the 4:1 ratio,
DualPipe, MTP, V2 against 67B: `paper_report`), each beside the paper's value with a status.
`--paper-only` prints the paper's numbers alone; `--markdown FILE` writes them as a table;
`--plot DIR` writes PNG charts; `--roofline B,T` compiles and times our own train step. User
errors print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

from deepseek_jax.cli_args import ArgParser, output_dir, positive_float, positive_int
from deepseek_jax.codesign import kv_cache, memory, paper_report, plots, report
from deepseek_jax.codesign.hardware import get_hardware
from deepseek_jax.config import ConfigError, cli, load_config
from deepseek_jax.model import abstract_variables

DEFAULT_CONFIG = "deepseek_v3_671b"
RUN_CONFIG = "deepseek_v3_h800_2048"   # V3's 2048-GPU run: the tokens per step of Table 4


def _shape(text: str) -> tuple[int, int]:
  parts = text.split(",")
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f"{text!r} must read BATCH,SEQ (e.g. 2,64)")
  return positive_int(parts[0]), positive_int(parts[1])


def build_parser(prog: str = "python -m deepseek_jax.codesign") -> ArgParser:
  p = ArgParser(prog=prog, description="Reproduce the tables of 'Insights into DeepSeek-V3' and "
                                       "plan memory, communication and speed for a config.",
                epilog=cli.keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="model YAML (default: configs/deepseek_v3_671b.yaml)")
  p.add_argument("overrides", nargs="*", metavar="section.field=value",
                 help="dotted config overrides, e.g. model.num_layers=4 (see below)")
  p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # deprecated
  p.add_argument("--hardware", default="h800",
                 help="preset: h800, h100, h200, gb200_nvl72, tpu_v5p")
  cli.add_flag(p, "--seq-len", type=positive_int,
                 help="sequence length for this model's FLOPs and memory (default: train.seq_len)")
  cli.add_flag(p, "--tokens-per-device", type=positive_int, default=32,
                 help="decode tokens per device for the EP bound (32)")
  cli.add_flag(p, "--ep-size", type=positive_int, help="devices in the EP group "
                 "(default: routed + shared experts, one per device)")
  p.add_argument("--bandwidth", type=positive_float, metavar="GB/s",
                 help="all-to-all bandwidth per device for the EP bound "
                      "(default: the preset's tier)")
  p.add_argument("--mesh", help="axis=size,... e.g. data=2,fsdp=16,expert=64,tensor=1")
  p.add_argument("--devices", type=positive_int, default=2048,
                 help="devices for the automatic FSDP + EP mesh when --mesh is not given (2048)")
  p.add_argument("--rules", choices=("project", "planning"), default="project",
                 help="logical -> mesh rules: sharding/rules.py with the config's mesh.rules "
                      "(project) or codesign's shard-everything table (planning)")
  cli.add_flag(p, "--micro-batch", type=positive_int,
                 help="sequences per micro-step, all devices (default: one per batch shard)")
  cli.add_flag(p, "--bf16-moments", action="store_true",
               help="Adam moments in BF16 (V3 recipe; default: the config's train.bf16_moments)")
  cli.add_flag(p, "--no-zero1", action="store_true",
                 help="keep optimizer state replicated over the data axis")
  cli.add_flag(p, "--sample-tokens", type=int, default=2048,
                 help="tokens routed by the real router for the node-limited table (0: skip)")
  cli.add_flag(p, "--no-eval-shape", action="store_true",
                 help="skip the model's eval_shape (parameter check and memory plan)")
  p.add_argument("--roofline", type=_shape, metavar="B,T",
                 help="compile and time our train step on B x T tokens (small configs only)")
  cli.add_flag(p, "--roofline-steps", type=positive_int, default=3)
  p.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR")
  cli.add_flag(p, "--paper-only", action="store_true",
                 help="print only the paper's numbers (Tables 1-5, ratio, DualPipe, MTP, V2 vs "
                      "67B) beside ours, with a status each; fast")
  p.add_argument("--markdown", metavar="FILE",
                 help="also write the paper's remaining numbers as a Markdown table to FILE")
  p.add_argument("--logfmt", action="store_true",
                 help="add the LogFMT claim from `lab wires` (slower: it encodes test tiles)")
  return p


def paper_lines(args, v2, v3, hw) -> list[str]:
  """The paper's remaining numbers (Tables 3-5 and the rest) as report lines; `--markdown` and
  `--logfmt` act here."""
  run = load_config(cli.config_path(RUN_CONFIG)).train
  extra = []
  if args.logfmt:
    group = paper_report.logfmt_group()
    if group is None:
      raise ConfigError("--logfmt: deepseek_jax.lab.wires.logfmt_claim is not available")
    extra.append(group)
  sections = paper_report.paper_sections(v2, v3, run.batch_size * run.seq_len, hw, extra)
  if args.markdown:
    pathlib.Path(args.markdown).write_text(paper_report.markdown(sections) + "\n")
  counts = paper_report.status_counts(sections)
  return paper_report.section_lines(sections) + [
      "== Paper numbers by status: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " =="]


def run(argv=None, prog: str = "python -m deepseek_jax.codesign") -> list[str]:
  args = build_parser(prog).parse_intermixed_args(argv)
  if args.sample_tokens < 0:
    raise ConfigError(f"--sample-tokens={args.sample_tokens}: must be >= 0")
  hw = get_hardware(args.hardware)
  path = args.config or cli.config_path(DEFAULT_CONFIG)
  cfg = load_config(path, [*args.set, *args.overrides])
  m = cfg.model
  seq_len = args.seq_len or cfg.train.seq_len
  rules = memory.project_rules(cfg.mesh) if args.rules == "project" else memory.PLANNING_RULES
  mesh = memory.parse_mesh(args.mesh) if args.mesh else memory.auto_mesh(m, args.devices, rules)
  memory.check_rules(rules, mesh)
  plot_dir = output_dir("--plot", args.plot)
  v2, v3 = report.reference_model("deepseek_v2_236b"), report.reference_model(DEFAULT_CONFIG)
  bandwidth = None if args.bandwidth is None else args.bandwidth * 1e9
  moment_bytes = memory.moment_bytes(cfg.train, args.bf16_moments)

  if args.paper_only:
    return ([f"# the paper's numbers beside the project's (on {hw.name})"]
            + report.section_table1(v3) + report.section_table2(v2, v3)
            + paper_lines(args, v2, v3, get_hardware("h800")))
  variables = None if args.no_eval_shape else abstract_variables(m)
  lines = [f"# co-design report for {path} on {hw.name}"]
  lines += report.section_model(m, seq_len, variables)
  lines += report.section_table1(v3)
  lines += report.section_table2(v2, v3)
  lines += report.section_ep(m, hw, args.tokens_per_device, args.ep_size, bandwidth)
  lines += report.section_node_limited(m, hw, args.sample_tokens)
  plan = None
  if variables is not None:
    mem_lines, plan = report.section_memory(
        m, mesh, args.micro_batch, seq_len, moment_bytes, not args.no_zero1, hw, rules,
        variables=variables)
    lines += mem_lines
  lines += paper_lines(args, v2, v3, get_hardware("h800"))
  if args.roofline:
    lines += report.section_roofline(m, *args.roofline, args.roofline_steps)
  if plot_dir is not None:
    written = [plots.plot_kv_cache(kv_cache.table1(v3), plot_dir / "kv_cache_table1.png"),
               plots.plot_tpot_vs_bandwidth(plot_dir / "tpot_vs_bandwidth.png")]
    if plan is not None:
      n = math.prod(mesh.values())
      by_mesh = report.plans_by_mesh(m, n, mesh if args.mesh else None, seq_len,
                                     moment_bytes, not args.no_zero1, variables, rules)
      written.append(plots.plot_memory_by_mesh(
          by_mesh, plot_dir / "memory_by_mesh.png", hw.hbm_bytes,
          f"{pathlib.Path(str(path)).stem} on {n} devices: full remat, one sequence of "
          f"{seq_len} per batch shard"))
    lines.append("== Plots ==")
    lines += [f"  {w}" for w in written]
  return lines


def main(argv=None, prog: str = "python -m deepseek_jax.codesign") -> int:
  try:
    lines = run(argv, prog)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:   # e.g. --plot into a directory that cannot be written
    print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
