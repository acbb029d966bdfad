"""afire: AFiRe self-supervised pre-training for chest X-rays, with a C/CUDA core."""
from __future__ import annotations

import ctypes
import os

import scipy_openblas32 as _openblas

# Idle OpenMP workers spin for about a millisecond (GOMP_SPINCOUNT=100000; libgomp's own
# default is ~3 ms) before they sleep. Every thread of afire's C core is an OpenMP thread
# (OpenBLAS runs single-threaded inside them) and a step opens hundreds of parallel regions:
# waking a sleeping worker for each (OMP_WAIT_POLICY=passive, the default until 2026-12)
# made 2 threads SLOWER than 1 on small shapes (test step, vit_tiny 64 px bf16 encode) and
# cost 20-40% at vit_tiny 224 px (docs/PERFORMANCE.md, "CPU"). On a machine whose cores are
# busy with other work, set OMP_WAIT_POLICY=passive (either variable set by the user wins).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "100000"

from . import dist as _dist  # noqa: E402  (launch detection only: loads no C code)

# Several ranks on one node (mpirun -np N): each takes its share of the cores, unless
# OMP_NUM_THREADS says otherwise (read once, when the C core loads below).
_threads = _dist.cpu_threads_per_rank()
if _threads is not None:
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

# Load the OpenBLAS shipped in the scipy-openblas32 wheel before the extension, so that the
# extension's dependency on libscipy_openblas.so resolves to it wherever pip put it.
_lib = os.path.join(_openblas.get_lib_dir(), "lib" + _openblas.get_library() + ".so")
if os.path.exists(_lib):
    ctypes.CDLL(_lib, mode=ctypes.RTLD_GLOBAL)

from . import _C  # noqa: E402,F401  (afire._C: the C core, public for tests and tools)
from ._C import Tensor  # noqa: E402
from .config import Config  # noqa: E402
from .device import cuda_available, require_device  # noqa: E402
from .model import AFiRe  # noqa: E402
from .pretrain import pretrain  # noqa: E402  (the function; the module stays importable)

__version__ = "0.1.0"
__all__ = ["AFiRe", "Config", "pretrain", "Tensor", "cuda_available", "require_device",
           "__version__"]
