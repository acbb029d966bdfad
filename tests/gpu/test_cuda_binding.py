"""afire.cuda without a GPU: what CPU-only machines and CI can check.

A build without the CUDA backend raises a RuntimeError that says how to get one; a CUDA
build validates arguments exactly like afire._C.ops before it touches the device.
"""
import numpy as np
import pytest

from afire import _C

from afire import cuda  # noqa: E402
OPS = ["linear_forward", "linear_backward", "layernorm_forward", "layernorm_backward",
       "gelu_forward", "gelu_backward", "softmax_forward", "softmax_backward",
       "attention_forward", "attention_backward", "residual_forward", "residual_backward",
       "patchify_forward", "patchify_backward", "unpatchify", "l2norm_forward",
       "l2norm_backward", "wn_linear_forward", "wn_linear_backward", "adamw_update",
       "time_linear", "time_attention"]


@pytest.mark.skipif(not cuda.compiled(), reason="this build has no CUDA backend")
def test_every_op_has_a_gpu_twin_with_the_cpu_name():
    for name in OPS:
        assert callable(getattr(cuda, name)), name
        if not name.startswith("time_"):
            assert hasattr(_C.ops, name), name
    assert cuda.PATCH_PQC == _C.ops.PATCH_PQC and cuda.PATCH_CPQ == _C.ops.PATCH_CPQ


def test_device_count_is_an_int():
    n = cuda.device_count()
    assert isinstance(n, int) and n >= 0
    if not cuda.compiled():
        assert n == 0


@pytest.mark.skipif(cuda.compiled(), reason="this build has the CUDA backend")
def test_no_cuda_build_raises_clear_runtime_error():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(RuntimeError, match="no CUDA backend"):
        cuda.linear_forward(x, np.zeros((4, 3), np.float32))
    with pytest.raises(RuntimeError, match="no CUDA backend"):
        cuda.time_linear(4, 4, 4)


@pytest.mark.skipif(not cuda.compiled(), reason="this build has no CUDA backend")
def test_cuda_build_validates_before_the_device():
    f32 = np.float32
    with pytest.raises(TypeError, match="inp"):
        cuda.linear_forward(np.zeros((2, 3)), np.zeros((4, 3), f32))
    with pytest.raises(ValueError, match="weight"):
        cuda.linear_forward(np.zeros((2, 3), f32), np.zeros((4, 5), f32))
    with pytest.raises(ValueError, match="H=5"):
        cuda.attention_forward(np.zeros((1, 2, 12), f32), 5)
    with pytest.raises(ValueError, match="divide"):
        cuda.patchify_forward(np.zeros((1, 1, 6, 6), f32), 4)
    with pytest.raises(ValueError, match="t "):
        p = np.zeros(3, f32)
        cuda.adamw_update(p, p.copy(), np.zeros(3, f32), np.zeros(3, f32), lr=0.1, t=0)


@pytest.mark.skipif(not cuda.compiled() or cuda.device_count() > 0,
                    reason="needs a CUDA build on a machine without a GPU")
def test_cuda_build_without_gpu_raises_runtime_error():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda.linear_forward(x, np.zeros((4, 3), np.float32))
