"""One error path for every command: what the user sees when something goes wrong.

- A user error (`ConfigError`, and the checkpoint/HF errors that name a file) is one line on stderr
  and exit code 2.
- A fault (`Fault`: disk full, a read-only or unwritable directory, non-finite training, anything
  unexpected) is one line on stderr saying what survived, and exit code 1.
- No Python traceback reaches the user unless `--debug` (any command) or `DEEPSEEK_JAX_DEBUG=1` asks
  for it. Errors that orbax and asyncio log from their background threads (the same fault, told
  again with tracebacks) are dropped; after a failure the process leaves without waiting for
  those threads (`os._exit`), so it never hangs at interpreter shutdown.

`command(main, prog)` runs a command's `main(argv, prog=...)` this way and exits; in-process
callers (tests) use `call`, which returns the exit code instead. Light: imports no jax.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import traceback
from typing import Callable, NoReturn

from deepseek_jax.config.base import ConfigError

DEBUG_ENV = "DEEPSEEK_JAX_DEBUG"
DEBUG_FLAG = "--debug"
# Errors that name the user's input (a file, a field): exit 2. The checkpoint and HF config
# errors live in hf/ (which imports jax), so they are matched by name here.
USER_ERROR_NAMES = ("CheckpointError", "HFConfigError", "UserError")


class UserError(ConfigError):
  """Bad input that is not a config field (a file, a flag): one line, exit 2."""


class Fault(RuntimeError):
  """A failure the user did not ask for (disk full, non-finite training, ...): one line saying
  what survived, exit 1."""


def debug_requested(argv=()) -> bool:
  return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def is_user_error(e: BaseException) -> bool:
  return isinstance(e, ConfigError) or any(c.__name__ in USER_ERROR_NAMES
                                           for c in type(e).__mro__)


_OS_WHAT = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}
# The same conditions as orbax/tensorstore word them (a ValueError with the OS error's text).
_OS_TEXT = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS,
            "Permission denied": errno.EACCES, "Disk quota exceeded": errno.EDQUOT,
            "File too large": errno.EFBIG}


def os_errno(e: BaseException) -> int | None:
  """The OS error behind `e` (an OSError, or its text inside an orbax/tensorstore error, or a
  cause in the chain), else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _OS_WHAT:
      return e.errno
    text = str(e)
    for phrase, code in _OS_TEXT.items():
      if phrase in text:
        return code
    e = e.__cause__ or e.__context__
  return None


def os_what(code: int) -> str:
  return _OS_WHAT.get(code, os.strerror(code))


def first_line(e: BaseException, width: int = 200) -> str:
  text = str(e).strip().splitlines()
  return text[0][:width] if text else type(e).__name__


def describe(e: BaseException) -> tuple[int, str]:
  """(exit code, one line) for an exception that reached the top of a command."""
  if is_user_error(e):
    return 2, first_line(e, 1000)
  if isinstance(e, Fault):
    return 1, first_line(e, 1000)
  code = os_errno(e)
  if code is not None:
    where = getattr(e, "filename", None)
    if isinstance(e, OSError):
      return 1, f"{os_what(code)}{f' writing {where}' if where else ''}"
    return 1, f"{os_what(code)} ({first_line(e)})"
  if isinstance(e, OSError) and e.strerror:
    return 1, f"{e.strerror}{f': {e.filename}' if e.filename else ''}"
  if isinstance(e, MemoryError):
    return 1, "out of host memory (try a smaller model or batch)"
  return 1, (f"unexpected {type(e).__name__}: {first_line(e)} (rerun with {DEBUG_FLAG} or "
             f"{DEBUG_ENV}=1 for the traceback)")


def show_traceback() -> None:
  """Prints the exception being handled when the user asked for tracebacks (for commands that
  tell an error themselves, in one line, and return its code)."""
  if debug_requested():
    traceback.print_exc()


class _Background(logging.Filter):
  """Drops what orbax (its threads report a failed save with tracebacks through absl logging)
  and asyncio ("exception was never retrieved", "Event loop is closed") log at ERROR: the command
  reports the fault itself, in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if record.name == "asyncio" or any(p in record.pathname for p in _BACKGROUND_CODE):
      return False
    return not (record.exc_info and _from_background(record.exc_info[2]))


_FILTER = _Background()
# Where the background noise comes from: a failed restore or save leaves orbax's threads and event
# loops to fail again later ("Event loop is closed", futures whose exception nobody retrieved).
_BACKGROUND_CODE = ("/orbax/", "/asyncio/", "/concurrent/futures/", "/tensorstore/",
                    "/array_serialization/")


def _from_background(tb) -> bool:
  while tb is not None:
    if any(part in tb.tb_frame.f_code.co_filename for part in _BACKGROUND_CODE):
      return True
    tb = tb.tb_next
  return False


def _thread_hook(args) -> None:
  if not _from_background(args.exc_traceback):
    _DEFAULT_HOOKS[0](args)


def _unraisable_hook(args) -> None:
  if not _from_background(args.exc_traceback):
    _DEFAULT_HOOKS[1](args)


_DEFAULT_HOOKS = (threading.excepthook, sys.unraisablehook)


def quiet_background() -> None:
  """Drops what background threads, event loops and collected futures of orbax report about a
  failure (the command tells it in one line); everything else is printed as usual."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)
  threading.excepthook = _thread_hook
  sys.unraisablehook = _unraisable_hook


def call(main: Callable[..., int], argv=None, prog: str | None = None) -> int:
  """Runs `main(argv, prog=prog)` under the one error path; returns the exit code."""
  argv = sys.argv[1:] if argv is None else list(argv)
  debug = debug_requested(argv)
  if DEBUG_FLAG in argv:       # what the command tells itself (`show_traceback`) sees it too
    os.environ[DEBUG_ENV] = "1"
  argv = [a for a in argv if a != DEBUG_FLAG]
  if not debug:
    quiet_background()
  name = prog or "deepseek-jax"
  try:
    code = main(argv, prog=prog) if prog is not None else main(argv)
    return 0 if code is None else int(code)
  except KeyboardInterrupt:
    print(f"\n{name}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 (the one place every error is told)
    code, line = describe(e)
    if debug:
      traceback.print_exc()
    print(f"{name}: error: {line}", file=sys.stderr)
    return code


def leave(code: int) -> NoReturn:
  """Exits with `code`. After a failure, without joining background threads (orbax's may wait
  forever on a directory that cannot be written) or running the collector (asyncio's noise)."""
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except Exception:  # noqa: BLE001 (a closed stream: nothing more to say)
    pass
  if code != 0:
    logging.shutdown()
    os._exit(code)
  sys.exit(code)


def command(main: Callable[..., int], prog: str | None = None, argv=None) -> NoReturn:
  leave(call(main, argv, prog))
