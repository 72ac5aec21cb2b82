# SPDX-License-Identifier: Apache-2.0
"""The README's example runs verbatim."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_readme_example_runs_verbatim(tmp_path):
    blocks = python_blocks(README.read_text())
    assert len(blocks) == 1, "the README has one Python example"
    out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "converged after" in out.stdout and "LOO over 100,000 units" in out.stdout
    assert (tmp_path / "fit.npz").is_file()
