"""End-to-end evaluation on real radiographs (Kermany = the paper's ChildCXR, and NIH),
`pytest -m eval`: the CPU-scale claims of docs/RESULTS.md that hold, with the margins their
seed spread supports.

The protocol is benchmarks/ablation_scale.py's (its own functions are imported), at its CPU
default: the test preset at 64 px (patch 8), batch 16, peak lr 1e-3 (base_lr 1.6e-2: METHOD
§5 scales base_lr by batch/256, and the paper's base_lr at batch 16 barely moves the encoder),
2000 steps on the NORMAL images of 60% of the patients; pre-training seeds 0 and 1, five
random initialisations (seeds 101-105) of the same configuration as the baseline. On the
held-out patients: a 5-fold patient-wise linear probe (`PROBE_RECIPE`, the API's and the CLI's
default), and the anomaly protocol (adapt 100 steps on the pre-training normals; validation
and test = 40% / 60% of the held-out patients) with every score and the blur / image std /
pixel PCA baselines on the same test images. Every run is deterministic, so the numbers are
those of benchmarks/results/ablation_cpu.json (measured there; per seed):

- Kermany probe (pooled out-of-fold AUC): pre-trained 0.935 / 0.929, random 0.885-0.913;
  difference +0.028, two-level bootstrap 95% interval [+0.010, +0.046].
- Kermany anomaly, test AUC: token_knn (the default score, chosen on validation splits,
  not in the paper) 0.885 / 0.856 vs random 0.61-0.83 (+0.169 [+0.076, +0.261]), but BELOW
  blur (0.932): -0.062 [-0.123, -0.007]. inpaint_ratio_z (not in the paper) 0.967 / 0.971,
  above blur +0.037 [+0.014, +0.061]; Eq. 51 (the paper's) 0.129 / 0.149: inverted.
- NIH anomaly, test AUC: token_knn 0.816 / 0.805 vs random 0.79-0.84 (no gain, not
  asserted); restore_z (not in the paper) 0.697 / 0.692 vs random 0.40-0.45 and blur 0.316.

Runs in about 6 minutes on 2 CPU cores.
"""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from afire import AFiRe
from afire.evaluate import PROBE_RECIPE, anomaly, finetune, linear_probe, load_data
from afire.evaluate import metrics as M
from afire.evaluate.anomaly import DEFAULT_SCORE

pytestmark = pytest.mark.eval

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ablation_scale",
                                               ROOT / "benchmarks" / "ablation_scale.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SIZE, STEPS, BATCH, PEAK_LR, ADAPT = 64, 2000, 16, 1e-3, 100
PRETRAIN_SEEDS = (0, 1)
RANDOM_SEEDS = (101, 102, 103, 104, 105)
N_BOOT = 1000


def data_dir(name: str) -> Path:
    # as tests/conftest.py: $AFIRE_DATA, else ../shared/data beside the repository
    root = Path(os.environ.get("AFIRE_DATA", ROOT.parent / "shared" / "data"))
    d = root / name
    if not (d / "labels.csv").exists():
        pytest.skip(f"real data not found at {d} (set AFIRE_DATA to the shared data folder)")
    return d


def assert_not_pretrained_on(part, pre):
    """No scored image is a pre-training image, by file path or by pixels."""
    assert len(part) and not set(part.paths) & set(pre.paths)
    pre_pixels = {x.tobytes() for x in pre.images}
    assert not any(x.tobytes() in pre_pixels for x in part.images)


