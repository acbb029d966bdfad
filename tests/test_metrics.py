"""afire.evaluate.metrics: hand-computed cases (always run) and scikit-learn agreement
(only where scikit-learn is installed)."""
import warnings

import numpy as np
import pytest

from afire.evaluate import metrics as M


# ---------------------------------------------------------------- hand-computed cases
def test_auc_hand_cases():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.roc_auc([0, 1], [0.0, 1.0]) == 1.0
    assert M.roc_auc([0, 1], [1.0, 0.0]) == 0.0
    # all scores tied: every pair is a tie -> 0.5
    assert M.roc_auc([0, 1, 1, 0, 1], [3, 3, 3, 3, 3]) == 0.5
    # pairs (pos, neg): (2,1)>, (2,2)tie, (3,1)>, (3,2)> -> (3 + 0.5) / 4
    assert M.roc_auc([0, 1, 0, 1], [1, 2, 2, 3]) == pytest.approx(3.5 / 4)


def test_auc_brute_force_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 5, 60).astype(float)        # many ties
    pos, neg = s[y == 1], s[y == 0]
    want = ((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (len(pos) * len(neg))
    assert M.roc_auc(y, s) == pytest.approx(want, abs=1e-12)


def test_average_ranks():
    np.testing.assert_array_equal(M.average_ranks([10, 20, 10, 30, 20, 20]),
                                  [1.5, 4.0, 1.5, 6.0, 4.0, 4.0])


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only 0 and 1"):
        M.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="values"):
        M.roc_auc([0, 1, 1], [0.1, 0.2])


def test_roc_curve_hand_case():
    fpr, tpr, thr = M.roc_curve([0, 1, 0, 1], [1, 2, 2, 3])
    np.testing.assert_array_equal(thr, [np.inf, 3, 2, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    # trapezoid area under the curve equals the rank AUC (ties = diagonal segments)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc([0, 1, 0, 1], [1, 2, 2, 3]))


def test_threshold_metrics_hand_case():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 1, 0, 1, 0, 0, 0, 0]    # tp 2, fn 2, fp 1, tn 3
    assert M.confusion(y, p) == {"tp": 2, "fp": 1, "tn": 3, "fn": 2}
    assert M.accuracy(y, p) == pytest.approx(5 / 8)
    assert M.precision(y, p) == pytest.approx(2 / 3)
    assert M.recall(y, p) == pytest.approx(2 / 4)
    assert M.specificity(y, p) == pytest.approx(3 / 4)
    assert M.f1(y, p) == pytest.approx(4 / 7)
    # undefined ratios are NaN, not 0
    assert np.isnan(M.precision([0, 1], [0, 0]))
    assert np.isnan(M.f1([0, 0], [0, 0]))


def test_best_accuracy_threshold():
    y = [0, 0, 1, 0, 1, 1]
    s = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]
    thr, acc = M.best_accuracy_threshold(y, s)
    # score >= 0.5 -> 5/6 correct; >= 0.3 -> also 5/6; the higher threshold wins the tie
    assert (thr, acc) == (0.5, pytest.approx(5 / 6))
    assert M.binary_metrics(y, s, thr)["acc"] == pytest.approx(acc)
    # perfectly separable -> accuracy 1
    assert M.best_accuracy_threshold([0, 0, 1], [1, 2, 3]) == (3.0, 1.0)


def test_dice_hand_cases():
    t = np.zeros((3, 4, 4), np.uint8)
    p = np.zeros((3, 4, 4), np.float32)
    t[0, :2, :2] = 1                  # 4 px
    p[0, :2, :3] = 0.9                # 6 px, 4 overlap -> 8/10
    t[1, 0, 0] = 1                    # missed entirely -> 0
    # image 2: both empty -> 1 (SIIM convention)
    np.testing.assert_allclose(M.dice(p, t), [0.8, 0.0, 1.0])
    assert M.dice(p, t, empty=np.nan)[2] != M.dice(p, t, empty=np.nan)[2]   # NaN
    assert M.dice(p[0] > 0.5, t[0])[0] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="shape"):
        M.dice(p[:2], t)


