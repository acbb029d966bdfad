"""afire.pretrain.pretraining_set: which images `afire pretrain` trains on, the fingerprint
its checkpoints record, and where its messages go."""
import dataclasses
import io
import json

import numpy as np
import pytest
from _util import small_cfg

from afire import AFiRe
from afire.data import ShardDataset, phantom_dataset, phantom_records, prepare
from afire.pretrain import DEFAULT_PHANTOMS, pretrain, pretraining_set

S = 32


def prepared(root, n=20, **change):
    recs = [dataclasses.replace(r, **change) for r in phantom_records(n, seed=2, p_abnormal=0.4)]
    prepare("", str(root), fmt="phantom", size=S, workers=1, shard_size=6, progress=False,
            records=recs)
    return str(root)


def test_a_directory_gives_its_normal_train_images(tmp_path):
    root = prepared(tmp_path / "d")
    said = []
    ps = pretraining_set(root, S, say=said.append)
    want = ShardDataset(root, split="train", abnormal=0)
    assert said == [] and isinstance(ps.dataset, ShardDataset)
    assert len(ps) == len(want) > 0 and ps.desc == f"{len(want)} normal images of {root} " \
                                                   "(split train)"
    assert ps.fingerprint == want.fingerprint
    assert ps.provenance() == {"kind": "shards", "root": str((tmp_path / "d").resolve()),
                               "split": "train", "abnormal": 0}
    idx = ps.epoch_order(5, 1)[:7]
    np.testing.assert_array_equal(ps.read(idx)[0], want.images(idx))
    with pytest.raises(ValueError, match="images are 32x32 but the config's img_size is 64"):
        pretraining_set(root, 64)


def test_unlabelled_and_unsplit_directories(tmp_path):
    root = prepared(tmp_path / "u", abnormal=-1, split="test")
    said = []
    ps = pretraining_set(root, S, say=said.append)
    assert len(ps) == 20 and ps.provenance()["split"] is None
    assert ps.provenance()["abnormal"] == -1 and "labels no image normal" in said[0]
    root = prepared(tmp_path / "a", abnormal=1)
    with pytest.raises(ValueError, match="holds no normal image"):
        pretraining_set(root, S)
    with pytest.raises(FileNotFoundError, match="afire prepare"):
        pretraining_set(str(tmp_path / "none"), S)


def test_phantoms_and_arrays():
    ps = pretraining_set(None, S, seed=3)
    assert len(ps) == DEFAULT_PHANTOMS and ps.dataset is None and ps.bad == {}
    assert ps.fingerprint == f"phantom:{DEFAULT_PHANTOMS}:{S}:3"
    assert ps.provenance() == {"kind": "memory"}
    np.testing.assert_array_equal(pretraining_set(10, S, seed=3).read(np.arange(10))[0],
                                  phantom_dataset(10, size=S, seed=3)["images"])
    x = phantom_dataset(6, size=S, seed=0)["images"]
    a, b = pretraining_set(x, S), pretraining_set(x.copy(), S)
    assert a.fingerprint == b.fingerprint != pretraining_set(x[::-1], S).fingerprint
    with pytest.raises(TypeError, match="uint8"):
        pretraining_set(x.astype(np.float32), S)
    with pytest.raises(ValueError, match=r"shape \(N, 16, 16\)"):
        pretraining_set(x, 16)
    with pytest.raises(ValueError, match=">= 1"):
        pretraining_set(0, S)
    with pytest.raises(TypeError, match="data must be"):
        pretraining_set(1.5, S)


def test_checkpoints_record_the_sets_fingerprint_and_selection(tmp_path):
    root = prepared(tmp_path / "d")
    cfg = small_cfg(img_size=S, batch_size=4)
    pretrain(cfg, data=root, out=str(tmp_path / "run"), max_steps=1, report=False,
             progress=False, stream=io.StringIO())
    meta = AFiRe.read_metadata(tmp_path / "run" / "last.safetensors")
    ps = pretraining_set(root, S)
    assert meta["data_fingerprint"] == ps.fingerprint and meta["data_desc"] == ps.desc
    assert json.loads(meta["train_data"]) == ps.provenance()


def test_messages_and_the_bar_go_to_the_given_stream(tmp_path, capsys):
    buf = io.StringIO()
    pretrain(small_cfg(img_size=S, batch_size=4), data=8, out=str(tmp_path / "run"),
             max_steps=2, report=False, stream=buf)
    text = buf.getvalue()
    assert text.startswith("afire pretrain: preset test")
    # the bar: one line per redraw (not a terminal), the last one with the training fields
    assert "\r" not in text and "\npretrain: 100%|" in text and "2/2 [" in text
    assert "loss" in text.splitlines()[-1] and "img/s" in text.splitlines()[-1]
    assert capsys.readouterr().err == ""
