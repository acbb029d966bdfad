"""The C core knows no Python (tools/check_layout.py): csrc/core, csrc/ops and cuda/ include
no Python.h / NumPy / binding header, and csrc/core + csrc/ops compile without Python."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import check_layout  # noqa: E402


def test_core_includes_no_python():
    assert check_layout.forbidden_includes() == []


def test_core_compiles_without_python():
    if not os.path.isdir(os.path.join(check_layout.ROOT, "csrc", "core")):
        pytest.skip("no C sources beside this test (installed package)")
    assert check_layout.compile_without_python() == []


def test_the_check_catches_a_python_include(tmp_path, monkeypatch):
    (tmp_path / "csrc" / "core").mkdir(parents=True)
    (tmp_path / "csrc" / "core" / "x.c").write_text('#include "py_util.h"\nint f(void);\n')
    monkeypatch.setattr(check_layout, "ROOT", str(tmp_path))
    assert len(check_layout.forbidden_includes()) == 1
    assert len(check_layout.compile_without_python()) == 1
