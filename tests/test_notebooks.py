"""The notebooks run top to bottom from any working directory, say what their text claims, and are
committed with outputs of that kind.

Each notebook is executed once (nbclient, in a temporary working directory) and its printed
results are checked as properties: the mesh that splits a dimension is the one whose collectives
appear, node-limited routing caps the nodes per token, a trained router's biases lower MaxVio,
a stream joins to the generated text. `NOTEBOOKS_WRITE=1 pytest tests/test_notebooks.py` writes
the executed notebooks back into notebooks/ (how their committed outputs are made).
"""

from __future__ import annotations

import os
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("sharding_experiments", "api")


def _text(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """name -> the notebook executed in a fresh working directory (run on first use)."""
  import nbclient  # noqa: PLC0415 (test extra)
  done = {}

  def run(name: str):
    if name not in done:
      nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
      cwd = tmp_path_factory.mktemp(name)
      # The kernel inherits this environment: conftest's 8 fake devices are the sharding
      # notebook's own choice (it sets them), not the API notebook's single-device run.
      env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
      env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                env.get("XLA_FLAGS", ""))
      env["JAX_PLATFORMS"] = "cpu"
      client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                       resources={"metadata": {"path": str(cwd)}})
      old = dict(os.environ)
      os.environ.clear()
      os.environ.update(env)
      try:
        client.execute()   # raises CellExecutionError naming the failing cell
      finally:
        os.environ.clear()
        os.environ.update(old)
      if os.environ.get("NOTEBOOKS_WRITE") == "1":
        nbformat.write(nb, NOTEBOOKS / f"{name}.ipynb")
      done[name] = nb
    return done[name]
  return run


def _table(text: str, header: str) -> dict[str, list[float]]:
  """Rows of a printed table after `header`: first word -> the numbers on the line."""
  rows, lines = {}, text[text.index(header):].splitlines()[1:]
  for line in lines:
    if not re.match(r"^\d+(x\d+)+\s", line):
      if line.strip():
        break
      continue
    label, rest = line.split(None, 1)
    rows[label] = [float(x) for x in re.findall(r"\d+\.?\d*", rest)]
  return rows


def _collectives(text: str):
  """The collectives table (38-character mesh column, then 26 per kind): ops and kB per kind."""
  lines = [l for l in text[text.index("mesh (data x fsdp x expert x tensor)  "):].splitlines() if l]
  kinds = lines[0][38:].split()
  ops, kb = {}, {}
  for line in lines[1:5]:
    cells = [line[38 + 26 * i:38 + 26 * (i + 1)] for i in range(len(kinds))]
    nums = [re.search(r"(\d+) ops\s+([\d.]+) kB", c) for c in cells]
    ops[line[:38].strip()] = {k: int(m[1]) if m else 0 for k, m in zip(kinds, nums)}
    kb[line[:38].strip()] = {k: float(m[2]) if m else 0.0 for k, m in zip(kinds, nums)}
  return ops, kb


def test_sharding_notebook(executed):
  text = _text(executed("sharding_experiments"))
  assert "8 devices: cpu" in text
  assert re.search(r"moe_blocks/mlp/experts/down_proj\s+\[L, E, M, D\]\s+\[L, E_expert, M, D_fsdp\]", text)
  ops, kb = _collectives(text)
  assert set(ops) == {"8x1x1x1", "1x8x1x1", "1x1x8x1", "2x1x2x2"}
  # fsdp gathers every weight before use; the others gather almost nothing.
  assert ops["1x8x1x1"]["all-gather"] > 5 * max(ops[m]["all-gather"] for m in ("8x1x1x1", "1x1x8x1"))
  # the expert axis moves tokens: its all-to-all carries far more than the data mesh's resharding.
  assert kb["1x1x8x1"]["all-to-all"] > 5 * kb["8x1x1x1"]["all-to-all"]
  # tensor parallelism all-reduces the row-parallel partial sums.
  assert ops["2x1x2x2"]["all-reduce"] > ops["1x1x8x1"]["all-reduce"]
  routed = {int(g): (float(c), int(n), int(d)) for g, c, n, d in re.findall(
      r"topk_group=(\d+): copies/token ([\d.]+), cross-node/token [\d.]+, max nodes (\d+), "
      r"dropped (\d+)", text)}
  assert set(routed) == {4, 8}
  assert routed[4][1] <= 4 and routed[8][1] > 4          # node-limited: at most M = 4 nodes
  assert routed[4][0] < routed[8][0] and routed[4][2] == routed[8][2] == 0
  v3 = _table(text, "params GB/dev")
  assert v3["1x128x16x1"][0] < v3["1x32x64x1"][0] < v3["1x8x256x1"][0] < v3["4x8x64x1"][0]
  assert len({row[2] for row in v3.values()}) == 1       # the same total state, split differently
  assert "total parameters: 682.6B" in text


def test_api_notebook(executed):
  nb = executed("api")
  text = _text(nb)
  assert "trained steps: 60" in text
  assert "again  : True" in text and "stream == generate: True" in text
  assert "sum == score: True" in text
  ppl = dict(re.findall(r"^(python|noise)\s+score\s+-?[\d.]+ nats, perplexity\s+([\d.]+)", text, re.M))
  assert float(ppl["python"]) < float(ppl["noise"])
  assert "load [MoE layers, experts]: (1, 8) assignments per layer: [1024.]" in text
  with_bias, without = re.search(r"MaxVio with biases \[([\d.]+)\], without \[([\d.]+)\]", text).groups()
  assert float(with_bias) < float(without)             # the balancing biases do their job
  assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs(name):
  """Every code cell was run in order and shows its output; no errors; small images."""
  path = NOTEBOOKS / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert all(c.outputs for c in code), "a code cell without output: execute and save the notebook"
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  assert path.stat().st_size < 200_000
