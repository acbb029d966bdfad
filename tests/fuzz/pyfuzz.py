"""Fuzz targets for afire's Python-side parsers, run by atheris (libFuzzer for Python).

    python3 tests/fuzz/pyfuzz.py TARGET [libFuzzer flags] CORPUS_DIR...   # fuzz (needs atheris)
    python3 tests/fuzz/pyfuzz.py TARGET --replay FILE_OR_DIR...          # re-run saved inputs

Targets (each input must either succeed with a well-formed result or fail with the
documented exception; anything else, a hang or a memory blow-up is a finding):

  torch_zip     whole-file bytes -> afire.torch_pickle.load_torch_checkpoint
                (ValueError / pickle.UnpicklingError only)
  torch_pkl     data.pkl bytes, wrapped in a valid torch zip that holds the storages of
                corpus/torch_pickle/state_dict.pth -> the restricted unpickler; the result
                may hold only plain containers, numbers, strings and numpy arrays
  shards        byte 0 picks one file of a small prepared dataset (SHARD_FILES), the rest
                replaces it -> afire.data.ShardDataset, then every image is read
                (ValueError only; images must come back uint8 [S, S])
  image         byte 0 picks the suffix (.png/.jpg/.dcm), the rest is the file ->
                afire.data.image.load_gray + resize_square, the decoding path of
                `afire prepare` (any Exception is a per-file failure there and is fine;
                crashes, hangs and huge allocations are not)
"""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tempfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARD_FILES = ("meta.json", "manifest.jsonl", "shard_00000.npy", "mask_00000.npy")
IMAGE_EXTS = (".png", ".jpg", ".dcm")
S = 8  # side of the images in the shard target's dataset

