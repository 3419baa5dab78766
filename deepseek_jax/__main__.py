"""`deepseek-jax COMMAND ...` (or `python -m deepseek_jax COMMAND ...`): one entry point for the
commands, each also runnable as `python -m <module>`. Every command takes `--help`, which lists
the config keys it accepts; bad input prints one line and exits with 2, a fault (disk full, ...)
one line and 1 (`deepseek_jax.errors`); `--debug` or DEEPSEEK_JAX_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import importlib
import sys

from deepseek_jax import errors
from deepseek_jax.version import __version__

# command -> (module with main(argv, prog), arguments put before the user's, what it does)
COMMANDS = {
    "train": ("deepseek_jax.train", (), "train a model (--config, default tiny.yaml; --resume)"),
    "generate": ("deepseek_jax.generate.__main__", (), "generate text from a run or HF checkpoint"),
    "eval": ("deepseek_jax.evaluate", (), "loss, bits/byte and perplexity on a text file"),
    "convert": ("deepseek_jax.hf.__main__", ("convert",), "write a run or HF checkpoint as HF"),
    "info": ("deepseek_jax.hf.__main__", ("info",), "a HF checkpoint's config and parameters"),
    "codesign": ("deepseek_jax.codesign.__main__", (), "the paper's tables and a memory plan"),
    "aot": ("deepseek_jax.aot.__main__", (), "compile for a GPU/TPU that is not here"),
    "serve": ("deepseek_jax.generate.serve", (), "serve prompts (a file or stdin) with continuous batching"),
    "lab": ("deepseek_jax.lab.__main__", (), "what-if studies: accumulator, wires, bandwidth, topology"),
    "prepare": ("deepseek_jax.training.prepare", (), "tokenise a corpus into ArrayRecord once"),
}
PROG = "deepseek-jax"


def usage() -> str:
  width = max(map(len, COMMANDS))
  return "\n".join([f"usage: {PROG} COMMAND [--config F] [section.field=value ...] [options]",
                    "", "commands:"] +
                   [f"  {name:<{width}}  {what}" for name, (_, _, what) in COMMANDS.items()] +
                   ["", f"{PROG} COMMAND --help lists its options and config keys; --debug "
                    f"(or {errors.DEBUG_ENV}=1) shows a failure's traceback."])


def main(argv=None) -> int:
  """Runs a command; as the program (`argv` None) exits, after a failure without waiting for
  background threads (`errors.leave`)."""
  code = _main(sys.argv[1:] if argv is None else list(argv))
  if argv is None:
    errors.leave(code)
  return code


def _main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(usage(), file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  if argv[0] == "--version":
    print(f"{PROG} {__version__}")
    return 0
  if argv[0] not in COMMANDS:
    print(f"{PROG}: error: unknown command {argv[0]!r} (one of {', '.join(COMMANDS)}; see "
          "--help)", file=sys.stderr)
    return 2
  module, before, _ = COMMANDS[argv[0]]
  # Imported by name: the light top level answers --help without loading jax, and the aot
  # command sets its platform variables before jax is first imported.
  prog = PROG if before else f"{PROG} {argv[0]}"

  def run(rest, prog):
    return importlib.import_module(module).main([*before, *rest], prog=prog)
  return errors.call(run, argv[1:], prog)


if __name__ == "__main__":
  main()
