"""The statistics behind every pre-trained vs random-init claim (afire.evaluate.metrics):
AUCs of many models on the same images, the two-level (images x seeds) bootstrap of their
difference, the AUC within strata of a confound (blur) and the rank correlation."""
import numpy as np
import pytest

from afire.evaluate import metrics as M

rng = np.random.default_rng(0)


def brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return ((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (len(pos) * len(neg))


def test_auc_rows_is_the_auc_of_each_row():
    y = rng.integers(0, 2, 40)
    s = np.round(rng.normal(size=(3, 40)), 1)         # ties included
    np.testing.assert_allclose(M.auc_rows(y, s), [brute_auc(y, r) for r in s])
    with pytest.raises(ValueError):
        M.auc_rows(y, s[:, :10])


def test_seed_bootstrap_interval():
    y = np.r_[np.zeros(60), np.ones(60)].astype(int)
    good = y + rng.normal(0, 0.7, (3, 120))               # three "pre-trained" seeds
    bad = y + rng.normal(0, 3.0, (5, 120))                # five "random" seeds
    ci = M.seed_bootstrap_ci(y, good, bad, n=300)
    assert ci["value"] == pytest.approx(M.auc_rows(y, good).mean() - M.auc_rows(y, bad).mean())
    assert ci["low"] <= ci["value"] <= ci["high"] and ci["excludes_zero"] and ci["low"] > 0
    same = M.seed_bootstrap_ci(y, bad[:2], bad[2:4], n=300)
    assert not same["excludes_zero"]
    # the seed level counts: a lone seed far from the others widens the interval
    spread = np.concatenate([good[:2], y[None] + rng.normal(0, 3.0, (1, 120))])
    wide = M.seed_bootstrap_ci(y, spread, bad, n=300)
    assert wide["high"] - wide["low"] > ci["high"] - ci["low"]
    # one baseline row against seeds; paired seeds use one draw for both sides
    assert M.seed_bootstrap_ci(y, good, good[:1] * 0 + y, n=50)["value"] <= 0
    assert M.seed_bootstrap_ci(y, good, good, n=50, paired_seeds=True)["high"] == 0


def test_matched_auc_ignores_what_the_confound_explains():
    n = 400
    blur = rng.normal(size=n)
    y = (blur + rng.normal(0, 0.3, n) > 0).astype(int)   # the label follows blur
    assert M.roc_auc(y, blur) > 0.9
    assert abs(M.matched_auc(y, blur, blur, bins=20) - 0.5) < 0.15
    signal = y + rng.normal(0, 0.5, n)                     # a score with its own information
    assert M.matched_auc(y, signal, blur) > 0.75
    assert np.isnan(M.matched_auc([0, 0, 1, 1], [1, 2, 3, 4], [0, 1, 2, 3], bins=2))


def test_spearman():
    a = rng.normal(size=50)
    assert M.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert M.spearman(a, -a) == pytest.approx(-1.0)
