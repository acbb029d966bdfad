"""afire.evaluate protocols end to end on tiny phantom data (seconds): data input, patient-wise
splits, results.json, the CLI. Protocols that need the C downstream kernels skip with a
visible reason on a build without them."""
import csv
import json
import math

import numpy as np
import pytest
from _util import small_cfg
from PIL import Image

from afire import AFiRe, _C
from afire.cli import main
from afire.data import phantom_dataset
from afire.evaluate import anomaly, finetune, linear_probe, load_data, segment
from afire.evaluate.anomaly import feature_distance
from afire.evaluate.common import (group_folds, group_holdout, json_safe, random_init,
                                   subsample)

HAS_DOWNSTREAM = hasattr(getattr(_C, "downstream", None), "linear_probe_fit")
needs_c = pytest.mark.skipif(not HAS_DOWNSTREAM,
                             reason="afire._C.downstream kernels not in this build")


@pytest.fixture(scope="module")
def model():
    return AFiRe(small_cfg(batch_size=8), steps_per_epoch=5)


@pytest.fixture(scope="module")
def phantom():
    # groups of 2 images: a patient-wise split must keep pairs together
    d = phantom_dataset(64, size=32, seed=3, p_abnormal=0.5)
    d["groups"] = np.repeat(np.arange(32), 2).astype(str)
    return d


# ---------------------------------------------------------------- data and splits
def test_group_folds_and_holdout_keep_groups_together():
    groups = np.repeat(np.arange(23), 3).astype(str)
    f = group_folds(groups, 5, seed=1)
    for g in np.unique(groups):
        assert len(np.unique(f[groups == g])) == 1
    per_fold = [len(np.unique(groups[f == k])) for k in range(5)]
    assert sorted(per_fold) == [4, 4, 5, 5, 5]
    h = group_holdout(groups, 0.3, seed=1)
    assert len(np.unique(groups[h])) == 7
    assert not set(groups[h]) & set(groups[~h])
    with pytest.raises(ValueError, match="folds"):
        group_folds(groups[:6], 5)
    s = subsample(np.arange(100), 0.1, seed=0)
    assert len(s) == 10 and len(set(s)) == 10
    assert len(subsample(np.arange(5), 0.01, seed=0)) == 2   # never below 2 images


def test_load_data_arrays_and_resize(phantom):
    d = load_data(phantom)
    assert d.images.shape == (64, 32, 32)
    np.testing.assert_array_equal(d.abnormal, phantom["labels"] > 0)
    assert d.masks is not None and d.organ_labels is not None
    d16 = load_data(phantom, 16)
    assert d16.images.shape == (64, 16, 16) and d16.masks.shape == (64, 16, 16)
    assert set(np.unique(d16.masks)) <= {0, 1}
    y, names = d.targets("abnormal")
    assert names == ["abnormal"] and y.shape == (64, 1)
    with pytest.raises(ValueError, match="multi-label"):
        d.targets("findings")
    with pytest.raises(ValueError, match="images"):
        load_data({"labels": [0]})
    with pytest.raises(TypeError):
        load_data(42)


