"""Tiny fake datasets in their published layouts, for the tests of afire.data."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_png(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def write_jpeg(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)
    return path


def write_corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"this is not a png body" * 3)
    return path


def gradient(h, w, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = (x * 255 // max(w - 1, 1) + rng.integers(0, 20, (h, w))).clip(0, 255)
    return a.astype(np.uint8)


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def encode_rle_relative(mask: np.ndarray) -> str:
    """Reference encoder: column-major runs, starts relative to the previous run's end."""
    flat = mask.T.reshape(-1).astype(np.int8)
    d = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
    out, prev_end = [], 0
    for s, e in zip(starts, ends):
        out += [int(s - prev_end), int(e - s)]
        prev_end = e
    return " ".join(map(str, out)) if out else "-1"


def decode_rle_reference(rle: str, h: int, w: int) -> np.ndarray:
    """Independent decoder: absolute starts by cumulative sums, then column-major reshape."""
    if rle.strip() in ("", "-1"):
        return np.zeros((h, w), np.uint8)
    v = np.array(rle.split(), dtype=np.int64)
    starts, lengths = v[0::2], v[1::2]
    abs_starts = np.cumsum(starts) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.zeros(h * w, np.uint8)
    for s, n in zip(abs_starts, lengths):
        flat[s:s + n] = 1
    return flat.reshape(w, h).T


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", slope=None,
                intercept=None, window=None, bits_stored=None, uid=None, voi_lut=None):
    """A minimal single-frame grayscale DICOM file (needs pydicom)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    uid = uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.PatientID = "p1"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        first, lut = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(lut), first, 16]
        item.add_new(0x00283006, "OW", np.asarray(lut, "<u2").tobytes())  # LUTData
        ds.VOILUTSequence = [item]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path
