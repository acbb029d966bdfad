"""Smoke check on real radiographs: a few hundred steps of the test preset on Kermany normals
lower both objectives, and the Eq. 51 anomaly score is then computed on held-out groups.

What we see (printed, not asserted): at 32-64 px and up to 3000 steps the score ranks
pneumonia BELOW normal (AUC 0.2-0.43). Eq. 51 is a restoration error, and on this data the
pneumonia images have lower contrast (image std alone gives AUC 0.26), so a better
reconstructor ranks them as more normal. The paper's AUC needs its full-scale pre-training;
this test does not pretend otherwise."""
import csv

import numpy as np
import pytest
from PIL import Image

from afire import AFiRe, Config


def roc_auc(scores, labels):
    """Mann-Whitney AUC with ties counted half."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return greater / (len(pos) * len(neg))


def load(root, rows, size):
    return np.stack([np.asarray(Image.open(root / r["filename"]).convert("L")
                                .resize((size, size), Image.BILINEAR)) for r in rows])


@pytest.mark.data
def test_pretraining_on_real_normals_learns_and_separates(kermany_dir):
    rows = list(csv.DictReader(open(kermany_dir / "labels.csv")))
    groups = sorted({r["group_id"] for r in rows})
    rng = np.random.default_rng(0)
    test_groups = set(rng.choice(groups, size=len(groups) // 4, replace=False))
    train = [r for r in rows if r["group_id"] not in test_groups and r["abnormal"] == "0"]
    test = [r for r in rows if r["group_id"] in test_groups]
    size = 32
    x_train = load(kermany_dir, train, size)
    test = [r for r in test if r["abnormal"] == "0"] + \
        [r for r in test if r["abnormal"] == "1"][:120]
    x_test = load(kermany_dir, test, size)
    y_test = np.array([r["abnormal"] == "1" for r in test])

    batch, steps = 16, 300
    cfg = Config.preset_config("test", batch_size=batch, epochs=steps // 25, warmup_epochs=1,
                               base_lr=2e-3, seed=0)
    model = AFiRe(cfg, steps_per_epoch=25)
    log = []
    for step in range(steps):
        idx = rng.choice(len(x_train), size=batch, replace=False)
        log.append(model.train_step(x_train[idx]))
    first = {k: np.mean([r[k] for r in log[25:50]]) for k in ("l_recon", "l_cst")}
    last = {k: np.mean([r[k] for r in log[-25:]]) for k in ("l_recon", "l_cst")}
    print(f"\nfirst {first} last {last}")
    assert last["l_recon"] < 0.8 * first["l_recon"]
    assert last["l_cst"] < first["l_cst"]
    log_score = model.anomaly_log_score(x_test)
    assert np.isfinite(log_score).all()
    auc = roc_auc(log_score, y_test)
    contrast_auc = roc_auc(x_test.reshape(len(x_test), -1).std(1), y_test)
    print(f"anomaly AUC (pneumonia vs held-out normal, test preset 32px, {steps} steps): "
          f"{auc:.3f}; image-std-only AUC {contrast_auc:.3f}")
