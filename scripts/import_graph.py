"""The import graph of `deepseek_jax/` and `sharding/`: cycles, function-level imports, layer rules.

  python scripts/import_graph.py [ROOT] [--edges]

Reads the source with `ast` (nothing is imported), so it also runs on an old checkout: ROOT is
the repository root (default: this file's). Prints one line per cycle, per import made inside a
function, and per model-side module that imports `sharding/`; exits 1 when there is a cycle or a
model module importing `sharding/`. `tests/test_house.py` asserts the same.
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGES = ("deepseek_jax", "sharding")
# Model-side modules (DESIGN.md): they name logical axes only and never import sharding/.
MODEL_MODULES = ("layers", "rope", "mla", "router", "dispatch", "moe", "block", "mtp", "model",
                 "naming", "vma", "fp8")


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for p in sorted((root / package).rglob("*.py")):
      name = ".".join(p.relative_to(root).with_suffix("").parts)
      out[name.removesuffix(".__init__")] = p
  return out


def _imports(path: pathlib.Path, name: str, known) -> tuple[set[str], list[tuple[int, str]]]:
  """(modules of the project this file imports, [(line, module)] of imports inside functions)."""
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  deps, nested = set(), []
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      in_function |= {id(n) for n in ast.walk(node) if n is not node}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found = {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
      found = subs if len(subs) == len(node.names) else subs | {base}
    else:
      continue
    found = {d for d in found if d in known and d != name}
    deps |= found
    if id(node) in in_function:
      nested += [(node.lineno, d) for d in sorted(found)] or [(node.lineno, "(third-party)")]
  return deps, nested


def graph(root: pathlib.Path) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
  mods = modules(root)
  edges, nested = {}, {}
  for name, path in mods.items():
    edges[name], nested[name] = _imports(path, name, mods)
  return edges, nested


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Every strongly connected component of more than one module (Tarjan), as a sorted list."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return sorted(out)


def model_imports_sharding(edges: dict[str, set[str]]) -> list[str]:
  bad = []
  for name, deps in sorted(edges.items()):
    parts = name.split(".")
    if parts[0] == "deepseek_jax" and len(parts) > 1 and parts[1] in MODEL_MODULES:
      bad += [f"{name} -> {d}" for d in sorted(deps) if d.split(".")[0] == "sharding"]
  return bad


def main(argv: list[str]) -> int:
  args = [a for a in argv if not a.startswith("--")]
  root = pathlib.Path(args[0]) if args else pathlib.Path(__file__).resolve().parents[1]
  edges, nested = graph(root)
  if "--edges" in argv:
    for name in sorted(edges):
      print(f"{name} -> {', '.join(sorted(edges[name])) or '-'}")
  found = cycles(edges)
  bad = model_imports_sharding(edges)
  n_nested = sum(len(v) for v in nested.values())
  for c in found:
    print("cycle: " + " <-> ".join(c))
  for line in bad:
    print("model imports sharding/: " + line)
  for name in sorted(nested):
    for lineno, dep in nested[name]:
      print(f"function-level import: {modules(root)[name].relative_to(root)}:{lineno} {dep}")
  print(f"{len(edges)} modules, {sum(len(v) for v in edges.values())} imports, {len(found)} "
        f"cycles, {len(bad)} model->sharding imports, {n_nested} function-level imports")
  return 1 if found or bad else 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
