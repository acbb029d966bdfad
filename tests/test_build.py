"""The build: optional CUDA backend reports itself and fails clearly when unavailable."""
import pytest

import afire
from afire import _C, cuda


def test_build_info():
    info = _C.build_info()
    assert info["blas"] == "scipy-openblas32"
    assert info["openmp"] is True


def test_import_afire_loads_no_cuda_library():
    import subprocess
    import sys
    code = ("import afire, afire.model, afire.data\n"
            "maps = open('/proc/self/maps').read()\n"
            "print(any(n in maps for n in ('libcudart', 'libcublas', 'libcudnn', 'libnccl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cpu_device_always_valid():
    assert afire.require_device("cpu") == "cpu"


def test_bad_device_strings():
    with pytest.raises(ValueError, match="'cpu', 'cuda'"):
        afire.require_device("tpu")
    with pytest.raises(TypeError):
        afire.require_device(0)


def test_cuda_request_without_gpu_is_a_clear_error():
    if afire.cuda_available():
        pytest.skip("a CUDA GPU is visible: the error path is not reachable here")
    with pytest.raises(RuntimeError, match="cuda"):
        afire.require_device("cuda")


def test_cuda_library_versions_when_compiled():
    if not cuda.compiled():
        with pytest.raises(RuntimeError, match="no CUDA backend"):
            cuda.versions()
        return
    v = cuda.versions()
    assert v["cudart"] > 0 and v["cublaslt"] > 0
    assert v["cudnn"] >= 0 and v["nccl"] >= 0  # 0: built without that optional library
