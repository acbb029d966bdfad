"""Regenerate the committed seed corpora of the Python fuzz targets (tests/fuzz/corpus/).

Run from the repository root: ``python3 tests/fuzz/make_seeds.py``. Needs torch (only for
the torch_zip / torch_pkl seeds, skipped without it), Pillow and pydicom. The seeds are small valid
inputs; the fuzzers mutate them. The C targets' seeds (safetensors/, json/) are hand-made.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pyfuzz import SHARD_FILES, make_dataset  # noqa: E402


def write(kind: str, name: str, data: bytes) -> None:
    p = os.path.join(HERE, "corpus", kind, name)
    with open(p, "wb") as f:
        f.write(data)
    print(f"{p}: {len(data)} bytes")


def torch_seeds() -> None:
    try:
        import torch
    except ImportError:
        print("torch not installed: torch_pickle seeds left as they are")
        return
    g = torch.Generator().manual_seed(0)
    sd = {"patch_embed.proj.weight": torch.randn(4, 1, 2, 2, generator=g),
          "blocks.0.norm1.bias": torch.zeros(4, dtype=torch.float16),
          "pos_embed": torch.randn(1, 3, 4, generator=g).to(torch.bfloat16),
          "count": torch.tensor([3], dtype=torch.int64), "flag": torch.tensor([True])}
    sd["view"] = sd["patch_embed.proj.weight"][1:3, 0, :, 1]  # offset + strides
    for name, obj in (("state_dict.pth", sd),
                      ("nested.pth", {"model": {"w": sd["count"]}, "epoch": 3, "lr": 1e-3})):
        buf = io.BytesIO()
        torch.save(obj, buf)
        write("torch_zip", name, buf.getvalue())
        with zipfile.ZipFile(buf) as z:  # the pickle alone, for the torch_pkl target
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
            write("torch_pkl", name.replace(".pth", ".pkl"), z.read(pkl))


def image_seeds() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    for mode, ext, kw in (("L", "png", {}), ("I;16", "png", {}), ("RGB", "jpg", {"quality": 50}),
                          ("P", "png", {})):
        im = Image.fromarray(gray)
        if mode == "I;16":
            im = Image.fromarray((gray.astype(np.uint16) * 257))
        elif mode != "L":
            im = im.convert(mode)
        buf = io.BytesIO()
        im.save(buf, format="PNG" if ext == "png" else "JPEG", **kw)
        # the first byte picks the suffix the harness gives the file (see pyfuzz.IMAGE_EXTS)
        sel = {"png": 0, "jpg": 1}[ext]
        write("image", f"{mode.replace(';', '')}.{ext}", bytes([sel]) + buf.getvalue())
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    except ImportError:
        print("pydicom not installed: no DICOM seed")
        return
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["afire-fuzz"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = 8, 6
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    ds.WindowCenter, ds.WindowWidth = 500, 800
    ds.PixelData = (rng.integers(0, 4096, (8, 6)).astype("<u2")).tobytes()
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.dcm")
        ds.save_as(p, enforce_file_format=True)
        with open(p, "rb") as f:
            write("image", "mono1.dcm", bytes([2]) + f.read())


def shard_seeds() -> None:
    with tempfile.TemporaryDirectory() as d:
        make_dataset(d)
        for sel, name in enumerate(SHARD_FILES):
            with open(os.path.join(d, name), "rb") as f:
                write("shards", name, bytes([sel]) + f.read())


if __name__ == "__main__":
    torch_seeds()
    image_seeds()
    shard_seeds()
