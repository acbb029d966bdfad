"""Shared plumbing of the evaluation protocols: data input, patient-wise splits, models,
features, results.json.

Data input (`load_data`) accepts
- an :class:`EvalData` (returned as is, resized if needed),
- a prepared directory (``afire prepare`` output, read with :class:`ShardDataset`),
- a directory in the shared-data layout (``labels.csv`` + images, read with
  ``read_shared`` and resized with ``afire.data.image.resize_square``),
- a dict of arrays: ``images`` uint8 [N,S,S] and optionally ``labels`` ([N] ints: 0
  normal, >0 abnormal, as `phantom_dataset` returns; or [N,C] multi-label floats),
  ``abnormal`` [N], ``groups`` [N], ``masks`` / ``lesion_masks`` / ``organ_labels``,
  ``paths`` [N] and ``splits`` [N].

`load_data` returns every image of its input. Which of them a protocol may test on (the
recorded split, the images a checkpoint pre-trained on) is decided by :mod:`.selection`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import _C
from ..data.progress import Progress
from ..display import EvalResults
from ..model import AFiRe


@dataclass
class EvalData:
    """Images with everything a protocol may need, aligned on the first axis.

    images uint8 [N,S,S]; abnormal int64 [N] (0, 1, -1 unknown); labels float32 [N,C]
    (NaN = unknown) with label_names; groups (patient ids) [N]; masks uint8 [N,S,S] or
    None; organ_labels uint8 [N,S,S] or None (phantom anatomy); paths str [N] (the
    manifest path / image file; None for arrays) and splits str [N] (the split recorded
    by ``afire prepare`` or the shared-data reader; None for arrays).
    """

    images: np.ndarray
    abnormal: np.ndarray
    groups: np.ndarray
    labels: np.ndarray | None = None
    label_names: list[str] = field(default_factory=list)
    masks: np.ndarray | None = None
    organ_labels: np.ndarray | None = None
    source: str = "arrays"
    paths: np.ndarray | None = None
    splits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> "EvalData":
        idx = np.asarray(idx)

        def take(a):
            return None if a is None else a[idx]
        return replace(self, images=self.images[idx], abnormal=self.abnormal[idx],
                       groups=self.groups[idx], labels=take(self.labels),
                       masks=take(self.masks), organ_labels=take(self.organ_labels),
                       paths=take(self.paths), splits=take(self.splits))

    def digests(self) -> np.ndarray:
        """str [N]: a hash of each image's pixel bytes (pixel-identical images share it)."""
        return image_digests(self.images)

    def targets(self, target: str | list[str] = "abnormal") -> tuple[np.ndarray, list[str]]:
        """float32 [N,C] targets and class names. ``target``: "abnormal" (one binary class,
        NaN where unknown), "findings" (every multi-label finding) or a list of names."""
        if target == "abnormal":
            y = self.abnormal.astype(np.float32)[:, None]
            y[y < 0] = np.nan
            return y, ["abnormal"]
        if self.labels is None or not self.label_names:
            raise ValueError(f"target={target!r} needs multi-label findings, this data "
                             f"({self.source}) has none; use target='abnormal'")
        names = self.label_names if target == "findings" else list(target)
        missing = [n for n in names if n not in self.label_names]
        if missing:
            raise ValueError(f"unknown finding(s) {missing}; this data has {self.label_names}")
        cols = [self.label_names.index(n) for n in names]
        return self.labels[:, cols].astype(np.float32), names

    def counts(self) -> dict[str, int]:
        return {"images": len(self), "normal": int((self.abnormal == 0).sum()),
                "abnormal": int((self.abnormal == 1).sum()),
                "unknown": int((self.abnormal < 0).sum()),
                "groups": int(len(np.unique(self.groups)))}


def image_digests(images: np.ndarray) -> np.ndarray:
    """str [N]: BLAKE2b-128 of each uint8 image's shape and bytes."""
    out = []
    for x in images:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(x.shape).encode())
        h.update(np.ascontiguousarray(x).tobytes())
        out.append(h.hexdigest())
    return np.asarray(out, dtype=str).reshape(len(out))


