"""Read PyTorch checkpoints (``torch.save`` zip format) into numpy, without torch.

A ``.pth`` file written by torch >= 1.6 is a zip archive::

    <prefix>/data.pkl        the pickled object tree (dicts, tensors, numbers, ...)
    <prefix>/data/<key>      raw bytes of each storage, in the byte order of <prefix>/byteorder
    <prefix>/byteorder       "little" or "big" (absent in old files: little)

Unpickling is restricted: :class:`RestrictedUnpickler` resolves only the globals needed to
rebuild tensors and plain containers and raises :class:`pickle.UnpicklingError` for anything
else, so a malicious checkpoint cannot run code. Tensors come back as C-contiguous numpy
arrays; half and bfloat16 tensors are converted to float32 (numpy has no bfloat16, and the
afire model is float32). The legacy (pre-1.6, non-zip) format is not supported.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import types
import zipfile
import zlib

import numpy as np

__all__ = ["CheckpointArgs", "RestrictedUnpickler", "load_torch_checkpoint"]


class CheckpointArgs(types.SimpleNamespace):
    """Harmless stand-in for the ``argparse.Namespace`` that DINO/MAE checkpoints store."""


class _StorageType:
    """Tag for ``torch.FloatStorage`` & co.: the numpy dtype of the raw bytes."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _DType:
    """Tag for ``torch.float32`` & co. (only ever compared, never called)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


# Raw storage dtype; "bfloat16" is read as uint16 and widened to float32.
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_DTYPE_NAMES = ("float32", "float", "float64", "double", "float16", "half", "bfloat16",
                "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "bool")


class _Storage:
    """A loaded storage: a 1-d numpy array (half types already widened to float32)."""

    def __init__(self, array: np.ndarray, tag: _StorageType):
        self.array, self.tag = array, tag


def _as_index_tuple(x, what: str) -> tuple:
    if not isinstance(x, tuple) or not all(type(v) is int for v in x):
        raise ValueError(f"malformed checkpoint: tensor {what} must be a tuple of ints, got {x!r}")
    if any(v < 0 for v in x):
        raise ValueError(f"malformed checkpoint: negative tensor {what} {x!r}")
    return x


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> np.ndarray:
    """numpy twin of torch._utils._rebuild_tensor_v2: a strided view of the storage, copied."""
    if not isinstance(storage, _Storage):
        raise ValueError("malformed checkpoint: tensor is not backed by a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise ValueError(f"malformed checkpoint: bad storage offset {storage_offset!r}")
    size = _as_index_tuple(size, "size")
    stride = _as_index_tuple(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"malformed checkpoint: size {size} and stride {stride} differ in rank")
    base = storage.array
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=base.dtype)
    # Every element the view touches must lie inside the storage (as_strided does not check).
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= base.size:
        raise ValueError(f"malformed checkpoint: tensor of size {size}, stride {stride} at offset "
                         f"{storage_offset} reads past its storage of {base.size} elements")
    # Overlapping strides (torch's expand) could make a tiny file expand to gigabytes on
    # copy; a saved state dict never has more elements than its storage.
    if int(np.prod(size, dtype=object)) > base.size:
        raise ValueError(f"malformed checkpoint: tensor of size {size} has more elements than "
                         f"its storage ({base.size}); expanded (stride-0) tensors are not "
                         "supported")
    item = base.itemsize
    view = np.lib.stride_tricks.as_strided(base[storage_offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype,
                       *_ignored) -> np.ndarray:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *_ignored):
    if not isinstance(data, np.ndarray):
        raise ValueError("malformed checkpoint: parameter data is not a tensor")
    return data


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """The ``_codecs.encode`` that protocol-2 pickles use for bytes; latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode with anything but latin-1 text")
    return text.encode("latin-1", errors)


