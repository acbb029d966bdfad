"""Device selection: 'cpu' always works; 'cuda' needs a CUDA build and a visible GPU."""
from __future__ import annotations

from . import cuda


class DeviceUnavailableError(RuntimeError):
    """A CUDA device was asked for and this build or machine has none."""


def cuda_available() -> bool:
    """True when this build has the CUDA backend and a GPU is visible."""
    return cuda.compiled() and cuda.device_count() > 0


def require_device(device: str) -> str:
    """Validate a device string ('cpu', 'cuda' or 'cuda:N'); raise a clear error otherwise."""
    if not isinstance(device, str):
        raise TypeError("device must be a string such as 'cpu' or 'cuda', "
                        f"got {type(device).__name__}")
    if device == "cpu":
        return device
    idx = device_index(device)
    if not cuda.compiled():
        raise DeviceUnavailableError(f"device={device!r} was requested but {cuda.NO_BUILD}")
    n = cuda.device_count()
    if n == 0:
        raise DeviceUnavailableError(f"device={device!r} was requested but no CUDA GPU is "
                                     "visible on this machine")
    if not idx < n:
        raise ValueError(f"device={device!r}: only {n} CUDA device(s) visible")
    return device


def device_index(device: str) -> int:
    """The GPU index of 'cuda' (0) or 'cuda:N'; ValueError for any other string.

    Checked before anything CUDA is touched, so a typo gets the same message on every build.
    """
    if device == "cuda":
        return 0
    head, sep, num = device.partition(":")
    # isdecimal+isascii: int() would also take ' 1', '+1', '1_0' and non-ASCII digits
    if head == "cuda" and sep and num.isascii() and num.isdecimal():
        return int(num)
    raise ValueError("device must be 'cpu', 'cuda' or 'cuda:N' (N an integer), "
                     f"got {device!r}")