def _resize_stack(a: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if a.shape[1:] == (size, size):
        return a
    from ..data.image import resize_square

    return np.stack([resize_square(x, size, "crop", nearest=nearest) for x in a])


class EvaluationNote(UserWarning):
    """Something the evaluation did on its own that changes what is measured (a resize, a
    split choice, images left out). Also recorded in results.json under "notes"."""


def note(say: Callable[[str], None] | None, text: str) -> None:
    """Tell the user: ``say(text)`` (the CLI prints), else an :class:`EvaluationNote`."""
    if say is not None:
        say(text)
    else:
        warnings.warn(text, EvaluationNote, stacklevel=3)


def _resized(d: EvalData, size: int | None, say=None) -> EvalData:
    if size is None or d.images.shape[1:] == (size, size):
        return d
    s = d.images.shape[1]
    note(say, f"{d.source}: images are {s}x{s} px, evaluation runs at {size}x{size} px (the "
              f"model's img_size): resizing them ({'up' if size > s else 'down'}sampled with "
              "Lanczos after a centre crop to square; masks nearest-neighbour)")
    return replace(d, images=_resize_stack(d.images, size, False),
                   masks=None if d.masks is None else _resize_stack(d.masks, size, True),
                   organ_labels=None if d.organ_labels is None
                   else _resize_stack(d.organ_labels, size, True))


def _from_arrays(d: dict) -> EvalData:
    if "images" not in d:
        raise ValueError("a data dict needs an 'images' entry (uint8 [N,S,S])")
    x = np.asarray(d["images"])
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"images must be uint8 [N,S,S], got {x.dtype} {x.shape}")
    n = len(x)
    labels, names = None, []
    lab = d.get("labels")
    if "abnormal" in d:
        abnormal = np.asarray(d["abnormal"]).astype(np.int64)
    elif lab is not None and np.ndim(lab) == 1:
        abnormal = (np.asarray(lab) > 0).astype(np.int64)
    else:
        abnormal = np.full(n, -1, np.int64)
    if lab is not None and np.ndim(lab) == 2:
        labels = np.asarray(lab, np.float32)
        names = list(d.get("label_names") or [f"class_{j}" for j in range(labels.shape[1])])
    groups = np.asarray(d["groups"]).astype(str) if "groups" in d else \
        np.array([str(i) for i in range(n)])
    masks = d.get("masks", d.get("lesion_masks"))
    paths = None if d.get("paths") is None else np.asarray(d["paths"]).astype(str)
    splits = None if d.get("splits") is None else np.asarray(d["splits"]).astype(str)
    for name, a in (("abnormal", abnormal), ("groups", groups), ("labels", labels),
                    ("masks", masks), ("paths", paths), ("splits", splits)):
        if a is not None and len(a) != n:
            raise ValueError(f"{name} has {len(a)} entries for {n} images")
    return EvalData(images=x, abnormal=abnormal, groups=groups, labels=labels,
                    label_names=names,
                    masks=None if masks is None else np.asarray(masks, np.uint8),
                    organ_labels=d.get("organ_labels"), source="arrays", paths=paths,
                    splits=splits)


def _from_prepared(root: str) -> EvalData:
    from ..data import ShardDataset

    ds = ShardDataset(root)
    masks = None
    if ds.meta.get("masks"):
        ds = ShardDataset(root, masks=True)
        masks = ds.images(np.arange(len(ds)), masks=True)
    names = sorted({k for r in ds.records for k in (r.get("labels") or {})})
    groups = [g or r["path"] for g, r in zip(ds.field("group", ""), ds.records)]
    return EvalData(images=ds.images(np.arange(len(ds))),
                    abnormal=np.asarray(ds.field("abnormal", -1), np.int64),
                    groups=np.asarray(groups, str).reshape(len(ds)),
                    labels=ds.label_matrix(names) if names else None, label_names=names,
                    masks=masks, source=f"prepared:{root}",
                    paths=np.asarray(ds.field("path"), str).reshape(len(ds)),
                    splits=np.asarray(ds.field("split"), str).reshape(len(ds)))


