"""Shared setup of the GPU tests: each test that needs the device requests the `gpu` fixture
(a module does so for all its tests with pytest.mark.usefixtures("gpu")), which skips with a
visible reason when the build has no CUDA backend or no GPU is visible.

Nothing here loads the CUDA backend at import: test_cuda_tensor.py imports torch first."""
import pytest

from afire import cuda


def no_gpu_reason():
    """Why the GPU tests cannot run here, or None."""
    if not cuda.compiled():
        return "afire was built without the CUDA backend (rebuild with AFIRE_CUDA=1 and nvcc)"
    if cuda.device_count() == 0:
        return "afire.cuda.device_count() == 0 (no driver or no GPU)"
    return None


@pytest.fixture(scope="session")
def gpu():
    """Skips (every test that needs it, module fixtures included) without a usable GPU."""
    reason = no_gpu_reason()
    if reason is not None:
        pytest.skip("no CUDA GPU visible: " + reason)
