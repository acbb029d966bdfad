"""The build: optional CUDA backend reports itself and fails clearly when unavailable."""
import pytest

import afire
from afire import _C


def test_build_info():
    info = _C.build_info()
    assert info["blas"] == "scipy-openblas32"
    assert info["openmp"] is True
    assert info["cuda"] == _C.cuda.compiled()


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
    if not _C.cuda.compiled():
        with pytest.raises(RuntimeError, match="no CUDA backend"):
            _C.cuda.versions()
        return
    v = _C.cuda.versions()
    assert v["cublaslt"] > 0 and v["cudnn"] > 0 and v["nccl"] > 0