def _from_shared(root: str, size: int) -> EvalData:
    from ..data import load_gray, read_shared, resize_square

    recs = read_shared(root)
    if not recs:
        raise ValueError(f"{root}: labels.csv lists no readable image")
    names = sorted({k for r in recs for k in r.labels})
    imgs = np.stack([resize_square(load_gray(r.path), size, "crop") for r in recs])
    lab = np.array([[r.labels.get(n, np.nan) for n in names] for r in recs], np.float32)
    return EvalData(images=imgs, abnormal=np.array([r.abnormal for r in recs], np.int64),
                    groups=np.array([r.group or r.path for r in recs], str),
                    labels=lab if names else None, label_names=names,
                    source=f"shared:{root}", paths=np.array([r.path for r in recs], str),
                    splits=np.array([r.split for r in recs], str))


def load_data(data: Any, size: int | None = None,
              say: Callable[[str], None] | None = None) -> EvalData:
    """Any supported data input (see the module docstring) as :class:`EvalData` whose
    images are ``size`` x ``size`` (short side resized, centre crop) when size is given;
    a resize is announced through ``say`` (default: an :class:`EvaluationNote` warning).
    ValueError when the input holds no image."""
    if isinstance(data, EvalData):
        d = data
    elif isinstance(data, dict):
        d = _from_arrays(data)
    elif isinstance(data, (str, os.PathLike)):
        root = os.fspath(data)
        if os.path.exists(os.path.join(root, "meta.json")):
            d = _from_prepared(root)
        elif os.path.exists(os.path.join(root, "labels.csv")):
            if size is None:
                raise ValueError("reading the shared-data layout needs the image size")
            d = _from_shared(root, size)
        else:
            raise ValueError(f"{root}: neither a prepared dataset (meta.json) nor the "
                             "shared-data layout (labels.csv + images)")
    else:
        raise TypeError(f"data must be a path, a dict of arrays or EvalData, got "
                        f"{type(data).__name__}")
    if len(d) == 0:
        raise ValueError(f"{d.source}: no images (an empty preparation or array); evaluation "
                         "needs labelled images")
    return _resized(d, size, say)


# ---------------------------------------------------------------- patient-wise splits
def group_folds(groups, k: int, seed: int = 0) -> np.ndarray:
    """Fold index in [0, k) per image; every image of a group lands in the same fold.
    Groups are shuffled (seeded) and dealt round robin, so folds differ by <= 1 group."""
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    if len(uniq) < k:
        raise ValueError(f"{len(uniq)} groups (patients) cannot make {k} folds")
    perm = np.random.default_rng(seed).permutation(len(uniq))
    fold_of_group = np.empty(len(uniq), np.int64)
    fold_of_group[perm] = np.arange(len(uniq)) % k
    return fold_of_group[inv]


def group_holdout(groups, fraction: float, seed: int = 0) -> np.ndarray:
    """bool [N]: True for the images of about ``fraction`` of the groups (at least one
    group and never all of them)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    if len(uniq) < 2:
        raise ValueError("a patient-wise split needs at least 2 groups")
    n_out = min(max(1, int(round(fraction * len(uniq)))), len(uniq) - 1)
    chosen = np.zeros(len(uniq), bool)
    chosen[np.random.default_rng(seed).permutation(len(uniq))[:n_out]] = True
    return chosen[inv]


def subsample(idx: np.ndarray, fraction: float, seed: int, minimum: int = 2) -> np.ndarray:
    """A seeded random ``fraction`` of idx (label-fraction experiments), >= minimum."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return idx
    n = min(len(idx), max(minimum, int(round(fraction * len(idx)))))
    return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))


# ---------------------------------------------------------------- models and features
def load_model(checkpoint_or_model: Any, batch_size: int | None = None,
               device: str = "cpu", inference: bool = False) -> AFiRe:
    """An :class:`AFiRe` from a checkpoint path (loaded onto ``device``), or the model
    itself (which keeps its own device). ``inference``: a path is loaded as an inference
    model on the CPU (encoders and decoder only; a GPU model keeps its full state)."""
    if isinstance(checkpoint_or_model, AFiRe):
        return checkpoint_or_model
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        p = Path(checkpoint_or_model)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {p} not found")
        return AFiRe.load(p, device=device, batch_size=batch_size,
                          inference=inference and device == "cpu")
    raise TypeError(f"expected a checkpoint path or an AFiRe model, got "
                    f"{type(checkpoint_or_model).__name__}")


