"""The notebooks under notebooks/.

Stored without outputs or execution counts, with cell ids (no MissingIDFieldWarning). Each
runs top to bottom in a real Jupyter kernel (nbclient + ipykernel, in the ``test`` extra),
with the notebooks folder as its working directory as when a user opens it, and this
checkout's afire first on the kernel's path; afterwards neither that folder nor the
kernel's temporary directory holds anything new. The executions are marked ``slow``: the
sanitizer run (``-m "not slow"``) leaves them out, the normal suite runs them (about a
minute and a half on 2 cores, the real-data notebook included).
"""
import json
import os
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NB_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
NAMES = [p.name for p in NOTEBOOKS]
EXPECTED = {"quickstart.ipynb", "real_data.ipynb", "bring_your_own_weights.ipynb",
            "from_pytorch.ipynb"}
CELL_TIMEOUT = 600


def data_root() -> Path:
    """As tests/conftest.py: $AFIRE_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("AFIRE_DATA", REPO.parent / "shared" / "data"))


def test_the_notebooks_are_there():
    assert EXPECTED <= set(NAMES), NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_is_stored_without_outputs(path):
    raw = json.loads(path.read_text())
    assert (raw["nbformat"], raw["nbformat_minor"]) >= (4, 5)     # cell ids exist from 4.5
    ids = [c.get("id") for c in raw["cells"]]
    assert all(ids) and len(set(ids)) == len(ids), ids
    for c in raw["cells"]:
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None, c["id"]
        assert not c.get("attachments"), c["id"]
    assert any(c["cell_type"] == "code" for c in raw["cells"])
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (the test extra "
                                                      "has it: pip install -e '.[test]')")
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # MissingIDFieldWarning, a bad schema, ...
        nbformat.validate(nbformat.read(path, as_version=4))


def _outputs(nb, kind=None):
    """Every output of the executed notebook (of one output_type if given)."""
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if kind is None or o.output_type == kind]


def _text(nb, name="stdout"):
    return "".join(o.text for o in _outputs(nb, "stream") if o.name == name)


def execute(path, tmp_path, monkeypatch):
    """Run the notebook in a fresh kernel; returns (executed notebook, seconds)."""
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (the test extra "
                                                      "has it: pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel not installed (the test extra has it)")
    import nbformat

    nb = nbformat.read(path, as_version=4)
    tmp = tmp_path / "kernel-tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("AFIRE_DATA", str(data_root()))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    before = sorted(os.listdir(NB_DIR))
    t0 = time.monotonic()
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NB_DIR)}}).execute()
    seconds = time.monotonic() - t0
    print(f"{path.name}: {seconds:.0f} s")
    assert sorted(os.listdir(NB_DIR)) == before, "the notebook left files in notebooks/"
    # (pymp-*: multiprocessing's own folder of prepare's worker pool, which it removes when
    # the kernel process exits)
    left = [p.name for p in tmp.iterdir() if not p.name.startswith("pymp-")]
    assert not left, f"left in the temporary directory: {left}"
    return nb, seconds


def _html(nb, mime="text/html") -> str:
    return "".join(o.get("data", {}).get(mime, "") for o in _outputs(nb)
                   if o.output_type in ("execute_result", "display_data"))


def _pngs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb)
               if o.output_type in ("execute_result", "display_data"))


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    nb, _ = execute(NB_DIR / "quickstart.ipynb", tmp_path, monkeypatch)
    html = _html(nb)
    assert "afire.Config" in html and "afire.AFiRe" in html        # the rich displays
    assert "<b>linear_probe</b>" in html and "<b>anomaly</b>" in html
    # the 6 figures the protocols wrote (the anomaly protocol's heat maps of every score
    # among them), and one returned as a Figure
    pytest.importorskip("matplotlib")
    assert _pngs(nb) == 7
    assert "linear probe AUC" in _text(nb)


@pytest.mark.slow
@pytest.mark.data
def test_real_data_runs(tmp_path, monkeypatch):
    kermany = data_root() / "kermany_native"
    if not (kermany / "labels.csv").exists():
        pytest.skip(f"real data not found at {kermany} (set AFIRE_DATA to the shared data "
                    "folder); the notebook itself falls back to phantoms")
    nb, _ = execute(NB_DIR / "real_data.ipynb", tmp_path, monkeypatch)
    out = _text(nb)
    assert "prepared 1261 images" in out and "phantom" not in out.lower()
    table = _html(nb, "text/markdown")       # the probe's AUCs with bootstrap intervals
    assert "95% CI" in table and table.count("random init, seed") == 3
    assert "<b>linear_probe</b>" in _html(nb) and "<b>anomaly</b>" in _html(nb)
    pytest.importorskip("matplotlib")
    assert _pngs(nb) >= 3           # heat maps, t-SNE of both encoders


@pytest.mark.slow
def test_bring_your_own_weights_runs(tmp_path, monkeypatch):
    nb, _ = execute(NB_DIR / "bring_your_own_weights.ipynb", tmp_path, monkeypatch)
    out = _text(nb)
    for what in ("timm", "DINO", "MAE", "PyTorch .pth"):
        assert f"{what}:" in out, what
    assert "max |difference|" in out


@pytest.mark.slow
def test_from_pytorch_runs(tmp_path, monkeypatch):
    nb, _ = execute(NB_DIR / "from_pytorch.ipynb", tmp_path, monkeypatch)
    out = _text(nb)
    assert "zero-copy" in out and "head accuracy" in out
