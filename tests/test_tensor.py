"""afire._C.Tensor: zero-copy interop with NumPy (buffer protocol, __array_interface__, DLPack)."""
import gc
import sys

import numpy as np
import pytest

import afire
from afire import Tensor


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8])
def test_zero_copy_from_numpy(dtype):
    a = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    t = Tensor(a)
    assert t.shape == (2, 3, 4)
    assert t.dtype == np.dtype(dtype).name
    assert t.strides == a.strides
    assert t.nbytes == a.nbytes
    for view in (np.asarray(t), np.array(memoryview(t), copy=False), np.from_dlpack(t), t.numpy()):
        assert view.dtype == a.dtype and view.shape == a.shape
        np.testing.assert_array_equal(view, a)
        assert np.shares_memory(view, a)
    a[0, 0, 0] = 7
    assert np.asarray(t)[0, 0, 0] == 7


def test_tensor_keeps_source_alive():
    a = np.ones((5,), np.float32)
    t = Tensor(a)
    ref = sys.getrefcount(a)
    del a
    gc.collect()
    np.testing.assert_array_equal(np.asarray(t), np.ones(5, np.float32))
    assert ref >= 2


def test_dlpack_capsule_outlives_tensor():
    t = Tensor.zeros((3, 2), dtype="int32")
    arr = np.from_dlpack(t)
    writer = np.asarray(t)
    del t
    gc.collect()
    writer[1, 1] = 5
    del writer
    gc.collect()
    assert arr.sum() == 5 and arr[1, 1] == 5
    assert afire.Tensor.zeros((2,)).__dlpack_device__() == (1, 0)


def test_zeros_and_repr():
    t = Tensor.zeros((2, 0, 3), dtype="uint8")
    assert t.shape == (2, 0, 3) and t.nbytes == 0
    assert "uint8" in repr(t)
    z = np.asarray(Tensor.zeros((4, 4)))
    assert z.dtype == np.float32 and not z.any()


def test_readonly_source_stays_readonly():
    a = np.zeros(3, np.float32)
    a.flags.writeable = False
    t = Tensor(a)
    with pytest.raises((BufferError, ValueError, TypeError)):
        memoryview(t)[0] = 1.0  # noqa
    assert not np.asarray(t).flags.writeable


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="float32, int32 or uint8"):
        Tensor(np.zeros(3, np.float64))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        Tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="C-contiguous"):
        Tensor(np.zeros((4, 4), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="shape"):
        Tensor.zeros((2, -1))
    with pytest.raises(TypeError, match="dtype"):
        Tensor.zeros((2,), dtype="float16")
    with pytest.raises(ValueError, match="at most 8"):
        Tensor.zeros((1,) * 9)
