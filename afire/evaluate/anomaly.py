"""Anomaly detection exactly as METHOD §6.

1. Initialise student, teacher, decoder and prototypes from a pre-trained model.
2. Adapt with Tasks I+II (the full AFiRe step, `AFiRe.train_step`) on the NORMAL training
   images of the target set: Adam (no weight decay), lr 1e-4, cosine, batch 64.
3. Score every test image (higher = more abnormal). The paper's score is Eq. 51 (``eq51``:
   1/A(x), reported as log(1/A(x)), monotone in it and never overflowing). Every score of
   ``afire.model.ANOMALY_SCORES`` is computed in C (csrc/core/anomaly.c) and reported, each
   labelled with whether it is in the paper; ``score`` picks the one the protocol's
   thresholds and headline AUC use (``DEFAULT_SCORE``, chosen on validation splits, see
   docs/RESULTS.md). The reference statistics of the scores that need them (per-position
   error statistics, Gaussians and nearest neighbours of teacher tokens) are fitted in C on
   the adaptation normals, after the adaptation.
4. AUC with abnormal as positive; ACC/F1 at the best-accuracy ROC threshold chosen ON THE
   TEST SET (the SQUID protocol the paper follows; optimistic), and at a threshold chosen
   on a separate validation split (the honest number).
5. Trivial baselines on exactly the same test (and validation) images, reported beside
   every score: blur (minus the mean absolute Laplacian), image standard deviation and the
   reconstruction error of a pixel PCA fitted on the adaptation normals. They are NumPy
   reporting only, not afire scores. On Kermany the normal images are much sharper than the
   pneumonia ones, so blur alone reaches AUC ~0.9: a score that beats it there but not on a
   less confounded set (NIH) is probably a blur detector.

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

from .. import _C
from ..model import ANOMALY_SCORES, GRAY_MEAN, GRAY_STD, AFiRe
from . import figures as F
from . import metrics as M
from ..data.progress import Progress
from .common import (EvalData, group_holdout, progress_bar, results_of,
                     setup_model, split_seed_of, try_figures, write_results)
from .selection import resolve_inputs

SQUID_LABEL = "SQUID protocol (threshold chosen on test)"
FEATURE_LABEL = ("Mahalanobis distance of GAP teacher features to the adaptation normals "
                 "(not in the paper)")
SHRINKAGE = 0.1   # covariance -> (1 - a) cov + a * mean variance * I: D may exceed the normals
VAL_LABEL = "threshold chosen on the validation split"
# The recommended score: the best mean validation AUC over kermany_native and nih14_dev
# (benchmarks/anomaly_scale.py; the selection and its numbers are in docs/RESULTS.md).
DEFAULT_SCORE = "token_knn"
PCA_COMPONENTS = 10
BASELINES = {
    "blur": "minus the mean absolute Laplacian of the image (blurrier = more abnormal); a "
            "baseline, not an afire score",
    "image_std": "standard deviation of the pixels; a baseline, not an afire score",
    "pixel_pca": f"squared reconstruction error of a {PCA_COMPONENTS}-component pixel PCA "
                 "fitted on the adaptation normals; a baseline, not an afire score",
}


def score_label(kind: str) -> str:
    """What a score is, saying whether it is in the paper."""
    paper, text = ANOMALY_SCORES[kind]
    return f"{text} ({'in the paper' if paper else 'not in the paper'})"


def blur_score(images: np.ndarray) -> np.ndarray:
    """Minus the mean absolute 4-neighbour Laplacian of each uint8 image (in [0, 1] units):
    higher = blurrier."""
    x = np.asarray(images, np.float32) / 255.0
    lap = np.abs(4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1]
                 - x[:, 1:-1, :-2] - x[:, 1:-1, 2:])
    return -lap.mean(axis=(1, 2)).astype(np.float64)


def image_std(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float64) / 255.0
    return x.reshape(len(x), -1).std(axis=1)


def pixel_pca_error(normals: np.ndarray, images: np.ndarray,
                    components: int = PCA_COMPONENTS) -> np.ndarray:
    """Mean squared residual of each image after projection onto the first ``components``
    principal components of the normal images' pixels ([0, 1] units)."""
    a = np.asarray(normals, np.float64).reshape(len(normals), -1) / 255.0
    x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
    mu = a.mean(axis=0)
    k = max(0, min(components, len(a) - 1))
    v = np.linalg.svd(a - mu, full_matrices=False)[2][:k]
    r = (x - mu) - ((x - mu) @ v.T) @ v
    return (r ** 2).mean(axis=1)


