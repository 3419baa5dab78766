"""House rules, checked from outside: no import cycle, model code never imports sharding/, short
files, and a README layout that names every module (and only modules that exist)."""

from __future__ import annotations

import importlib.util
import sys
import pathlib
import re
import subprocess

import deepseek_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _graph_tool():
  spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_import_graph_has_no_cycle():
  tool = _graph_tool()
  edges, _ = tool.graph(ROOT)
  assert "deepseek_jax.model" in edges and "sharding.expert_parallel" in edges  # the scan saw both
  assert tool.cycles(edges) == []


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
  (tmp_path / "deepseek_jax").mkdir()
  (tmp_path / "deepseek_jax" / "__init__.py").write_text("")
  (tmp_path / "deepseek_jax" / "a.py").write_text("from deepseek_jax import b\nx = 1\n")
  (tmp_path / "deepseek_jax" / "b.py").write_text("def f():\n  from deepseek_jax.a import x\n")
  (tmp_path / "sharding").mkdir()
  (tmp_path / "sharding" / "__init__.py").write_text("")
  tool = _graph_tool()
  edges, nested = tool.graph(tmp_path)
  assert tool.cycles(edges) == [["deepseek_jax.a", "deepseek_jax.b"]]
  assert nested["deepseek_jax.b"] == [(2, "deepseek_jax.a")]


def test_layer_rules_hold_and_forbid_model_to_sharding():
  tool = _graph_tool()
  edges, _ = tool.graph(ROOT)
  assert tool.violations(edges) == []
  planted = dict(edges)
  planted["deepseek_jax.moe"] = edges["deepseek_jax.moe"] | {"sharding.expert_parallel"}
  planted["deepseek_jax.fp8.dot"] = edges["deepseek_jax.fp8.dot"] | {"deepseek_jax.model"}
  planted["deepseek_jax.config.schema"] = {"deepseek_jax.fp8"}
  assert tool.violations(planted) == ["deepseek_jax.config.schema -> deepseek_jax.fp8",
                                      "deepseek_jax.fp8.dot -> deepseek_jax.model",
                                      "deepseek_jax.moe -> sharding.expert_parallel"]


def test_import_graph_command_exits_zero():
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  assert " 0 cycles, 0 forbidden imports" in out.stdout


def _tracked_python_files() -> list[pathlib.Path]:
  out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                       check=False)
  if out.returncode != 0:  # not a git checkout (e.g. an sdist): every .py under the root
    return [p for p in ROOT.rglob("*.py") if ".ci-venv" not in p.parts]
  return [ROOT / f for f in out.stdout.split() if (ROOT / f).is_file()]


def test_no_file_over_400_lines():
  long = {str(p.relative_to(ROOT)): n for p in _tracked_python_files()
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"files over {MAX_LINES} lines (split by concept): {long}"


def readme_layout_modules(text: str) -> set[str]:
  """Module paths named in the README's '## Layout' code block.

  A line whose first word ends in '/' opens that directory at its indentation; every `name.py`
  on a line belongs to the directory opened on that line, else to the innermost open directory
  indented less than the line."""
  block = re.search(r"^## Layout\n.*?```\n(.*?)```", text, re.S | re.M)
  assert block, "README has no '## Layout' section with a code block"
  stack: list[tuple[int, str]] = []   # (indent, path prefix)
  found = set()
  for line in block.group(1).splitlines():
    if not line.strip():
      continue
    indent = len(line) - len(line.lstrip())
    while stack and stack[-1][0] >= indent:
      stack.pop()
    parent = stack[-1][1] if stack else ""
    first = line.split()[0]
    here = parent
    if first.endswith("/"):
      here = parent + first
      stack.append((indent, here))
    for name in re.findall(r"(?<![\w/.])([a-z_][a-z0-9_]*\.py)\b", line):
      found.add(here + name)
  return found


def _package_modules() -> set[str]:
  out = {"train.py"}
  for pkg in ("deepseek_jax", "sharding"):
    for p in (ROOT / pkg).rglob("*.py"):
      if not p.name.startswith("__"):
        out.add(str(p.relative_to(ROOT)))
  return out


def test_readme_layout_parser_reads_nesting():
  text = ("## Layout\n\n```\ntrain.py   main\npkg/       a.py, b.py\n  sub/     c.py\n  d.py     "
          "x\nother/     e.py\n```\n")
  assert readme_layout_modules(text) == {"train.py", "pkg/a.py", "pkg/b.py", "pkg/sub/c.py",
                                         "pkg/d.py", "other/e.py"}


def test_readme_layout_names_every_module_and_only_existing_ones():
  named = readme_layout_modules((ROOT / "README.md").read_text())
  missing = _package_modules() - named
  assert not missing, f"modules missing from the README layout: {sorted(missing)}"
  stale = sorted(n for n in named if not (ROOT / n).is_file())
  assert not stale, f"README layout names files that do not exist: {stale}"


def test_public_api_resolves_and_the_root_import_stays_light():
  for name in deepseek_jax.__all__:
    assert getattr(deepseek_jax, name) is not None, name
  assert set(deepseek_jax.__all__) <= set(dir(deepseek_jax))
  probe = ("import sys, deepseek_jax, deepseek_jax.config; "
           "print(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
  assert out.stdout.strip() == "[]", out.stdout
