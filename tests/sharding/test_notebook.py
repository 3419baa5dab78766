"""notebooks/sharding_experiments.ipynb runs top to bottom, and is committed without outputs."""

import nbformat
import pytest

from tests.sharding import common

NOTEBOOK = common.ROOT / "notebooks" / "sharding_experiments.ipynb"


def test_notebook_is_stripped():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None


@pytest.mark.slow
def test_notebook_executes():
  import nbclient
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "8 devices: cpu" in text
  assert "E_expert" in text and "all-to-all" in text
  assert "total parameters: 682.6B" in text
