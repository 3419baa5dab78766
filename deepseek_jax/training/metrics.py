"""Training metrics: model FLOPs utilisation, JSONL + TensorBoard logs, a progress bar, the log.

MFU = `ModelConfig.flops_per_token(seq_len, mtp=True)` * tokens/s / peak ("Insights into
DeepSeek-V3" Table 2 method plus the MTP modules the run trains, V3 report §2.2). The peak is
`train.peak_flops` if set, else the declared dense BF16 peak of a known accelerator, else the best
f32 rate of several large matmuls measured in this process (CPU), so a slow measurement does not
flatter MFU. `TeeLog` copies what the command prints into `<workdir>/train.log`.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.codesign.hardware import PRESETS

TERA = 1e12
# Dense BF16 peaks of devices that `codesign.hardware.PRESETS` does not describe (vendor datasheets);
# matched against `device_kind`. H100/H800/H200/TPU v5p come from the presets (one source of truth).
_OTHER_PEAKS = {"H20": 148 * TERA, "A100": 312 * TERA, "TPU v4": 275 * TERA,
                "TPU v5 lite": 197 * TERA, "TPU v5e": 197 * TERA, "TPU v6": 918 * TERA}


def declared_peaks() -> dict[str, float]:
  """device_kind substring -> dense BF16 FLOP/s."""
  from_presets = {"H100": PRESETS["h100"], "H800": PRESETS["h800"], "H200": PRESETS["h200"],
                  "TPU v5p": PRESETS["tpu_v5p"]}
  return {**{k: hw.peak_bf16_flops for k, hw in from_presets.items()}, **_OTHER_PEAKS}


def measure_matmul_peak(sizes=(1024, 2048), repeats: int = 4) -> float:
  """Best f32 FLOP/s over `repeats` n x n x n matmuls for each n, on the default device."""
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), jnp.float32) / n
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t))
  return best


def peak_flops(declared: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, how it was obtained) for the first local device."""
  if declared > 0:
    return declared, "train.peak_flops"
  kind = jax.local_devices()[0].device_kind
  for name, peak in declared_peaks().items():
    if name.lower() in kind.lower():
      return peak, f"declared {name} BF16 dense peak"
  return measure_matmul_peak(), f"measured f32 matmul peak ({kind})"


def to_python(x):
  """Device/NumPy metric values as JSON-friendly floats, ints, bools and lists."""
  a = np.asarray(x)
  if a.ndim:
    return [to_python(v) for v in a]
  v = a.item()
  return v if not isinstance(v, float) or math.isfinite(v) else str(v)


class MetricsWriter:
  """Appends metric rows to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb`)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int = 0, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0     # one writer per run, not per process
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._file, self._tb = None, None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():   # a killed run may have logged past its last checkpoint
      keep = [r for r in self.read(self.path) if r.get("step", 0) <= resume_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    self._file = self.path.open("a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 (slow import; only when logging)
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

  @staticmethod
  def read(path) -> list[dict]:
    rows = []
    for line in pathlib.Path(path).read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue   # a line cut short by a kill
    return rows

  def write(self, step: int, kind: str, values: dict) -> dict:
    row = {"step": step, "kind": kind, **{k: to_python(v) for k, v in values.items()}}
    if not self.enabled:
      return row
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k in ("step", "kind"):
          continue
        vals = v if isinstance(v, list) else [v]
        for i, x in enumerate(vals):
          if isinstance(x, (int, float)) and not isinstance(x, bool):
            self._tb.add_scalar(f"{kind}/{k}" + (f"/{i}" if isinstance(v, list) else ""), x, step)
    return row

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


class ProgressBar:
  """One self-overwriting line on a terminal; plain lines every `every` steps otherwise."""

  def __init__(self, total: int, start: int = 0, every: int = 10, stream=None):
    self.total, self.start, self.every = total, start, every
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.t0 = time.perf_counter()
    self.closed = False

  def update(self, step: int, text: str) -> None:
    frac = step / max(self.total, 1)
    done = int(30 * frac)
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    line = (f"[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} {text} "
            f"eta {eta:4.0f}s")
    if self.tty:
      self.stream.write("\r" + line + "\033[K")
      self.stream.flush()
    elif step % self.every == 0 or step == self.total:
      self.stream.write(line + "\n")

  def note(self, text: str) -> None:
    """A line that stays (the bar, on a terminal, is redrawn below it at the next update)."""
    self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty and not self.closed:
      self.stream.write("\n")
    self.closed = True



_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Tee:
  """A text stream writing to `stream` and, line by line, to `log`: a carriage return (a progress
  bar redrawing itself) ends the line it follows, and terminal escapes are left out. A log that
  cannot be written (disk full) is given up; the terminal still gets everything."""

  def __init__(self, stream, log):
    self.stream, self.log, self.pending = stream, log, ""

  def write(self, text: str) -> int:
    self.stream.write(text)
    self.pending += text
    *lines, self.pending = re.split(r"[\r\n]", self.pending)
    if self.log is None:
      return len(text)
    try:
      for line in lines:
        line = _ESCAPES.sub("", line)
        if line.strip():
          self.log.write(line + "\n")
      self.log.flush()
    except OSError:
      self.log = None
    return len(text)

  def flush(self) -> None:
    self.stream.flush()

  def __getattr__(self, name):   # isatty, fileno, encoding ... of the real stream
    return getattr(self.stream, name)


class TeeLog:
  """While active, sys.stdout and sys.stderr are also appended to `path` (None: nothing is)."""

  def __init__(self, path: pathlib.Path | None, header: str = ""):
    self.path, self.header, self._log, self._saved = path, header, None, None

  def __enter__(self):
    if self.path is None:
      return self
    self._log = open(self.path, "a")  # noqa: SIM115 (closed in __exit__)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    self._log.write(f"--- {stamp} {self.header}\n")
    self._saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, self._log), _Tee(sys.stderr, self._log)
    return self

  def __exit__(self, *exc):
    if self._log is None:
      return
    try:
      for tee in (sys.stdout, sys.stderr):
        if isinstance(tee, _Tee) and tee.log is not None and tee.pending.strip():
          tee.log.write(_ESCAPES.sub("", tee.pending) + "\n")
    except OSError:
      pass
    finally:
      sys.stdout, sys.stderr = self._saved
      try:
        self._log.close()
      except OSError:
        pass
