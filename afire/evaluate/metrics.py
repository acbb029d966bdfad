"""Evaluation metrics in plain NumPy (no scikit-learn needed).

Conventions:
- Scores: higher = more positive (more abnormal). A prediction at threshold t is
  ``score >= t``.
- ROC AUC is the Mann-Whitney statistic with average ranks, so tied scores count half.
  An AUC needs both classes: a single-class set raises ValueError in :func:`roc_auc`, and
  gives NaN (with a warning naming the class) in :func:`multilabel_auc`, never a silent 0.
- NaN labels (uncertain / ignored findings) are left out of that class's evaluation.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np


def _binary_inputs(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values but y_score has {s.size}")
    if y.size == 0:
        raise ValueError("empty input")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0 and 1 (filter NaN labels first)")
    if not np.isfinite(s).all():
        raise ValueError("y_score contains NaN or Inf")
    return y.astype(bool), s


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x; tied values share the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    mean_rank = (starts + 1 + ends) / 2.0     # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie)."""
    y, s = _binary_inputs(y_true, y_score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes, got {n_pos} positive and {n_neg} "
                         "negative labels")
    r = average_ranks(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score plus the (0, 0) start.

    thresholds are decreasing; the first is +inf (nothing predicted positive). Every
    distinct score is kept (scikit-learn's ``drop_intermediate=False``).
    """
    y, s = _binary_inputs(y_true, y_score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC curve needs both classes, got {n_pos} positive and {n_neg} "
                         "negative labels")
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    last = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])   # end of each tie run
    tps = np.cumsum(ys)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, ss[last]]


def confusion(y_true, y_pred) -> dict[str, int]:
    """Counts tp, fp, tn, fn of binary predictions."""
    y, _ = _binary_inputs(y_true, np.zeros(np.size(y_true)))
    p = np.asarray(y_pred).ravel()
    if p.shape != y.shape:
        raise ValueError(f"y_true has {y.size} values but y_pred has {p.size}")
    p = p.astype(bool)
    return {"tp": int((p & y).sum()), "fp": int((p & ~y).sum()),
            "tn": int((~p & ~y).sum()), "fn": int((~p & y).sum())}


def _ratio(a: int, b: int) -> float:
    # an undefined ratio (0/0) is reported as NaN, not silently as 0 or 1
    return a / b if b else float("nan")


def accuracy(y_true, y_pred) -> float:
    c = confusion(y_true, y_pred)
    return (c["tp"] + c["tn"]) / sum(c.values())


def precision(y_true, y_pred) -> float:
    c = confusion(y_true, y_pred)
    return _ratio(c["tp"], c["tp"] + c["fp"])


def recall(y_true, y_pred) -> float:
    """Sensitivity, true-positive rate."""
    c = confusion(y_true, y_pred)
    return _ratio(c["tp"], c["tp"] + c["fn"])


def specificity(y_true, y_pred) -> float:
    c = confusion(y_true, y_pred)
    return _ratio(c["tn"], c["tn"] + c["fp"])


def f1(y_true, y_pred) -> float:
    """2 tp / (2 tp + fp + fn); NaN when there is no positive label nor prediction."""
    c = confusion(y_true, y_pred)
    return _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])


def binary_metrics(y_true, y_score, threshold: float) -> dict[str, float]:
    """ACC, F1, precision, recall, specificity of ``score >= threshold``."""
    y, s = _binary_inputs(y_true, y_score)
    pred = s >= threshold
    return {"threshold": float(threshold), "acc": accuracy(y, pred), "f1": f1(y, pred),
            "precision": precision(y, pred), "recall": recall(y, pred),
            "specificity": specificity(y, pred)}


def best_accuracy_threshold(y_true, y_score) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy over the ROC thresholds.

    Ties go to the highest threshold. Used for the SQUID protocol (threshold picked on the
    evaluated set itself, an optimistic number) and for picking a threshold on a
    validation split.
    """
    y, _ = _binary_inputs(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score)
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    acc = (tpr * n_pos + (1.0 - fpr) * n_neg) / len(y)
    k = int(np.argmax(acc))
    return float(thr[k]), float(acc[k])


def dice(pred, target, threshold: float = 0.5, empty: float = 1.0) -> np.ndarray:
    """Per-image Dice 2|P n T| / (|P| + |T|) of masks [B, H, W] (or one [H, W] mask).

    ``pred`` may hold probabilities (binarised at ``pred >= threshold``) or 0/1 values.
    An image with an empty prediction AND an empty target gets ``empty`` (1.0: the
    SIIM-ACR convention that a correct "no pneumothorax" is a perfect score).
    """
    p = np.asarray(pred)
    t = np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} != target shape {t.shape}")
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.ndim != 3:
        raise ValueError(f"masks must be [B, H, W] or [H, W], got shape {p.shape}")
    pb = (p >= threshold) if p.dtype.kind == "f" else p.astype(bool)
    tb = t.astype(bool)
    inter = (pb & tb).sum(axis=(1, 2)).astype(np.float64)
    total = pb.sum(axis=(1, 2)) + tb.sum(axis=(1, 2))
    out = np.full(len(p), float(empty))
    nz = total > 0
    out[nz] = 2.0 * inter[nz] / total[nz]
    return out


def multilabel_auc(y_true, y_score, names: Sequence[str] | None = None,
                   warn: bool = True) -> dict:
    """Per-class ROC AUC of [N, C] labels/scores and their mean.

    NaN labels are dropped per class. A class whose remaining labels hold a single value
    gets AUC NaN, a warning naming it, and is excluded from the mean.

    Returns ``{"per_class": {name: auc}, "mean_auc": float, "excluded": [names],
    "positives": {name: n}, "evaluated": {name: n}}``; ``mean_auc`` is NaN when every class
    is excluded.
    """
    Y = np.asarray(y_true, dtype=np.float64)
    S = np.asarray(y_score, dtype=np.float64)
    if Y.ndim == 1:
        Y, S = Y[:, None], S.reshape(-1, 1)
    if Y.ndim != 2 or Y.shape != S.shape:
        raise ValueError(f"labels {Y.shape} and scores {S.shape} must both be [N, C]")
    C = Y.shape[1]
    names = [f"class_{j}" for j in range(C)] if names is None else list(names)
    if len(names) != C:
        raise ValueError(f"{len(names)} names for {C} classes")
    per, excluded, pos, cnt = {}, [], {}, {}
    for j, name in enumerate(names):
        keep = ~np.isnan(Y[:, j])
        y, s = Y[keep, j], S[keep, j]
        pos[name], cnt[name] = int((y == 1).sum()), int(keep.sum())
        if pos[name] == 0 or pos[name] == cnt[name]:
            per[name] = float("nan")
            excluded.append(name)
            if warn:
                warnings.warn(f"class {name!r}: only one label value among its {cnt[name]} "
                              f"evaluated images ({pos[name]} positive); AUC undefined, "
                              "excluded from the mean", RuntimeWarning, stacklevel=2)
            continue
        per[name] = roc_auc(y, s)
    vals = [v for v in per.values() if not math.isnan(v)]
    return {"per_class": per, "mean_auc": float(np.mean(vals)) if vals else float("nan"),
            "excluded": excluded, "positives": pos, "evaluated": cnt}


def sigmoid(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # overflow-free logistic


def bootstrap_ci(y_true, y_score, other_score=None, metric=None, n: int = 1000,
                 level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """A percentile bootstrap interval of ``metric(y_true, y_score)`` (default ROC AUC)
    over the rows: ``n`` resamples of the rows with replacement, those holding a single
    class skipped. With ``other_score`` (another model's scores of the same rows) the
    interval is of the paired difference metric(score) - metric(other), on the same
    resamples. Returns {"value", "low", "high", "level", "n"} (n: resamples used)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    metric = roc_auc if metric is None else metric
    y, s = _binary_inputs(y_true, y_score)
    o = None if other_score is None else _binary_inputs(y_true, other_score)[1]

    def value(idx):
        v = metric(y[idx], s[idx])
        return v if o is None else v - metric(y[idx], o[idx])

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            draws.append(value(idx))
    if not draws:
        raise ValueError("no bootstrap resample holds both classes")
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return {"value": float(value(np.arange(len(y)))), "low": float(lo), "high": float(hi),
            "level": level, "n": len(draws)}


def auc_rows(y_true, scores) -> np.ndarray:
    """ROC AUC of each row of ``scores`` [R, N] against the same labels ``y_true`` [N]
    (average ranks: ties count half)."""
    y, _ = _binary_inputs(y_true, np.zeros(np.size(y_true)))
    s = np.atleast_2d(np.asarray(scores, np.float64))
    if s.shape[1] != len(y) or not np.isfinite(s).all():
        raise ValueError(f"scores must be finite and [R, {len(y)}], got {s.shape}")
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("ROC AUC needs both classes")
    r = np.stack([average_ranks(row) for row in s])
    return (r[:, y].sum(1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def seed_bootstrap_ci(y_true, scores_a, scores_b, n: int = 2000, level: float = 0.95,
                      seed: int = 0, paired_seeds: bool = False) -> dict:
    """A two-level percentile bootstrap interval of mean_i AUC(a_i) - mean_j AUC(b_j): the
    rows of ``scores_a`` [Sa, N] and ``scores_b`` [Sb, N] are models (seeds) scoring the
    same N images. Each resample draws the images with replacement AND the seeds of each
    side with replacement, so both the test-set noise and the seed-to-seed spread count
    (``paired_seeds``: one draw of seed indices for both sides, for models that share their
    seeds; a side with one row, e.g. a baseline, keeps it). Resamples holding one class are
    skipped. Returns {"value", "low", "high", "level", "n", "excludes_zero"}."""
    y, _ = _binary_inputs(y_true, np.zeros(np.size(y_true)))
    a, b = np.atleast_2d(np.asarray(scores_a, np.float64)), np.atleast_2d(
        np.asarray(scores_b, np.float64))
    value = float(auc_rows(y, a).mean() - auc_rows(y, b).mean())
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if not 0 < y[idx].sum() < len(idx):
            continue
        ia = rng.integers(0, len(a), len(a))
        ib = ia if paired_seeds and len(a) == len(b) else rng.integers(0, len(b), len(b))
        draws.append(auc_rows(y[idx], a[ia][:, idx]).mean()
                     - auc_rows(y[idx], b[ib][:, idx]).mean())
    if not draws:
        raise ValueError("no bootstrap resample holds both classes")
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return {"value": value, "low": float(lo), "high": float(hi), "level": level,
            "n": len(draws), "excludes_zero": bool(lo > 0 or hi < 0)}


def matched_auc(y_true, y_score, confound, bins: int = 5) -> float:
    """ROC AUC over the (positive, negative) pairs that fall in the same quantile bin of
    ``confound`` (e.g. image blur): how well a score ranks images that the confound cannot
    tell apart. A score that only reads the confound gets about 0.5. Ties count half; NaN
    when no bin holds both classes."""
    y, s = _binary_inputs(y_true, y_score)
    c = np.asarray(confound, np.float64).ravel()
    if c.shape != s.shape:
        raise ValueError(f"confound has {c.size} values for {s.size} scores")
    edges = np.quantile(c, np.linspace(0, 1, bins + 1)[1:-1])
    b = np.searchsorted(edges, c, side="right")
    num = den = 0.0
    for k in range(bins):
        pos, neg = s[(b == k) & y], s[(b == k) & ~y]
        if len(pos) and len(neg):
            num += (pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()
            den += len(pos) * len(neg)
    return float(num / den) if den else float("nan")


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = average_ranks(a), average_ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])