def baseline_scores(normals: np.ndarray, images: np.ndarray) -> dict[str, np.ndarray]:
    """The trivial baselines of every anomaly number, on ``images`` (higher = more
    abnormal by each one's own definition; none is fitted to labels)."""
    out = {"blur": blur_score(images), "image_std": image_std(images)}
    if len(normals) >= 2:
        out["pixel_pca"] = pixel_pca_error(normals, images)
    return out


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
    ``normal_features`` [M, D] (covariance shrunk towards a multiple of I), computed in C
    (``afire._C.anomaly.gauss_fit`` / ``gauss_score``: the "feature_distance" score on GAP
    features given directly)."""
    f0 = np.asarray(normal_features, np.float32)
    if len(f0) < 2:
        raise ValueError("feature_distance needs at least 2 normal images")
    # one "patch token" per image after a dummy cls token: one Gaussian of the features
    tok = np.ascontiguousarray(np.stack([np.zeros_like(f0), f0], axis=1))
    mean, prec = _C.anomaly.gauss_fit(tok, shrinkage=shrinkage)
    f = np.asarray(features, np.float32)
    x = np.ascontiguousarray(np.stack([np.zeros_like(f), f], axis=1))
    return _C.anomaly.gauss_score(x, mean, prec)[0]


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
            figures: bool = True, progress: bool = True, score: str = DEFAULT_SCORE,
            scores: Any = None, knn_k: int = 1, inpaint_stride: int = 2) -> dict:
    """Anomaly detection on ``data`` (normal = 0, abnormal = 1; unknown labels are left out).

    Test and validation images: see :mod:`.selection` (by default a directory's non-"train"
    splits, never the checkpoint's pre-training images). Without ``test_data`` that pool is
    split BY GROUP (patient) into adapt/val/test with ``test_fraction`` / ``val_fraction``
    of the groups (no val split when ``val_data`` is given: it chooses the threshold); the
    adaptation uses only the normal images of the adapt part. With ``test_data`` (and
    optionally ``val_data``), ``data`` is the adaptation set and only its normals are used.

    ``adapt_steps`` (default ``adapt_epochs`` passes over the normal images; 0 = score with
    the pre-trained model as it is). ``score``: the score whose AUC is ``metrics["auc"]``
    and whose thresholds are chosen (a name of ``afire.model.ANOMALY_SCORES``; "eq51" is the
    paper's); ``scores``: which ones to compute and report (default: all; ``score`` always
    is); ``knn_k``, ``inpaint_stride``: the nearest neighbours of "token_knn" and the mask
    stride of the in-painting scores. ``split_seed`` seeds the splits and the adaptation's
    batch order (``seed`` is its old name); ``init_seed`` replaces the model by a random
    initialisation with that seed. ``progress``: a bar on stderr during the adaptation.
    Returns the results dict (an :class:`~afire.display.EvalResults`, shown as tables in
    Jupyter; also written to ``out/results.json`` with figures when ``out`` is given);
    ``results["sets"]`` holds the adaptation normals and the scored test / validation
    images as :class:`EvalData`, and ``arrays`` their row indices in the pool
    (``results["pool"]``) when there is one.
    """
    split_seed = split_seed_of(split_seed, seed)
    kinds = _kinds(score, scores)
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
    if score not in ("eq51", "inpaint") and len(normals) < 2:
        raise ValueError(f"score {score!r} compares with the adaptation normals and needs at "
                         f"least 2 of them ({train.source} gives {len(normals)}); pass "
                         "score='eq51' (the paper's) or 'inpaint', or use more normal images")
    if adapt_steps > 0 and len(normals) == 0:
        raise ValueError(f"no normal training image to adapt on in {train.source} "
                         f"({train.counts()}); pass adapt_steps=0 to score the model as it "
                         "is, or use data with labelled normal images")
    if adapt_steps > 0:
        with progress_bar(progress, adapt_steps, "anomaly: adapt", unit="step") as bar:
            adapted, log = adapt(model, normals, adapt_steps, lr, batch, split_seed, bar)
    else:
        adapted, log = model, []
    s_test, per, ref = _score_all(adapted, normals, test.images, kinds, knn_k, inpaint_stride)
    y_test = test.abnormal
    s_main = per[score][0]
    fpr, tpr, _ = M.roc_curve(y_test, s_main)
    auc = M.roc_auc(y_test, s_main)
    t_squid, _ = M.best_accuracy_threshold(y_test, s_main)
    base_test = baseline_scores(normals, test.images)
    metrics = {"score": score, "score_label": score_label(score),
               "score_in_paper": ANOMALY_SCORES[score][0], "auc": auc,
               "squid": dict(M.binary_metrics(y_test, s_main, t_squid), label=SQUID_LABEL),
               "scores": {k: {"auc": _auc_or_nan(y_test, v[0]), "in_paper": ANOMALY_SCORES[k][0],
                              "label": score_label(k)} for k, v in per.items()},
               "baselines": {k: {"auc": M.roc_auc(y_test, v), "label": BASELINES[k]}
                             for k, v in base_test.items()}}
    if "feature_distance" in per:
        metrics["feature_distance"] = {"auc": metrics["scores"]["feature_distance"]["auc"],
                                       "label": FEATURE_LABEL}
    counts = {"adapt_normal": int(len(normals)), "adapt_abnormal_unused":
              int((train.abnormal == 1).sum()), "test": test.counts()}
    arrays = {"test_score": s_main, "test_log_score": s_test, "test_abnormal": y_test}
    arrays.update({f"test_{k}": v[0] for k, v in per.items() if k != "eq51"})
    arrays.update({f"test_baseline_{k}": v for k, v in base_test.items()})
    if rows is not None:
        arrays.update(test_rows=rows["test"], adapt_rows=rows["adapt"], val_rows=rows["val"])
    for name, part in (("test", test), ("adapt", adapt_set), ("val", val)):
        if part is not None and part.paths is not None:
            arrays[f"{name}_paths"] = part.paths
    if val is not None:
        if len(val):
            s_val_eq51, per_val, _ = _score_all(adapted, normals, val.images, kinds, knn_k,
                                                inpaint_stride, ref)
            base_val = baseline_scores(normals, val.images)
        else:
            s_val_eq51, per_val, base_val = np.zeros(0), {k: (np.zeros(0),) for k in per}, {}
        s_val = per_val[score][0]
        counts["val"] = val.counts()
        arrays.update(val_log_score=s_val_eq51, val_score=s_val, val_abnormal=val.abnormal)
        if len(np.unique(val.abnormal)) == 2:
            t_val, _ = M.best_accuracy_threshold(val.abnormal, s_val)
            metrics["val_threshold"] = dict(M.binary_metrics(y_test, s_main, t_val),
                                            label=VAL_LABEL)
            metrics["auc_val"] = M.roc_auc(val.abnormal, s_val)
            for k, v in per_val.items():
                metrics["scores"][k]["auc_val"] = _auc_or_nan(val.abnormal, v[0])
            for k, v in base_val.items():
                metrics["baselines"][k]["auc_val"] = M.roc_auc(val.abnormal, v)
        else:
            metrics["val_threshold"] = {"label": VAL_LABEL, "error": "the validation split "
                                        "holds a single class; no threshold chosen"}
    results = {
        "protocol": "anomaly",
        "description": f"METHOD §6: adapt with Tasks I+II on target normals, score "
                       f"{score!r} ({'in' if ANOMALY_SCORES[score][0] else 'not in'} the "
                       "paper; every score and the baselines are reported), abnormal positive",
        "settings": {"lr": lr, "batch": min(batch, max(1, len(normals))),
                     "adapt_steps": adapt_steps, "optimizer": "Adam (no weight decay), cosine",
                     "test_fraction": test_fraction,
                     "val_fraction": val_fraction if pool is not None and inp.val is None
                     else None,
                     "validation": "given" if inp.val is not None else
                     ("by group" if pool is not None and val is not None else None),
                     "split_seed": split_seed, "init_seed": init_seed,
                     "split": "given" if test_data is not None else "by group",
                     "score": score, "scores": list(kinds),
                     "reference": ref.summary() if ref is not None else None,
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
            results["figures"] = _figures(adapted, test, score, per, (fpr, tpr, auc),
                                          Path(out), heatmaps, split_seed)
        write_results(out, results)
    results["model"] = adapted
    results["pool"] = pool
    results["sets"] = {"adapt": adapt_set, "test": test, "val": val}
    return results_of(results)


def _kinds(score: str, scores: Any) -> tuple[str, ...]:
    if score not in ANOMALY_SCORES:
        raise ValueError(f"unknown anomaly score {score!r}; choose from {list(ANOMALY_SCORES)}")
    kinds = tuple(ANOMALY_SCORES) if scores is None else \
        ((scores,) if isinstance(scores, str) else tuple(scores))
    bad = [k for k in kinds if k not in ANOMALY_SCORES]
    if bad:
        raise ValueError(f"unknown anomaly score(s) {bad}; choose from {list(ANOMALY_SCORES)}")
    return tuple(dict.fromkeys(("eq51", score) + kinds))


def _auc_or_nan(y, s) -> float:
    s = np.asarray(s, np.float64)
    return M.roc_auc(y, s) if np.isfinite(s).all() else math.nan


def _score_all(model: AFiRe, normals: np.ndarray, images: np.ndarray, kinds, knn_k: int,
               stride: int, ref=None):
    """(Eq. 51 log scores, {kind: (score, map)}, reference): every kind, computed in C. The
    kinds that need a reference get NaN when fewer than 2 adaptation normals exist."""
    need = [k for k in kinds if k not in ("eq51", "inpaint")]
    if ref is None and need and len(normals) >= 2:
        ref = model.anomaly_reference(normals, kinds=need, stride=stride,
                                      k=min(knn_k, len(normals)), shrinkage=SHRINKAGE)
    have = [k for k in kinds if k not in need or ref is not None]
    out = model.anomaly_scores(images, have, ref)
    g = model.cfg.img_size // model.cfg.patch_size
    for k in kinds:
        if k not in out:
            side = 1 if k == "feature_distance" else g
            out[k] = (np.full(len(images), np.nan), np.full((len(images), side, side), np.nan,
                                                          np.float32))
    return out["eq51"][0], {k: out[k] for k in kinds}, ref


def _figures(model: AFiRe, test: EvalData, score: str, per: dict, roc, out: Path, n: int,
             seed: int) -> list:
    s_test = per[score][0]
    figs = [try_figures(F.roc_figure, {score: roc}, out / "roc.png",
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
        titles = [f"{'abn' if test.abnormal[i] else 'nor'} s={s_test[i]:.2f}" for i in pick]
        figs.append(try_figures(F.overlay_figure, x, per[score][1][pick], out / "heatmaps.png",
                                titles, title=f"per-token map of {score!r}: "
                                              f"{ANOMALY_SCORES[score][1]}",
                                scale="shared", colorbar_label=f"{score} per token"))
        # every score's map on the same few images (each map on its own scale)
        few = pick[:min(4, len(pick))]
        kinds = [k for k in per if k != "feature_distance"]
        xs = np.concatenate([test.images[few]] * len(kinds))
        maps = np.concatenate([per[k][1][few] for k in kinds])
        titles = [f"{k} {'abn' if test.abnormal[i] else 'nor'}" for k in kinds for i in few]
        figs.append(try_figures(F.overlay_figure, xs, maps, out / "heatmaps_scores.png",
                                titles, title="per-token maps of every score (each image on "
                                              "its own scale)", scale="per_image"))
        normals = test.images[test.abnormal == 0][:4]
        if len(normals):
            xp, tok = slm_images(model, normals, seed)
            cols = {"x": normals, "x' (SLM)": xp,
                    "R(x'), lesion tokens masked": _to_uint8(model.restore(xp, tok)),
                    "R(x)": _to_uint8(model.restore(normals))}
            figs.append(try_figures(F.grid_figure, cols, out / "restorations.png",
                                    title="restorations (paper Fig. 9/10)"))
    return [f for f in figs if f]