_TMP = tempfile.mkdtemp(prefix="afire-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


class Finding(AssertionError):
    """An input that broke a target's contract."""


def make_dataset(root: str, n: int = 3) -> None:
    """A valid `afire prepare` output with one shard of n images and masks."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    meta = {"version": 1, "format": "folder", "source": "/x", "size": S, "resize": "crop",
            "shard_size": 4, "shards": 1, "records": n, "masks": True}
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, "manifest.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"index": i, "shard": 0, "row": i, "path": f"img{i}.png",
                                "split": "train" if i else "test", "label": "normal",
                                "abnormal": i % 2, "labels": {"a": 1.0}}) + "\n")
    np.save(os.path.join(root, "shard_00000.npy"), rng.integers(0, 256, (n, S, S), np.uint8))
    np.save(os.path.join(root, "mask_00000.npy"), rng.integers(0, 2, (n, S, S), np.uint8))


# ------------------------------------------------------------------------------ targets

def _write(name: str, data: bytes) -> str:
    p = os.path.join(_TMP, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


_SAFE_TYPES = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex,
               bool, type(None), np.ndarray, np.generic, np.dtype)


def _check_plain(obj, depth: int = 0) -> None:
    from afire.torch_pickle import _ALLOWED, CheckpointArgs, _DType, _Storage, _StorageType

    if depth > 200:
        return
    if isinstance(obj, (CheckpointArgs,)):
        obj = vars(obj)
    # a bare GLOBAL yields the allow-listed object itself (e.g. `tuple` for torch.Size):
    # harmless, since producing it ran nothing
    if any(obj is v for v in _ALLOWED.values()):
        return
    if isinstance(obj, _Storage):  # a storage saved on its own: its data is a plain array
        obj = obj.array
    if not isinstance(obj, _SAFE_TYPES + (_DType, _StorageType)):
        raise Finding(f"unpickler produced a {type(obj).__module__}.{type(obj).__name__}")
    if isinstance(obj, dict):
        for k, v in list(obj.items())[:1000]:
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in list(obj)[:1000]:
            _check_plain(v, depth + 1)
    elif isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise Finding("unpickler produced an object array")


def target_torch_zip(data: bytes) -> None:
    from afire.torch_pickle import load_torch_checkpoint

    p = _write("ckpt.pth", data)
    try:
        obj = load_torch_checkpoint(p)
    except (ValueError, pickle.UnpicklingError):
        return
    _check_plain(obj)


_PKL_WRAPPER: dict[str, bytes] | None = None


def _storages() -> dict[str, bytes]:
    global _PKL_WRAPPER
    if _PKL_WRAPPER is None:
        with zipfile.ZipFile(os.path.join(HERE, "corpus", "torch_zip", "state_dict.pth")) as z:
            _PKL_WRAPPER = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()
                            if "/data/" in n or n.endswith("/byteorder")}
    return _PKL_WRAPPER


def target_torch_pkl(data: bytes) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data)
        for name, raw in _storages().items():
            z.writestr(f"archive/{name}", raw)
    target_torch_zip(buf.getvalue())


def target_shards(data: bytes) -> None:
    from afire.data import ShardDataset

    root = os.path.join(_TMP, "ds")
    if not os.path.isdir(root):
        make_dataset(root)
        target_shards.pristine = {n: open(os.path.join(root, n), "rb").read() for n in SHARD_FILES}
    for n, raw in target_shards.pristine.items():  # undo the previous input
        with open(os.path.join(root, n), "wb") as f:
            f.write(raw)
    if not data:
        return
    _write(os.path.join("ds", SHARD_FILES[data[0] % len(SHARD_FILES)]), data[1:])
    try:
        ds = ShardDataset(root, masks=data[0] >= len(SHARD_FILES))
    except ValueError:
        return
    n = len(ds)
    if not (isinstance(ds.size, int) and ds.size > 0):
        raise Finding(f"size {ds.size!r} accepted")
    for i in range(min(n, 16)):
        im = ds[i]
        if im.dtype != np.uint8 or im.shape != (ds.size, ds.size):
            raise Finding(f"ds[{i}] is {im.dtype} {im.shape}")
    if n:
        b = ds.images(range(min(n, 16)))
        if b.shape != (min(n, 16), ds.size, ds.size):
            raise Finding(f"images() returned {b.shape}")
    ds.field("path")
    try:
        ds.label_matrix(["a"])
    except ValueError:  # a label value that is not a number
        pass


def target_image(data: bytes) -> None:
    from afire.data.image import load_gray, resize_square

    if not data:
        return
    p = _write("img" + IMAGE_EXTS[data[0] % len(IMAGE_EXTS)], data[1:])
    try:
        img = load_gray(p)
    except ImportError:
        raise
    except Exception:  # noqa: BLE001 - prepare records any exception as a failed file
        return
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 2:
        raise Finding(f"load_gray returned {type(img).__name__} "
                      f"{getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}")
    if img.size == 0:
        return
    for mode in ("crop", "pad"):
        try:
            out = resize_square(img, 16, mode)
        except ValueError:
            continue
        if out.shape != (16, 16) or out.dtype != np.uint8:
            raise Finding(f"resize_square({mode}) returned {out.dtype} {out.shape}")


TARGETS = {"torch_zip": target_torch_zip, "torch_pkl": target_torch_pkl,
           "shards": target_shards, "image": target_image}


# ------------------------------------------------------------------------------ drivers

def replay(target, paths: list[str]) -> int:
    """Run every file under `paths`; returns the number of inputs."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p))
        else:
            files.append(p)
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        try:
            target(data)
        except Finding as e:
            raise Finding(f"{f}: {e}") from e
    return len(files)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{'|'.join(TARGETS)}}} [--replay PATH...|libFuzzer args]")
    target = TARGETS[argv[1]]
    if len(argv) > 2 and argv[2] == "--replay":
        n = replay(target, argv[3:])
        print(f"{argv[1]}: {n} inputs replayed, no findings")
        return
    import atheris

    with atheris.instrument_imports():
        import afire.data  # noqa: F401
        import afire.data.image  # noqa: F401
        import afire.torch_pickle  # noqa: F401
    atheris.Setup([argv[0]] + argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
