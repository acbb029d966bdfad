"""The readers and `prepare` on the real chest X-rays of the shared data (skipped if absent).

Set AFIRE_DATA to the folder holding kermany_native/ and nih14_dev/; the default is
<repository>/../shared/data."""
import os

import numpy as np
import pytest

from afire.data import ShardDataset, prepare, read_shared
from afire.data.image import load_gray, resize_square

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("AFIRE_DATA", os.path.join(REPO, "..", "shared", "data"))


def dataset(name):
    path = os.path.join(DATA, name)
    if not os.path.exists(os.path.join(path, "labels.csv")):
        pytest.skip(f"real data {name}/ not found under AFIRE_DATA={DATA!r}")
    return path


pytestmark = pytest.mark.data


def test_kermany_native_records():
    recs = read_shared(dataset("kermany_native"))
    assert len(recs) == 1261
    assert sum(r.abnormal == 0 for r in recs) == 403
    assert sum(r.label == "pneumonia" for r in recs) == 858
    train = {r.group for r in recs if r.split == "train"}
    test = {r.group for r in recs if r.split == "test"}
    assert train and test and not train & test  # split by group, never by image
    assert 0.1 < sum(r.split == "test" for r in recs) / len(recs) < 0.3


def test_nih14_dev_records():
    recs = read_shared(dataset("nih14_dev"))
    assert len(recs) == 517 and sum(r.abnormal == 0 for r in recs) == 267
    assert all(r.labels["Pneumonia"] == 1.0 for r in recs if r.abnormal == 1)
    assert all(sum(r.labels.values()) == 0 for r in recs if r.abnormal == 0)
    train = {r.group for r in recs if r.split == "train"}
    assert not train & {r.group for r in recs if r.split == "test"}


def test_prepare_real_subset(tmp_path):
    recs = read_shared(dataset("kermany_native"))[:12]
    out = str(tmp_path / "k")
    s = prepare("", out, fmt="shared", size=64, workers=1, shard_size=5, progress=False,
                records=recs)
    assert s["images"] == 12 and s["failed"] == 0
    ds = ShardDataset(out)
    for i in (0, 11):
        np.testing.assert_array_equal(ds[i], resize_square(load_gray(recs[i].path), 64))
    img = ds.images(range(12)).astype(np.float64)
    assert 30 < img.mean() < 220 and img.std() > 20  # real radiographs, not blank
