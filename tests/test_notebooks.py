"""The notebooks run: their code cells are executed in order (no Jupyter needed)."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(path):
    cells = json.loads(path.read_text())["cells"]
    code = [("".join(c["source"])) for c in cells if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    namespace: dict = {}
    for i, src in enumerate(code):
        exec(compile(src, f"{path.name}[cell {i}]", "exec"), namespace)  # noqa: S102
    # the quickstart's evaluation writes its figures (when matplotlib is installed)
    figures = [f for key in ("probe", "detect") if key in namespace
               for f in namespace[key]["figures"]]
    for f in figures:
        assert Path(f).stat().st_size > 1000, f
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    if path.name == "quickstart.ipynb":
        assert len(figures) == 5, figures
