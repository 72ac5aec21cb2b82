# SPDX-License-Identifier: Apache-2.0
"""Execute every tutorial (MyST markdown notebooks) in smoke mode."""

from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.md"))


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext", reason="install the dev extra to run tutorials")
    nbclient = pytest.importorskip("nbclient", reason="install the dev extra to run tutorials")
    monkeypatch.setenv("PYRO_SOFTMIX_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(path)
    assert sum(c.cell_type == "code" for c in nb.cells) > 0
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
