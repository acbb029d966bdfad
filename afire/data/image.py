"""Decoding radiographs to 8-bit grayscale and resizing them to S x S.

Conversions (documented once, used by every reader and by ``afire prepare``):

* 8-bit grayscale is kept as is; colour (RGB, palette, with alpha) is converted to
  luminance with Pillow's ITU-R 601-2 weights.
* Images with more than 8 bits (16-bit PNG, DICOM) are mapped linearly to [0, 255] by
  their own minimum and maximum (min-max), never by clipping to 0..255. A DICOM that
  carries a VOI LUT or a window (WindowCenter/WindowWidth) is windowed instead, as a
  viewer would show it; pass ``window=False`` to always use min-max.
* DICOM: modality rescale (RescaleSlope, RescaleIntercept) first, then VOI, then
  MONOCHROME1 images are inverted so that bone is bright, as in MONOCHROME2.
* Resizing (:func:`resize_square`): ``"crop"`` (default) scales the SHORT side to S with
  Lanczos, then takes the centre S x S crop (the layout of the shared real data);
  ``"pad"`` scales the LONG side to S and pads the rest with black, centred (keeps the
  whole field of view). Masks use the same geometry with nearest-neighbour sampling.
"""
from __future__ import annotations

import os

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DICOM_EXTS = (".dcm", ".dicom")
RESIZE_MODES = ("crop", "pad")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a test dependency
        raise ImportError("reading PNG/JPEG needs Pillow: pip install 'afire[images]'") from e
    return Image


def _pydicom():
    try:
        import pydicom
    except ImportError as e:
        raise ImportError(
            "reading DICOM files needs pydicom: pip install 'afire[images]'") from e
    return pydicom


def is_dicom_path(path: str) -> bool:
    return path.lower().endswith(DICOM_EXTS)


def minmax_to_uint8(a: np.ndarray) -> np.ndarray:
    """Linear map of the array's [min, max] onto [0, 255] (a constant image becomes 0)."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("image contains non-finite values")
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _pil_to_gray(im) -> np.ndarray:
    if im.mode in ("L", "1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV"):
        if im.mode != "L":
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = im.convert("RGBA").convert("RGB")
            im = im.convert("L")
        return np.asarray(im, dtype=np.uint8)
    # high bit depth: I;16, I;16B, I;16L, I (int32), F (float32)
    a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if a.dtype == np.uint8:
        return a
    return minmax_to_uint8(a)


def read_image_file(path: str) -> np.ndarray:
    """A PNG/JPEG (or anything Pillow opens) as uint8 [H, W] grayscale."""
    Image = _pil()
    with Image.open(path) as im:
        im.load()
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        return _pil_to_gray(im)


def dicom_to_uint8(ds, window: bool = True) -> np.ndarray:
    """Pixel data of a pydicom dataset as uint8 [H, W] (see the module docstring)."""
    a = ds.pixel_array
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        a = a[0]
    if a.ndim == 3:  # colour DICOM: luminance
        return minmax_to_uint8(a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    x = a.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    x = x * slope + intercept
    out = None
    if window:
        if "VOILUTSequence" in ds:
            out = _apply_voi_lut_sequence(x, ds)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
            if w is not None and c is not None and w > 1:
                # DICOM PS3.3 C.11.2.1.2.1 linear window
                y = ((x - (c - 0.5)) / (w - 1.0) + 0.5)
                out = np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)
    if out is None:
        out = minmax_to_uint8(x)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _first(v):
    try:
        if hasattr(v, "__len__") and not isinstance(v, (str, bytes)):
            v = v[0]
        return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _apply_voi_lut_sequence(values: np.ndarray, ds) -> np.ndarray:
    """First VOI LUT of the sequence applied to the modality values; inputs below/above
    the LUT's range take its first/last entry (DICOM PS3.3 C.11.2.1.1), and the LUT's
    output bit depth is mapped onto 8 bits."""
    item = ds.VOILUTSequence[0]
    desc = [int(v) for v in item.LUTDescriptor]
    n_entries = desc[0] or 65536
    first = desc[1]
    bits = desc[2]
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        lut = np.frombuffer(data, dtype=np.uint16 if bits > 8 else np.uint8)
    else:
        lut = np.asarray(data)
    lut = lut[:n_entries].astype(np.float64)
    idx = np.clip(np.rint(values).astype(np.int64) - first, 0, len(lut) - 1)
    y = lut[idx]
    return np.rint(y * (255.0 / ((1 << bits) - 1))).clip(0, 255).astype(np.uint8)


def read_dicom_file(path: str, window: bool = True) -> np.ndarray:
    """A DICOM file as uint8 [H, W] (needs pydicom)."""
    pydicom = _pydicom()
    ds = pydicom.dcmread(path)
    return dicom_to_uint8(ds, window=window)


def load_gray(path: str) -> np.ndarray:
    """Any supported radiograph file as uint8 [H, W]."""
    if is_dicom_path(path):
        return read_dicom_file(path)
    return read_image_file(path)


def _geometry(h: int, w: int, size: int, mode: str):
    """(new_h, new_w, top, left): resized shape and the crop offset (crop) or the paste
    offset (pad)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"empty image ({h}x{w})")
    if mode == "crop":
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        return nh, nw, (nh - size) // 2, (nw - size) // 2
    s = size / max(h, w)
    nh, nw = max(1, min(size, round(h * s))), max(1, min(size, round(w * s)))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def resize_square(img: np.ndarray, size: int, mode: str = "crop", nearest: bool = False
                  ) -> np.ndarray:
    """uint8 [H, W] -> uint8 [size, size] (see the module docstring for the modes)."""
    Image = _pil()
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    h, w = img.shape
    nh, nw, top, left = _geometry(h, w, size, mode)
    resample = Image.NEAREST if nearest else Image.LANCZOS
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), resample=resample)
    r = np.asarray(im, dtype=np.uint8)
    if mode == "crop":
        return np.ascontiguousarray(r[top:top + size, left:left + size])
    out = np.zeros((size, size), np.uint8)
    out[top:top + nh, left:left + nw] = r
    return out


def list_image_files(root: str, dicom: bool = True) -> list[str]:
    """All PNG/JPEG (and DICOM) files under root, recursively, sorted."""
    exts = IMAGE_EXTS + (DICOM_EXTS if dicom else ())
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in files:
            if f.lower().endswith(exts) and not f.startswith("."):
                out.append(os.path.join(d, f))
    out.sort()
    return out