def _numpy_scalar(dtype, data=None):
    """numpy's scalar reconstructor, for plain (non-object) dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("refusing numpy scalar with an object dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _allowed_globals() -> dict:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): tuple,
        ("argparse", "Namespace"): CheckpointArgs,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }
    for name, dtype in _STORAGES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    for name in _DTYPE_NAMES:
        allowed[("torch", name)] = _DType(name)
    return allowed


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip checkpoint, resolving storages from the zip.

    Only the globals in ``_ALLOWED`` can be referenced; anything else (``os.system``,
    ``builtins.eval``, arbitrary classes) raises :class:`pickle.UnpicklingError` before it is
    looked up, so it is never imported nor called.
    """

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._zip, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"torch checkpoint: refusing global '{module}.{name}' (only tensors, plain "
                "containers and argparse.Namespace can be loaded)") from None

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or type(pid[4]) is not int or pid[4] < 0):
            raise pickle.UnpicklingError(f"torch checkpoint: unsupported persistent id {pid!r}")
        tag, key, numel = pid[1], pid[2], pid[4]
        cached = self._storages.get(key)
        if cached is not None:
            if cached.tag is not tag:
                raise ValueError(f"malformed checkpoint: storage {key!r} used with two dtypes")
            return cached
        raw_dtype = np.dtype("uint16" if tag.dtype == "bfloat16" else tag.dtype)
        raw_dtype = raw_dtype.newbyteorder("<" if self._byteorder == "little" else ">")
        member = f"{self._prefix}/data/{key}"
        try:
            raw = self._zip.read(member)
        except KeyError:
            raise ValueError(f"malformed checkpoint: missing storage '{member}'") from None
        if len(raw) != numel * raw_dtype.itemsize:
            raise ValueError(f"malformed checkpoint: storage '{member}' has {len(raw)} bytes, "
                             f"expected {numel} x {raw_dtype.itemsize}")
        arr = np.frombuffer(raw, dtype=raw_dtype)
        if tag.dtype == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif tag.dtype == "float16":
            arr = arr.astype(np.float32)
        else:
            arr = arr.astype(raw_dtype.newbyteorder("="))  # native order, writeable copy
        storage = _Storage(arr, tag)
        self._storages[key] = storage
        return storage


def _find_prefix(names: list[str]) -> str:
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise ValueError("not a torch.save checkpoint: expected exactly one '<name>/data.pkl' in "
                         f"the zip, found {len(pkls)}")
    return pkls[0][: -len("/data.pkl")]


def _check_memo_indices(data: bytes) -> None:
    """Reject memo indices a real pickle cannot have (one PUT per opcode at most).

    The C unpickler grows its memo to the largest index it sees, so a 100-byte pickle with
    ``LONG_BINPUT 2**28`` would make it allocate gigabytes before failing."""
    limit = len(data)
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and (type(arg) is not int or arg > limit):
            raise ValueError(f"malformed checkpoint: pickle memo index {arg!r} out of range")


def load_torch_checkpoint(path: str | os.PathLike):
    """Load a ``torch.save`` zip checkpoint without torch.

    Returns the saved object with every tensor replaced by a numpy array (float32 for
    float32/float16/bfloat16 tensors; float64, int64, int32, int16, int8, uint8, bool kept),
    nested dicts kept nested, ``argparse.Namespace`` replaced by :class:`CheckpointArgs`.
    Raises ValueError for a truncated/corrupt file or the unsupported legacy format,
    pickle.UnpicklingError if the pickle references anything outside the allow-list, and
    OSError if the file cannot be read.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        # the file opened above, so an OSError here (a seek to a corrupt negative offset)
        # is a malformed archive, not an unreadable file
        if head.startswith(b"PK"):
            raise ValueError(f"{path}: truncated or corrupt zip archive ({e})") from None
        if head[:1] == b"\x80":
            raise ValueError(f"{path}: legacy (pre-1.6, non-zip) torch.save format is not "
                             "supported; re-save it with torch >= 1.6") from None
        raise ValueError(f"{path}: not a PyTorch zip checkpoint") from None
    with archive:
        try:
            prefix = _find_prefix(archive.namelist())
            byteorder = "little"
            if f"{prefix}/byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
                if byteorder not in ("little", "big"):
                    raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
            data = archive.read(f"{prefix}/data.pkl")
            _check_memo_indices(data)
            unpickler = RestrictedUnpickler(io.BytesIO(data), archive, prefix, byteorder)
            return unpickler.load()
        except (pickle.UnpicklingError, ValueError):
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, TypeError, AttributeError,
                IndexError, OverflowError, MemoryError, RecursionError, OSError,
                NotImplementedError, RuntimeError) as e:  # RuntimeError: "encrypted" flag
            raise ValueError(
                f"{path}: malformed torch checkpoint ({type(e).__name__}: {e})") from None
