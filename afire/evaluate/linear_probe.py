"""Linear probe (paper Table 1): frozen TEACHER encoder, global-average-pooled patch tokens,
a linear classifier (sigmoid / BCE per class) trained in C
(``afire._C.downstream.linear_probe_fit``). Metrics: per-class ROC AUC and their mean;
for one class also ACC, F1, precision, recall and specificity at probability 0.5 (the
classifier's own decision, no threshold tuned on the test set).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import figures as F
from . import metrics as M
from .common import (EvalData, downstream, gap_features, group_folds, group_holdout,
                     mean_std, progress_bar, require_targets, results_of, setup_model,
                     split_seed_of, try_figures, write_results)
from .selection import resolve_inputs


def fit_predict(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, *,
                epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                batch: int = 256, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Train the C linear probe on (features, targets) and return (test logits, fit dict).
    NaN targets are missing entries (skipped by the C loss); rows with no target at all
    are left out."""
    ds = downstream()
    keep = ~np.isnan(y_train).all(axis=1)
    fit = ds.linear_probe_fit(np.ascontiguousarray(f_train[keep], np.float32),
                              np.ascontiguousarray(y_train[keep], np.float32), epochs=epochs,
                              lr=lr, weight_decay=weight_decay, batch=batch, seed=seed)
    logits = ds.linear_probe_predict(np.ascontiguousarray(f_test, np.float32), fit["weight"],
                                     fit["bias"], fit["mean"], fit["std"])
    return np.asarray(logits, np.float64), fit


def evaluate_scores(y: np.ndarray, logits: np.ndarray, names: list[str]) -> dict:
    """AUCs of logits against [N, C] targets (+ thresholded metrics for one class)."""
    r = M.multilabel_auc(y, logits, names)
    out = {"mean_auc": r["mean_auc"], "per_class_auc": r["per_class"],
           "excluded_classes": r["excluded"]}
    if y.shape[1] == 1:
        keep = ~np.isnan(y[:, 0])
        out.update({k: v for k, v in M.binary_metrics(y[keep, 0], logits[keep, 0], 0.0).items()
                    if k != "threshold"})
        out["decision"] = "probability >= 0.5"
    return out


# The recipe of the evaluation suite (tests/eval) and the defaults of the API and of
# `afire evaluate linear-probe`: one place, so that they cannot drift apart.
PROBE_RECIPE = {"folds": 5, "test_fraction": 0.3, "epochs": 200, "lr": 1e-2,
                "weight_decay": 1e-4, "batch": 256}


