"""ShardDataset: memory-mapped shards, manifest validation, filters, deterministic batches."""
import json
import os

import numpy as np
import pytest

from afire.data import ShardDataset, phantom_dataset, phantom_records, prepare
from afire.data.loader import DataError, epoch_order

S = 16
N = 23


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    recs = phantom_records(N, seed=3, p_abnormal=0.4)
    summary = prepare("", out, fmt="phantom", size=S, workers=1, shard_size=5, progress=False,
                      records=recs)
    assert summary["images"] == N and summary["shards"] == 5
    return out


def copy_prepared(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_reads_back_what_was_written(prepared):
    ds = ShardDataset(prepared, masks=True)
    ref = phantom_dataset(N, size=S, seed=3, p_abnormal=0.4)
    assert len(ds) == N and ds.size == S
    np.testing.assert_array_equal(ds.images(range(N)), ref["images"])
    np.testing.assert_array_equal(ds.images(range(N), masks=True), ref["lesion_masks"])
    np.testing.assert_array_equal(ds[7], ref["images"][7])
    np.testing.assert_array_equal(ds.mask(7), ref["lesion_masks"][7])
    assert ds.field("abnormal") == [int(k > 0) for k in ref["labels"]]
    lm = ds.label_matrix(["lesion", "absent"])
    assert lm.shape == (N, 2) and np.isnan(lm[:, 1]).all()
    np.testing.assert_array_equal(lm[:, 0], (ref["labels"] > 0).astype(np.float32))


def test_filters(prepared):
    ds = ShardDataset(prepared)
    normal = ShardDataset(prepared, abnormal=0)
    assert len(normal) == ds.field("abnormal").count(0) and 0 < len(normal) < N
    assert all(r["abnormal"] == 0 for r in normal.records)
    train = ShardDataset(prepared, split="train")
    test = ShardDataset(prepared, split=["test"])
    assert len(train) + len(test) == N and len(test) > 0
    nod = ShardDataset(prepared, label=("nodule", "effusion"))
    assert {r["label"] for r in nod.records} <= {"nodule", "effusion"}
    assert len(ShardDataset(prepared, split="val")) == 0
    idx = [r["index"] for r in normal.records]
    np.testing.assert_array_equal(normal.images(range(len(normal))), ds.images(idx))


def test_batches_deterministic(prepared):
    ds = ShardDataset(prepared)
    a = list(ds.batches(4, seed=1, epoch=2, return_index=True))
    b = list(ds.batches(4, seed=1, epoch=2, return_index=True))
    assert len(a) == N // 4 and all(x.shape == (4, S, S) and x.dtype == np.uint8 for x, _ in a)
    for (xa, ia), (xb, ib) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(xa, ds.images(ia))
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([1, 2]))).permutation(N)
    np.testing.assert_array_equal(np.concatenate([i for _, i in a]), order[:N // 4 * 4])
    other = np.concatenate([i for _, i in ds.batches(4, seed=1, epoch=3, return_index=True)])
    assert not np.array_equal(other, order[:len(other)])
    full = np.concatenate([i for _, i in ds.batches(4, drop_last=False, return_index=True)])
    assert sorted(full.tolist()) == list(range(N))
    seq = list(ds.batches(10, shuffle=False, drop_last=False))
    assert [len(x) for x in seq] == [10, 10, 3]
    np.testing.assert_array_equal(seq[0], ds.images(range(10)))
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))


def test_validation_errors(prepared, tmp_path):
    with pytest.raises(ValueError, match="not a prepared dataset"):
        ShardDataset(str(tmp_path))

    d = copy_prepared(prepared, tmp_path / "drop")
    man = os.path.join(d, "manifest.jsonl")
    lines = open(man).read().splitlines()
    open(man, "w").write("\n".join(lines[:-1]) + "\n")  # last row of the last shard lost
    with pytest.raises(ValueError, match="rows but the manifest lists"):
        ShardDataset(d)

    d = copy_prepared(prepared, tmp_path / "json")
    man = os.path.join(d, "manifest.jsonl")
    open(man, "a").write('{"index": 99, "path": "x"')
    with pytest.raises(ValueError, match=r"manifest.jsonl:24: invalid JSON"):
        ShardDataset(d)

    d = copy_prepared(prepared, tmp_path / "trunc")
    p = os.path.join(d, "shard_00002.npy")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:len(data) - 100])
    with pytest.raises(ValueError, match="shard_00002.npy: unreadable or truncated"):
        ShardDataset(d)

    d = copy_prepared(prepared, tmp_path / "missing")
    os.remove(os.path.join(d, "shard_00001.npy"))
    with pytest.raises(ValueError, match="missing shard"):
        ShardDataset(d)

    d = copy_prepared(prepared, tmp_path / "size")
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta["size"] = 32
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    with pytest.raises(ValueError, match=r"expected uint8 \[n, 32, 32\]"):
        ShardDataset(d)

    d = copy_prepared(prepared, tmp_path / "nomask")
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta["masks"] = False
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    with pytest.raises(ValueError, match="no masks"):
        ShardDataset(d, masks=True)
    with pytest.raises(ValueError, match="masks=True"):
        ShardDataset(d).mask(0)