def run(name: str) -> dict:
    """Pre-train the seeds, initialise the random models, evaluate every one of them."""
    d = load_data(data_dir(name), SIZE)
    pre, ev, val, test = bench.split(d)
    normals = pre.images[pre.abnormal == 0]
    models = {}
    for seed in PRETRAIN_SEEDS:
        cfg, _ = bench.make_config("test", SIZE, BATCH, STEPS, len(normals), PEAK_LR, seed)
        models[f"afire{seed}"], log = bench.pretrain(cfg, normals, STEPS, "cpu", seed)
        print(f"\n{name}: pre-training seed {seed} on {len(normals)} normals, "
              f"{log['seconds']:.0f} s, final loss {log['loss_last5pct']:.3f}")
    for seed in RANDOM_SEEDS:
        cfg, spe = bench.make_config("test", SIZE, BATCH, STEPS, len(normals), PEAK_LR, seed)
        models[f"random{seed}"] = AFiRe(cfg, steps_per_epoch=spe)
    adapt_normals = pre.subset(np.flatnonzero(pre.abnormal == 0))
    out = {"pre": pre, "ev": ev, "probe": {}, "anomaly": {}}
    for k, m in models.items():
        out["probe"][k] = linear_probe(m, ev, **PROBE_RECIPE, figures=False, progress=False)
        out["anomaly"][k] = anomaly(m, adapt_normals, test_data=test, val_data=val,
                                    adapt_steps=ADAPT, batch=BATCH, figures=False,
                                    progress=False, say=lambda t: None)
    out["model"] = models[f"afire{PRETRAIN_SEEDS[0]}"]
    return out


def scores(res: dict, kind: str, who: str) -> np.ndarray:
    """Test scores [models, images] of the pre-trained ("afire") or random models."""
    key = "test_log_score" if kind == "eq51" else f"test_{kind}"
    return np.stack([r["arrays"][key] for k, r in res["anomaly"].items() if k.startswith(who)])


def auc_of(res: dict, kind: str, who: str) -> list[float]:
    return [r["metrics"]["scores"][kind]["auc"] for k, r in res["anomaly"].items()
            if k.startswith(who)]


@pytest.fixture(scope="module")
def kermany():
    return run("kermany_native")


@pytest.fixture(scope="module")
def nih():
    return run("nih14_dev")


def test_pretraining_beats_random_init_on_linear_probe(kermany):
    """>= 2 pre-training seeds, 5 random inits, the difference's interval excludes 0."""
    p = kermany["probe"]
    rows = {k: r["arrays"]["rows"] for k, r in p.items()}
    first = next(iter(rows.values()))
    assert all(np.array_equal(v, first) for v in rows.values())      # the same folds
    y = p["afire0"]["arrays"]["targets"][:, 0]
    logits = {k: r["arrays"]["logits"][:, 0] for k, r in p.items()}
    a = np.stack([v for k, v in logits.items() if k.startswith("afire")])
    b = np.stack([v for k, v in logits.items() if k.startswith("random")])
    ci = M.seed_bootstrap_ci(y, a, b, n=N_BOOT)
    auc = {k: r["metrics"]["pooled_out_of_fold"]["mean_auc"] for k, r in p.items()}
    print("linear probe, pooled AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in auc.items())
          + f"; pre-trained minus random {ci['value']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]")
    assert p["afire0"]["settings"]["folds"] == PROBE_RECIPE["folds"]
    assert_not_pretrained_on(p["afire0"]["pool"].subset(p["afire0"]["arrays"]["rows"]),
                             kermany["pre"])
    assert ci["value"] > 0.01 and ci["low"] > 0, ci
    assert min(v for k, v in auc.items() if k.startswith("afire")) > \
        np.mean([v for k, v in auc.items() if k.startswith("random")])