def test_load_data_shared_layout(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        name = f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(tmp_path / name)
        rows.append({"filename": name, "label": "pneumonia" if i % 2 else "normal",
                     "abnormal": i % 2, "group_id": f"p{i // 2}", "Effusion": "" if i == 0 else ("1" if i == 3 else "0")})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    d = load_data(tmp_path, 16)
    assert d.images.shape == (6, 16, 16) and d.images.dtype == np.uint8
    np.testing.assert_array_equal(d.abnormal, [0, 1, 0, 1, 0, 1])
    assert list(d.groups) == ["p0", "p0", "p1", "p1", "p2", "p2"]
    y, names = d.targets(["Effusion"])
    assert np.isnan(y[0, 0]) and y[3, 0] == 1 and y[1, 0] == 0
    with pytest.raises(ValueError, match="neither"):
        load_data(tmp_path / "nothing")


def test_json_safe_nan_is_null():
    s = json.dumps(json_safe({"a": float("nan"), "b": np.float32(2), "c": np.arange(2)}))
    assert json.loads(s) == {"a": None, "b": 2.0, "c": [0, 1]}


# ---------------------------------------------------------------- anomaly (no C downstream)
def test_anomaly_protocol(model, phantom, tmp_path):
    before = {k: v.copy() for k, v in model.state_tensors().items()}
    r = anomaly(model, phantom, adapt_steps=4, batch=8, out=tmp_path, seed=0)
    # the pre-trained model is left alone; the adapted copy moved
    for k, v in model.state_tensors().items():
        np.testing.assert_array_equal(v, before[k])
    moved = r["model"].state_tensors()["student.encoder.blocks.0.attn.qkv.weight"]
    assert not np.array_equal(moved, before["student.encoder.blocks.0.attn.qkv.weight"])
    assert r["adaptation"]["steps"] == 4
    m = r["metrics"]
    assert 0.0 <= m["auc"] <= 1.0
    assert m["squid"]["label"] == "SQUID protocol (threshold chosen on test)"
    assert "validation" in m["val_threshold"]["label"]
    # the SQUID threshold is the best accuracy ON TEST: the validation one cannot beat it
    assert m["squid"]["acc"] >= m["val_threshold"]["acc"]
    c = r["counts"]
    assert c["test"]["images"] + c["val"]["images"] + c["adapt_normal"] + \
        c["adapt_abnormal_unused"] == 64
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"] == "anomaly" and saved["metrics"]["auc"] == pytest.approx(m["auc"])
    arr = np.load(tmp_path / "arrays.npz")
    assert len(arr["test_log_score"]) == c["test"]["images"]
    assert np.isfinite(arr["test_log_score"]).all()
    fd = m["feature_distance"]
    assert "not in the paper" in fd["label"] and 0.0 <= fd["auc"] <= 1.0
    assert len(arr["test_feature_distance"]) == c["test"]["images"]
    assert (arr["test_feature_distance"] >= 0).all()
    for f in ("roc.png", "heatmaps.png", "restorations.png"):
        if r["figures"]:
            assert (tmp_path / f).stat().st_size > 1000


def test_feature_distance_is_a_shrunk_mahalanobis_distance():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(200, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + 4.0
    x = rng.normal(size=(7, 5)) * 3.0
    mu, cov = normals.mean(0), np.cov(normals.T)
    want = [(v - mu) @ np.linalg.inv(cov) @ (v - mu) for v in x]
    np.testing.assert_allclose(feature_distance(normals, x, shrinkage=0.0), want, rtol=1e-9)
    # full shrinkage: Euclidean distance over the mean variance
    np.testing.assert_allclose(feature_distance(normals, x, shrinkage=1.0),
                               ((x - mu) ** 2).sum(1) / np.trace(cov) * 5, rtol=1e-9)
    # more dimensions than normals: still finite thanks to the shrinkage
    d = feature_distance(rng.normal(size=(4, 32)), rng.normal(size=(3, 32)))
    assert np.isfinite(d).all() and (d > 0).all()
    # a step along a low-variance direction is farther than the same step along a wide one
    far = feature_distance(normals, np.array([mu + [0, 0, 1, 0, 0], mu + [0, 0, 0, 1, 0]]))
    assert far[0] > far[1]
    with pytest.raises(ValueError, match="at least 2"):
        feature_distance(normals[:1], x)


def test_anomaly_scores_are_eq51(model, phantom):
    """With no adaptation the protocol's scores are the model's own Eq. 51 log scores."""
    r = anomaly(model, phantom, adapt_steps=0, test_data={"images": phantom["images"][:10],
                "labels": np.r_[np.zeros(5), np.ones(5)].astype(int)})
    np.testing.assert_allclose(r["arrays"]["test_log_score"],
                               model.anomaly_log_score(phantom["images"][:10]))
    assert "val_threshold" not in r["metrics"]


def test_random_init_differs(model):
    r = random_init(model, seed=5)
    assert r.cfg.seed == 5
    a = r.state_tensors()["teacher.encoder.blocks.0.attn.qkv.weight"]
    assert not np.array_equal(a, model.state_tensors()["teacher.encoder.blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------- protocols on the C kernels
@needs_c
def test_linear_probe_protocol(model, phantom, tmp_path):
    r = linear_probe(model, phantom, folds=4, epochs=20, out=tmp_path, figures=False)
    assert len(r["folds"]) == 4
    assert sum(f["n_test"] for f in r["folds"]) == 64          # every image tested once
    assert r["metrics"]["mean_auc"]["n"] == 4
    pooled = r["metrics"]["pooled_out_of_fold"]
    assert 0 <= pooled["mean_auc"] <= 1 and 0 <= pooled["acc"] <= 1
    assert r["arrays"]["logits"].shape == (64, 1)
    assert json.loads((tmp_path / "results.json").read_text())["protocol"] == "linear_probe"


@needs_c
def test_linear_probe_separates_an_easy_signal(model):
    """Images whose brightness encodes the label: any encoder + probe must find it."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    x = np.clip(rng.normal(100 + 60 * y[:, None, None], 10, (80, 32, 32)), 0, 255).astype(np.uint8)
    r = linear_probe(model, {"images": x, "labels": y}, folds=1, test_fraction=0.3,
                     epochs=50)
    assert r["metrics"]["mean_auc"] > 0.95


@needs_c
def test_finetune_protocol(model, phantom, tmp_path):
    r = finetune(model, phantom, folds=2, label_fractions=(0.5, 1.0), epochs=2, batch=8,
                 patience=1, out=tmp_path, gradcam=2)
    assert [run["label_fraction"] for run in r["runs"]] == [0.5, 1.0]
    f0 = r["runs"][0]["folds"][0]
    assert f0["n_train"] < r["runs"][1]["folds"][0]["n_train"]
    assert 1 <= f0["epochs_run"] <= 2
    for run in r["runs"]:
        for f in run["folds"]:
            assert math.isnan(f["mean_auc"]) or 0 <= f["mean_auc"] <= 1
    assert (tmp_path / "results.json").exists()


@needs_c
def test_segment_protocol(model, phantom, tmp_path):
    r = segment(model, phantom, mask="lung", epochs=2, batch=8, out=tmp_path)
    f = r["runs"][0]["folds"][0]
    assert 0 <= f["dice"] <= 1 and f["n_positive"] == f["n"]     # every phantom has lungs
    assert (tmp_path / "results.json").exists()
    with pytest.raises(ValueError, match="organ"):
        segment(model, phantom, mask="spleen", epochs=1)


# ---------------------------------------------------------------- CLI
def test_cli_evaluate_anomaly(model, tmp_path, capsys):
    ck = tmp_path / "ck.safetensors"
    model.save(ck)
    assert main(["prepare", "150", str(tmp_path / "ph"), "--format", "phantom", "--size", "32",
                 "--p-abnormal", "0.5", "--quiet", "--workers", "1"]) == 0
    out = tmp_path / "res"
    assert main(["evaluate", "anomaly", "--checkpoint", str(ck), "--data", str(tmp_path / "ph"),
                 "--adapt-steps", "2", "--batch", "8", "--out", str(out), "--no-figures"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["adapt_steps"] == 2 and res["counts"]["test"]["images"] > 0
    assert "SQUID" in capsys.readouterr().out
    assert main(["evaluate", "anomaly", "--checkpoint", str(tmp_path / "missing"),
                 "--data", str(tmp_path / "ph")]) == 2
    assert main(["evaluate", "finetune", "--checkpoint", str(ck), "--data",
                 str(tmp_path / "ph"), "--label-fraction", "0"]) == 2
    assert main(["evaluate", "linear-probe", "--checkpoint", str(ck), "--data",
                 str(tmp_path / "ph"), "--device", "gpu"]) == 2
    assert "device must be" in capsys.readouterr().err


def test_cli_evaluate_on_a_missing_gpu_is_a_clear_error(model, tmp_path, capsys):
    from afire.device import cuda_available
    if cuda_available():
        pytest.skip("a GPU is visible here: the no-GPU error path cannot be taken")
    ck = tmp_path / "ck.safetensors"
    model.save(ck)
    assert main(["evaluate", "linear-probe", "--checkpoint", str(ck), "--data",
                 str(tmp_path), "--device", "cuda"]) == 2
    assert "device='cuda' was requested" in capsys.readouterr().err