def linear_probe(checkpoint_or_model: Any, data: Any, *, test_data: Any = None,
                 target: str | list[str] = "abnormal", folds: int = PROBE_RECIPE["folds"],
                 test_fraction: float = PROBE_RECIPE["test_fraction"],
                 epochs: int = PROBE_RECIPE["epochs"], lr: float = PROBE_RECIPE["lr"],
                 weight_decay: float = PROBE_RECIPE["weight_decay"],
                 batch: int = PROBE_RECIPE["batch"], split_seed: int | None = None,
                 init_seed: int | None = None, split: str = "auto",
                 allow_train_split: bool = False, exclude: Any = None,
                 pretrain_meta: dict | None = None, device: str = "cpu",
                 say: Callable[[str], None] | None = None,
                 seed: int | None = None, branch: str = "teacher",
                 out: str | Path | None = None, figures: bool = True,
                 progress: bool = True) -> dict:
    """Linear probe of a (pre-trained) encoder.

    Test images: see :mod:`.selection` (by default a directory's non-"train" splits, never
    the checkpoint's pre-training images; ``split``, ``allow_train_split``, ``exclude``).
    Splits: ``test_data`` given -> train on ``data``, test on it; ``folds`` > 1 ->
    patient-wise k-fold cross-validation of the pool (metrics per fold, mean and std, plus
    the pooled out-of-fold AUC); else one patient-wise hold-out of ``test_fraction`` of
    the groups. ``split_seed`` seeds the folds and the probe's training (``seed`` is its
    old name); ``init_seed`` replaces the encoder by a random initialisation with that
    seed (the baseline). Images without a label are left out.

    Returns the results dict (an :class:`~afire.display.EvalResults`, shown as tables in
    Jupyter; written to ``out`` when given; "data" records which images were used and why,
    "notes" what was announced). ``progress``: a bar on stderr while features are
    computed. ``results["pool"]`` (not written) is the pool, or the test set, as
    :class:`EvalData`; ``arrays["rows"]`` / ``arrays["fold"]`` give every scored row's
    index in it and its fold.
    """
    split_seed = split_seed_of(split_seed, seed)
    # the probe only encodes: a checkpoint is loaded without its training state (CPU)
    model, meta, encoder = setup_model(checkpoint_or_model, init_seed, pretrain_meta,
                                       device, inference=True)
    S = model.cfg.img_size
    inp = resolve_inputs(meta, S, data, test_data, split=split,
                         allow_train_split=allow_train_split, exclude=exclude, say=say)
    hp = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch=batch, seed=split_seed)
    fold_results = []
    if test_data is not None:
        d, y = require_targets(inp.train, *inp.train.targets(target), "the linear probe",
                               inp.tell)
        names = d.targets(target)[1]
        t, y_t = require_targets(inp.test, inp.test.targets(target)[0], names,
                                 "the linear probe's test set", inp.tell)
        with progress_bar(progress, len(d) + len(t), "linear-probe: features") as bar:
            feats = gap_features(model, d.images, branch=branch, bar=bar)
            f_t = gap_features(model, t.images, branch=branch, bar=bar)
        logits, fit = fit_predict(feats, y, f_t, **hp)
        metrics = evaluate_scores(y_t, logits, names)
        oof_y, oof_logits, oof_f = y_t, logits, f_t
        rows, fold_of_row = np.arange(len(t)), np.zeros(len(t), np.int64)
        counts = {"train": d.counts(), "test": t.counts()}
        split_desc, scored = "given", t
    else:
        y, names = inp.pool.targets(target)
        d, y = require_targets(inp.pool, y, names, "the linear probe", inp.tell)
        with progress_bar(progress, len(d), "linear-probe: features") as bar:
            feats = gap_features(model, d.images, branch=branch, bar=bar)
        fold = group_folds(d.groups, folds, split_seed) if folds > 1 else \
            group_holdout(d.groups, test_fraction, split_seed).astype(np.int64)
        oof_logits = np.full(y.shape, np.nan)
        for k in range(max(folds, 1)):
            te = fold == (k if folds > 1 else 1)
            logits, fit = fit_predict(feats[~te], y[~te], feats[te], **hp)
            oof_logits[te] = logits
            fold_results.append(dict(evaluate_scores(y[te], logits, names),
                                     n_train=int((~te).sum()), n_test=int(te.sum()),
                                     final_loss=float(np.ravel(fit["loss"])[-1])))
        covered = ~np.isnan(oof_logits[:, 0])
        rows = np.flatnonzero(covered)
        fold_of_row = fold[covered] if folds > 1 else np.ones(len(rows), np.int64)
        oof_y, oof_logits, oof_f = y[covered], oof_logits[covered], feats[covered]
        if folds > 1:
            metrics = {key: mean_std([f[key] for f in fold_results])
                       for key in ("mean_auc", "acc", "f1") if key in fold_results[0]}
            metrics["pooled_out_of_fold"] = evaluate_scores(oof_y, oof_logits, names)
        else:
            metrics = {k: v for k, v in fold_results[0].items()}
        if folds > 1:
            counts = {"all": d.counts()}
        else:
            counts = {"train": d.subset(np.flatnonzero(fold == 0)).counts(),
                      "test": d.subset(np.flatnonzero(fold == 1)).counts()}
        split_desc = f"{folds}-fold by group" if folds > 1 else \
            f"hold-out {test_fraction} of groups"
        scored = d
    results = {
        "protocol": "linear_probe",
        "description": "frozen encoder, GAP patch-token features, linear classifier (BCE), "
                       "paper Table 1",
        "settings": dict(hp, target=target if isinstance(target, str) else list(target),
                         classes=names, branch=branch, split=split_desc, folds=folds,
                         test_fraction=test_fraction, split_seed=split_seed,
                         init_seed=init_seed, model=model.cfg.preset, img_size=S,
                         pretrain_step=model.step, feature_dim=int(feats.shape[1]),
                         source=d.source),
        "encoder": encoder,
        "data": inp.info,
        "notes": inp.notes,
        "counts": counts,
        "metrics": metrics,
        "folds": fold_results,
        "arrays": {"logits": oof_logits.astype(np.float32), "targets": oof_y,
                   "rows": rows.astype(np.int64), "fold": fold_of_row.astype(np.int64)},
        "figures": [],
    }
    if scored.paths is not None:
        results["arrays"]["paths"] = scored.paths[rows]
    if out is not None:
        if figures:
            results["figures"] = _figures(oof_y, oof_logits, oof_f, names, Path(out),
                                          split_seed)
        write_results(out, results)
    results["pool"] = scored
    return results_of(results)


def _figures(y, logits, feats, names, out: Path, seed: int) -> list:
    curves = {}
    for j, n in enumerate(names):
        keep = ~np.isnan(y[:, j])
        if len(np.unique(y[keep, j])) == 2:
            fpr, tpr, _ = M.roc_curve(y[keep, j], logits[keep, j])
            curves[n] = (fpr, tpr, M.roc_auc(y[keep, j], logits[keep, j]))
    figs = []
    if curves:
        figs.append(try_figures(F.roc_figure, curves, out / "roc.png", title="Linear probe"))
    if len(feats) >= 5:
        lab = np.where(np.isnan(y[:, 0]), -1, y[:, 0]).astype(int)
        cls = {0: "normal" if names[0] == "abnormal" else f"no {names[0]}", 1: names[0],
               -1: "unknown"}
        figs.append(try_figures(F.tsne_figure, feats, lab, out / "tsne.png", seed=seed,
                                title="t-SNE of encoder features (test)", class_names=cls))
    return [f for f in figs if f]


__all__ = ["linear_probe", "fit_predict", "evaluate_scores", "EvalData", "PROBE_RECIPE"]
