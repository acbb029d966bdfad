"""Which images a protocol may train, validate and test on: recorded splits, the images a
checkpoint pre-trained on, duplicates.

The rule (every protocol, the API and ``afire evaluate`` alike):

1. **Recorded splits.** A directory (an ``afire prepare`` output, or the shared-data layout)
   records a split per image. By default (``split="auto"``) the images a protocol *tests*
   on come only from its non-"train" splits when it has any: "train" is the split
   ``afire pretrain --data DIR`` trains on. ``split="test"`` (or "val", "test,val", ...)
   names the splits; a choice that includes "train" while the directory has other splits
   ("all", "train") is refused unless ``allow_train_split=True``, and then warned about.
   Data passed in memory (a dict of arrays, :class:`EvalData`) is used as given unless
   ``split`` names splits: the caller has chosen it.
2. **The checkpoint's own pre-training images.** ``afire pretrain`` records in every
   checkpoint a fingerprint of the images it read (``data_fingerprint``) and a description
   naming the directory (``data_desc``). The evaluation re-derives, from every prepared
   directory it is given and from the directory the checkpoint names, the image set
   ``afire pretrain`` reads there, and compares fingerprints. When one matches, those images
   are *identified*: they are removed from every test and validation set, by manifest path
   and by pixel bytes (so a copy under another name or another preparation of the same
   files goes too). Built-in phantoms (``afire pretrain`` without ``--data``) are
   regenerated and removed by pixel bytes. When the checkpoint names an evaluated
   directory but nothing there matches its fingerprint any more (re-prepared since), the
   pre-training images cannot be told apart: testing on its "train" split is refused.
3. ``exclude``: further paths (a list, a file with one path a line, a ``manifest.jsonl``
   or a prepared directory) never to test or validate on.
4. **Roles never overlap.** With ``test_data`` given, training images that also appear in
   the test or validation set (same path or same pixels) are dropped from training; a
   validation image that is also a test image is dropped from validation. Inside one
   pool, pixel-identical images are put in one group, so patient-wise folds never place
   copies on both sides.

Everything decided here is written to results.json ("data") and announced as a note.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .common import EvalData, image_digests, load_data, note

TRAIN = "train"
PHANTOM_PREFIX = "phantom://"
MAX_PHANTOMS = 20000     # regenerate at most this many built-in phantoms to compare pixels


# ---------------------------------------------------------------- provenance
@dataclass
class Provenance:
    """What is known about the images a checkpoint pre-trained on.

    status: "identified" (``paths`` / pixel digests known), "changed" (the checkpoint names
    an evaluated directory, which no longer holds what it pre-trained on), "unverifiable"
    (pre-trained on data that cannot be read back: an array, a directory gone or changed)
    or "unknown" (no record: a model object, or a checkpoint not written by afire
    pretrain)."""

    status: str
    detail: str
    root: str | None = None
    paths: frozenset = frozenset()
    count: int = 0
    _digest_fn: Callable[[], Iterable[str]] | None = field(default=None, repr=False)
    _digests: frozenset | None = field(default=None, repr=False)

    def digests(self) -> frozenset:
        if self._digests is None:
            self._digests = frozenset(self._digest_fn()) if self._digest_fn else frozenset()
        return self._digests

    def summary(self) -> dict:
        return {"status": self.status, "detail": self.detail, "root": self.root,
                "images": self.count}


def _norm_paths(paths: Iterable[str]) -> set[str]:
    """Every path in its written and its absolute normalised form (phantom ids as is)."""
    out = set()
    for p in paths:
        p = str(p)
        if p.startswith(PHANTOM_PREFIX):
            out.add(p)
            continue
        out.add(os.path.normpath(p))
        out.add(os.path.normpath(os.path.abspath(p)))
    return out


def _path_hits(d: EvalData, paths: set | frozenset) -> np.ndarray:
    if d.paths is None or not paths:
        return np.zeros(len(d), bool)
    return np.array([bool(_norm_paths([p]) & paths) for p in d.paths], bool)


_DESC = re.compile(r"^\d+ (?:normal )?images of (.+?)"
                   r"(?: \(split train\)| with unknown labels, taken as normal.*| \(as given\))?$")


def named_root(meta: dict) -> str | None:
    """The prepared directory a checkpoint says it pre-trained on (``train_data`` JSON
    with a "root", else parsed from ``data_desc``), or None."""
    td = meta.get("train_data")
    if td:
        try:
            root = json.loads(td).get("root")
            if isinstance(root, str) and root:
                return root
        except (ValueError, AttributeError):
            pass
    m = _DESC.match(meta.get("data_desc", "") or "")
    return m.group(1) if m else None


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _pretrain_read(root: str, fingerprint: str):
    """The ShardDataset of ``root`` whose pre-training fingerprint is ``fingerprint``:
    first the selection ``afire pretrain --data root`` makes, then the plain split /
    abnormal filters a caller could have passed as a ShardDataset. None if none matches."""
    from ..data import ShardDataset
    from ..pretrain import pretraining_set   # the module (afire.pretrain is a function)

    every = ShardDataset(root)
    try:
        chosen = pretraining_set(root, every.size)
        if chosen.fingerprint == fingerprint:
            return chosen.dataset
    except ValueError:
        pass
    for sp in [None] + sorted(set(every.field("split"))):
        for ab in (None, 0, -1, 1, (0, -1)):
            ds = ShardDataset(root, split=sp, abnormal=ab)
            if len(ds) and ds.fingerprint == fingerprint:
                return ds
    return None


def pretrain_provenance(meta: dict | None, roots: Iterable[str] = (),
                        phantoms_possible: bool = True) -> Provenance:
    """Identify the images a checkpoint (its metadata ``meta``) pre-trained on, trying the
    prepared directories ``roots`` and the one the checkpoint names. ``phantoms_possible``
    False skips regenerating built-in phantoms (no evaluated input can hold phantoms)."""
    if meta is None:
        return Provenance("unknown", "a model object was given (no checkpoint metadata); "
                                     "its pre-training images cannot be checked")
    fp = meta.get("data_fingerprint") or ""
    desc = meta.get("data_desc") or "?"
    if not fp:
        return Provenance("unknown", "the checkpoint records no pre-training data (not "
                                     "written by `afire pretrain`)")
    if fp.startswith("phantom:"):
        try:
            _, n, size, seed = fp.split(":")
            n, size, seed = int(n), int(size), int(seed)
        except ValueError:
            return Provenance("unverifiable", f"unreadable fingerprint {fp!r} ({desc})")
        if n > MAX_PHANTOMS:
            return Provenance("unverifiable", f"{desc}: too many to regenerate for a check")

        def phantom_digests():
            if not phantoms_possible:
                return []
            from ..data import phantom_dataset

            return image_digests(phantom_dataset(n, size=size, seed=seed)["images"]).tolist()
        return Provenance("identified", desc, count=n, _digest_fn=phantom_digests)
    if not fp.startswith("shards:"):
        return Provenance("unverifiable", f"{desc}: pre-training images held in memory, "
                                          "they cannot be read back")
    named = named_root(meta)
    cands = list(roots) + ([named] if named else [])
    tried = []
    for root in cands:
        if not os.path.exists(os.path.join(root, "meta.json")) or \
                any(_same_dir(root, t) for t in tried):
            continue
        tried.append(root)
        try:
            ds = _pretrain_read(root, fp)
        except Exception as e:  # noqa: BLE001 - a broken directory cannot identify anything
            ds = None
            desc = f"{desc} (reading {root} failed: {e})"
        if ds is not None:
            idx = np.arange(len(ds))
            return Provenance("identified", desc, root=root,
                              paths=frozenset(_norm_paths(ds.field("path"))), count=len(ds),
                              _digest_fn=lambda ds=ds, idx=idx: image_digests(
                                  ds.images(idx)).tolist())
    if named and any(_same_dir(named, r) for r in roots if os.path.exists(r)):
        return Provenance("changed", f"{desc}: the checkpoint pre-trained on this directory, "
                                     "but what `afire pretrain` reads there now differs from "
                                     "what it read (re-prepared since?)", root=named)
    return Provenance("unverifiable", f"{desc}: "
                      + ("that directory is not available here" if named and not os.path.exists(
                          named) else "not found among the evaluated directories"),
                      root=named)


# ---------------------------------------------------------------- exclusion lists
def read_exclude(exclude: Any) -> set[str]:
    """Paths never to test on, from: None, an iterable of paths, a prepared directory (its
    manifest), a ``.jsonl`` manifest ("path" of each row) or a text file (a path a line)."""
    if exclude is None:
        return set()
    if not isinstance(exclude, (str, os.PathLike)):
        return _norm_paths(exclude)
    p = os.fspath(exclude)
    if os.path.isdir(p):
        p = os.path.join(p, "manifest.jsonl")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"exclude list {p} not found")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            if p.endswith(".jsonl"):
                try:
                    out.append(json.loads(line)["path"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{p}:{lineno}: not a manifest row with a 'path'") from None
            else:
                out.append(line)
    return _norm_paths(out)


# ---------------------------------------------------------------- selection
def _resolve_split(split: str, recorded: list[str], source: str) -> list[str]:
    if split == "auto":
        other = [s for s in recorded if s != TRAIN]
        return other if other and TRAIN in recorded else recorded
    if split == "all":
        return recorded
    want = [s.strip() for s in str(split).split(",") if s.strip()]
    missing = [s for s in want if s not in recorded]
    if not want or missing:
        raise ValueError(f"split={split!r}: {source} records the splits {recorded}; name "
                         "some of them (comma-separated), or 'auto' / 'all'")
    return want


def select(d: EvalData, *, role: str, split: str, is_dir: bool, allow_train_split: bool,
           prov: Provenance, excluded: set, tell: Callable[[str], None]) -> tuple[EvalData, dict]:
    """The images of ``d`` a protocol may use as ``role`` ("pool", "test" or "val"): the
    recorded-split rule, then the checkpoint's pre-training images and ``excluded`` out."""
    info: dict[str, Any] = {"source": d.source, "images_loaded": len(d)}
    if d.splits is not None:
        recorded = sorted(set(d.splits.tolist()))
        info["recorded_splits"] = {s: int((d.splits == s).sum()) for s in recorded}
        chosen = recorded if (split == "auto" and not is_dir) else \
            _resolve_split(split, recorded, d.source)
        info["splits_used"] = chosen
        has_other = any(s != TRAIN for s in recorded)
        if TRAIN in chosen and is_dir:
            if has_other and not allow_train_split:
                raise ValueError(
                    f"{d.source}: split={split!r} would test on split 'train', the images "
                    "`afire pretrain --data` trains on; evaluate on the other split(s) "
                    f"({', '.join(s for s in recorded if s != TRAIN)}; the default), or pass "
                    "allow_train_split=True (--allow-train-split) if this checkpoint did not "
                    "pre-train on them")
            if prov.status == "changed" and not allow_train_split:
                raise ValueError(
                    f"{d.source}: {prov.detail}. Its pre-training images cannot be told "
                    "apart from the others, so split 'train' cannot be tested on; prepare "
                    "a test split, pass test_data (--test-data) or exclude (--exclude) the "
                    "pre-training images, or allow_train_split=True (--allow-train-split) to "
                    "accept the risk")
            if has_other or prov.status != "identified":
                tell(f"warning: {role} images include split 'train' of {d.source}"
                     + ("; images identified as the checkpoint's pre-training images are "
                        "still left out" if prov.status == "identified" else
                        f"; it cannot be checked that the checkpoint did not pre-train on "
                        f"them ({prov.detail})"))
        d = d.subset(np.flatnonzero(np.isin(d.splits, chosen)))
    elif split not in ("auto", "all"):
        raise ValueError(f"split={split!r}: {d.source} records no splits (arrays); pass "
                         "'auto'")
    drop = np.zeros(len(d), bool)
    if prov.status == "identified" and len(d):
        drop |= _path_hits(d, prov.paths)
        dig = prov.digests()
        if dig:
            drop |= np.isin(d.digests(), list(dig))
    n_pre = int(drop.sum())
    listed = _path_hits(d, excluded) & ~drop
    info.update(excluded_pretrain=n_pre, excluded_listed=int(listed.sum()))
    if n_pre:
        tell(f"{role}: left out {n_pre} image(s) of {d.source} that the checkpoint pre-trained "
             f"on ({prov.detail})")
    if listed.any():
        tell(f"{role}: left out {int(listed.sum())} listed image(s) (exclude)")
    d = d.subset(np.flatnonzero(~(drop | listed)))
    info["images_used"] = len(d)
    if len(d) == 0:
        raise ValueError(f"{info['source']}: no {role} image left after "
                         + ("choosing split(s) " + ",".join(info.get("splits_used", [])) + ", "
                            if d.splits is not None else "")
                         + f"leaving out {n_pre} pre-training and {int(listed.sum())} listed "
                         "image(s); evaluate on data the checkpoint did not pre-train on "
                         "(a prepared directory with a test split, or test_data / --test-data)")
    return d, info


