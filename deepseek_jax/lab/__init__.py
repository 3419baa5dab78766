"""What-if studies of the hardware the paper asks vendors for ("Insights" §3-6): change the hardware
in software (accumulator width, wire formats, bandwidth and latency, topology) and see what it buys.
Each study is one command, `python -m deepseek_jax.lab STUDY`, printing a table and writing a plot.
"""

from __future__ import annotations

from deepseek_jax import errors


def study_main(run, argv, prog: str) -> int:
  """A study's `main`: `run(argv, prog)` gives its lines, printed; failures go through
  `errors.call`: bad input is one line and exit 2, an OS fault (an unwritable --plot) one line
  and exit 1."""

  def body(argv, prog):
    print("\n".join(run(argv, prog)))
    return 0
  return errors.call(body, argv, prog)
