"""Decoding to 8-bit grayscale and resizing (afire/data/image.py)."""
import sys

import numpy as np
import pytest
from data_fakes import write_dicom, write_jpeg, write_png
from PIL import Image

from afire.data import image as im

try:
    import pydicom  # noqa: F401

    HAVE_PYDICOM = True
except ImportError:
    HAVE_PYDICOM = False
needs_pydicom = pytest.mark.skipif(not HAVE_PYDICOM, reason="pydicom not installed "
                                   "(pip install 'afire[images]')")


def minmax_ref(a):
    a = a.astype(np.float64)
    return np.rint((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


def test_minmax_and_constant():
    a = np.array([[1000, 3000], [5000, 2000]], np.uint16)
    np.testing.assert_array_equal(im.minmax_to_uint8(a), minmax_ref(a))
    assert not im.minmax_to_uint8(np.full((3, 3), 7.0)).any()
    with pytest.raises(ValueError, match="non-finite"):
        im.minmax_to_uint8(np.array([0.0, np.nan]))


def test_png_8bit_16bit_rgb(tmp_path):
    g = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
    np.testing.assert_array_equal(im.load_gray(write_png(str(tmp_path / "g.png"), g)), g)

    a16 = (np.arange(48).reshape(6, 8) * 97 + 1000).astype(np.uint16)
    p = write_png(str(tmp_path / "d16.png"), a16)
    assert Image.open(p).mode.startswith("I")
    out = im.load_gray(p)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, minmax_ref(a16))  # scaled, not clipped at 255
    assert out.min() == 0 and out.max() == 255

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    out = im.load_gray(write_png(str(tmp_path / "c.png"), rgb))
    assert np.abs(out.astype(np.float64) - lum).max() <= 1.0

    j = im.load_gray(write_jpeg(str(tmp_path / "x.jpg"), np.full((16, 16), 100, np.uint8)))
    assert j.shape == (16, 16) and abs(int(j.mean()) - 100) <= 2


def test_resize_crop_geometry():
    # columns coded by value; nearest sampling keeps the codes, so the crop window shows
    h, w, S = 100, 200, 50
    a = np.tile((np.arange(w) % 250).astype(np.uint8), (h, 1))
    out = im.resize_square(a, S, "crop", nearest=True)
    assert out.shape == (S, S)
    # short side 100 -> 50 (scale 1/2), width 200 -> 100, centre crop starts at column 25
    src_cols = out[0].astype(int)
    expected = ((np.arange(25, 75) + 0.5) * 2).astype(int)
    assert np.abs(src_cols - expected).max() <= 1
    # Lanczos on a smooth image stays close to the nearest-neighbour answer
    smooth = im.resize_square(np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1)), S)
    assert abs(int(smooth[:, 0].mean()) - int(255 * 50 / 199)) <= 3


def test_resize_pad_geometry():
    h, w, S = 100, 200, 50
    a = np.full((h, w), 200, np.uint8)
    out = im.resize_square(a, S, "pad")
    # long side 200 -> 50, height 100 -> 25, pasted at row (50-25)//2 = 12
    assert not out[:12].any() and not out[37:].any()
    assert (out[12:37] == 200).all()
    tall = im.resize_square(np.full((200, 100), 9, np.uint8), S, "pad")
    assert not tall[:, :12].any() and (tall[:, 12:37] == 9).all()
    same = np.arange(64, dtype=np.uint8).reshape(8, 8)
    np.testing.assert_array_equal(im.resize_square(same, 8, "crop"), same)
    with pytest.raises(ValueError, match="resize mode"):
        im.resize_square(same, 8, "stretch")
    with pytest.raises(ValueError, match="2-D"):
        im.resize_square(np.zeros((4, 4, 3), np.uint8), 8)


def test_list_image_files(tmp_path):
    write_png(str(tmp_path / "b" / "x.PNG"), np.zeros((4, 4), np.uint8))
    write_png(str(tmp_path / "a.png"), np.zeros((4, 4), np.uint8))
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "c.dcm").write_bytes(b"")
    files = [p[len(str(tmp_path)) + 1:] for p in im.list_image_files(str(tmp_path))]
    assert files == ["a.png", "b/x.PNG", "c.dcm"]
    assert "c.dcm" not in [p[-5:] for p in im.list_image_files(str(tmp_path), dicom=False)]


def test_missing_pydicom_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"afire\[images\]"):
        im.load_gray(str(tmp_path / "x.dcm"))