def drop_overlap(a: EvalData, others: list[EvalData]) -> tuple[EvalData, int]:
    """``a`` without the images that also appear (same path or same pixels) in ``others``."""
    others = [o for o in others if o is not None]
    if not others:
        return a, 0
    paths = set().union(*[_norm_paths(o.paths) for o in others if o.paths is not None])
    digs = np.concatenate([o.digests() for o in others])
    drop = _path_hits(a, paths) | np.isin(a.digests(), digs)
    return a.subset(np.flatnonzero(~drop)), int(drop.sum())


def merge_duplicate_groups(d: EvalData) -> tuple[EvalData, int]:
    """``d`` with the groups of pixel-identical images merged (the smallest group id
    names the union), so that no split can place copies on both sides. Returns (data,
    number of groups merged away)."""
    dig = d.digests()
    if len(np.unique(dig)) == len(d):
        return d, 0
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.setdefault(g, g) != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first: dict[str, str] = {}
    for g, h in zip(d.groups.tolist(), dig.tolist()):
        if h in first:
            a, b = find(first[h]), find(g)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first[h] = g
    groups = np.array([find(g) for g in d.groups.tolist()], dtype=d.groups.dtype)
    merged = len(np.unique(d.groups)) - len(np.unique(groups))
    return replace(d, groups=groups), int(merged)


