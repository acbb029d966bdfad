"""What reaches the C training step is the dataset's images, byte for byte, for every source.

The expected batches are built here without afire's readers: the images are random-noise
PNGs written by this test (decoded back with Pillow), the order of epoch e is numpy's PCG64
permutation seeded with (seed, e) as documented in afire.data.loader, and the pretraining
set is the "train" split's NORMAL images in path order.
"""
import json
import os

import numpy as np
import pytest
from _util import small_cfg
from PIL import Image

from afire import AFiRe
from afire.data import phantom_dataset, prepare
from afire.pretrain import pretrain, read_log

S, B = 32, 4


def perm(n, seed, epoch):
    ss = np.random.SeedSequence([seed, epoch])
    return np.random.Generator(np.random.PCG64(ss)).permutation(n)


@pytest.fixture
def record_steps(monkeypatch):
    """Every batch handed to AFiRe.train_step (copies), in call order."""
    seen = []
    orig = AFiRe.train_step

    def spy(self, images, *a, **kw):
        seen.append(np.array(images, copy=True))
        return orig(self, images, *a, **kw)

    monkeypatch.setattr(AFiRe, "train_step", spy)
    return seen


@pytest.fixture(scope="module")
def kermany(tmp_path_factory):
    """A Kermany-layout folder of distinct noise images (train/test x NORMAL/PNEUMONIA) and
    the pixels of its pre-training set (train NORMAL, sorted by path) read with Pillow."""
    root = tmp_path_factory.mktemp("kermany")
    rng = np.random.default_rng(11)
    counts = {("train", "NORMAL"): 14, ("train", "PNEUMONIA"): 5, ("test", "NORMAL"): 4,
              ("test", "PNEUMONIA"): 3}
    for (split, cls), n in counts.items():
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (S, S), dtype=np.uint8)).save(
                d / f"{cls.lower()}-{split}-{i:02d}.png")
    train = sorted(str(p) for p in (root / "train" / "NORMAL").iterdir())
    pixels = np.stack([np.asarray(Image.open(p).convert("L")) for p in train])
    assert len({im.tobytes() for im in pixels}) == len(pixels)  # each image identifiable
    return root, train, pixels


def prepared(tmp_path, kermany, shard_size):
    root, train, pixels = kermany
    out = tmp_path / f"prep{shard_size}"
    prepare(str(root), str(out), fmt="kermany", size=S, workers=1, shard_size=shard_size,
            progress=False)
    man = [json.loads(line) for line in open(out / "manifest.jsonl")]
    assert [r["path"] for r in man if r["split"] == "train" and r["abnormal"] == 0] == train
    return str(out), man


def expected_batches(pixels, seed, epochs, keep=None):
    """The batches of `epochs` epochs: B images per step in epoch order, minus those not in
    `keep` (a boolean mask over pixels) — a batch left empty is skipped."""
    nb = len(pixels) // B
    out = []
    for e in range(epochs):
        order = perm(len(pixels), seed, e)
        for b in range(nb):
            idx = order[b * B:(b + 1) * B]
            if keep is not None:
                idx = idx[keep[idx]]
            if len(idx):
                out.append(pixels[idx])
    return out


def assert_same_batches(seen, expected):
    assert len(seen) == len(expected)
    for i, (a, b) in enumerate(zip(seen, expected)):
        assert a.dtype == np.uint8 and a.shape == b.shape, i
        np.testing.assert_array_equal(a, b, err_msg=f"batch {i}")


def train(out, data, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("report", False)
    return pretrain(kw.pop("cfg", small_cfg(seed=3)), data=data, out=str(out), **kw)


def test_array_source_bytes(tmp_path, record_steps):
    x = np.random.default_rng(0).integers(0, 256, (10, S, S), dtype=np.uint8)
    train(tmp_path / "run", x)
    assert_same_batches(record_steps, expected_batches(x, 3, 2))


def test_phantom_source_bytes(tmp_path, record_steps):
    train(tmp_path / "run", 9)
    x = phantom_dataset(9, size=S, seed=3)["images"]
    assert_same_batches(record_steps, expected_batches(x, 3, 2))


@pytest.mark.parametrize("shard_size", [1000, 3])
def test_shard_source_bytes(tmp_path, kermany, record_steps, shard_size):
    data, man = prepared(tmp_path, kermany, shard_size)
    assert len({r["shard"] for r in man}) == (1 if shard_size == 1000 else 9)
    train(tmp_path / "run", data)
    assert_same_batches(record_steps, expected_batches(kermany[2], 3, 2))


def test_shard_source_after_a_bad_shard(tmp_path, kermany, record_steps):
    data, man = prepared(tmp_path, kermany, 3)
    train_rows = [r for r in man if r["split"] == "train" and r["abnormal"] == 0]
    bad_shard = train_rows[0]["shard"]
    keep = np.array([r["shard"] != bad_shard for r in train_rows])
    assert 0 < keep.sum() < len(keep)

    def hook(row):
        if row["step"] == 0:
            os.remove(os.path.join(data, f"shard_{bad_shard:05d}.npy"))

    s = train(tmp_path / "run", data, callback=hook)
    assert len(s["bad_files"]) == 1
    want = expected_batches(kermany[2], 3, 2)[:1] + expected_batches(kermany[2], 3, 2, keep)[1:]
    assert_same_batches(record_steps, want)


def test_shard_source_after_resume(tmp_path, kermany, record_steps):
    data, _ = prepared(tmp_path, kermany, 3)
    out = tmp_path / "run"
    train(out, data, max_steps=3)
    n_first = len(record_steps)
    train(out, data, resume=True, cfg=None)
    want = expected_batches(kermany[2], 3, 2)
    assert n_first == 3
    assert_same_batches(record_steps, want)


def test_report_samples_are_dataset_images(tmp_path, kermany, monkeypatch):
    import importlib

    mod = importlib.import_module("afire.pretrain")  # afire.pretrain is also the function
    data, _ = prepared(tmp_path, kermany, 3)
    got = {}
    orig = mod.write_report

    def spy(out, model, summary, sample_images, **kw):
        got["x"] = np.array(sample_images, copy=True)
        return orig(out, model, summary, sample_images, **kw)

    monkeypatch.setattr(mod, "write_report", spy)
    train(tmp_path / "run", data, report=True, max_steps=1)
    pixels = kermany[2]
    np.testing.assert_array_equal(got["x"], pixels[perm(len(pixels), 3, 0)[:4]])


def test_two_identical_runs_log_identical_losses(tmp_path, kermany):
    data, _ = prepared(tmp_path, kermany, 3)
    rows = []
    for name in ("a", "b"):
        train(tmp_path / name, data, log_every=1)
        rows.append([(r["step"], r["loss"], r["l_stru"], r["l_cate"], r["l_recon"])
                     for r in read_log(tmp_path / name / "log.jsonl")])
    assert len(rows[0]) == 2 * (len(kermany[1]) // B)
    assert rows[0] == rows[1]
