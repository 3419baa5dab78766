"""One writer per workdir: `<workdir>/.lock`, held by the training process for its whole run.

The lock is an exclusive `flock` on the file (the kernel drops it when the holder dies, kill -9
included), and the file records the holder: pid, host, start time and command. A second writer is
refused in one line naming the holder. A record left by a process that died without releasing
(the file is not empty but nobody holds it, and the pid is gone) is taken over with a note.
A released lock leaves an empty file; a workdir that holds nothing but the lock (a run refused
before it wrote anything) is removed again on release.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time

from deepseek_jax.errors import UserError

LOCK = ".lock"


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:    # exists, owned by someone else
    return True
  return True


def _alive(record: dict) -> bool:
  """Whether the record's process still runs (on this host; another host's cannot be checked and
  counts as alive)."""
  pid = record.get("pid")
  if record.get("host") != socket.gethostname():
    return bool(record)
  return isinstance(pid, int) and pid_alive(pid)


def _describe(record: dict) -> str:
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("time", 0)))
  return (f"process {record.get('pid')} on {record.get('host')} since {when} "
          f"({record.get('command', '?')})")


class WorkdirLock:
  """`with WorkdirLock(workdir, command):` holds the workdir's lock; UserError if it is held."""

  def __init__(self, workdir: str | pathlib.Path, command: str = "train"):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK
    self.command = command
    self._fd: int | None = None
    self._created = False

  def _read(self) -> dict:
    try:
      text = os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {"pid": "?", "host": "?", "command": "unreadable lock record"}

  def acquire(self) -> "WorkdirLock":
    self._created = not self.workdir.exists()
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"--workdir {self.workdir}: cannot write there ({e.strerror})") from None
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      held = False
    except OSError as e:
      # A filesystem without flock (some network mounts): the record's pid decides alone.
      old = self._read() if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) else None
      held = old is None or _alive(old)
    if held:
      holder = self._read()
      os.close(self._fd)
      self._fd = None
      raise UserError(f"--workdir {self.workdir} is in use by {_describe(holder)}; wait for it "
                      f"to finish, stop it, or pick another --workdir (lock: {self.path})") from None
    old = self._read()
    if old:
      state = "still running but not holding it" if _alive(old) else "no longer running"
      print(f"train: note: taking over the stale lock of {self.workdir} left by "
            f"{_describe(old)}, {state}", file=sys.stderr, flush=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
              "command": self.command[:200]}
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(record).encode(), 0)
    os.fsync(self._fd)
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
      if self._created and [p.name for p in self.workdir.iterdir()] == [LOCK]:
        self.path.unlink()
        self.workdir.rmdir()
    except OSError:
      pass
    finally:
      try:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
      except OSError:
        pass          # never held (a filesystem without flock); closing releases anyway
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