def test_anomaly_on_kermany_held_out_patients(kermany):
    r0 = kermany["anomaly"]["afire0"]
    for part in ("test", "val"):
        assert_not_pretrained_on(r0["sets"][part], kermany["pre"])
    assert (r0["sets"]["adapt"].abnormal == 0).all() and r0["adaptation"]["steps"] == ADAPT
    m = r0["metrics"]
    assert m["score"] == DEFAULT_SCORE and m["squid"]["acc"] >= m["val_threshold"]["acc"]
    y = r0["arrays"]["test_abnormal"]
    blur = r0["arrays"]["test_baseline_blur"]
    for kind in m["scores"]:
        ci_r = M.seed_bootstrap_ci(y, scores(kermany, kind, "afire"),
                                   scores(kermany, kind, "random"), n=N_BOOT)
        ci_b = M.seed_bootstrap_ci(y, scores(kermany, kind, "afire"), blur, n=N_BOOT)
        print(f"kermany {kind:16s} test AUC {np.round(auc_of(kermany, kind, 'afire'), 3)} "
              f"random {np.round(auc_of(kermany, kind, 'random'), 3)}; minus random "
              f"{ci_r['value']:+.3f} [{ci_r['low']:+.3f}, {ci_r['high']:+.3f}], minus blur "
              f"{ci_b['value']:+.3f} [{ci_b['low']:+.3f}, {ci_b['high']:+.3f}]")
    print("baselines: " + ", ".join(f"{k} {v['auc']:.3f}" for k, v in m["baselines"].items()))
    # the confound: blur alone separates Kermany; the paper's score is inverted
    assert m["baselines"]["blur"]["auc"] > 0.9
    assert max(auc_of(kermany, "eq51", "afire")) < 0.3
    # the default score (token_knn): >= 0.85 on average, far above random init ...
    knn = auc_of(kermany, DEFAULT_SCORE, "afire")
    assert np.mean(knn) >= 0.85 and min(knn) > 0.83, knn
    ci = M.seed_bootstrap_ci(y, scores(kermany, DEFAULT_SCORE, "afire"),
                             scores(kermany, DEFAULT_SCORE, "random"), n=N_BOOT)
    assert ci["low"] > 0.03, ci
    # ... but not above blur; the in-painting ratio is, on these images
    ratio = auc_of(kermany, "inpaint_ratio_z", "afire")
    assert min(ratio) > 0.95, ratio
    ci = M.seed_bootstrap_ci(y, scores(kermany, "inpaint_ratio_z", "afire"), blur, n=N_BOOT)
    assert ci["low"] > 0, ci
    # and not by reading sharpness alone: within blur quintiles it still separates
    for s in scores(kermany, "inpaint_ratio_z", "afire"):
        assert M.matched_auc(y, s, blur) > 0.85


def test_anomaly_on_nih(nih):
    """NIH (adult, less confounded by sharpness): restoration-error z-scores beat random init
    and blur; the default token_knn beats blur but NOT random init (printed)."""
    r0 = nih["anomaly"]["afire0"]
    y = r0["arrays"]["test_abnormal"]
    blur = r0["arrays"]["test_baseline_blur"]
    for kind in r0["metrics"]["scores"]:
        ci_r = M.seed_bootstrap_ci(y, scores(nih, kind, "afire"), scores(nih, kind, "random"),
                                   n=N_BOOT)
        print(f"nih {kind:16s} test AUC {np.round(auc_of(nih, kind, 'afire'), 3)} random "
              f"{np.round(auc_of(nih, kind, 'random'), 3)}; minus random {ci_r['value']:+.3f} "
              f"[{ci_r['low']:+.3f}, {ci_r['high']:+.3f}]")
    print("baselines: " + ", ".join(f"{k} {v['auc']:.3f}"
                                    for k, v in r0["metrics"]["baselines"].items()))
    assert r0["metrics"]["baselines"]["blur"]["auc"] < 0.5
    for kind in ("restore_z", "inpaint_z"):
        ci = M.seed_bootstrap_ci(y, scores(nih, kind, "afire"), scores(nih, kind, "random"),
                                 n=N_BOOT)
        assert ci["low"] > 0.05, (kind, ci)
        ci = M.seed_bootstrap_ci(y, scores(nih, kind, "afire"), blur, n=N_BOOT)
        assert ci["low"] > 0.05, (kind, ci)
    assert min(auc_of(nih, DEFAULT_SCORE, "afire")) > 0.75
    ci = M.seed_bootstrap_ci(y, scores(nih, DEFAULT_SCORE, "afire"), blur, n=N_BOOT)
    assert ci["low"] > 0.2, ci