def test_multilabel_nan_class_is_warned_and_excluded():
    y = np.array([[0, 1, 0], [1, 1, np.nan], [0, 1, 1], [1, 1, 0]], float)
    s = np.array([[0.1, 0.5, 0.2], [0.9, 0.6, 0.3], [0.2, 0.7, 0.8], [0.8, 0.1, 0.1]])
    with pytest.warns(RuntimeWarning, match="'Cardio'"):
        r = M.multilabel_auc(y, s, names=["Atel", "Cardio", "Edema"])
    assert np.isnan(r["per_class"]["Cardio"])
    assert r["excluded"] == ["Cardio"]
    assert r["per_class"]["Atel"] == 1.0
    assert r["per_class"]["Edema"] == 1.0          # NaN label row left out
    assert r["evaluated"]["Edema"] == 3
    assert r["mean_auc"] == 1.0                    # not (1 + 0 + 1) / 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = M.multilabel_auc(y[:, :1], s[:, :1])
    assert r["mean_auc"] == 1.0
    with pytest.warns(RuntimeWarning):
        assert np.isnan(M.multilabel_auc(np.ones((3, 1)), s[:3, :1])["mean_auc"])


def test_sigmoid_is_stable():
    np.testing.assert_allclose(M.sigmoid([-1000.0, 0.0, 1000.0]), [0.0, 0.5, 1.0])


# ---------------------------------------------------------------- scikit-learn agreement
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn(seed, tied):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 200
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + 0.7 * y
    if tied:
        s = np.round(s * 2) / 2
    assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = M.roc_curve(y, s)
    f2, t2, th2 = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])
    thr0, _ = M.best_accuracy_threshold(y, s)
    pred = s >= thr0
    assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert M.f1(y, pred) == pytest.approx(skm.f1_score(y, pred))
    assert M.precision(y, pred) == pytest.approx(skm.precision_score(y, pred))
    assert M.recall(y, pred) == pytest.approx(skm.recall_score(y, pred))
    # best accuracy over every threshold really is the maximum
    accs = [skm.accuracy_score(y, s >= t) for t in np.unique(s)]
    assert M.best_accuracy_threshold(y, s)[1] == pytest.approx(max(accs))


def test_multilabel_against_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (80, 4)).astype(float)
    s = rng.normal(size=(80, 4)) + y
    r = M.multilabel_auc(y, s)
    assert r["mean_auc"] == pytest.approx(skm.roc_auc_score(y, s, average="macro"))
    want = skm.roc_auc_score(y, s, average=None)
    np.testing.assert_allclose(list(r["per_class"].values()), want)


def test_bootstrap_ci():
    from afire.evaluate.metrics import bootstrap_ci, roc_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1.0, 200)
    r = bootstrap_ci(y, s, n=300, seed=1)
    assert r["value"] == roc_auc(y, s) and r["low"] < r["value"] < r["high"]
    assert r["n"] == 300 and r["level"] == 0.95
    assert bootstrap_ci(y, s, n=300, seed=1) == r                   # seeded
    # an independent computation of the same resamples
    g = np.random.default_rng(1)
    draws = [roc_auc(y[i], s[i]) for i in (g.integers(0, 200, 200) for _ in range(300))]
    assert (r["low"], r["high"]) == tuple(np.percentile(draws, [2.5, 97.5]))
    narrow = bootstrap_ci(y, s, n=300, seed=1, level=0.5)
    assert r["low"] < narrow["low"] < narrow["high"] < r["high"]
    # paired: identical scores differ by exactly 0; a better model's difference is > 0
    same = bootstrap_ci(y, s, other_score=s, n=50)
    assert same["value"] == same["low"] == same["high"] == 0.0
    worse = s + rng.normal(0, 3.0, 200)
    diff = bootstrap_ci(y, s, other_score=worse, n=300)
    assert diff["value"] == roc_auc(y, s) - roc_auc(y, worse) and diff["low"] > 0
    assert bootstrap_ci([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2], n=200)["low"] == 1.0
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_ci([1, 1], [0.3, 0.4], n=10)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(y, s, level=1.0)
