"""`python -m deepseek_jax.lab STUDY [options]` (or `deepseek-jax lab STUDY`): one what-if study.

Each study module has `main(argv, prog) -> int`; it prints a table, writes a plot (`--plot DIR`)
and a short text of what the table shows. Bad input prints one line and exits with 2, an OS fault
(an unwritable --plot) one line and 1 (`deepseek_jax.errors`).
"""

from __future__ import annotations

import importlib
import sys

from deepseek_jax import errors

PROG = "python -m deepseek_jax.lab"
# study -> (module with main(argv, prog), what it varies)
STUDIES = {
    "accumulator": ("deepseek_jax.lab.accumulator",
                    "train in FP8 with 13-22 bit accumulators and promotion intervals"),
    "wires": ("deepseek_jax.lab.wires",
              "BF16, FP8, LogFMT-8/10 on the expert dispatch and combine: loss and bytes"),
    "bandwidth": ("deepseek_jax.lab.bandwidth",
                  "EP TPOT bound and training step as scale-up/out bandwidth and latency vary"),
    "topology": ("deepseek_jax.lab.topology",
                 "cost per endpoint against scale for FT2, MPFT, FT3, SF and DF"),
}


def usage(prog: str) -> str:
  width = max(map(len, STUDIES))
  return "\n".join([f"usage: {prog} STUDY [options]", "", "studies:"] +
                   [f"  {name:<{width}}  {what}" for name, (_, what) in STUDIES.items()] +
                   ["", f"{prog} STUDY --help lists its options."])


def _run(argv: list[str], prog: str) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(usage(prog), file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  if argv[0] not in STUDIES:
    raise errors.UserError(f"unknown study {argv[0]!r} (one of {', '.join(STUDIES)})")
  module = importlib.import_module(STUDIES[argv[0]][0])
  return module.main(argv[1:], prog=f"{prog} {argv[0]}")


def main(argv=None, prog: str = PROG) -> int:
  return errors.call(_run, sys.argv[1:] if argv is None else list(argv), prog)


if __name__ == "__main__":
  errors.leave(main())
