"""`afire prepare` end to end: shards, manifest, corrupt files, resume, settings checks.

Shard pixels are checked against an independent reference: each source file decoded here
with Pillow (or pydicom) alone and resized by the rule of the documentation written out
below, not with afire.data.image. Equality is exact: the reference makes the same Pillow
resampling calls (Lanczos, nearest for masks) on the same 8-bit input, so any difference
is a difference in decoding, conversion or geometry."""
import json
import os

import numpy as np
import pytest
from data_fakes import (
    encode_rle_relative,
    gradient,
    write_corrupt,
    write_jpeg,
    write_lines,
    write_png,
)
from PIL import Image

from afire.cli import main
from afire.data import ShardDataset, phantom_dataset

S = 16
LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


def minmax_u8(a):
    a = a.astype(np.float64)
    return np.rint((a - a.min()) * 255 / (a.max() - a.min())).astype(np.uint8)


def decode_reference(path):
    """uint8 [H, W]: 8-bit gray as stored, colour -> Pillow's "L" (ITU-R 601-2), more than
    8 bits -> the file's own min..max onto 0..255."""
    with Image.open(path) as im:
        if im.mode in ("L", "RGB", "RGBA", "P", "1"):
            return np.asarray(im.convert("L"))
        return minmax_u8(np.asarray(im))


def square_reference(a, size, mode, resample=LANCZOS):
    """crop: short side -> size (long side round(long * size / short)), centre crop;
    pad: long side -> size, the short side scaled the same way, centred on black."""
    h, w = a.shape
    k = min(h, w) if mode == "crop" else max(h, w)
    nh, nw = (max(1, round(h * size / k)), max(1, round(w * size / k)))
    for side in (h, w):  # no rounding ties in these tests: round() would not matter
        assert (2 * side * size) % (2 * k) != k
    im = Image.fromarray(a)
    r = np.asarray(im.resize((nw, nh), resample) if (nh, nw) != (h, w) else im)
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return r[top:top + size, left:left + size]
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = r
    return out


