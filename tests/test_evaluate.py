"""afire.evaluate protocols end to end on tiny phantom data (seconds): data input, patient-wise
splits, results.json, the CLI. Protocols that need the C downstream kernels skip with a
visible reason on a build without them."""
import csv
import json
import math
import os

import numpy as np
import pytest
from _util import small_cfg
from PIL import Image

from afire import AFiRe, _C
from afire.cli import main
from afire.data import ORGAN_LABELS, phantom_dataset
from afire.evaluate import PROBE_RECIPE, anomaly, finetune, linear_probe, load_data, segment
from afire.evaluate.anomaly import DEFAULT_SCORE, blur_score, feature_distance, pixel_pca_error
from afire.model import ANOMALY_SCORES
from afire.evaluate.linear_probe import fit_predict
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


def _reference_decode(path, size):
    """The shared layout's documented rule, written here with Pillow alone: 8-bit grayscale,
    short side scaled to ``size`` with Lanczos, centre crop."""
    im = Image.open(path).convert("L")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def test_load_data_shared_layout(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    shapes = [(40, 48), (48, 40), (30, 61), (64, 64), (17, 23), (50, 45)]
    for i, (h, w) in enumerate(shapes):
        name = f"im{5 - i}.png"          # file order differs from the CSV order
        img = rng.integers(0, 255, (h, w), dtype=np.uint8)
        img[: h // 2] //= 2              # structure, so a wrong crop shows
        Image.fromarray(img).save(tmp_path / name)
        rows.append({"filename": name, "label": "pneumonia" if i % 2 else "normal",
                     "abnormal": i % 2, "group_id": f"p{i // 2}",
                     "Effusion": "" if i == 0 else ("1" if i == 3 else "0")})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    d = load_data(tmp_path, 16)
    assert d.images.shape == (6, 16, 16) and d.images.dtype == np.uint8
    by_name = {r["filename"]: r for r in rows}
    assert sorted(os.path.basename(p) for p in d.paths) == sorted(by_name)
    y, names = d.targets(["Effusion"])
    for i, p in enumerate(d.paths):
        r = by_name[os.path.basename(p)]
        # pixels: an independent Pillow decode + resize of the very file of this row
        np.testing.assert_array_equal(d.images[i], _reference_decode(p, 16), err_msg=p)
        assert d.abnormal[i] == r["abnormal"] and d.groups[i] == r["group_id"]
        want = np.nan if r["Effusion"] == "" else float(r["Effusion"])
        assert (np.isnan(y[i, 0]) and np.isnan(want)) or y[i, 0] == want
    with pytest.raises(ValueError, match="neither"):
        load_data(tmp_path / "nothing")


def test_json_safe_nan_is_null():
    s = json.dumps(json_safe({"a": float("nan"), "b": np.float32(2), "c": np.arange(2)}))
    assert json.loads(s) == {"a": None, "b": 2.0, "c": [0, 1]}


# ---------------------------------------------------------------- anomaly (no C downstream)
def brute_auc(y, s):
    """AUC by counting every (abnormal, normal) pair; ties count one half."""
    y, s = np.asarray(y).ravel(), np.asarray(s, float).ravel()
    pos, neg = s[y == 1], s[y == 0]
    return ((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (len(pos) * len(neg))


def test_anomaly_protocol(model, phantom, tmp_path):
    before = {k: v.copy() for k, v in model.state_tensors().items()}
    r = anomaly(model, phantom, adapt_steps=4, batch=8, out=tmp_path, split_seed=0)
    # the pre-trained model is left alone; the adapted copy moved
    for k, v in model.state_tensors().items():
        np.testing.assert_array_equal(v, before[k])
    moved = r["model"].state_tensors()["student.encoder.blocks.0.attn.qkv.weight"]
    assert not np.array_equal(moved, before["student.encoder.blocks.0.attn.qkv.weight"])
    assert r["adaptation"]["steps"] == 4
    # content: rows refer to the input as given (in memory: every image, in order)
    x, y, g = phantom["images"], (phantom["labels"] > 0).astype(int), phantom["groups"]
    np.testing.assert_array_equal(r["pool"].images, x)
    a = r["arrays"]
    te, ad, va = a["test_rows"], a["adapt_rows"], a["val_rows"]
    assert len(te) and len(ad) and len(va)
    # the adaptation set is normal-only, and exactly the normals of the adapt groups
    assert (y[ad] == 0).all()
    np.testing.assert_array_equal(r["sets"]["adapt"].images, x[ad])
    rest = np.setdiff1d(np.arange(64), np.r_[te, va])
    np.testing.assert_array_equal(np.sort(ad), rest[y[rest] == 0])
    # adapt / val / test share no image, no patient and no pixels
    for p_, q in ((ad, te), (ad, va), (va, te)):
        assert not set(p_) & set(q) and not set(g[p_]) & set(g[q])
    test_pixels = {v.tobytes() for v in x[te]}
    assert not any(v.tobytes() in test_pixels for v in x[ad])
    # the scores are those of the listed test rows: recomputed from the adapted model
    np.testing.assert_array_equal(a["test_abnormal"], y[te])
    np.testing.assert_allclose(a["test_log_score"], r["model"].anomaly_log_score(x[te]),
                               rtol=1e-6)
    m = r["metrics"]
    assert m["score"] == DEFAULT_SCORE and not m["score_in_paper"]
    ref = r["model"].anomaly_reference(x[ad], kinds=[DEFAULT_SCORE])
    np.testing.assert_allclose(a["test_score"],
                               r["model"].anomaly_scores(x[te], DEFAULT_SCORE, ref)[0], rtol=1e-6)
    assert m["auc"] == pytest.approx(brute_auc(y[te], a["test_score"]))
    assert m["auc_val"] == pytest.approx(
        brute_auc(y[va], r["model"].anomaly_scores(x[va], DEFAULT_SCORE, ref)[0]))
    # every score is reported, labelled, the paper's Eq. 51 among them
    assert set(m["scores"]) == set(ANOMALY_SCORES)
    assert m["scores"]["eq51"]["in_paper"] and "in the paper" in m["scores"]["eq51"]["label"]
    assert m["scores"]["eq51"]["auc"] == pytest.approx(brute_auc(y[te], a["test_log_score"]))
    for k, v in m["scores"].items():
        assert k == "eq51" or ("not in the paper" in v["label"] and not v["in_paper"])
        assert 0 <= v["auc"] <= 1 and 0 <= v["auc_val"] <= 1
        if k != "eq51":
            assert v["auc"] == pytest.approx(brute_auc(y[te], a[f"test_{k}"]))
    # the baselines, on the very same test images
    np.testing.assert_allclose(a["test_baseline_blur"], blur_score(x[te]))
    np.testing.assert_allclose(a["test_baseline_pixel_pca"], pixel_pca_error(x[ad], x[te]))
    for k in ("blur", "image_std", "pixel_pca"):
        b = m["baselines"][k]
        assert "not an afire score" in b["label"]
        assert b["auc"] == pytest.approx(brute_auc(y[te], a[f"test_baseline_{k}"]))
    f_ad = r["model"].encode(x[ad])[:, 1:].mean(axis=1)
    f_te = r["model"].encode(x[te])[:, 1:].mean(axis=1)
    np.testing.assert_allclose(a["test_feature_distance"], feature_distance(f_ad, f_te),
                               rtol=1e-4)
    assert m["squid"]["label"] == "SQUID protocol (threshold chosen on test)"
    assert "validation" in m["val_threshold"]["label"]
    # the SQUID threshold is the best accuracy ON TEST: the validation one cannot beat it
    assert m["squid"]["acc"] >= m["val_threshold"]["acc"]
    c = r["counts"]
    assert c["adapt_normal"] == len(ad) and c["test"]["images"] == len(te)
    assert c["test"]["images"] + c["val"]["images"] + c["adapt_normal"] + \
        c["adapt_abnormal_unused"] == 64
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"] == "anomaly" and saved["metrics"]["auc"] == pytest.approx(m["auc"])
    assert saved["settings"]["score"] == DEFAULT_SCORE
    assert saved["settings"]["reference"]["normal_images"] == len(ad)
    assert saved["settings"]["split_seed"] == 0 and saved["settings"]["init_seed"] is None
    assert saved["encoder"]["weights"] == "checkpoint"
    arr = np.load(tmp_path / "arrays.npz")
    np.testing.assert_array_equal(arr["test_rows"], te)
    np.testing.assert_array_equal(arr["test_log_score"], a["test_log_score"])
    fd = m["feature_distance"]
    assert "not in the paper" in fd["label"]
    assert fd["auc"] == pytest.approx(brute_auc(y[te], a["test_feature_distance"]))
    for f in ("roc.png", "heatmaps.png", "heatmaps_scores.png", "restorations.png"):
        if r["figures"]:
            assert (tmp_path / f).stat().st_size > 1000


def test_feature_distance_is_a_shrunk_mahalanobis_distance():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(200, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + 4.0
    x = rng.normal(size=(7, 5)) * 3.0
    mu, cov = normals.mean(0), np.cov(normals.T)
    want = [(v - mu) @ np.linalg.inv(cov) @ (v - mu) for v in x]
    np.testing.assert_allclose(feature_distance(normals, x, shrinkage=0.0), want, rtol=1e-4)
    # full shrinkage: Euclidean distance over the mean variance
    np.testing.assert_allclose(feature_distance(normals, x, shrinkage=1.0),
                               ((x - mu) ** 2).sum(1) / np.trace(cov) * 5, rtol=1e-4)
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
                "labels": np.r_[np.zeros(5), np.ones(5)].astype(int)}, score="eq51")
    np.testing.assert_allclose(r["arrays"]["test_log_score"],
                               model.anomaly_log_score(phantom["images"][:10]))
    np.testing.assert_array_equal(r["arrays"]["test_score"], r["arrays"]["test_log_score"])
    assert r["metrics"]["score_in_paper"] and r["settings"]["score"] == "eq51"
    assert "val_threshold" not in r["metrics"]


def test_anomaly_score_choice_is_checked(model, phantom):
    test = {"images": phantom["images"][:10], "labels": np.r_[np.zeros(5), np.ones(5)].astype(int)}
    with pytest.raises(ValueError, match="unknown anomaly score"):
        anomaly(model, phantom, adapt_steps=0, test_data=test, score="blur")
    only = {"images": phantom["images"][:12], "labels": np.r_[np.zeros(1), np.ones(11)].astype(int)}
    with pytest.raises(ValueError, match="at least 2"):
        anomaly(model, only, adapt_steps=0, test_data=test, score="token_knn")
    r = anomaly(model, only, adapt_steps=0, test_data=test, score="inpaint", scores=["eq51"])
    assert set(r["metrics"]["scores"]) == {"eq51", "inpaint"}


def test_random_init_differs(model):
    r = random_init(model, seed=5)
    assert r.cfg.seed == 5
    a = r.state_tensors()["teacher.encoder.blocks.0.attn.qkv.weight"]
    assert not np.array_equal(a, model.state_tensors()["teacher.encoder.blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------- protocols on the C kernels
@needs_c
def test_linear_probe_protocol(model, phantom, tmp_path):
    r = linear_probe(model, phantom, folds=4, epochs=20, out=tmp_path, figures=False)
    x, y, g = phantom["images"], (phantom["labels"] > 0).astype(int), phantom["groups"]
    np.testing.assert_array_equal(r["pool"].images, x)
    rows, fold, logits = r["arrays"]["rows"], r["arrays"]["fold"], r["arrays"]["logits"]
    assert sorted(rows.tolist()) == list(range(64))             # every image tested once
    np.testing.assert_array_equal(r["arrays"]["targets"][:, 0], y[rows])
    assert len(r["folds"]) == 4 and r["metrics"]["mean_auc"]["n"] == 4
    # independent reference: the GAP features straight from the encoder, one probe per fold
    # trained on exactly the other folds' rows, must reproduce the scored test logits
    feats = model.encode(x)[:, 1:].mean(axis=1)
    for k in range(4):
        te = rows[fold == k]
        tr = np.setdiff1d(np.arange(64), te)
        assert not set(g[te]) & set(g[tr])                      # patients never shared
        want, _ = fit_predict(feats[tr], y[tr, None].astype(np.float32), feats[te],
                              epochs=20, lr=PROBE_RECIPE["lr"],
                              weight_decay=PROBE_RECIPE["weight_decay"],
                              batch=PROBE_RECIPE["batch"], seed=0)
        np.testing.assert_allclose(logits[fold == k], want, rtol=1e-4, atol=1e-5)
        f = r["folds"][k]
        assert f["n_test"] == len(te) and f["n_train"] == len(tr)
        assert f["mean_auc"] == pytest.approx(brute_auc(y[te], logits[fold == k]))
    pooled = r["metrics"]["pooled_out_of_fold"]
    assert pooled["mean_auc"] == pytest.approx(brute_auc(y[rows], logits))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"] == "linear_probe"
    assert saved["settings"]["folds"] == 4 and saved["settings"]["split_seed"] == 0


@needs_c
def test_linear_probe_of_a_checkpoint_loads_an_inference_model(model, phantom, tmp_path):
    """From a path the probe loads only the encoders (CPU): the same logits as the full
    model, and its random-init baseline is an inference model of the same weights too."""
    trained = AFiRe(small_cfg(batch_size=8), steps_per_epoch=5)
    trained.train_step(phantom["images"][:8])
    trained.save(tmp_path / "c.safetensors")
    kw = dict(folds=4, epochs=5, figures=False, allow_train_split=True)
    by_path = linear_probe(tmp_path / "c.safetensors", phantom, **kw)
    by_model = linear_probe(AFiRe.load(tmp_path / "c.safetensors"), phantom, **kw)
    np.testing.assert_array_equal(by_path["arrays"]["logits"], by_model["arrays"]["logits"])
    loaded = []
    real_load = AFiRe.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AFiRe, "load", classmethod(
            lambda cls, *a, **k: loaded.append(k.get("inference")) or real_load(*a, **k)))
        linear_probe(tmp_path / "c.safetensors", phantom, **kw)
    assert loaded == [True]
    inf = real_load(tmp_path / "c.safetensors", inference=True)
    base = random_init(inf, seed=5)
    assert base.inference
    np.testing.assert_array_equal(base.encode(phantom["images"][:3]),
                                  random_init(trained, seed=5).encode(phantom["images"][:3]))


@needs_c
def test_linear_probe_separates_an_easy_signal(model):
    """Images whose brightness encodes the label: any encoder + probe must find it."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    x = np.clip(rng.normal(100 + 60 * y[:, None, None], 10, (80, 32, 32)), 0, 255).astype(np.uint8)
    r = linear_probe(model, {"images": x, "labels": y}, folds=1, test_fraction=0.3,
                     epochs=50)
    assert r["metrics"]["mean_auc"] > 0.95


def assert_partition(parts, groups, n=None):
    """Row sets pairwise disjoint, by row and by patient (and covering 0..n-1)."""
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert not set(a) & set(b) and not set(groups[a]) & set(groups[b])
    if n is not None:
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))


@needs_c
def test_finetune_protocol(model, phantom, tmp_path):
    r = finetune(model, phantom, folds=2, label_fractions=(0.5, 1.0), epochs=2, batch=8,
                 patience=1, out=tmp_path, gradcam=2)
    y, g = (phantom["labels"] > 0).astype(int), phantom["groups"]
    np.testing.assert_array_equal(r["pool"].images, phantom["images"])
    assert [run["label_fraction"] for run in r["runs"]] == [0.5, 1.0]
    a = r["arrays"]
    assert_partition([a["f1_k0_test"], a["f1_k1_test"]], g, 64)    # each image tested once
    for k in (0, 1):
        tr, va, te = a[f"f1_k{k}_train"], a[f"f1_k{k}_val"], a[f"f1_k{k}_test"]
        assert_partition([tr, va, te], g, 64)
        # a smaller label fraction subsamples the same training rows; val and test stay
        np.testing.assert_array_equal(a[f"f0.5_k{k}_test"], te)
        np.testing.assert_array_equal(a[f"f0.5_k{k}_val"], va)
        assert set(a[f"f0.5_k{k}_train"]) < set(tr)
        for run in r["runs"]:
            f = run["folds"][k]
            key = f"f{run['label_fraction']:g}_k{k}"
            assert f["n_test"] == len(te) and f["n_train"] == len(a[f"{key}_train"])
            assert 1 <= f["epochs_run"] <= 2
            # the reported AUC is that of the stored test logits against the input labels
            if len(set(y[te])) == 2:
                assert f["mean_auc"] == pytest.approx(brute_auc(y[te], a[f"{key}_test_logits"]))
            else:
                assert math.isnan(f["mean_auc"])
    assert (tmp_path / "results.json").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "arrays.npz")["f1_k0_test"], a["f1_k0_test"])


@needs_c
def test_segment_protocol(model, phantom, tmp_path):
    r = segment(model, phantom, mask="lung", epochs=2, batch=8, out=tmp_path)
    g = phantom["groups"]
    a = r["arrays"]
    tr, va, te = a["f1_k0_train"], a["f1_k0_val"], a["f1_k0_test"]
    assert_partition([tr, va, te], g, 64)
    f = r["runs"][0]["folds"][0]
    # truth from the input, independently of the protocol: the phantom's lung label
    lung = phantom["organ_labels"] == ORGAN_LABELS.index("lung")
    assert f["n"] == len(te) == len(a["f1_k0_test_dice"])
    assert f["n_positive"] == int(lung[te].any(axis=(1, 2)).sum()) == len(te)
    assert f["n_train"] == len(tr) and f["n_val"] == len(va)
    assert f["dice"] == pytest.approx(float(a["f1_k0_test_dice"].mean()))
    assert ((a["f1_k0_test_dice"] >= 0) & (a["f1_k0_test_dice"] <= 1)).all()
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
