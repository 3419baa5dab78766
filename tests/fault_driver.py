"""Runs fuzz cases of corrupted inputs through the commands' one error path, in one process.

  python -m tests.fault_driver CASES.json RESULT.json

Each case corrupts one file of a fresh copy of a fixture (a config YAML, a HF checkpoint's
config.json or safetensors header, a train.py checkpoint), runs a command on it through
`errors.call` (stdout/stderr captured at the file-descriptor level, so background threads'
output is caught too) and records the exit code, stderr, the time taken and every input file
whose bytes changed. Importing jax once for all cases keeps the cost of a case to what the
command does. `tests/test_fuzz.py` writes the cases and judges the results.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import struct
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
import yaml

from deepseek_jax import errors, training
from deepseek_jax import train as trainer
from deepseek_jax.config import Config, config_to_dict
from deepseek_jax.generate import __main__ as gen_cli
from deepseek_jax.hf import __main__ as hf_cli
from deepseek_jax.hf import load_hf

REPO = pathlib.Path(__file__).resolve().parents[1]
HF_FIXTURE = REPO / "tests" / "fixtures" / "hf" / "v3_tiny"
CASE_LIMIT_S = 120
# Values a structured mutation puts in place of a config field.
ODD_VALUES = [None, [], {}, "three", -1, 0, 1e30, float("inf"), True, "", [1, 2], 2 ** 62, 0.5]


class Hang(BaseException):
  """A case ran past CASE_LIMIT_S (not an Exception: the error path must not catch it)."""


def make_state(step: int):
  """(model config, a TrainState of the v3_tiny weights with Adam moments at `step`)."""
  cfg, variables = load_hf(HF_FIXTURE)
  params = variables["params"]
  zero = jnp.zeros((), jnp.int32)
  return cfg, training.TrainState(
      step=jnp.asarray(step, jnp.int32), params=params, opt_state=optax.adam(1e-3).init(params),
      router_state=variables["router_state"], fp8_state={}, rng=jax.random.PRNGKey(0),
      data_position=zero, bad_streak=zero, bad_total=zero)


def make_run(root: pathlib.Path) -> pathlib.Path:
  """A train.py workdir with checkpoints 5 and 7 of the v3_tiny weights (as train.py saves)."""
  workdir = root / "run"
  cfg, _ = make_state(0)
  ckpt = training.Checkpointer(workdir, keep=3, async_save=False,
                               config=config_to_dict(Config(model=cfg)))
  for step in (5, 7):
    assert ckpt.save(make_state(step)[1], force=True)
  ckpt.close()
  return workdir


def corrupt_bytes(path: pathlib.Path, rng: random.Random, op: str) -> None:
  data = path.read_bytes()
  if op == "truncate":
    path.write_bytes(data[:rng.randrange(len(data) + 1)])
  elif op == "flip":
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
      if b:
        b[rng.randrange(len(b))] = rng.randrange(256)
    path.write_bytes(bytes(b))
  elif op == "random":
    path.write_bytes(rng.randbytes(rng.choice([0, 1, 16, len(data)])))
  elif op == "delete":
    path.unlink()
  elif op == "non_utf8":
    at = rng.randrange(len(data) + 1)
    path.write_bytes(data[:at] + b"\xff\xfe\xc3" + data[at:])
  else:
    raise ValueError(op)


def mutate_tree(tree, rng: random.Random):
  """A copy of a parsed YAML/JSON document with one leaf (or the whole) replaced."""
  if not isinstance(tree, dict) or rng.random() < 0.05:
    return rng.choice(ODD_VALUES)
  tree = json.loads(json.dumps(tree))
  node = tree
  while True:
    key = rng.choice(sorted(node))
    if isinstance(node[key], dict) and node[key] and rng.random() < 0.8:
      node = node[key]
      continue
    node[key] = rng.choice(ODD_VALUES)
    return tree


def corrupt_safetensors_header(path: pathlib.Path, rng: random.Random, op: str) -> None:
  data = path.read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  header = json.loads(data[8:8 + n])
  if op == "length":
    data = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2 ** 40, len(data)])) + data[8:]
  else:      # a field of one tensor's entry (dtype, shape, data_offsets)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    field = rng.choice(["dtype", "shape", "data_offsets"])
    header[name][field] = rng.choice(ODD_VALUES + ["F64", "I8", [0, 10 ** 12], [3, 1]])
    body = json.dumps(header).encode()
    data = struct.pack("<Q", len(body)) + body + data[8 + n:]
  path.write_bytes(data)


def hashes(*roots: pathlib.Path) -> dict:
  out = {}
  for root in roots:
    for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
      if p.is_file() and p.name != ".lock":
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def run_captured(main, argv, prog) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `errors.call(main, argv, prog)`, captured at the fd level."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    try:
      code = errors.call(main, argv, prog)
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])
    out.seek(0)
    err.seek(0)
    return code, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")


def command(name: str, src: pathlib.Path, work: pathlib.Path):
  """(main, argv, prog) of `name` (info, convert, generate) reading `src`."""
  if name == "info":
    return hf_cli.main, ["info", str(src)], "info"
  if name == "generate":     # token ids in and out: no tokenizer needed
    return gen_cli.main, ["--checkpoint", str(src), "--prompt", "1,2,3", "--tokenizer", "ids",
                          "--max-new-tokens", "2"], "generate"
  return hf_cli.main, ["convert", str(src), str(work / "out")], "convert"


def prepare_case(case: dict, base: pathlib.Path, work: pathlib.Path):
  """(main, argv, prog, the inputs that must not change, a description) of one case."""
  rng = random.Random(case["seed"])
  kind, op = case["kind"], case["op"]
  if kind == "yaml":
    cfg = work / "c.yaml"
    shutil.copy(REPO / "configs" / "tiny.yaml", cfg)
    if op == "mutate":
      cfg.write_text(yaml.safe_dump(mutate_tree(yaml.safe_load(cfg.read_text()), rng)))
    else:
      corrupt_bytes(cfg, rng, op)
    # The workdir holds a run: a config that loads is refused there (exit 2) before any build.
    return (trainer.main, ["--config", str(cfg), "--workdir", str(work / "run"), "--steps", "3"],
            "train", [cfg, work / "run"])
  if kind in ("config_json", "safetensors"):
    hf = work / "hf"
    if kind == "config_json":
      target = hf / "config.json"
      if op == "mutate":
        target.write_text(json.dumps(mutate_tree(json.loads(target.read_text()), rng)))
      else:
        corrupt_bytes(target, rng, op)
    else:
      target = rng.choice(sorted(hf.glob("*.safetensors")))
      if op in ("length", "field"):
        corrupt_safetensors_header(target, rng, op)
      else:
        corrupt_bytes(target, rng, op)
    return (*command(case["command"], hf, work), [hf])
  if kind == "checkpoint":
    run = work / "run"
    steps = sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name))
    step = steps[-1] if rng.random() < 0.8 else steps[0]
    files = sorted(p for p in step.rglob("*") if p.is_file())
    corrupt_bytes(rng.choice(files), rng, op)
    return (*command(case["command"], run, work), [run])
  raise ValueError(kind)


def main(argv) -> int:
  cases = json.loads(pathlib.Path(argv[0]).read_text())
  base = pathlib.Path(tempfile.mkdtemp(prefix="fault_fuzz_"))
  shutil.copytree(HF_FIXTURE, base / "hf", ignore=shutil.ignore_patterns("reference.npz"))
  make_run(base)

  def on_alarm(*_):
    raise Hang()
  signal.signal(signal.SIGALRM, on_alarm)
  results = []
  for case in cases:
    work = base / f"case{len(results)}"
    shutil.copytree(base / "hf", work / "hf")
    shutil.copytree(base / "run", work / "run")
    main_fn, args, prog, inputs = prepare_case(case, base, work)
    before = hashes(*inputs)
    t0 = time.perf_counter()
    signal.alarm(CASE_LIMIT_S)
    try:
      code, out, err = run_captured(main_fn, args, prog)
    except Hang:
      code, out, err = None, "", "HANG"
    finally:
      signal.alarm(0)
    after = hashes(*inputs)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    results.append({**case, "argv": args, "code": code, "stderr": err[-4000:],
                    "seconds": time.perf_counter() - t0,
                    "changed": [os.path.relpath(c, work) for c in changed]})
    shutil.rmtree(work, ignore_errors=True)
  pathlib.Path(argv[1]).write_text(json.dumps(results, indent=1))
  shutil.rmtree(base, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
