"""Anomaly detection exactly as METHOD §6.

1. Initialise student, teacher, decoder and prototypes from a pre-trained model.
2. Adapt with Tasks I+II (the full AFiRe step, `AFiRe.train_step`) on the NORMAL training
   images of the target set: Adam (no weight decay), lr 1e-4, cosine, batch 64.
3. Reconstruct every test image without SLM and score it with Eq. 51; the reported score
   is 1/A(x) (higher = more abnormal). Rankings and thresholds use log(1/A(x)), which is
   monotone in it and never overflows.
4. AUC with abnormal as positive; ACC/F1 at the best-accuracy ROC threshold chosen ON THE
   TEST SET (the SQUID protocol the paper follows; optimistic), and at a threshold chosen
   on a separate validation split (the honest number).

Also reported, NOT part of the paper: ``feature_distance``, the Mahalanobis distance of each
test image's GAP teacher features to those of the adaptation normals (covariance shrunk
towards its mean variance). It asks whether the encoder separates the classes without any
label when the restoration error does not (on Kermany at our scales Eq. 51 ranks pneumonia
as more normal, while this distance does not; see tests/eval).

Adaptation detail: the trainer overwrites the prototypes C during its "first epoch"; the
adaptation model is built with one step per epoch, so only step 0 overwrites C (with the
teacher's statistics of the target's first batch), after which C is the usual EMA (m =
0.75 forgets any initial C within a few steps anyway).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..model import GRAY_MEAN, GRAY_STD, AFiRe
from . import figures as F
from . import metrics as M
from ..data.progress import Progress
from .common import (EvalData, gap_features, group_holdout, progress_bar, results_of,
                     setup_model, split_seed_of, try_figures, write_results)
from .selection import resolve_inputs

SQUID_LABEL = "SQUID protocol (threshold chosen on test)"
FEATURE_LABEL = ("Mahalanobis distance of GAP teacher features to the adaptation normals "
                 "(not in the paper)")
SHRINKAGE = 0.1   # covariance -> (1 - a) cov + a * mean variance * I: D may exceed the normals
VAL_LABEL = "threshold chosen on the validation split"


def adapt(model: AFiRe, normals: np.ndarray, steps: int, lr: float = 1e-4, batch: int = 64,
          seed: int = 0, bar: Progress | None = None) -> tuple[AFiRe, list[dict]]:
    """A copy of ``model`` adapted for ``steps`` AFiRe steps on uint8 normal images, on the
    model's device.

    The pre-trained model is not modified. Returns (adapted model, per-step statistics).
    ``bar`` (a :class:`~afire.data.progress.Progress` counting steps) shows each step's loss.
    """
    if len(normals) == 0:
        raise ValueError("no normal training images to adapt on")
    cfg = model.cfg
    b = min(batch, len(normals))
    acfg = cfg.replace(batch_size=b, epochs=max(1, steps), warmup_epochs=0,
                       base_lr=lr * 256.0 / b, min_lr=min(cfg.min_lr, lr),
                       weight_decay=0.0, weight_decay_end=0.0, freeze_last_layer_epochs=0,
                       teacher_temp=cfg.teacher_temp_final, teacher_temp_warmup_epochs=0,
                       seed=seed)
    new = AFiRe(acfg, device=model.device, steps_per_epoch=1, batch_size=b)
    # a fresh optimiser: the Adam moments stay zero
    new.set_state_tensors(model.state_tensors(), skip_prefixes=("adam_",))
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    log = []
    for _ in range(steps):
        if len(order) < b:                # one shuffled pass after another
            order = np.concatenate([order, rng.permutation(len(normals))])
        idx, order = order[:b], order[b:]
        log.append(new.train_step(normals[np.sort(idx)]))
        if bar is not None:
            bar.fields(f"loss {log[-1]['loss']:.4f}")
            bar.update(1)
    return new, log


def feature_distance(normal_features: np.ndarray, features: np.ndarray,
                     shrinkage: float = SHRINKAGE) -> np.ndarray:
    """Squared Mahalanobis distance of ``features`` [N, D] to the Gaussian of
    ``normal_features`` [M, D] (float64; covariance shrunk towards a multiple of I)."""
    f0 = np.asarray(normal_features, np.float64)
    if len(f0) < 2:
        raise ValueError("feature_distance needs at least 2 normal images")
    mu = f0.mean(axis=0)
    cov = np.cov(f0, rowvar=False).reshape(f0.shape[1], f0.shape[1])
    scale = max(float(np.trace(cov)) / len(cov), 1e-12)
    cov = (1 - shrinkage) * cov + shrinkage * scale * np.eye(len(cov))
    d = np.asarray(features, np.float64) - mu
    return np.einsum("nd,nd->n", d, np.linalg.solve(cov, d.T).T)


def _split(d: EvalData, test_fraction: float, val_fraction: float, seed: int):
    test = group_holdout(d.groups, test_fraction, seed)
    val = np.zeros(len(d), bool)
    if val_fraction > 0:
        rest = np.flatnonzero(~test)
        val[rest[group_holdout(d.groups[rest], val_fraction / (1 - test_fraction),
                               seed + 1)]] = True
    return ~test & ~val, val, test


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((x * GRAY_STD + GRAY_MEAN) * 255.0), 0, 255).astype(np.uint8)


def slm_images(model: AFiRe, images: np.ndarray, seed: int = 0):
    """(x', token labels) from the model's SLM settings, for restoration figures."""
    xp, _, tok = model.synthetic_lesions(images, step=0, seed=seed)
    return xp, tok


def _labelled(part: EvalData | None, what: str, source: str) -> EvalData | None:
    """The images of ``part`` with a known label; ValueError unless both classes remain."""
    if part is None:
        return None
    part = part.subset(np.flatnonzero(part.abnormal >= 0))
    n0, n1 = int((part.abnormal == 0).sum()), int((part.abnormal == 1).sum())
    if n0 == 0 or n1 == 0:
        raise ValueError(
            f"anomaly detection needs labelled normal and abnormal {what} images; {source} "
            f"gives {n0} normal and {n1} abnormal ones"
            + (" (no image is labelled: an unlabelled preparation such as `afire prepare "
               "--format folder` records abnormal = -1)" if n0 + n1 == 0 else
               " (use more data, another split_seed or a larger test_fraction)"))
    return part


def anomaly(checkpoint_or_model: Any, data: Any, *, test_data: Any = None,
            val_data: Any = None, adapt_epochs: float = 10.0, adapt_steps: int | None = None,
            lr: float = 1e-4, batch: int = 64, test_fraction: float = 0.3,
            val_fraction: float = 0.2, split_seed: int | None = None,
            init_seed: int | None = None, split: str = "auto",
            allow_train_split: bool = False, exclude: Any = None,
            pretrain_meta: dict | None = None, device: str = "cpu",
            say: Callable[[str], None] | None = None,
            seed: int | None = None, heatmaps: int = 8, out: str | Path | None = None,
            figures: bool = True, progress: bool = True) -> dict:
    """Anomaly detection on ``data`` (normal = 0, abnormal = 1; unknown labels are left out).

    Test and validation images: see :mod:`.selection` (by default a directory's non-"train"
    splits, never the checkpoint's pre-training images). Without ``test_data`` that pool is
    split BY GROUP (patient) into adapt/val/test with ``test_fraction`` / ``val_fraction``
    of the groups (no val split when ``val_data`` is given: it chooses the threshold); the
    adaptation uses only the normal images of the adapt part. With ``test_data`` (and
    optionally ``val_data``), ``data`` is the adaptation set and only its normals are used.

    ``adapt_steps`` (default ``adapt_epochs`` passes over the normal images; 0 = score with
    the pre-trained model as it is). ``split_seed`` seeds the splits and the adaptation's
    batch order (``seed`` is its old name); ``init_seed`` replaces the model by a random
    initialisation with that seed. ``progress``: a bar on stderr during the adaptation.
    Returns the results dict (an :class:`~afire.display.EvalResults`, shown as tables in
    Jupyter; also written to ``out/results.json`` with figures when ``out`` is given);
    ``results["sets"]`` holds the adaptation normals and the scored test / validation
    images as :class:`EvalData`, and ``arrays`` their row indices in the pool
    (``results["pool"]``) when there is one.
    """
    split_seed = split_seed_of(split_seed, seed)
    model, meta, encoder = setup_model(checkpoint_or_model, init_seed, pretrain_meta,
                                       device)
    S = model.cfg.img_size
    inp = resolve_inputs(meta, S, data, test_data, val_data, split=split,
                         allow_train_split=allow_train_split, exclude=exclude, say=say)
    pool = inp.pool
    if pool is not None:
        if not (pool.abnormal >= 0).any():
            _labelled(pool, "", pool.source)          # raises: nothing is labelled
        tr, va, te = _split(pool, test_fraction, 0.0 if inp.val is not None else val_fraction,
                            split_seed)
        rows = {"adapt": np.flatnonzero(tr), "test": np.flatnonzero(te),
                "val": np.flatnonzero(va)}
        rows = {k: v[pool.abnormal[v] >= 0] for k, v in rows.items()}
        rows["adapt"] = rows["adapt"][pool.abnormal[rows["adapt"]] == 0]
        train = pool.subset(np.flatnonzero(tr))
        test = _labelled(pool.subset(rows["test"]), "test", pool.source)
        val = inp.val if inp.val is not None else \
            (pool.subset(rows["val"]) if va.any() else None)
        if inp.val is not None:
            rows["val"] = np.zeros(0, np.int64)
    else:
        train, rows = inp.train, None
        test = _labelled(inp.test, "test", inp.test.source)
        val = inp.val
    if val is not None:
        val = val.subset(np.flatnonzero(val.abnormal >= 0))
    normal_rows = np.flatnonzero(train.abnormal == 0)
    adapt_set = train.subset(normal_rows)
    normals = adapt_set.images
    if adapt_steps is None:
        adapt_steps = int(math.ceil(adapt_epochs * len(normals) / min(batch, max(1, len(normals)))))
    if adapt_steps > 0 and len(normals) == 0:
        raise ValueError(f"no normal training image to adapt on in {train.source} "
                         f"({train.counts()}); pass adapt_steps=0 to score the model as it "
                         "is, or use data with labelled normal images")
    if adapt_steps > 0:
        with progress_bar(progress, adapt_steps, "anomaly: adapt", unit="step") as bar:
            adapted, log = adapt(model, normals, adapt_steps, lr, batch, split_seed, bar)
    else:
        adapted, log = model, []
    s_test = adapted.anomaly_log_score(test.images)
    y_test = test.abnormal
    if len(normals) >= 2:
        f_test = feature_distance(gap_features(adapted, normals),
                                  gap_features(adapted, test.images))
        f_auc = M.roc_auc(y_test, f_test)
    else:
        f_test, f_auc = np.full(len(test), np.nan), math.nan
    fpr, tpr, _ = M.roc_curve(y_test, s_test)
    auc = M.roc_auc(y_test, s_test)
    t_squid, _ = M.best_accuracy_threshold(y_test, s_test)
    metrics = {"auc": auc,
               "squid": dict(M.binary_metrics(y_test, s_test, t_squid), label=SQUID_LABEL),
               "feature_distance": {"auc": f_auc, "label": FEATURE_LABEL}}
    counts = {"adapt_normal": int(len(normals)), "adapt_abnormal_unused":
              int((train.abnormal == 1).sum()), "test": test.counts()}
    arrays = {"test_log_score": s_test, "test_abnormal": y_test,
              "test_feature_distance": f_test}
    if rows is not None:
        arrays.update(test_rows=rows["test"], adapt_rows=rows["adapt"], val_rows=rows["val"])
    for name, part in (("test", test), ("adapt", adapt_set), ("val", val)):
        if part is not None and part.paths is not None:
            arrays[f"{name}_paths"] = part.paths
    if val is not None:
        s_val = adapted.anomaly_log_score(val.images) if len(val) else np.zeros(0)
        counts["val"] = val.counts()
        arrays.update(val_log_score=s_val, val_abnormal=val.abnormal)
        if len(np.unique(val.abnormal)) == 2:
            t_val, _ = M.best_accuracy_threshold(val.abnormal, s_val)
            metrics["val_threshold"] = dict(M.binary_metrics(y_test, s_test, t_val),
                                            label=VAL_LABEL)
            metrics["auc_val"] = M.roc_auc(val.abnormal, s_val)
        else:
            metrics["val_threshold"] = {"label": VAL_LABEL, "error": "the validation split "
                                        "holds a single class; no threshold chosen"}
    results = {
        "protocol": "anomaly",
        "description": "METHOD §6: adapt with Tasks I+II on target normals, Eq. 51 score "
                       "(log 1/A(x)), abnormal positive",
        "settings": {"lr": lr, "batch": min(batch, max(1, len(normals))),
                     "adapt_steps": adapt_steps, "optimizer": "Adam (no weight decay), cosine",
                     "test_fraction": test_fraction,
                     "val_fraction": val_fraction if pool is not None and inp.val is None
                     else None,
                     "validation": "given" if inp.val is not None else
                     ("by group" if pool is not None and val is not None else None),
                     "split_seed": split_seed, "init_seed": init_seed,
                     "split": "given" if test_data is not None else "by group",
                     "model": model.cfg.preset, "img_size": S, "pretrain_step": model.step,
                     "source": (pool if pool is not None else inp.test).source},
        "encoder": encoder,
        "data": inp.info,
        "notes": inp.notes,
        "counts": counts,
        "metrics": metrics,
        "adaptation": {"steps": len(log),
                       "loss_first": float(np.mean([r["loss"] for r in log[:10]])) if log else None,
                       "loss_last": (float(np.mean([r["loss"] for r in log[-10:]]))
                                     if log else None)},
        "arrays": arrays,
        "figures": [],
    }
    if out is not None:
        if figures:
            results["figures"] = _figures(adapted, test, s_test, (fpr, tpr, auc), Path(out),
                                          heatmaps, split_seed)
        write_results(out, results)
    results["model"] = adapted
    results["pool"] = pool
    results["sets"] = {"adapt": adapt_set, "test": test, "val": val}
    return results_of(results)


def _figures(model: AFiRe, test: EvalData, s_test, roc, out: Path, n: int, seed: int) -> list:
    figs = [try_figures(F.roc_figure, {"anomaly score": roc}, out / "roc.png",
                        title="Anomaly detection (abnormal positive)")]
    # heat maps: the most and least abnormal-looking test images of each class
    pick = []
    for cls in (0, 1):
        idx = np.flatnonzero(test.abnormal == cls)
        idx = idx[np.argsort(-s_test[idx])]
        k = max(1, n // 2)
        pick += list(idx[:k // 2 + k % 2]) + list(idx[len(idx) - k // 2:]) if len(idx) else []
    pick = list(dict.fromkeys(int(i) for i in pick))[:n]
    if pick:
        x = test.images[pick]
        err = model.anomaly_score(x, return_map=True)[1]    # only the per-token map
        titles = [f"{'abn' if test.abnormal[i] else 'nor'} s={s_test[i]:.2f}" for i in pick]
        figs.append(try_figures(F.overlay_figure, x, err, out / "heatmaps.png", titles,
                                title="per-token restoration error (Eq. 51 terms); "
                                      "s = log(1/A(x))",
                                scale="shared", colorbar_label="token error ||y_j - x_j||^2 "
                                "(sum over its pixels, normalised intensities)"))
        normals = test.images[test.abnormal == 0][:4]
        if len(normals):
            xp, tok = slm_images(model, normals, seed)
            cols = {"x": normals, "x' (SLM)": xp,
                    "R(x'), lesion tokens masked": _to_uint8(model.restore(xp, tok)),
                    "R(x)": _to_uint8(model.restore(normals))}
            figs.append(try_figures(F.grid_figure, cols, out / "restorations.png",
                                    title="restorations (paper Fig. 9/10)"))
    return [f for f in figs if f]