# ---------------------------------------------------------------- checked reads (training)
def test_read_equals_the_memory_mapped_images(prepared):
    ds = ShardDataset(prepared, split="train")
    idx = np.array([5, 0, 11, 3, 3, len(ds) - 1])       # any order, repeats, across shards
    got, bad = ds.read(idx)
    assert bad == [] and ds.bad == {}
    assert got.dtype == np.uint8 and got.flags.c_contiguous and got.shape == (6, S, S)
    np.testing.assert_array_equal(got, ds.images(idx))
    np.testing.assert_array_equal(ds.read([])[0], np.empty((0, S, S), np.uint8))
    with pytest.raises(ValueError, match="on_bad must be"):
        ds.read(idx, on_bad="stop")


def test_read_names_a_shard_that_breaks_after_opening(prepared, tmp_path):
    d = copy_prepared(prepared, tmp_path / "d")
    ds = ShardDataset(d)
    shard_of = np.array(ds.field("shard"))
    idx = np.arange(N)
    p1 = os.path.join(d, "shard_00001.npy")
    os.remove(p1)
    with pytest.raises(DataError, match="shard_00001.npy: file disappeared") as e:
        ds.read(idx)
    assert e.value.path == p1 and ds.bad == {}
    got, bad = ds.read(idx, on_bad="skip")
    assert bad == [p1] and ds.bad == {p1: "file disappeared"}
    np.testing.assert_array_equal(got, ds.images(idx[shard_of != 1]))   # the map still holds
    again, bad = ds.read(idx, on_bad="skip")              # reported once, skipped from now on
    assert bad == [] and len(again) == len(got)

    p2 = os.path.join(d, "shard_00002.npy")
    raw = open(p2, "rb").read()
    open(p2, "wb").write(raw[:-1])
    with pytest.raises(DataError, match=r"shard_00002.npy: file size changed to \d+ bytes"):
        ds.read([int(np.flatnonzero(shard_of == 2)[0])])
    # same size, another header (a rewrite with other contents)
    hdr_end = raw.index(b"\n") + 1
    open(p2, "wb").write(raw[:hdr_end - 2].replace(b"False", b"Flase") + raw[hdr_end - 2:])
    with pytest.raises(DataError, match="header changed"):
        ds.read([int(np.flatnonzero(shard_of == 2)[0])])


def test_fingerprint_identifies_the_selection(prepared):
    import hashlib

    ds = ShardDataset(prepared, split="train", abnormal=0)
    # the rule checkpoints have recorded since afire pretrain 1 (resume compares it)
    h = hashlib.sha256(json.dumps(ds.meta, sort_keys=True).encode())
    for r in ds.records:
        h.update(f"\0{r['path']}\0{r['shard']}\0{r['row']}".encode())
    assert ds.fingerprint == "shards:" + h.hexdigest()[:32]
    assert ShardDataset(prepared, split="train", abnormal=0).fingerprint == ds.fingerprint
    assert ShardDataset(prepared, split="train").fingerprint != ds.fingerprint


def test_fortran_order_shards_are_refused(prepared, tmp_path):
    d = copy_prepared(prepared, tmp_path / "f")
    p = os.path.join(d, "shard_00000.npy")
    np.save(p, np.asfortranarray(np.load(p)))
    with pytest.raises(ValueError, match=r"shard_00000.npy: expected uint8 .*Fortran order"):
        ShardDataset(d)


def test_epoch_order_is_the_documented_permutation():
    want = np.random.Generator(np.random.PCG64(np.random.SeedSequence([4, 9]))).permutation(17)
    np.testing.assert_array_equal(epoch_order(17, 4, 9), want)


def test_a_garbled_shard_header_is_a_value_error(prepared, tmp_path):
    # numpy's header parser raised tokenize.TokenError for an unclosed brace
    d = copy_prepared(prepared, tmp_path / "g")
    p = os.path.join(d, "shard_00001.npy")
    raw = bytearray(open(p, "rb").read())
    end = raw.index(b"}")
    raw[end] = ord("{")
    open(p, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="shard_00001.npy: unreadable or truncated"):
        ShardDataset(d)