def assert_disjoint(test: EvalData, others: dict[str, EvalData | None]) -> None:
    """RuntimeError if a test image (path or pixels) is also in another role's set."""
    for name, o in others.items():
        if o is None or len(o) == 0:
            continue
        _, n = drop_overlap(test, [o])
        if n:
            raise RuntimeError(f"internal error: {n} test image(s) also in the {name} set")


# ---------------------------------------------------------------- all inputs of a protocol
@dataclass
class Inputs:
    """The data of one protocol run. Without ``test_data``: ``pool`` (which the protocol
    splits patient-wise) and optionally ``val``; with it: ``train``, ``test`` and
    optionally ``val``. ``info`` goes to results.json; ``notes`` were announced."""

    pool: EvalData | None
    train: EvalData | None
    test: EvalData | None
    val: EvalData | None
    provenance: Provenance
    info: dict
    notes: list[str]
    say: Callable[[str], None] | None = None

    def tell(self, text: str) -> None:
        """Announce a note and record it for results.json."""
        self.notes.append(text)
        note(self.say, text)


def _is_dir(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _prepared_root(x: Any) -> str | None:
    if _is_dir(x) and os.path.exists(os.path.join(os.fspath(x), "meta.json")):
        return os.fspath(x)
    return None


def resolve_inputs(meta: dict | None, size: int, data: Any, test_data: Any = None,
                   val_data: Any = None, *, split: str = "auto",
                   allow_train_split: bool = False, exclude: Any = None,
                   say: Callable[[str], None] | None = None) -> Inputs:
    """Load a protocol's inputs at ``size`` and apply the module's rule (see the module
    docstring). ``meta``: the checkpoint's metadata (None = unknown provenance)."""
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"split must be 'auto', 'all' or split names, got {split!r}")
    notes: list[str] = []

    def tell(text: str) -> None:
        notes.append(text)
        note(say, text)

    excluded = read_exclude(exclude)
    loaded = {role: (load_data(x, size, tell), _is_dir(x)) for role, x in
              (("data", data), ("test", test_data), ("val", val_data)) if x is not None}
    roots = [r for r in (_prepared_root(x) for x in (data, test_data, val_data)) if r]
    maybe_phantoms = any(d.paths is None or any(str(p).startswith(PHANTOM_PREFIX)
                                                for p in d.paths[:1000])
                         for d, _ in loaded.values())
    prov = pretrain_provenance(meta, roots, maybe_phantoms)
    info: dict[str, Any] = {"split_rule": split, "allow_train_split": bool(allow_train_split),
                            "pretrain": prov.summary(), "exclude_list": len(excluded)}
    kw = dict(split=split, allow_train_split=allow_train_split, prov=prov, excluded=excluded,
              tell=tell)
    val = None
    if "val" in loaded:
        val, info["val"] = select(loaded["val"][0], role="val", is_dir=loaded["val"][1], **kw)
    if test_data is None:
        pool, info["pool"] = select(loaded["data"][0], role="pool", is_dir=loaded["data"][1],
                                    **kw)
        if val is not None:
            pool, n = drop_overlap(pool, [val])
            info["pool"]["dropped_also_in_val"] = n
            if n:
                tell(f"pool: dropped {n} image(s) that are also validation images")
            if len(pool) == 0:
                raise ValueError("every pool image is also a validation image")
        pool, merged = merge_duplicate_groups(pool)
        info["pool"]["duplicate_groups_merged"] = merged
        if merged:
            tell(f"pool: {merged} group(s) merged with another holding a pixel-identical "
                 "image, so that copies never straddle a split")
        return Inputs(pool, None, None, val, prov, info, notes, say)
    test, info["test"] = select(loaded["test"][0], role="test", is_dir=loaded["test"][1], **kw)
    if val is not None:
        val, n = drop_overlap(val, [test])
        info["val"]["dropped_also_in_test"] = n
        if len(val) == 0:
            raise ValueError("every validation image is also a test image")
    train, n = drop_overlap(loaded["data"][0], [test, val])
    info["train"] = {"source": train.source, "images_loaded": len(loaded["data"][0]),
                     "dropped_also_in_test_or_val": n, "images_used": len(train)}
    if n:
        tell(f"train: dropped {n} image(s) of {train.source} that are also test or "
             "validation images")
    if len(train) == 0:
        raise ValueError(f"{loaded['data'][0].source}: no training image left: every one is "
                         "also a test or validation image")
    assert_disjoint(test, {"training": train, "validation": val})
    return Inputs(None, train, test, val, prov, info, notes, say)


__all__ = ["Inputs", "Provenance", "resolve_inputs", "select", "pretrain_provenance",
           "read_exclude", "drop_overlap", "merge_duplicate_groups", "assert_disjoint",
           "named_root", "TRAIN"]
