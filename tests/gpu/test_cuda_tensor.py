"""afire._C_cuda.cuda.DeviceTensor and AFiRe.encode(..., device_output=True).

Checks: the device tokens equal encode()'s host tokens bit for bit (same kernels, same batch
split); torch.from_dlpack and cupy.asarray / cupy.from_dlpack see the SAME memory (equal
device pointers, and a write through the consumer shows up in numpy()); the memory lives as
long as any holder (the model, then the DeviceTensor, may go first); reshape views; the
three dtypes through from_numpy; the __cuda_array_interface__ fields; errors.
Skipped with a visible reason without a CUDA build or GPU; the torch / cupy parts skip when
those packages (with CUDA) are missing.
"""
import gc

import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, cuda

# torch (then cupy) before afire's CUDA backend is loaded: torch's CUDA libraries are newer
# than the toolkit's, and the first loaded copy wins. Collection imports this module before
# any test loads the backend (cuda.compiled() does not load it). CPU-only builds never
# import torch here.
torch = cupy = None
if cuda.compiled():
    try:
        import torch
    except Exception:  # noqa: BLE001 - the torch tests skip
        torch = None
    try:
        import cupy
    except Exception:  # noqa: BLE001 - the cupy tests skip
        cupy = None

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]


def need_torch():
    if torch is None or not torch.cuda.is_available():
        pytest.skip("torch with CUDA is not available")


def need_cupy():
    if cupy is None:
        pytest.skip("cupy is not installed")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cupy cannot reach the GPU: {e}")


@pytest.fixture(scope="module")
def model(gpu):  # module fixtures run before the per-test one: ask for it here too
    # batch capacity 4: six images are encoded as 4 + 2, as encode() splits them
    return AFiRe(small_cfg(), device="cuda", steps_per_epoch=2)


@pytest.fixture(scope="module")
def images():
    return phantom_like(6, seed=3)


@pytest.mark.parametrize("branch", ["teacher", "student"])
def test_device_tokens_equal_host_tokens(model, images, branch):
    host = model.encode(images, branch)
    t = model.encode(images, branch, device_output=True)
    assert isinstance(t, cuda.DeviceTensor)
    assert t.shape == (6, model.num_tokens, model.embed_dim) == host.shape
    assert t.dtype == "float32" and t.device == "cuda:0" and t.device_index == 0
    assert t.ndim == 3 and len(t) == 6 and t.size == host.size and t.nbytes == host.nbytes
    assert t.data_ptr != 0 and not t.is_view
    assert t.__dlpack_device__() == (2, 0)
    np.testing.assert_array_equal(t.numpy(), host)
    np.testing.assert_array_equal(t.to_host(), host)
    assert "DeviceTensor(shape=(6, " in repr(t)


def test_each_call_returns_a_fresh_buffer(model, images):
    a = model.encode(images, device_output=True)
    b = model.encode(images, device_output=True)
    assert a.data_ptr != b.data_ptr
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_torch_from_dlpack_is_zero_copy(model, images):
    need_torch()
    host = model.encode(images)
    t = model.encode(images, device_output=True)
    x = torch.from_dlpack(t)
    assert x.data_ptr() == t.data_ptr
    assert x.device == torch.device("cuda", 0) and x.dtype == torch.float32
    assert tuple(x.shape) == t.shape and x.is_contiguous()
    np.testing.assert_array_equal(x.cpu().numpy(), host)
    x.add_(1.0)  # a write through torch is a write to afire's buffer
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t.numpy(), host + np.float32(1.0))
    # the legacy-stream / explicit-stream forms of the protocol
    for s in (None, -1, 1, 2, torch.cuda.current_stream().cuda_stream or 1):
        y = torch.utils.dlpack.from_dlpack(t.__dlpack__(stream=s))
        assert y.data_ptr() == t.data_ptr


def test_cupy_is_zero_copy(model, images):
    need_cupy()
    host = model.encode(images)
    t = model.encode(images, device_output=True)
    c = cupy.asarray(t)  # __cuda_array_interface__
    assert c.data.ptr == t.data_ptr and c.shape == t.shape and c.dtype == np.float32
    np.testing.assert_array_equal(cupy.asnumpy(c), host)
    d = cupy.from_dlpack(t)
    assert d.data.ptr == t.data_ptr
    c *= 2
    cupy.cuda.runtime.deviceSynchronize()
    np.testing.assert_array_equal(t.numpy(), 2 * host)


def test_cuda_array_interface_fields(model, images):
    t = model.encode(images[:2], device_output=True)
    cai = t.__cuda_array_interface__
    assert cai["version"] == 3
    assert cai["shape"] == t.shape and cai["typestr"] == "<f4"
    assert cai["data"] == (t.data_ptr, False)
    assert cai["strides"] is None  # C-contiguous
    assert cai["stream"] is None   # complete on return: no synchronisation needed


