"""What-if studies of the hardware the paper asks vendors for ("Insights" §3-6): change the hardware
in software (accumulator width, wire formats, bandwidth and latency, topology) and see what it buys.
Each study is one command, `python -m deepseek_jax.lab STUDY`, printing a table and writing a plot.
"""

from __future__ import annotations

import sys

from deepseek_jax.config.base import ConfigError


def study_main(run, argv, prog: str) -> int:
  """A study's `main`: `run(argv, prog)` gives its lines; bad input or an unwritable plot path is
  one line on stderr and exit 2."""
  try:
    lines = run(sys.argv[1:] if argv is None else list(argv), prog)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  return 0
