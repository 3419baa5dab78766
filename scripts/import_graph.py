"""The import graph of `deepseek_jax/` and `sharding/`: cycles, function-level imports, layer rules.

  python scripts/import_graph.py [ROOT] [--edges]

Reads the source with `ast` (nothing is imported), so it also runs on an old checkout: ROOT is
the repository root (default: this file's). Importing `a.b.c` counts as importing the package
`__init__`s of `a` and `a.b` too, as Python runs them first. Prints one line per cycle, per
import that the layer rules (`ALLOWED`) forbid, and per import made inside a function; exits 1
on a cycle or a forbidden import. `tests/test_house.py` asserts the same.
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGES = ("deepseek_jax", "sharding")
# Model-side modules (DESIGN.md): they name logical axes only and never import sharding/.
MODEL = tuple(f"deepseek_jax.{m}" for m in ("layers", "rope", "attention", "mla", "router",
                                             "gmm", "expert_blocks", "dispatch", "moe", "block",
                                             "mtp", "model", "loss", "naming", "vma"))
# Who may import whom: a module matching a key (longest prefix wins) may import only modules
# matching one of its values, besides its own package. Modules matching no key (training,
# generate, hf, codesign: the consumers above the model) may import anything without a cycle.
ALLOWED = {
    "deepseek_jax.config": (),
    "deepseek_jax.tokenizer": ("deepseek_jax.config",),
    "deepseek_jax.fp8": ("deepseek_jax.config",),
    "deepseek_jax.kernels": ("deepseek_jax.vma",),   # vma: jax only
    **{m: ("deepseek_jax.config", "deepseek_jax.fp8", "deepseek_jax.kernels") + MODEL
       for m in MODEL},
    "sharding": ("deepseek_jax.config", "deepseek_jax.fp8") + MODEL,
}


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for p in sorted((root / package).rglob("*.py")):
      name = ".".join(p.relative_to(root).with_suffix("").parts)
      out[name.removesuffix(".__init__")] = p
  return out


def _parents(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


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
    # Importing a.b.c runs the __init__ of a and a.b first, unless the importer lives inside them.
    found |= {p for d in found for p in _parents(d)
              if p in known and not (name == p or name.startswith(p + "."))}
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


def _matches(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def violations(edges: dict[str, set[str]]) -> list[str]:
  """'importer -> imported' for every import that `ALLOWED` forbids."""
  bad = []
  for name, deps in sorted(edges.items()):
    keys = [k for k in ALLOWED if _matches(name, k)]
    if not keys:
      continue
    key = max(keys, key=len)
    ok = ALLOWED[key] + (key,)
    bad += [f"{name} -> {d}" for d in sorted(deps)
            if d != "deepseek_jax" and not any(_matches(d, a) for a in ok)]   # the root is lazy
  return bad


def main(argv: list[str]) -> int:
  args = [a for a in argv if not a.startswith("--")]
  root = pathlib.Path(args[0]) if args else pathlib.Path(__file__).resolve().parents[1]
  edges, nested = graph(root)
  if "--edges" in argv:
    for name in sorted(edges):
      print(f"{name} -> {', '.join(sorted(edges[name])) or '-'}")
  found = cycles(edges)
  bad = violations(edges)
  n_nested = sum(len(v) for v in nested.values())
  for c in found:
    print("cycle: " + " <-> ".join(c))
  for line in bad:
    print("forbidden import: " + line)
  for name in sorted(nested):
    for lineno, dep in nested[name]:
      print(f"function-level import: {modules(root)[name].relative_to(root)}:{lineno} {dep}")
  print(f"{len(edges)} modules, {sum(len(v) for v in edges.values())} imports, {len(found)} "
        f"cycles, {len(bad)} forbidden imports, {n_nested} function-level imports")
  return 1 if found or bad else 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