def checkpoint_metadata(checkpoint_or_model: Any) -> dict[str, str] | None:
    """The metadata of a checkpoint path (``AFiRe.read_metadata``); None for a model
    object (it carries none)."""
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        p = Path(checkpoint_or_model)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {p} not found")
        return dict(AFiRe.read_metadata(p))
    return None


def random_init(model: AFiRe, seed: int = 0) -> AFiRe:
    """A freshly initialised model of the same configuration and device (the random
    baseline)."""
    return AFiRe(model.cfg.replace(seed=seed), device=model.device,
                 steps_per_epoch=model.steps_per_epoch,
                 batch_size=model.batch_capacity, inference=model.inference)


def gap_features(model: AFiRe, images: np.ndarray, branch: str = "teacher",
                 chunk: int = 256, bar: Progress | None = None) -> np.ndarray:
    """float32 [N, D]: global average pool of the encoder's patch tokens (cls excluded),
    METHOD §6. Computed in chunks so [N, T, D] never has to exist at once; ``bar``
    (a :class:`~afire.data.progress.Progress` counting images) advances by each chunk."""
    out = []
    for i in range(0, len(images), chunk):
        out.append(model.encode(images[i:i + chunk], branch=branch)[:, 1:].mean(axis=1))
        if bar is not None:
            bar.update(len(out[-1]))
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "img") -> Progress:
    """The progress bar of an evaluation phase (on stderr; nothing when not ``enabled``)."""
    return Progress(total, f"evaluate {desc}", unit=unit, enabled=enabled)


def downstream():
    """The C evaluation module, with a clear error when this build lacks it."""
    mod = getattr(_C, "downstream", None)
    if mod is None or not hasattr(mod, "linear_probe_fit"):
        raise ImportError("this afire build has no afire._C.downstream compute (the C "
                          "evaluation kernels); rebuild from a tree that includes them")
    return mod


def copy_teacher_encoder(net, model: AFiRe) -> int:
    """Copy ``model``'s TEACHER encoder into a downstream network (Classifier/Segmenter),
    matching tensors by name through ``net.param_table()``. Returns the number of
    tensors copied; ValueError if any encoder tensor finds no place or shapes differ."""
    src = {k[len("teacher.encoder."):]: v for k, v in model.state_tensors().items()
           if k.startswith("teacher.encoder.")}
    params = net.encoder_params()
    table = net.param_table()
    if isinstance(table, dict):           # {name: {...}} form
        table = [dict(v, name=k) for k, v in table.items()]
    copied = set()
    for p in table:
        name = p["name"]
        for pre in ("encoder.",):
            if name not in src and name.startswith(pre):
                name = name[len(pre):]
        if name not in src:
            continue
        shape = tuple(p["shape"])
        if tuple(src[name].shape) != shape:
            raise ValueError(f"encoder tensor {name}: checkpoint {src[name].shape}, "
                             f"downstream network {shape}")
        if isinstance(params, dict):
            params[p["name"]][...] = src[name]
        else:
            off, n = int(p["offset"]), int(np.prod(shape))
            params[off:off + n] = src[name].ravel()
        copied.add(name)
    missing = sorted(set(src) - copied)
    if missing:
        raise ValueError(f"downstream network has no place for encoder tensors {missing[:5]}")
    return len(copied)


def cosine_lr(base: float, step: int, total: int, warmup: int = 0, final: float = 0.0) -> float:
    """Per-step learning rate: linear warm-up then cosine to ``final``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


# ---------------------------------------------------------------- results
def json_safe(v: Any) -> Any:
    """Plain JSON values: NaN/Inf -> None, numpy scalars/arrays -> Python values."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return json_safe(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (Path,)):
        return os.fspath(v)
    return v