def shard_rows(out):
    """The manifest rows and, by path, the shard row each one points at (np.load)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    shards = {k: np.load(os.path.join(out, f"shard_{k:05d}.npy"))
              for k in {r["shard"] for r in rows}}
    return rows, {r["path"]: shards[r["shard"]][r["row"]] for r in rows}


def assert_content(out, size, mode):
    rows, got = shard_rows(out)
    for r in rows:
        np.testing.assert_array_equal(
            got[r["path"]], square_reference(decode_reference(r["path"]), size, mode),
            err_msg=r["path"])
    return rows


def make_folder(root):
    write_png(os.path.join(root, "NORMAL", "a.png"), gradient(20, 30, 1))
    write_png(os.path.join(root, "NORMAL", "b.png"), gradient(40, 20, 2))
    write_png(os.path.join(root, "NORMAL", "c16.png"),
              (np.arange(600).reshape(20, 30) * 50 + 300).astype(np.uint16))
    write_corrupt(os.path.join(root, "NORMAL", "d_bad.png"))
    write_jpeg(os.path.join(root, "SICK", "e.jpg"), np.stack([gradient(24, 24, 3)] * 3, -1))
    write_png(os.path.join(root, "SICK", "f.png"), gradient(16, 16, 4))
    write_png(os.path.join(root, "g.png"), gradient(17, 33, 5))


def run(args, capsys):
    rc = main(["prepare", *args, "--quiet"])
    return rc, capsys.readouterr().err


def mtimes(out):
    return {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in sorted(os.listdir(out))
            if f.startswith("shard_")}


def test_prepare_folder_end_to_end_and_resume(tmp_path, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_folder(src)
    args = [src, out, "--size", str(S), "--workers", "1", "--shard-size", "3"]
    rc, err = run(args, capsys)
    assert rc == 0
    assert "cannot read" in err and "d_bad.png" in err
    assert "6 images in 3 shards (0 already done), 1 unreadable" in err
    errors = open(os.path.join(out, "errors.txt")).read()
    assert errors.startswith(os.path.join(src, "NORMAL", "d_bad.png") + "\t")

    rows = assert_content(out, S, "crop")
    assert [r["index"] for r in rows] == list(range(6))
    assert [(r["shard"], r["row"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
                                                     (2, 0)]
    assert [os.path.relpath(r["path"], src) for r in rows] == [
        "NORMAL/a.png", "NORMAL/b.png", "NORMAL/c16.png", "SICK/e.jpg", "SICK/f.png", "g.png"]
    assert [r["label"] for r in rows] == ["NORMAL"] * 3 + ["SICK", "SICK", ""]
    ds = ShardDataset(out)  # the loader hands out the same rows
    assert len(ds) == 6
    _, got = shard_rows(out)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(ds[i], got[r["path"]])
    assert ds[2].max() > 240 and ds[2].min() < 15  # the 16-bit PNG, min-max scaled

    # resume: nothing to do, no file rewritten
    before = mtimes(out)
    rc, err = run(args, capsys)
    assert rc == 0 and "3 of 3 shards already finished" in err
    assert "6 images in 3 shards (3 already done), 1 unreadable" in err
    assert mtimes(out) == before

    # a lost done-marker and a truncated shard are redone; the others are kept
    os.remove(os.path.join(out, "shard_00001.done"))
    p2 = os.path.join(out, "shard_00002.npy")
    data = open(p2, "rb").read()
    open(p2, "wb").write(data[:-10])
    rc, err = run(args, capsys)
    assert rc == 0 and "1 of 3 shards already finished" in err
    after = mtimes(out)
    assert after["shard_00000.npy"] == before["shard_00000.npy"]
    assert after["shard_00001.npy"] != before["shard_00001.npy"]
    assert len(ShardDataset(out)) == 6
    assert len(assert_content(out, S, "crop")) == 6

    # a new input file changes the plan of the last shard only
    write_png(os.path.join(src, "h.png"), gradient(16, 16, 6))
    rc, err = run(args, capsys)
    assert rc == 0 and "2 of 3 shards already finished" in err and "7 images" in err
    rows = assert_content(out, S, "crop")
    assert [(r["shard"], r["row"]) for r in rows][-2:] == [(2, 0), (2, 1)]  # g.png, h.png

    # other settings into the same directory are refused
    rc, err = run([src, out, "--size", "32", "--workers", "1", "--shard-size", "3"], capsys)
    assert rc == 2 and "size=16" in err


def test_prepare_workers_match_serial(tmp_path, capsys):
    src = str(tmp_path / "src")
    make_folder(src)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run([src, a, "--size", str(S), "--workers", "1", "--resize", "pad"], capsys)[0] == 0
    assert run([src, b, "--size", str(S), "--workers", "2", "--resize", "pad"], capsys)[0] == 0
    np.testing.assert_array_equal(np.load(os.path.join(a, "shard_00000.npy")),
                                  np.load(os.path.join(b, "shard_00000.npy")))
    assert open(os.path.join(a, "manifest.jsonl")).read() == \
        open(os.path.join(b, "manifest.jsonl")).read()
    assert len(assert_content(b, S, "pad")) == 6


def test_prepare_phantom(tmp_path, capsys):
    out = str(tmp_path / "ph")
    rc, err = run(["10", out, "--format", "phantom", "--size", "32", "--shard-size", "4",
                   "--p-abnormal", "0.5", "--seed", "2", "--workers", "1"], capsys)
    assert rc == 0, err
    ds = ShardDataset(out, masks=True)
    ref = phantom_dataset(10, size=32, seed=2, p_abnormal=0.5)
    np.testing.assert_array_equal(ds.images(range(10)), ref["images"])
    np.testing.assert_array_equal(ds.images(range(10), masks=True), ref["lesion_masks"])
    names = ("normal", "nodule", "consolidation", "effusion")
    assert ds.field("label") == [names[k] for k in ref["labels"]]
    assert main(["prepare", "many", str(tmp_path / "x"), "--format", "phantom", "--quiet"]) == 2
    assert "number of images" in capsys.readouterr().err


def test_prepare_errors(tmp_path, capsys):
    rc, err = run([str(tmp_path / "nope"), str(tmp_path / "o"), "--workers", "1"], capsys)
    assert rc == 2 and "not a directory" in err
    rc, err = run([str(tmp_path), str(tmp_path / "o"), "--format", "nih", "--workers", "1"],
                  capsys)
    assert rc == 2 and "Data_Entry_2017" in err
    with pytest.raises(SystemExit):
        main(["prepare", str(tmp_path), str(tmp_path / "o"), "--format", "png"])
    with pytest.raises(SystemExit):
        main([])


def test_prepare_siim_masks(tmp_path, capsys):
    pytest.importorskip("pydicom", reason="pydicom not installed (pip install 'afire[images]')")
    from data_fakes import write_dicom

    src = str(tmp_path / "siim")
    h, w = 20, 40
    img = (np.arange(h * w).reshape(h, w) * 3).astype(np.uint16)
    m1 = np.zeros((h, w), np.uint8)
    m1[4:10, 8:20] = 1
    m2 = np.zeros((h, w), np.uint8)
    m2[12:18, 24:30] = 1
    write_dicom(os.path.join(src, "train", "1.2.3.dcm"), img, uid="1.2.3", bits_stored=12)
    write_dicom(os.path.join(src, "train", "1.2.4.dcm"), img, uid="1.2.4", bits_stored=12,
                photometric="MONOCHROME1")
    write_lines(os.path.join(src, "train-rle.csv"), [
        "ImageId, EncodedPixels", f"1.2.3, {encode_rle_relative(m1)}",
        f"1.2.3, {encode_rle_relative(m2)}", "1.2.4, -1"])
    out = str(tmp_path / "out")
    rc, err = run([src, out, "--format", "siim", "--size", "10", "--workers", "1"], capsys)
    assert rc == 0, err
    ds = ShardDataset(out, masks=True)
    assert ds.field("abnormal") == [1, 0] and ds.field("has_mask") == [True, True]
    # reference: pydicom's pixels, min-max, MONOCHROME1 inverted, then the crop rule
    # (20 x 40 -> 10 x 20, columns 5..14); the mask: nearest, the same crop
    import pydicom

    ref = minmax_u8(pydicom.dcmread(os.path.join(src, "train", "1.2.3.dcm")).pixel_array)
    rows, got = shard_rows(out)
    np.testing.assert_array_equal(got[os.path.join(src, "train", "1.2.3.dcm")],
                                  square_reference(ref, 10, "crop"))
    np.testing.assert_array_equal(got[os.path.join(src, "train", "1.2.4.dcm")],
                                  square_reference(255 - ref, 10, "crop"))
    masks = np.load(os.path.join(out, "mask_00000.npy"))
    expected = square_reference((m1 | m2) * np.uint8(255), 10, "crop", NEAREST) > 127
    np.testing.assert_array_equal(masks[rows[0]["row"]], expected.astype(np.uint8))
    assert masks[rows[0]["row"]].sum() > 10 and not masks[rows[1]["row"]].any()
    np.testing.assert_array_equal(ds.mask(0), masks[0])


def test_progress_bar_text():
    """Not a terminal (a log, a buffer): one line per redraw, a last line at the end,
    messages on lines of their own; disabled: only the messages."""
    import io

    from afire.data.progress import Progress, format_seconds

    s = io.StringIO()
    bar = Progress(10, "prep", stream=s, interval=0.0)
    bar.update(5)
    bar.message("note")
    bar.update(5)
    bar.close()
    text = s.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n") and "note" in lines
    assert lines[0].startswith("prep:   0%|") and "0/10" in lines[0]
    assert any(line.startswith("prep:  50%|#####") and "5/10" in line for line in lines)
    assert lines[-1].startswith("prep: 100%|##########| 10/10 [") and "img/s" in lines[-1]
    assert format_seconds(3725) == "1:02:05" and format_seconds(65) == "01:05"
    quiet = io.StringIO()
    q = Progress(3, stream=quiet, enabled=False)
    q.update(3)
    q.message("error line")
    q.close()
    assert quiet.getvalue() == "error line\n"


def test_progress_bar_lines_at_most_every_interval():
    import io

    from afire.data.progress import LINE_INTERVAL, Progress

    s = io.StringIO()
    with Progress(1000, "prep", stream=s) as bar:      # default interval: 5 s
        assert not bar.in_place and LINE_INTERVAL == 5.0
        for _ in range(1000):
            bar.update()
    assert len(s.getvalue().splitlines()) == 2         # the start and the end


def test_progress_bar_in_place_on_a_terminal():
    import io

    from afire.data.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    bar = Progress(4, "pretrain", unit="step", stream=s, interval=0.0, initial=1)
    bar.fields("loss 1.0 | 5.0 img/s")
    bar.update(2)
    bar.message("a message")
    bar.close()
    text = s.getvalue()
    assert bar.in_place and "\r" in text and "a message\n" in text
    assert "3/4" in text and "loss 1.0 | 5.0 img/s" in text and text.endswith("\n")
