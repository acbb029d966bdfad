"""The layout rule of the C sources: the core knows no Python.

csrc/core (the C core), csrc/ops (CPU kernels) and cuda/ (their GPU twins) must not include
Python.h, NumPy or any binding header (csrc/python/py_*.h); only csrc/python/ may. Checked
twice: by reading the #include lines, and by compiling every core and ops file with an include
path that has no Python in it (a header that pulls Python in indirectly fails there).

    python tools/check_layout.py        # exit 1 with the offending files
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_PYTHON = ("csrc/core", "csrc/ops", "cuda")
FORBIDDEN = re.compile(r'#\s*include\s*[<"](Python\.h|numpy/[^">]+|py_[a-z_]+\.h)[">]')


def source_files(folder: str, exts: tuple[str, ...]) -> list[str]:
    out = []
    for d, _, files in os.walk(os.path.join(ROOT, folder)):
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(exts)]
    return sorted(out)


def forbidden_includes() -> list[str]:
    bad = []
    for folder in NO_PYTHON:
        for path in source_files(folder, (".c", ".h", ".cu", ".cuh")):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if FORBIDDEN.search(line):
                        bad.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    return bad


def compile_without_python() -> list[str]:
    """Syntax-check every core/ops C file with no Python or NumPy on the include path."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return ["no C compiler found to check that csrc/core compiles without Python"]
    try:
        import scipy_openblas32
        blas_inc = ["-I" + scipy_openblas32.get_include_dir()]
    except ImportError:
        blas_inc = []
    bad = []
    for folder in ("csrc/core", "csrc/ops"):
        for path in source_files(folder, (".c",)):
            cmd = [cc, "-fsyntax-only", "-std=c11", "-fopenmp", "-I" + os.path.join(ROOT, "csrc"),
                   "-I" + os.path.join(ROOT, "csrc/core")] + blas_inc + [path]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                first = (r.stderr.strip().splitlines() or ["?"])[0]
                bad.append(f"{os.path.relpath(path, ROOT)} does not compile without Python: "
                           f"{first}")
    return bad


def main() -> int:
    bad = forbidden_includes() + compile_without_python()
    for b in bad:
        print(b)
    if bad:
        print(f"check_layout: {len(bad)} problem(s): {', '.join(NO_PYTHON)} must not depend on "
              "Python (move binding code to csrc/python/)")
        return 1
    print(f"check_layout: {', '.join(NO_PYTHON)} include no Python; csrc/core and csrc/ops "
          "compile without it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
