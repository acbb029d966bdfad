"""encode(device_output=True) on a CPU model, and the CUDA-only DeviceTensor on any build.
(The GPU side is tests/gpu/test_cuda_tensor.py.)"""
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, cuda


def test_device_output_needs_a_cuda_model():
    m = AFiRe(small_cfg(), device="cpu", steps_per_epoch=2)
    with pytest.raises(ValueError, match="device_output=True needs a cuda model"):
        m.encode(phantom_like(2), device_output=True)
    assert m.encode(phantom_like(2), device_output=False).shape == (2, m.num_tokens, m.embed_dim)


def test_device_tensor_exists_only_in_cuda_builds():
    if cuda.compiled():
        assert cuda.DeviceTensor.__name__ == "DeviceTensor"
    else:
        with pytest.raises(RuntimeError, match="no CUDA backend"):
            cuda.DeviceTensor  # noqa: B018 (the attribute access itself must raise)
