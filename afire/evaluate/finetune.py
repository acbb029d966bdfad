"""Fine-tuning (paper Table 2, METHOD §6): the TEACHER encoder + a multi-label head (GAP
over patch tokens -> LayerNorm -> Linear, BCE-with-logits), trained in C
(``afire._C.downstream.Classifier``) with AdamW, per-step cosine lr, augmentation (random
resized crop, flip, small rotation), early stopping on the validation mean AUC (patience
in epochs; the best epoch's weights are restored), label fractions (1/10/100 %) and
patient-wise k-fold cross-validation. Grad-CAM maps of the fine-tuned classifier are
drawn for a few test images (paper Fig. 7).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import figures as F
from . import metrics as M
from ..data.progress import Progress
from .common import (EvalData, copy_teacher_encoder, cosine_lr, downstream, group_folds,
                     group_holdout, mean_std, progress_bar, require_targets, results_of,
                     setup_model, split_seed_of, subsample, try_figures, write_results)
from .selection import resolve_inputs


# ---------------------------------------------------------------- shared training loop
def predict_padded(fn: Callable, x: np.ndarray, capacity: int) -> np.ndarray:
    """Run ``fn`` over x in chunks of exactly ``capacity`` (the last one padded by
    repeating its final image, the padding's outputs dropped)."""
    outs = []
    for i in range(0, len(x), capacity):
        part = x[i:i + capacity]
        n = len(part)
        if n < capacity:
            part = np.concatenate([part, np.repeat(part[-1:], capacity - n, axis=0)])
        outs.append(np.asarray(fn(np.ascontiguousarray(part)))[:n])
    return np.concatenate(outs)


def _param_views(net, with_encoder: bool) -> list[np.ndarray]:
    """The writable parameter views of a downstream network (head: an array or a dict of
    arrays; encoder: the flat buffer)."""
    head = net.head_params()
    views = list(head.values()) if isinstance(head, dict) else [head]
    return views + ([net.encoder_params()] if with_encoder else [])


def _snapshot(net, with_encoder: bool) -> list[np.ndarray]:
    return [np.array(a, copy=True) for a in _param_views(net, with_encoder)]


def _restore(net, snap: list[np.ndarray], with_encoder: bool) -> None:
    for dst, src in zip(_param_views(net, with_encoder), snap):
        dst[...] = src


def train_early_stopping(net, n_train: int, batch_args: Callable, val_score: Callable, *,
                         capacity: int, epochs: int, lr: float, weight_decay: float,
                         patience: int, seed: int, warmup_epochs: int = 0,
                         augment: bool = True, freeze_encoder: bool = False,
                         bar: Progress | None = None) -> dict:
    """Train ``net`` (Classifier or Segmenter) with a per-step cosine lr; after every epoch
    score the validation set (higher = better) and stop after ``patience`` epochs without
    gain, restoring the best epoch. A NaN validation score disables early stopping (the
    last epoch is kept) with a warning. Returns {"history", "best_epoch", "best_val"}.
    ``bar`` (a :class:`~afire.data.progress.Progress` counting epochs) advances by
    ``epochs`` in all, the epochs left out by early stopping included."""
    rng = np.random.default_rng(seed)
    spe = max(1, n_train // capacity)           # full batches only: the C batch is fixed
    total = epochs * spe
    best, best_epoch, snap, bad, step = -math.inf, -1, None, 0, 0
    history, warned = [], False
    for ep in range(epochs):
        order = rng.permutation(n_train)
        losses = []
        for b in range(spe):
            idx = np.sort(order[b * capacity:(b + 1) * capacity])
            lr_t = cosine_lr(lr, step, total, warmup_epochs * spe)
            r = net.train_step(*batch_args(idx), lr_t, weight_decay, step, augment=augment)
            losses.append(float(r["loss"] if isinstance(r, dict) else r))
            step += 1
        v = float(val_score())
        history.append({"epoch": ep, "train_loss": float(np.mean(losses)), "val": v})
        if bar is not None:
            bar.fields(f"loss {history[-1]['train_loss']:.4f} val {v:.4f}")
            bar.update(1)
        if math.isnan(v):
            if not warned:
                warnings.warn("validation score is NaN (single-class or empty validation "
                              "set): early stopping disabled, the last epoch is kept",
                              RuntimeWarning, stacklevel=2)
                warned = True
            continue
        if v > best:
            best, best_epoch, bad = v, ep, 0
            snap = _snapshot(net, not freeze_encoder)
        else:
            bad += 1
            if bad >= patience:
                if bar is not None:
                    bar.update(epochs - ep - 1)
                break
    if snap is not None and not warned:
        _restore(net, snap, not freeze_encoder)
    return {"history": history, "best_epoch": best_epoch,
            "best_val": best if best > -math.inf else float("nan"), "steps": step}


def train_folds(model, d: EvalData, splits: list, frac: float, make_net: Callable,
                batch_args: Callable, val_score: Callable, *, val_fraction: float,
                batch: int, seed: int, **train_kw):
    """The fold loop of both fine-tuning protocols at one label fraction. For each split k
    (train+val, test, val or None): without a given val, a ``val_fraction`` of the train+val
    groups validates; the rest is sub-sampled to ``frac``; a fresh network
    ``make_net(capacity, seed + k)`` gets the teacher encoder and is trained by
    :func:`train_early_stopping` on ``batch_args(indices into d)`` with
    ``val_score(predict, val indices)``.
    Yields (k, net, predict, tr, va, te, history); predict(indices into d) -> outputs."""
    for k, sp in enumerate(splits):
        trval, te = sp[0], sp[1]
        given_val = sp[2] if len(sp) > 2 else None
        if given_val is not None:
            tr, va = trval, given_val
        else:
            tr, va = split_val(d, trval, val_fraction, seed + 100 + k)
        tr = subsample(tr, frac, seed + k)
        cap = min(batch, len(tr))
        net = make_net(cap, seed + k)
        copy_teacher_encoder(net, model)

        def predict(idx, net=net, cap=cap):
            return predict_padded(net.predict, d.images[idx], cap)

        hist = train_early_stopping(
            net, len(tr), lambda idx, tr=tr: batch_args(tr[idx]),
            lambda va=va, predict=predict: val_score(predict, va),
            capacity=cap, seed=seed + k, **train_kw)
        yield k, net, predict, tr, va, te, hist


def concat(parts: list[EvalData]) -> tuple[EvalData, list[np.ndarray]]:
    """Several EvalData as one (images, abnormal, groups; labels, masks, organ labels,
    paths and splits where every part has them) and each part's row indices in it."""
    def cat(name):
        vals = [getattr(p, name) for p in parts]
        return None if any(v is None for v in vals) else np.concatenate(vals)
    names = list(dict.fromkeys(n for p in parts for n in p.label_names))
    labels = None
    if names:      # the union of the findings, NaN where a part lacks one
        labels = np.full((sum(len(p) for p in parts), len(names)), np.nan, np.float32)
        row = 0
        for p in parts:
            for j, n in enumerate(p.label_names):
                labels[row:row + len(p), names.index(n)] = p.labels[:, j]
            row += len(p)
    both = EvalData(images=cat("images"), abnormal=cat("abnormal"), groups=cat("groups"),
                    labels=labels, label_names=names, masks=cat("masks"),
                    organ_labels=cat("organ_labels"), source=parts[0].source,
                    paths=cat("paths"), splits=cat("splits"))
    off = np.cumsum([0] + [len(p) for p in parts])
    return both, [np.arange(off[i], off[i + 1]) for i in range(len(parts))]


def train_then_test(d: EvalData, t: EvalData, v: EvalData | None = None
                    ) -> tuple[EvalData, list]:
    """`d`, `t` (and `v`) in one EvalData and the single split that trains on all of `d`,
    tests on all of `t` and validates on `v` (None: a val_fraction of `d`)."""
    both, idx = concat([d, t] + ([v] if v is not None else []))
    return both, [(idx[0], idx[1], idx[2] if v is not None else None)]


def split_folds(d: EvalData, folds: int, test_fraction: float, seed: int,
                val_idx: np.ndarray | None = None):
    """[(train+val indices, test indices, val indices or None)] by group over the rows of
    ``d`` not in ``val_idx``: k folds, or one hold-out. ``val_idx`` given: every fold
    validates on those rows."""
    rows = np.arange(len(d)) if val_idx is None else \
        np.setdiff1d(np.arange(len(d)), val_idx)
    g = d.groups[rows]
    if folds > 1:
        f = group_folds(g, folds, seed)
        return [(rows[f != k], rows[f == k], val_idx) for k in range(folds)]
    te = group_holdout(g, test_fraction, seed)
    return [(rows[~te], rows[te], val_idx)]


def split_val(d: EvalData, idx: np.ndarray, val_fraction: float, seed: int):
    """(train, val) indices from idx, by group."""
    v = group_holdout(d.groups[idx], val_fraction, seed)
    return idx[~v], idx[v]


def arrange(inp, keep: Callable[[EvalData, str], EvalData], folds: int,
            test_fraction: float, split_seed: int) -> tuple[EvalData, list]:
    """The combined data and the splits of a fine-tuning protocol from its
    :class:`~.selection.Inputs`; ``keep(part, role)`` filters a part first (labels/masks)."""
    if inp.pool is None:
        return train_then_test(keep(inp.train, "training"), keep(inp.test, "test"),
                               None if inp.val is None else keep(inp.val, "validation"))
    pool = keep(inp.pool, "pool")
    if inp.val is None:
        return pool, split_folds(pool, folds, test_fraction, split_seed)
    d, (_, vi) = concat([pool, keep(inp.val, "validation")])
    return d, split_folds(d, folds, test_fraction, split_seed, val_idx=vi)


def _as_fractions(label_fractions) -> list[float]:
    fr = [label_fractions] if isinstance(label_fractions, (int, float)) else list(label_fractions)
    for f in fr:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"label fractions are in (0, 1] (1 % = 0.01), got {f}")
    return [float(f) for f in fr]


# ---------------------------------------------------------------- the protocol
def finetune(checkpoint_or_model: Any, data: Any, *, test_data: Any = None,
             val_data: Any = None, target: str | list[str] = "abnormal",
             label_fractions: float | Sequence[float] = (1.0,), folds: int = 5,
             test_fraction: float = 0.2, val_fraction: float = 0.1, epochs: int = 100,
             batch: int = 128, lr: float = 2e-4, weight_decay: float = 0.05,
             patience: int = 10, warmup_epochs: int = 0, augment: bool = True,
             freeze_encoder: bool = False, split_seed: int | None = None,
             init_seed: int | None = None, split: str = "auto",
             allow_train_split: bool = False, exclude: Any = None,
             pretrain_meta: dict | None = None, device: str = "cpu",
             say: Callable[[str], None] | None = None,
             seed: int | None = None, gradcam: int = 8, out: str | Path | None = None,
             figures: bool = True, progress: bool = True) -> dict:
    """Fine-tune the teacher encoder with a classification head.

    Test and validation images: see :mod:`.selection` (by default a directory's non-"train"
    splits, never the checkpoint's pre-training images). For each label fraction and each
    patient-wise fold (``folds`` > 1) or one hold-out (``test_fraction``; or ``test_data``
    given): the validation set (early stopping) is ``val_data`` when given, else a
    ``val_fraction`` of the remaining groups; the rest is sub-sampled to the label fraction
    and trained on. NaN targets (missing / uncertain-ignored) are skipped by the loss and
    left out of the metrics; images without any label are left out. Metric: per-class test
    AUC and their mean. ``split_seed`` seeds splits, heads and batches (``seed`` is its old
    name); ``init_seed`` replaces the encoder by a random initialisation with that seed.
    ``progress``: a bar of the training epochs (all folds and fractions) on stderr. Returns
    the results dict (an :class:`~afire.display.EvalResults`, shown as tables in Jupyter).

    ``arrays`` hold, per label fraction f and fold k, the row indices (into
    ``results["pool"]``, the combined data) of ``f{f}_k{k}_train`` / ``_val`` / ``_test``
    and the test logits ``f{f}_k{k}_test_logits``.
    """
    split_seed = split_seed_of(split_seed, seed)
    model, meta, encoder = setup_model(checkpoint_or_model, init_seed, pretrain_meta,
                                       device)
    ds = downstream()
    S = model.cfg.img_size
    inp = resolve_inputs(meta, S, data, test_data, val_data, split=split,
                         allow_train_split=allow_train_split, exclude=exclude, say=say)
    fractions = _as_fractions(label_fractions)

    def keep(part: EvalData, role: str) -> EvalData:
        y_part, names_part = part.targets(target)
        return require_targets(part, y_part, names_part, f"fine-tuning ({role} images)",
                               inp.tell)[0]

    d, splits = arrange(inp, keep, folds, test_fraction, split_seed)
    y, names = d.targets(target)
    cfg = model.cfg.to_dict()
    y32 = y.astype(np.float32)   # NaN = missing: the C BCE skips it

    def make_net(cap, net_seed):
        return ds.Classifier(cfg, len(names), cap, seed=net_seed, freeze_encoder=freeze_encoder)

    def batch_args(sel):
        return np.ascontiguousarray(d.images[sel]), np.ascontiguousarray(y32[sel])

    def val_auc(predict, va):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return M.multilabel_auc(y[va], predict(va).astype(np.float64), names,
                                    warn=False)["mean_auc"]

    runs, cam_fig_data, arrays = [], None, {}
    bar = progress_bar(progress, len(fractions) * len(splits) * epochs, "finetune",
                       unit="epoch")
    for frac in fractions:
        fold_res = []
        for k, net, predict, tr, va, te, hist in train_folds(
                model, d, splits, frac, make_net, batch_args, val_auc,
                val_fraction=val_fraction, batch=batch, seed=split_seed, epochs=epochs, lr=lr,
                weight_decay=weight_decay, patience=patience, warmup_epochs=warmup_epochs,
                augment=augment, freeze_encoder=freeze_encoder, bar=bar):
            logits = predict(te).astype(np.float64)
            r = M.multilabel_auc(y[te], logits, names)
            fold_res.append({"fold": k, "mean_auc": r["mean_auc"], "per_class_auc":
                             r["per_class"], "excluded_classes": r["excluded"],
                             "n_train": int(len(tr)), "n_val": int(len(va)),
                             "n_test": int(len(te)),
                             "nan_targets_ignored": int(np.isnan(y[tr]).sum()),
                             "best_epoch": hist["best_epoch"], "best_val_auc": hist["best_val"],
                             "epochs_run": len(hist["history"]), "history": hist["history"]})
            key = f"f{frac:g}_k{k}"
            arrays.update({f"{key}_train": tr, f"{key}_val": va, f"{key}_test": te,
                           f"{key}_test_logits": logits.astype(np.float32)})
            if cam_fig_data is None or frac == max(fractions) and k == 0:
                cam_fig_data = (net, te, logits)
        runs.append({"label_fraction": frac,
                     "mean_auc": mean_std([f["mean_auc"] for f in fold_res]),
                     "folds": fold_res})
    bar.close()
    results = {
        "protocol": "finetune",
        "description": "teacher encoder + GAP-LayerNorm-Linear head, BCE, AdamW, cosine lr, "
                       "early stopping on validation mean AUC (METHOD §6)",
        "settings": {"target": target if isinstance(target, str) else list(target),
                     "classes": names, "label_fractions": fractions,
                     "folds": folds if test_data is None else "given test set",
                     "test_fraction": test_fraction,
                     "val_fraction": None if inp.val is not None else val_fraction,
                     "validation": "given" if inp.val is not None else "by group",
                     "epochs": epochs, "batch": batch, "lr": lr, "weight_decay": weight_decay,
                     "patience": patience, "warmup_epochs": warmup_epochs, "augment": augment,
                     "freeze_encoder": freeze_encoder, "split_seed": split_seed,
                     "init_seed": init_seed, "model": model.cfg.preset,
                     "img_size": S, "pretrain_step": model.step, "source": d.source},
        "encoder": encoder,
        "data": inp.info,
        "notes": inp.notes,
        "counts": {"all": d.counts()},
        "metrics": {f"mean_auc@{r['label_fraction']:g}": r["mean_auc"] for r in runs},
        "runs": runs,
        "arrays": dict(arrays, **({} if d.paths is None else {"pool_paths": d.paths})),
        "figures": [],
    }
    if out is not None:
        if figures and cam_fig_data is not None:
            results["figures"] = _figures(cam_fig_data, d, y, names, Path(out), gradcam)
        write_results(out, results)
    results["pool"] = d
    return results_of(results)


def _figures(cam_data, d: EvalData, y, names, out: Path, n: int) -> list:
    net, te, logits = cam_data
    figs = []
    yt = y[te]
    curves = {}
    for j, name in enumerate(names):
        keep = ~np.isnan(yt[:, j])
        if len(np.unique(yt[keep, j])) == 2:
            fpr, tpr, _ = M.roc_curve(yt[keep, j], logits[keep, j])
            curves[name] = (fpr, tpr, M.roc_auc(yt[keep, j], logits[keep, j]))
    if curves:
        figs.append(try_figures(F.roc_figure, curves, out / "roc.png", title="Fine-tuned"))
    if n > 0 and len(te):
        # the class with the most positives; its most confident positives first
        j = int(np.nanargmax(np.nansum(yt, axis=0))) if np.nansum(yt) > 0 else 0
        order = np.argsort(-logits[:, j])
        pos = [i for i in order if yt[i, j] == 1][:n] or list(order[:n])
        idx = te[pos]
        cams = _gradcam_padded(net, d.images[idx], j)
        titles = [f"{names[j]} p={M.sigmoid(logits[i, j]):.2f}" for i in pos]
        figs.append(try_figures(F.overlay_figure, d.images[idx], cams, out / "gradcam.png",
                                titles, title=f"Grad-CAM, class {names[j]} (paper Fig. 7)",
                                colorbar_label="Grad-CAM, relative per image (0 = min, "
                                               "1 = max)"))
    return [f for f in figs if f]


def _gradcam_padded(net, images: np.ndarray, class_index: int) -> np.ndarray:
    return np.asarray(net.gradcam(np.ascontiguousarray(images), class_index))