def test_multilabel_finetuning_on_nih_findings(kermany, tmp_path):
    """Transfer of the Kermany-pre-trained encoder to adult NIH radiographs: fine-tuning on
    the 14 finding labels at 10% and 100% of the training labels, 3 patient-wise folds.
    A finding with a single label value in a test fold is NaN, warned about and left out of
    the mean. Printed, not asserted: pre-trained vs random-init mean AUC (517 images, mostly
    'Pneumonia' + co-findings: too few for a meaningful multi-label comparison)."""
    from afire.evaluate.common import random_init

    model = kermany["model"]
    nih = load_data(data_dir("nih14_dev"), SIZE)
    res = {}
    for name, m in (("afire", model), ("random", random_init(model, seed=1))):
        with pytest.warns(RuntimeWarning, match="only one label value"):
            r = finetune(m, nih, target="findings", label_fractions=(0.1, 1.0), folds=3,
                         epochs=15, batch=32, lr=1e-3, patience=5, out=tmp_path / name,
                         figures=name == "afire", gradcam=4)
        res[name] = r
        print(f"fine-tuning {name}: " + ", ".join(
            f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in r["metrics"].items()))
    r = res["afire"]
    assert r["settings"]["classes"] == nih.label_names and len(nih.label_names) == 14
    small, full = r["runs"]
    for f_small, f_full in zip(small["folds"], full["folds"]):
        assert f_small["n_test"] == f_full["n_test"]
        assert 0 < f_small["n_train"] < 0.2 * f_full["n_train"]
        excluded = set(f_full["excluded_classes"])
        assert excluded and "Pneumonia" not in excluded
        for c, auc in f_full["per_class_auc"].items():
            assert np.isnan(auc) == (c in excluded)
        assert np.isfinite(f_full["mean_auc"])
    saved = json.loads((tmp_path / "afire" / "results.json").read_text())
    assert saved["counts"]["all"]["images"] == len(nih)


def test_readme_workflow_on_one_folder_never_tests_on_pretraining_images(tmp_path):
    """The README's commands on one folder of real radiographs: afire prepare -> afire
    pretrain --data DIR -> afire evaluate linear-probe / anomaly --data DIR. No scored
    image is a pre-training image, by manifest path or by pixels (read back from the raw
    manifest and shards, not through afire.evaluate)."""
    from afire.cli import main

    prep, run_dir = tmp_path / "kermany-64", tmp_path / "run"
    assert main(["prepare", str(data_dir("kermany_native")), str(prep), "--format", "shared",
                 "--size", str(SIZE), "--quiet", "--workers", "2"]) == 0
    assert main(["pretrain", "--data", str(prep), "--preset", "test",
                 "--batch-size", str(BATCH), "--max-steps", "30", "--out", str(run_dir),
                 "--no-report", "--quiet", f"img_size={SIZE}"]) == 0
    rows = [json.loads(line) for line in (prep / "manifest.jsonl").read_text().splitlines()]
    shards = {k: np.load(prep / f"shard_{k:05d}.npy") for k in {r["shard"] for r in rows}}
    pre = [r for r in rows if r["split"] == "train" and r["abnormal"] == 0]
    pre_paths = {r["path"] for r in pre}
    pre_pixels = {shards[r["shard"]][r["row"]].tobytes() for r in pre}
    pixels = {r["path"]: shards[r["shard"]][r["row"]].tobytes() for r in rows}
    ck = str(run_dir / "last.safetensors")
    for proto, extra, key in (("linear-probe", [], "paths"),
                              ("anomaly", ["--adapt-steps", "20", "--batch", str(BATCH)],
                               "test_paths")):
        out = tmp_path / proto
        assert main(["evaluate", proto, "--checkpoint", ck, "--data", str(prep), "--out",
                     str(out), "--no-figures"] + extra) == 0
        res = json.loads((out / "results.json").read_text())
        scored = np.load(out / "arrays.npz")[key].tolist()
        assert res["data"]["pretrain"]["status"] == "identified"
        assert res["data"]["pretrain"]["images"] == len(pre)
        assert len(scored) > 50 and not set(scored) & pre_paths
        assert not any(pixels[p] in pre_pixels for p in scored)
        if proto == "anomaly":
            assert res["settings"]["score"] == DEFAULT_SCORE
            assert set(res["metrics"]["baselines"]) == {"blur", "image_std", "pixel_pca"}
        print(f"README workflow, {proto}: {len(scored)} scored images from split(s) "
              f"{res['data']['pool']['splits_used']}, none of the {len(pre)} pre-training "
              "images")