def results_of(results: dict) -> EvalResults:
    """A protocol's results dict as :class:`~afire.display.EvalResults` (the same dict,
    shown as tables in Jupyter)."""
    return EvalResults(results)


def write_results(out: str | os.PathLike, results: dict) -> Path:
    """Write ``results.json`` (NaN as null) and ``arrays.npz`` (the "arrays" entry) into
    ``out``; returns the JSON path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in results.items() if k != "arrays"}
    p = out / "results.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(body), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)
    if results.get("arrays"):
        np.savez_compressed(out / "arrays.npz", **results["arrays"])
    return p


def mean_std(values) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": int(len(v))}


def try_figures(fn, *args, **kwargs) -> str | None:
    """Run a figure function; a missing matplotlib only warns (results still written)."""
    try:
        return fn(*args, **kwargs)
    except ImportError as e:
        warnings.warn(f"figure skipped: {e}", RuntimeWarning, stacklevel=2)
        return None


# ---------------------------------------------------------------- run setup shared by protocols
def split_seed_of(split_seed: int | None, seed: int | None) -> int:
    """The protocol seed: ``split_seed``; ``seed`` is its older name (kept for callers)."""
    if seed is not None and split_seed is not None and int(seed) != int(split_seed):
        raise ValueError(f"seed={seed} and split_seed={split_seed} disagree; seed is the old "
                         "name of split_seed, pass only split_seed")
    s = split_seed if split_seed is not None else seed
    return 0 if s is None else int(s)


def setup_model(checkpoint_or_model: Any, init_seed: int | None = None,
                pretrain_meta: dict | None = None, device: str = "cpu",
                inference: bool = False) -> tuple[AFiRe, dict | None, dict]:
    """(model, checkpoint metadata, an "encoder" record for results.json).

    ``init_seed`` given: the checkpoint's configuration with freshly initialised weights
    (:func:`random_init` with that seed, the random baseline) — its test sets are still
    chosen from the checkpoint's metadata, so baseline and pre-trained model are scored on
    the same images. ``pretrain_meta`` stands in for the metadata of a model object;
    ``device`` is where a checkpoint path is loaded (a model object keeps its own);
    ``inference``: as :func:`load_model` (protocols that only encode)."""
    model = load_model(checkpoint_or_model, device=device, inference=inference)
    meta = checkpoint_metadata(checkpoint_or_model)
    if meta is None:
        meta = pretrain_meta
    enc = {"weights": "checkpoint", "pretrain_step": model.step, "init_seed": None,
           "checkpoint": os.fspath(checkpoint_or_model)
           if isinstance(checkpoint_or_model, (str, os.PathLike)) else None}
    if init_seed is not None:
        model = random_init(model, seed=int(init_seed))
        enc.update(weights="random init of the checkpoint's configuration",
                   init_seed=int(init_seed), pretrain_step=0)
    return model, meta, enc


def require_targets(d: EvalData, y: np.ndarray, names: list[str], what: str,
                    say=None) -> tuple[EvalData, np.ndarray]:
    """Keep the rows with at least one known target; ValueError (what the protocol needs)
    when none is labelled or a single binary class remains."""
    known = ~np.isnan(y).all(axis=1)
    if not known.any():
        raise ValueError(
            f"{what} needs labels: none of the {len(d)} images of {d.source} has a known "
            f"{'/'.join(names)} label (an unlabelled preparation, e.g. `afire prepare "
            "--format folder`, records abnormal = -1); evaluate labelled data (kermany, nih, "
            "chexpert, shared with labels.csv, phantom)")
    if names == ["abnormal"] and len(np.unique(y[known, 0])) < 2:
        cls = "abnormal" if y[known, 0][0] == 1 else "normal"
        raise ValueError(f"{what} needs normal and abnormal images; the {int(known.sum())} "
                         f"labelled images of {d.source} used here are all {cls}")
    if not known.all():
        note(say, f"{d.source}: {int((~known).sum())} image(s) without a label left out")
        d, y = d.subset(np.flatnonzero(known)), y[known]
    return d, y
