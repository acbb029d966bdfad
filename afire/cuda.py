"""The CUDA backend, loaded on first use.

It is the separate extension `afire._C_cuda` (built when nvcc is found), so `import afire`
never loads CUDA libraries. Any backend function is reachable as ``afire.cuda.<name>``; on a
build without it, each raises a RuntimeError saying how to get one.
"""
from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

NO_BUILD = ("this build of afire has no CUDA backend (nvcc was not found when it was built; "
            "reinstall with the CUDA toolkit on PATH or AFIRE_CUDA=1)")
_backend: ModuleType | None = None


def compiled() -> bool:
    """True when the CUDA extension was built."""
    return importlib.util.find_spec("afire._C_cuda") is not None


def backend() -> ModuleType:
    """The loaded backend module; RuntimeError when the build has none."""
    global _backend
    if _backend is None:
        if not compiled():
            raise RuntimeError(NO_BUILD)
        from . import _C_cuda  # type: ignore[attr-defined]

        _backend = _C_cuda.cuda
    return _backend


def device_count() -> int:
    """Visible CUDA devices (0 without a CUDA build, a driver or a GPU)."""
    return backend().device_count() if compiled() else 0


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(backend(), name)
