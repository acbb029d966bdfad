"""The readers and `prepare` on the real chest X-rays of the shared data (skipped if absent).

Set AFIRE_DATA to the folder holding kermany_native/ and nih14_dev/; the default is
<repository>/../shared/data. Records are checked against labels.csv read here with the
csv module; shard pixels against the PNG decoded here with Pillow and resized by the rule
written out in the test (the same Pillow Lanczos call, so equality is exact)."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from afire.data import ShardDataset, prepare, read_shared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("AFIRE_DATA", os.path.join(REPO, "..", "shared", "data"))
LANCZOS = Image.Resampling.LANCZOS


def dataset(name):
    path = os.path.join(DATA, name)
    if not os.path.exists(os.path.join(path, "labels.csv")):
        pytest.skip(f"real data {name}/ not found under AFIRE_DATA={DATA!r}")
    return path


def csv_rows(root):
    with open(os.path.join(root, "labels.csv"), newline="", encoding="utf-8") as f:
        return {os.path.join(root, r["filename"]): r for r in csv.DictReader(f)}


def crop_reference(path, size):
    """Pillow alone: gray, short side -> size with Lanczos, centre size x size crop."""
    with Image.open(path) as im:
        im = im.convert("L")
        w, h = im.size
        nw, nh = round(w * size / min(w, h)), round(h * size / min(w, h))
        a = np.asarray(im.resize((nw, nh), LANCZOS) if (nw, nh) != (w, h) else im)
    top, left = (nh - size) // 2, (nw - size) // 2
    return a[top:top + size, left:left + size]


def shard_rows(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    shards = {k: np.load(os.path.join(out, f"shard_{k:05d}.npy"))
              for k in {r["shard"] for r in rows}}
    return rows, {r["path"]: shards[r["shard"]][r["row"]] for r in rows}


pytestmark = pytest.mark.data


def test_kermany_native_records():
    root = dataset("kermany_native")
    recs = read_shared(root)
    ref = csv_rows(root)
    assert len(recs) == len(ref) == 1261
    assert sorted(r.path for r in recs) == sorted(ref)  # every listed file, nothing else
    for r in recs:
        row = ref[r.path]
        assert (r.label, r.abnormal, r.group) == (row["label"], int(row["abnormal"]),
                                                  row["group_id"])
        assert r.extra.get("pneumonia_type", "") == row["pneumonia_type"]
        assert r.labels == ({"pneumonia": float(row["label"] == "pneumonia")})
    assert sum(r.abnormal == 0 for r in recs) == 403
    assert sum(r.label == "pneumonia" for r in recs) == 858
    train = {r.group for r in recs if r.split == "train"}
    test = {r.group for r in recs if r.split == "test"}
    assert train and test and not train & test  # split by group, never by image
    assert 0.1 < sum(r.split == "test" for r in recs) / len(recs) < 0.3


def test_nih14_dev_records():
    root = dataset("nih14_dev")
    recs = read_shared(root)
    ref = csv_rows(root)
    assert len(recs) == len(ref) == 517 and sum(r.abnormal == 0 for r in recs) == 267
    findings = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
                "Fibrosis", "Pleural_Thickening", "Hernia")
    for r in recs:
        row = ref[r.path]
        assert (r.abnormal, r.group) == (int(row["abnormal"]), row["patient_id"])
        assert r.labels == {f: float(row[f]) for f in findings}
        # the |-joined NIH string names exactly the positive findings
        named = set(row["nih_finding_labels"].split("|")) - {"No Finding"}
        assert {f for f, v in r.labels.items() if v == 1.0} == named
    assert all(r.labels["Pneumonia"] == 1.0 for r in recs if r.abnormal == 1)
    assert all(sum(r.labels.values()) == 0 for r in recs if r.abnormal == 0)
    train = {r.group for r in recs if r.split == "train"}
    assert not train & {r.group for r in recs if r.split == "test"}


def test_prepare_real_subset(tmp_path):
    root = dataset("kermany_native")
    recs = read_shared(root)
    # normals and pneumonias from the start and the end of the sorted list
    recs = recs[:4] + recs[-4:]
    out = str(tmp_path / "k")
    s = prepare("", out, fmt="shared", size=100, workers=2, shard_size=3, progress=False,
                records=recs)
    assert s["images"] == 8 and s["failed"] == 0 and s["shards"] == 3
    rows, got = shard_rows(out)
    assert [r["path"] for r in rows] == [r.path for r in recs]
    for r in rows:  # 256 x 256 -> 100 x 100 (a non-integer factor)
        np.testing.assert_array_equal(got[r["path"]], crop_reference(r["path"], 100),
                                      err_msg=r["path"])
    ds = ShardDataset(out)
    np.testing.assert_array_equal(ds.images(range(8)), np.stack([got[r.path] for r in recs]))
    assert {r["label"] for r in rows} == {"normal", "pneumonia"}


def test_prepare_real_non_square_crop(tmp_path):
    # the shared images are square; cut wide and tall pieces of two of them so that the
    # crop geometry (short side, centre offset) runs on real radiograph content
    root = dataset("kermany_native")
    names = sorted(csv_rows(root))[:2]
    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(names):
        a = np.asarray(Image.open(p).convert("L"))
        Image.fromarray(a[20:200, :]).save(src / f"wide{i}.png")    # 256 x 180
        Image.fromarray(a[:, 30:171]).save(src / f"tall{i}.png")    # 141 x 256
    out = str(tmp_path / "o")
    s = prepare(str(src), out, size=64, workers=1, progress=False)
    assert s["images"] == 4 and s["failed"] == 0
    rows, got = shard_rows(out)
    for r in rows:
        ref = crop_reference(r["path"], 64)
        np.testing.assert_array_equal(got[r["path"]], ref, err_msg=r["path"])
        assert ref.std() > 20  # real radiograph content, not blank
