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

Limits (hostile or broken files must fail fast, not exhaust memory):

* A file whose header declares more than ``max_pixels`` pixels (default
  :data:`MAX_PIXELS`, 8192 x 8192) is refused BEFORE its pixels are decoded
  (:class:`ImageTooLargeError`): Pillow reads only the header on ``Image.open``; a DICOM's
  Rows x Columns x NumberOfFrames is read with ``stop_before_pixels``. Pillow's own
  decompression-bomb error (above ``2 * Image.MAX_IMAGE_PIXELS``) is reported the same way.
* :func:`resize_square` refuses a resize whose intermediate image (before the centre
  crop) would exceed ``max_pixels``: in ``"crop"`` mode a 1 x 150000 strip would otherwise
  be scaled to 224 x 33,600,000 pixels (7.5 GB). Such images need ``"pad"``.
* Only regular files are opened (after symbolic links): a FIFO named like an image would
  block ``open()`` forever and a device such as /dev/zero never ends; both raise ValueError.
"""
from __future__ import annotations

import os
import stat
import warnings

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DICOM_EXTS = (".dcm", ".dicom")
RESIZE_MODES = ("crop", "pad")
MAX_PIXELS = 1 << 26  # 67,108,864 = 8192 x 8192: 4x the largest chest X-ray detectors


class ImageTooLargeError(ValueError):
    """A file declares (or a resize would make) more pixels than the configured limit."""


def _check_pixels(path: str, what: str, n: int, max_pixels: int | None) -> None:
    if max_pixels is not None and n > max_pixels:
        raise ImageTooLargeError(
            f"{path}: {what} = {n:,} pixels, above the limit of {max_pixels:,} pixels per "
            f"image; refused before decoding")


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


def read_image_file(path: str, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A PNG/JPEG (or anything Pillow opens) as uint8 [H, W] grayscale. Files declaring
    more than ``max_pixels`` pixels (None: no limit of ours) are refused before decoding."""
    Image = _pil()
    _check_regular(path)
    with warnings.catch_warnings():
        # our own limit decides; Pillow's warning would only repeat it on stderr
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"{path}: refused before decoding: {e}") from None
    with im:
        w, h = im.size
        _check_pixels(path, f"image is {w}x{h}", w * h, max_pixels)
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


def _header_int(ds, name: str, default: int) -> int:
    try:
        v = ds.get(name, None)
        return int(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def read_dicom_file(path: str, window: bool = True, max_pixels: int | None = MAX_PIXELS
                    ) -> np.ndarray:
    """A DICOM file as uint8 [H, W] (needs pydicom). The header is read first (without
    the pixel data): Rows x Columns x NumberOfFrames above ``max_pixels`` is refused
    before any pixel is decoded (pixel_array decodes every frame)."""
    pydicom = _pydicom()
    _check_regular(path)
    if max_pixels is not None:
        hdr = pydicom.dcmread(path, stop_before_pixels=True)
        rows, cols = _header_int(hdr, "Rows", 0), _header_int(hdr, "Columns", 0)
        frames = max(1, _header_int(hdr, "NumberOfFrames", 1))
        what = f"DICOM header declares {rows}x{cols}" + (f" x {frames} frames"
                                                         if frames > 1 else "")
        _check_pixels(path, what, rows * cols * frames, max_pixels)
    ds = pydicom.dcmread(path)
    return dicom_to_uint8(ds, window=window)


def _check_regular(path: str) -> None:
    """Only regular files are opened: a FIFO named x.png would block open() forever, a
    device (a link to /dev/zero) never ends."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a directory" if stat.S_ISDIR(mode) else "not a regular file")
        raise ValueError(f"{path}: {kind}, not a regular file; not opened")


def load_gray(path: str, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Any supported radiograph file as uint8 [H, W]; more than ``max_pixels`` declared
    pixels raise :class:`ImageTooLargeError` before decoding (None: no limit of ours).
    Anything but a regular file (after symbolic links) raises ValueError unopened."""
    if is_dicom_path(path):
        return read_dicom_file(path, max_pixels=max_pixels)
    return read_image_file(path, max_pixels=max_pixels)


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


def resize_square(img: np.ndarray, size: int, mode: str = "crop", nearest: bool = False,
                  max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W] -> uint8 [size, size] (see the module docstring for the modes). A resize
    whose intermediate image would exceed ``max_pixels`` (an extreme aspect ratio in crop
    mode) raises :class:`ImageTooLargeError` instead of allocating it."""
    Image = _pil()
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    h, w = img.shape
    nh, nw, top, left = _geometry(h, w, size, mode)
    if max_pixels is not None and nh * nw > max(max_pixels, size * size):
        raise ImageTooLargeError(
            f"a {w}x{h} image (aspect ratio {max(w, h) / min(w, h):.0f}:1) resized for "
            f"{mode!r} at size {size} would be {nw}x{nh} = {nh * nw:,} pixels before the crop, "
            f"above the limit of {max_pixels:,}; use resize mode 'pad' (--resize pad) for it")
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
