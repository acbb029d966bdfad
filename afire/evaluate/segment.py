"""Segmentation (paper Table 2, SIIM-ACR Dice; METHOD §6): the TEACHER encoder + a per-token
head predicting PxP mask logits, Dice + BCE loss, trained in C
(``afire._C.downstream.Segmenter``) with the fine-tuning loop of :mod:`.finetune`
(AdamW, cosine lr, augmentation applied to image and mask alike, early stopping on the
validation mean Dice, label fractions, patient-wise folds).

Why a per-token head and not an upsampling decoder: it is METHOD §6's first choice, it adds
only D x P*P weights so the Dice measures the pre-trained encoder rather than a decoder
trained on the labels, and it needs no extra architecture choices (widths, skips). Its
limit is resolution: mask detail finer than a patch comes from the linear map alone.

Masks: SIIM-ACR RLE decoded by ``afire prepare`` (a prepared directory with masks), the
phantom's lesion masks (``mask="lesion"``), or a phantom organ (``mask="lung"``, any name
of ``afire.data.ORGAN_LABELS``).

Dice: per test image at probability 0.5; an image whose prediction and truth are both
empty scores 1 (the SIIM-ACR convention). Also reported: the mean over images with a
non-empty truth only (the stricter number).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import ORGAN_LABELS
from . import figures as F
from . import metrics as M
from .common import (EvalData, downstream, mean_std, progress_bar, results_of, setup_model,
                     split_seed_of, try_figures, write_results)
from .finetune import _as_fractions, arrange, train_folds
from .selection import resolve_inputs


def _mask_array(d: EvalData, mask: str) -> np.ndarray:
    """uint8 0/1 masks [N,S,S] of every image of d (ValueError if d has none)."""
    if mask == "lesion":
        if d.masks is None:
            raise ValueError(f"{d.source}: no masks (prepare SIIM with its RLE CSV, or pass "
                             "phantom data with lesion_masks)")
        return (d.masks > 0).astype(np.uint8)
    if mask in ORGAN_LABELS:
        if d.organ_labels is None:
            raise ValueError(f"mask={mask!r} needs phantom organ labels, {d.source} has none")
        return (d.organ_labels == ORGAN_LABELS.index(mask)).astype(np.uint8)
    raise ValueError(f"mask must be 'lesion' or an organ of {ORGAN_LABELS}, got {mask!r}")


def masks_of(d: EvalData, mask: str) -> tuple[EvalData, np.ndarray]:
    """(images with a known mask, uint8 0/1 masks [N,S,S]). Lesion masks: where any image
    is labelled, only the labelled ones (an unlabelled image's empty mask means unknown)."""
    m = _mask_array(d, mask)
    if mask == "lesion" and (d.abnormal >= 0).any():
        keep = np.flatnonzero(d.abnormal >= 0)
        return d.subset(keep), m[keep]
    if mask == "lesion" and d.paths is not None:
        # read from a directory: an unlabelled image's empty mask is unknown, not empty
        raise ValueError(
            f"{d.source}: none of these {len(d)} images has a known lesion mask (e.g. SIIM's "
            "'test' split is unlabelled); segment a labelled split (--split train "
            "--allow-train-split, if the checkpoint did not pre-train on it: its own "
            "pre-training images are left out anyway) or pass --test-data")
    return d, m


def dice_summary(prob: np.ndarray, truth: np.ndarray) -> dict:
    per = M.dice(prob, truth)
    pos = truth.reshape(len(truth), -1).any(axis=1)
    return {"dice": float(per.mean()),
            "dice_positive_only": float(per[pos].mean()) if pos.any() else float("nan"),
            "n_positive": int(pos.sum()), "n": int(len(per))}


def segment(checkpoint_or_model: Any, data: Any, *, test_data: Any = None,
            val_data: Any = None, mask: str = "lesion",
            label_fractions: float | Sequence[float] = (1.0,), folds: int = 1,
            test_fraction: float = 0.2, val_fraction: float = 0.1, epochs: int = 50,
            batch: int = 32, lr: float = 1e-4, weight_decay: float = 0.05,
            patience: int = 10, warmup_epochs: int = 0, augment: bool = True,
            freeze_encoder: bool = False, split_seed: int | None = None,
            init_seed: int | None = None, split: str = "auto",
            allow_train_split: bool = False, exclude: Any = None,
            pretrain_meta: dict | None = None, device: str = "cpu",
            say: Callable[[str], None] | None = None,
            seed: int | None = None, show: int = 8, out: str | Path | None = None,
            figures: bool = True, progress: bool = True) -> dict:
    """Fine-tune the teacher encoder for segmentation and report the test Dice.

    Test and validation images: see :mod:`.selection`; splits, validation and seeds as in
    :func:`~.finetune.finetune`. ``arrays`` hold, per label fraction f and fold k, the
    row indices (into ``results["pool"]``) ``f{f}_k{k}_train`` / ``_val`` / ``_test`` and
    the per-image test Dice ``f{f}_k{k}_test_dice``. ``progress``: a bar of the training
    epochs on stderr. Returns the results dict (an :class:`~afire.display.EvalResults`).
    """
    split_seed = split_seed_of(split_seed, seed)
    model, meta, encoder = setup_model(checkpoint_or_model, init_seed, pretrain_meta,
                                       device)
    ds = downstream()
    S = model.cfg.img_size
    inp = resolve_inputs(meta, S, data, test_data, val_data, split=split,
                         allow_train_split=allow_train_split, exclude=exclude, say=say)
    fractions = _as_fractions(label_fractions)
    d, splits = arrange(inp, lambda part, role: masks_of(part, mask)[0], folds, test_fraction,
                        split_seed)
    m = _mask_array(d, mask)
    cfg = model.cfg.to_dict()

    def make_net(cap, net_seed):
        return ds.Segmenter(cfg, cap, seed=net_seed, freeze_encoder=freeze_encoder)

    def batch_args(sel):
        return np.ascontiguousarray(d.images[sel]), np.ascontiguousarray(m[sel])

    def val_dice(predict, va):
        return M.dice(predict(va), m[va]).mean() if len(va) else float("nan")

    runs, show_data, arrays = [], None, {}
    bar = progress_bar(progress, len(fractions) * len(splits) * epochs, "segment",
                       unit="epoch")
    for frac in fractions:
        fold_res = []
        for k, _net, predict, tr, va, te, hist in train_folds(
                model, d, splits, frac, make_net, batch_args, val_dice,
                val_fraction=val_fraction, batch=batch, seed=split_seed, epochs=epochs, lr=lr,
                weight_decay=weight_decay, patience=patience, warmup_epochs=warmup_epochs,
                augment=augment, freeze_encoder=freeze_encoder, bar=bar):
            prob = predict(te)
            fold_res.append(dict(dice_summary(prob, m[te]), fold=k, n_train=int(len(tr)),
                                 n_val=int(len(va)), best_epoch=hist["best_epoch"],
                                 best_val_dice=hist["best_val"],
                                 epochs_run=len(hist["history"]), history=hist["history"]))
            key = f"f{frac:g}_k{k}"
            arrays.update({f"{key}_train": tr, f"{key}_val": va, f"{key}_test": te,
                           f"{key}_test_dice": M.dice(prob, m[te]).astype(np.float32)})
            if show_data is None or (frac == max(fractions) and k == 0):
                show_data = (te, prob)
        runs.append({"label_fraction": frac,
                     "dice": mean_std([f["dice"] for f in fold_res]),
                     "dice_positive_only": mean_std([f["dice_positive_only"] for f in fold_res]),
                     "folds": fold_res})
    bar.close()
    results = {
        "protocol": "segment",
        "description": "teacher encoder + per-token PxP mask head, Dice + BCE, AdamW, cosine "
                       "lr, early stopping on validation Dice (METHOD §6)",
        "settings": {"mask": mask, "label_fractions": fractions,
                     "folds": folds if test_data is None else "given test set",
                     "test_fraction": test_fraction,
                     "val_fraction": None if inp.val is not None else val_fraction,
                     "validation": "given" if inp.val is not None else "by group",
                     "epochs": epochs, "batch": batch, "lr": lr, "weight_decay": weight_decay,
                     "patience": patience, "augment": augment, "freeze_encoder": freeze_encoder,
                     "split_seed": split_seed, "init_seed": init_seed,
                     "model": model.cfg.preset, "img_size": S,
                     "pretrain_step": model.step, "dice_empty_convention": 1.0,
                     "source": d.source},
        "encoder": encoder,
        "data": inp.info,
        "notes": inp.notes,
        "counts": {"all": d.counts()},
        "metrics": {f"dice@{r['label_fraction']:g}": r["dice"] for r in runs},
        "runs": runs,
        "arrays": dict(arrays, **({} if d.paths is None else {"pool_paths": d.paths})),
        "figures": [],
    }
    if out is not None:
        if figures and show_data is not None and show > 0:
            te, prob = show_data
            # images with the largest true masks first, so the figure shows something
            order = np.argsort(-m[te].reshape(len(te), -1).sum(1), kind="stable")[:show]
            per = M.dice(prob[order], m[te][order])
            f = try_figures(F.mask_figure, d.images[te][order], m[te][order], prob[order],
                            Path(out) / "segmentation.png",
                            title="truth (green contour), prediction (red)",
                            titles=[f"Dice {v:.2f}" for v in per])
            results["figures"] = [f] if f else []
        write_results(out, results)
    results["pool"] = d
    return results_of(results)