@needs_pydicom
def test_dicom_minmax_and_monochrome1(tmp_path):
    a = (np.arange(30).reshape(5, 6) * 100 + 500).astype(np.uint16)  # 12-bit range
    p2 = write_dicom(str(tmp_path / "m2.dcm"), a, bits_stored=12)
    np.testing.assert_array_equal(im.load_gray(p2), minmax_ref(a))
    p1 = write_dicom(str(tmp_path / "m1.dcm"), a, photometric="MONOCHROME1", bits_stored=12)
    np.testing.assert_array_equal(im.load_gray(p1), 255 - minmax_ref(a))
    # rescale slope/intercept is linear, so min-max output is unchanged by it
    p3 = write_dicom(str(tmp_path / "r.dcm"), a, slope=2.0, intercept=-1024, bits_stored=12)
    np.testing.assert_array_equal(im.load_gray(p3), minmax_ref(a))
    p8 = write_dicom(str(tmp_path / "u8.dcm"), a.astype(np.uint8))
    assert im.load_gray(p8).dtype == np.uint8


@needs_pydicom
def test_dicom_window_after_rescale(tmp_path):
    a = (np.arange(40).reshape(5, 8) * 100).astype(np.uint16)
    slope, intercept, c, w = 0.5, -100.0, 700.0, 1000.0
    p = write_dicom(str(tmp_path / "w.dcm"), a, slope=slope, intercept=intercept,
                    window=(c, w), bits_stored=12)
    x = a * slope + intercept
    ref = np.rint(np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(im.load_gray(p), ref)
    assert not np.array_equal(im.read_dicom_file(p, window=False), ref)  # min-max instead
    pm1 = write_dicom(str(tmp_path / "w1.dcm"), a, slope=slope, intercept=intercept,
                      window=(c, w), bits_stored=12, photometric="MONOCHROME1")
    np.testing.assert_array_equal(im.load_gray(pm1), 255 - ref)


@needs_pydicom
def test_dicom_voi_lut_sequence(tmp_path):
    a = np.array([[0, 5, 10], [12, 20, 30]], np.uint16)
    first = 4
    lut = np.arange(16) * 4000  # 16-bit LUT output over inputs 4..19
    p = write_dicom(str(tmp_path / "lut.dcm"), a, voi_lut=(first, lut), bits_stored=12)
    idx = np.clip(a.astype(int) - first, 0, len(lut) - 1)
    ref = np.rint(lut[idx] * 255.0 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(im.load_gray(p), ref)


def test_pixel_limit_png(tmp_path):
    p = write_png(str(tmp_path / "g.png"), np.zeros((30, 40), np.uint8))
    with pytest.raises(im.ImageTooLargeError, match=r"g\.png: image is 40x30 = 1,200 pixels, "
                                                    r"above the limit of 1,199"):
        im.load_gray(p, max_pixels=1199)
    assert im.load_gray(p, max_pixels=1200).shape == (30, 40)
    assert im.load_gray(p, max_pixels=None).shape == (30, 40)
    assert issubclass(im.ImageTooLargeError, ValueError)


@needs_pydicom
def test_pixel_limit_dicom_header(tmp_path, monkeypatch):
    a = (np.arange(800).reshape(20, 40) * 3).astype(np.uint16)
    p = write_dicom(str(tmp_path / "big.dcm"), a, bits_stored=12)
    # refused from the header: pixel_array is never reached
    import pydicom

    def no_decode(self):
        raise AssertionError("pixels decoded before the size check")

    with monkeypatch.context() as m:
        m.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decode))
        with pytest.raises(im.ImageTooLargeError,
                           match=r"big\.dcm: DICOM header declares 20x40 = 800 pixels"):
            im.load_gray(p, max_pixels=799)
    np.testing.assert_array_equal(im.load_gray(p, max_pixels=800), minmax_ref(a))
    # every frame is decoded by pixel_array, so frames count
    ds = pydicom.dcmread(p)
    ds.NumberOfFrames = 3
    ds.PixelData = np.concatenate([a, a, a]).tobytes()
    ds.save_as(str(tmp_path / "frames.dcm"))
    with pytest.raises(im.ImageTooLargeError, match=r"20x40 x 3 frames = 2,400 pixels"):
        im.load_gray(str(tmp_path / "frames.dcm"), max_pixels=2399)
    np.testing.assert_array_equal(im.load_gray(str(tmp_path / "frames.dcm")), minmax_ref(a))


def test_resize_refuses_a_huge_crop_intermediate():
    strip = np.zeros((2, 5000), np.uint8)
    # crop: short side 2 -> 32 would make a 32 x 80000 image first
    with pytest.raises(im.ImageTooLargeError, match=r"5000x2 .* 80000x32 = 2,560,000 pixels "
                                                    r"before the crop.*'pad'"):
        im.resize_square(strip, 32, "crop", max_pixels=1_000_000)
    assert im.resize_square(strip, 32, "crop", max_pixels=None).shape == (32, 32)
    assert im.resize_square(strip, 32, "pad", max_pixels=1_000_000).shape == (32, 32)
