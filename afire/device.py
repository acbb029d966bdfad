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
    if device == "cuda" or device.startswith("cuda:"):
        if not cuda.compiled():
            raise DeviceUnavailableError(f"device={device!r} was requested but {cuda.NO_BUILD}")
        n = cuda.device_count()
        idx = 0 if device == "cuda" else int(device.split(":", 1)[1])
        if n == 0:
            raise DeviceUnavailableError("device='cuda' was requested but no CUDA GPU is "
                                         "visible on this machine")
        if not 0 <= idx < n:
            raise ValueError(f"device={device!r}: only {n} CUDA device(s) visible")
        return device
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