def test_tensor_outlives_the_model(images):
    need_torch()
    m = AFiRe(small_cfg(), device="cuda", steps_per_epoch=2)
    host = m.encode(images)
    t = m.encode(images, device_output=True)
    x = torch.from_dlpack(t)
    ptr = t.data_ptr
    del m
    gc.collect()
    np.testing.assert_array_equal(t.numpy(), host)
    del t  # the DLPack capsule now holds the last reference
    gc.collect()
    # churn device memory: a freed buffer would be reused and overwritten
    other = AFiRe(small_cfg(seed=5), device="cuda", steps_per_epoch=2)
    for _ in range(2):
        other.train_step(phantom_like(4, seed=9))
    junk = torch.full((1 << 20,), 7.0, device="cuda")
    torch.cuda.synchronize()
    assert x.data_ptr() == ptr
    np.testing.assert_array_equal(x.cpu().numpy(), host)
    del junk, other


def test_cupy_view_keeps_memory_alive(images):
    need_cupy()
    m = AFiRe(small_cfg(), device="cuda", steps_per_epoch=2)
    host = m.encode(images)
    c = cupy.asarray(m.encode(images, device_output=True))  # the only holder is cupy
    del m
    gc.collect()
    scratch = cupy.full((1 << 20,), 7.0, dtype=cupy.float32)
    np.testing.assert_array_equal(cupy.asnumpy(c), host)
    del scratch


def test_reshape_is_a_view_that_keeps_the_owner(model, images):
    t = model.encode(images, device_output=True)
    host = t.numpy()
    v = t.reshape(-1, model.embed_dim)
    w = v.reshape((6, model.num_tokens * model.embed_dim))
    assert v.is_view and w.is_view
    assert v.data_ptr == t.data_ptr == w.data_ptr
    assert v.shape == (6 * model.num_tokens, model.embed_dim)
    del t
    gc.collect()
    np.testing.assert_array_equal(w.numpy(), host.reshape(6, -1))
    with pytest.raises(ValueError, match="elements"):
        v.reshape(5, 5)
    with pytest.raises(ValueError, match="infer"):
        v.reshape(-1, 7 * model.embed_dim + 1)


@pytest.mark.parametrize("dtype,typestr,torch_name", [(np.float32, "<f4", "float32"),
                                                      (np.int32, "<i4", "int32"),
                                                      (np.uint8, "|u1", "uint8")])
def test_from_numpy_round_trip(dtype, typestr, torch_name):
    a = (np.arange(24).reshape(2, 3, 4) * 7 % 251).astype(dtype)
    d = cuda.DeviceTensor.from_numpy(a[:, ::-1])  # non-contiguous input is copied first
    assert d.dtype == np.dtype(dtype).name and d.shape == (2, 3, 4)
    assert d.__cuda_array_interface__["typestr"] == typestr
    np.testing.assert_array_equal(d.numpy(), a[:, ::-1])
    if torch is not None and torch.cuda.is_available():
        x = torch.from_dlpack(d)
        assert x.dtype == getattr(torch, torch_name) and x.data_ptr() == d.data_ptr
        np.testing.assert_array_equal(x.cpu().numpy(), a[:, ::-1])


def test_empty_tensor():
    d = cuda.DeviceTensor.from_numpy(np.zeros((0, 3), np.float32))
    assert d.data_ptr == 0 and d.shape == (0, 3) and d.nbytes == 0
    assert d.__cuda_array_interface__["data"] == (0, False)
    assert d.numpy().shape == (0, 3)


def test_errors(model, images):
    with pytest.raises(TypeError):
        cuda.DeviceTensor()
    with pytest.raises(TypeError, match="float32, int32 or uint8"):
        cuda.DeviceTensor.from_numpy(np.zeros(3, np.float64))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        cuda.DeviceTensor.from_numpy([1.0, 2.0])
    with pytest.raises(ValueError, match="device 99 out of range"):
        cuda.DeviceTensor.from_numpy(np.zeros(3, np.float32), device=99)
    t = model.encode(images[:1], device_output=True)
    with pytest.raises(ValueError, match="ambiguous"):
        t.__dlpack__(stream=0)
    with pytest.raises(ValueError):
        t.__dlpack__(stream=-5)
    with pytest.raises(BufferError, match="copy=True"):
        t.__dlpack__(copy=True)
    with pytest.raises(BufferError, match="cannot export"):
        t.__dlpack__(dl_device=(1, 0))
    assert t.__dlpack__(dl_device=(2, 0), copy=False, max_version=(1, 0)) is not None
    with pytest.raises(ValueError, match="branch"):
        model.encode(images, "ema", device_output=True)
    with pytest.raises(ValueError, match="shape"):
        model.encode(np.zeros((2, 16, 16), np.uint8), device_output=True)
    with pytest.raises(TypeError, match="uint8"):
        model.encode(images.astype(np.float32), device_output=True)
    with pytest.raises(ValueError, match="images"):
        model._t.encode_device(np.zeros((0, 32, 32), np.uint8))
