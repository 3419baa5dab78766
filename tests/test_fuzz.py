"""Fuzzing the commands' error path: random corruption of a config YAML, a HF config.json, a
safetensors header or file, and a train.py checkpoint's files.

Every case must end in one of: success (exit 0), exit 2 with one line, exit 1 with one line
(notes that a checkpoint step was unreadable and an older one used may precede it; a corrupt input
reported as an "unexpected" internal error fails too) and never a
Python traceback, a hang (the driver's per-case alarm) or a changed byte in any input file (the
commands here write only their output directory). The cases run in one process
(`tests/fault_driver.py`, jax imported once); the default run takes one case per (input, kind of
corruption), `-m slow` runs FUZZ_CASES (default 200) random ones.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import random
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
OPS = {
    "yaml": ["mutate", "non_utf8", "truncate", "flip", "random", "delete"],
    "config_json": ["mutate", "non_utf8", "truncate", "flip", "random", "delete"],
    "safetensors": ["length", "field", "truncate", "flip", "random", "delete"],
    "checkpoint": ["truncate", "flip", "random", "delete"],
}
COMMANDS = {"yaml": ["train"], "config_json": ["info", "convert"], "safetensors": ["convert"],
            "checkpoint": ["convert"]}
# -m slow also generates (it compiles the decode step: seconds per new shape).
SLOW_COMMANDS = {"yaml": ["train"], "config_json": ["info", "convert", "generate"],
                 "safetensors": ["convert", "generate"], "checkpoint": ["convert", "generate"]}
NOTES = ("is unreadable", ": note:")


def table_cases(seed: int = 0) -> list[dict]:
  """One case per (input, corruption), commands alternating."""
  rng = random.Random(seed)
  return [{"kind": k, "op": op, "seed": rng.randrange(2 ** 31),
           "command": COMMANDS[k][i % len(COMMANDS[k])]}
          for k, ops in OPS.items() for i, op in enumerate(ops)]


def random_cases(n: int, seed: int) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    kind = rng.choice(sorted(OPS))
    out.append({"kind": kind, "op": rng.choice(OPS[kind]), "seed": rng.randrange(2 ** 31),
                "command": rng.choice(SLOW_COMMANDS[kind])})
  return out


def run_driver(cases: list[dict], tmp_path: pathlib.Path, timeout: int) -> list[dict]:
  cases_file, result_file = tmp_path / "cases.json", tmp_path / "results.json"
  cases_file.write_text(json.dumps(cases))
  env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "JAX_PLATFORMS": "cpu"}
  env.pop("DEEPSEEK_JAX_DEBUG", None)
  proc = subprocess.run([sys.executable, "-m", "tests.fault_driver", str(cases_file),
                         str(result_file)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(result_file.read_text())


def verdict(r: dict) -> str | None:
  """None when the case ended as promised, else what went wrong."""
  err = r["stderr"]
  if r["code"] is None:
    return "hang"
  if "Traceback" in err:
    return "traceback"
  if r["changed"]:
    return f"changed input files {r['changed']}"
  if r["code"] not in (0, 1, 2):
    return f"exit code {r['code']}"
  if r["code"] != 0:
    lines = [ln for ln in err.splitlines() if ln.strip() and not any(n in ln for n in NOTES)]
    if len(lines) != 1 or "error:" not in lines[0]:
      return f"exit {r['code']} with {len(lines)} lines"
    if "error: unexpected " in lines[0]:    # a corrupt input is bad input, not an internal error
      return "bad input reported as an unexpected error"
  return None


def summary(results: list[dict]) -> str:
  codes = collections.Counter(r["code"] for r in results)
  per = collections.Counter((r["kind"], r["command"]) for r in results)
  return (f"exit codes {dict(sorted(codes.items(), key=str))}; cases per (input, command) "
          f"{dict(sorted(per.items()))}")


def check(results: list[dict]) -> None:
  bad = [(r["kind"], r["op"], r["seed"], r["argv"][0], verdict(r), r["stderr"][-600:])
         for r in results if verdict(r)]
  assert not bad, "\n".join(map(str, bad))


def test_verdict_rejects_what_it_should():
  ok = {"code": 2, "stderr": "train: error: x\n", "changed": []}
  assert verdict(ok) is None
  assert verdict({**ok, "code": None}) == "hang"
  assert verdict({**ok, "stderr": "Traceback (most recent call last):\n"}) == "traceback"
  assert verdict({**ok, "changed": ["hf/config.json"]}).startswith("changed")
  assert verdict({**ok, "stderr": "train: error: x\nmore\n"}) == "exit 2 with 2 lines"
  assert verdict({**ok, "code": 0, "stderr": "load: checkpoint step 7 is unreadable\n"}) is None
  assert verdict({**ok, "code": 1, "stderr": "convert: error: unexpected TypeError: x\n"}) == (
      "bad input reported as an unexpected error")


def test_fuzz_table(tmp_path):
  """Every (input, corruption) pair once; prints the size and time (FAULTS.md quotes them)."""
  t0 = time.perf_counter()
  results = run_driver(table_cases(), tmp_path, timeout=900)
  print(f"\nfuzz table: {len(results)} cases in {time.perf_counter() - t0:.1f}s; "
        f"{summary(results)}")
  assert len(results) == sum(map(len, OPS.values()))
  check(results)


@pytest.mark.slow
def test_fuzz_random(tmp_path):
  n = int(os.environ.get("FUZZ_CASES", "200"))
  t0 = time.perf_counter()
  results = run_driver(random_cases(n, seed=int(os.environ.get("FUZZ_SEED", "17"))), tmp_path,
                       timeout=60 * 60)
  print(f"\nfuzz random: {len(results)} cases in {time.perf_counter() - t0:.1f}s; "
        f"{summary(results)}")
  check(results)
