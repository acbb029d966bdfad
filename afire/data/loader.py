"""Reading prepared shards: :class:`ShardDataset`.

Shuffling is deterministic: the order of epoch ``e`` under ``seed`` is
``numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence([seed, e])))
.permutation(len(dataset))``, so a run resumed at epoch e sees the very same batches.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator

import numpy as np

from .prepare import shard_name


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_set(x) -> set | None:
    if x is None:
        return None
    if isinstance(x, (str, int)):
        return {x}
    return set(x)


class ShardDataset:
    """Images prepared by ``afire prepare``, memory-mapped.

    Args:
        root: the output directory of ``afire prepare``.
        split: keep records of this split (str or iterable of str), None = all.
        label: keep records with this label name (str or iterable), None = all.
        abnormal: keep records with this abnormal flag (0, 1, -1 or an iterable).
        masks: also map the lesion-mask shards (error if the preparation has none).

    Attributes: ``size`` (S), ``records`` (the kept manifest rows, dicts), ``meta``.
    ``ds[i]`` is uint8 [S, S]; ``ds.images(idx)`` gathers uint8 [len(idx), S, S].
    Raises ValueError when the manifest and the shards disagree or a file is truncated.
    """

    def __init__(self, root: str, split=None, label=None, abnormal=None, masks: bool = False):
        self.root = root
        meta_p = os.path.join(root, "meta.json")
        man_p = os.path.join(root, "manifest.jsonl")
        if not os.path.exists(meta_p) or not os.path.exists(man_p):
            raise ValueError(f"{root}: not a prepared dataset (meta.json / manifest.jsonl "
                             "missing); run `afire prepare` first")
        with open(meta_p, encoding="utf-8") as f:
            try:
                self.meta = json.load(f)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{meta_p}: invalid JSON ({e})") from None
        if not isinstance(self.meta, dict) or not _is_int(self.meta.get("size")) \
                or self.meta["size"] < 1 or not _is_int(self.meta.get("shards", 0)) \
                or self.meta.get("shards", 0) < 0:
            raise ValueError(f"{meta_p}: not an `afire prepare` meta.json (needs an object "
                             "with a positive int 'size' and an int 'shards' >= 0)")
        self.size = self.meta["size"]
        rows = []
        with open(man_p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except (ValueError, RecursionError):
                    raise ValueError(f"{man_p}:{lineno}: invalid JSON (truncated manifest?)"
                                     ) from None
        self._shards, self._masks = {}, {}
        per_shard: dict[int, list[int]] = {}
        for lineno, r in enumerate(rows, start=1):
            if not isinstance(r, dict):
                raise ValueError(f"{man_p}:{lineno}: a row must be a JSON object")
            for key in ("shard", "row", "path", "split", "label"):
                if key not in r:
                    raise ValueError(f"{man_p}:{lineno}: missing field {key!r}")
            if not (_is_int(r["shard"]) and _is_int(r["row"])):
                raise ValueError(f"{man_p}:{lineno}: 'shard' and 'row' must be ints")
            if not (isinstance(r["split"], str) and isinstance(r["label"], str)
                    and _is_int(r.get("abnormal", -1))):
                raise ValueError(f"{man_p}:{lineno}: 'split' and 'label' must be strings, "
                                 "'abnormal' an int")
            if not isinstance(r.get("labels") or {}, dict):
                raise ValueError(f"{man_p}:{lineno}: 'labels' must be an object")
            per_shard.setdefault(r["shard"], []).append(r["row"])
        n_shards = int(self.meta.get("shards", len(per_shard)))
        for k, rws in per_shard.items():
            if not 0 <= k < n_shards:
                raise ValueError(f"{man_p}: shard {k} outside the {n_shards} of meta.json")
            self._shards[k] = self._map(shard_name(k, "shard"), len(rws))
            if sorted(rws) != list(range(len(rws))):
                raise ValueError(f"{man_p}: rows of shard {k} are not 0..{len(rws) - 1}")
            if masks:
                if not self.meta.get("masks"):
                    raise ValueError(f"{root}: this preparation has no masks")
                self._masks[k] = self._map(shard_name(k, "mask"), len(rws))
        for k in range(n_shards):
            if k not in per_shard:
                # a shard whose every file failed is legitimately empty; anything else is not
                arr = self._map(shard_name(k, "shard"), None)
                if arr.shape[0] != 0:
                    raise ValueError(f"{root}: {shard_name(k)}.npy has {arr.shape[0]} rows but "
                                     "the manifest lists none (manifest truncated?)")
        sp, lb, ab = _as_set(split), _as_set(label), _as_set(abnormal)
        self.records = [r for r in rows
                        if (sp is None or r["split"] in sp) and (lb is None or r["label"] in lb)
                        and (ab is None or r.get("abnormal", -1) in ab)]
        self._loc = np.array([(r["shard"], r["row"]) for r in self.records],
                             dtype=np.int64).reshape(-1, 2)

    def _map(self, name: str, rows: int | None) -> np.ndarray:
        p = os.path.join(self.root, name + ".npy")
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise ValueError(f"{p}: missing shard file") from None
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{p}: unreadable or truncated shard ({e})") from None
        S = self.size
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1:] != (S, S):
            raise ValueError(f"{p}: expected uint8 [n, {S}, {S}], got {arr.dtype} {arr.shape}")
        if rows is not None and arr.shape[0] != rows:
            raise ValueError(f"{p}: {arr.shape[0]} rows but the manifest lists {rows}")
        return arr

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> np.ndarray:
        k, r = self._loc[i]
        return np.array(self._shards[int(k)][int(r)])

    def mask(self, i: int) -> np.ndarray:
        if not self._masks:
            raise ValueError("open the dataset with masks=True to read masks")
        k, r = self._loc[i]
        return np.array(self._masks[int(k)][int(r)])

    def images(self, idx: Iterable[int], masks: bool = False) -> np.ndarray:
        """uint8 [len(idx), S, S] gathered from the shards (a fresh contiguous array)."""
        idx = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
        src = self._masks if masks else self._shards
        if masks and not src:
            raise ValueError("open the dataset with masks=True to read masks")
        out = np.empty((len(idx), self.size, self.size), np.uint8)
        for j, i in enumerate(idx):
            k, r = self._loc[i]
            out[j] = src[int(k)][int(r)]
        return out

    def field(self, name: str, default=None) -> list:
        """One manifest field for every kept record (e.g. "abnormal", "group", "path")."""
        return [r.get(name, default) for r in self.records]

    def label_matrix(self, names: list[str]) -> np.ndarray:
        """float32 [N, len(names)] of multi-label findings; NaN where absent/uncertain."""
        out = np.full((len(self.records), len(names)), np.nan, np.float32)
        for i, r in enumerate(self.records):
            lab = r.get("labels") or {}
            for j, n in enumerate(names):
                v = lab.get(n)
                if v is not None:
                    try:
                        out[i, j] = float(v)
                    except (TypeError, ValueError):
                        raise ValueError(f"record {i}: label {n!r} is {v!r}, not a number"
                                         ) from None
        return out

    def epoch_order(self, seed: int = 0, epoch: int = 0) -> np.ndarray:
        """The permutation used for (seed, epoch) (see the module docstring)."""
        ss = np.random.SeedSequence([int(seed), int(epoch)])
        return np.random.Generator(np.random.PCG64(ss)).permutation(len(self))

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        n = len(self)
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                drop_last: bool = True, return_index: bool = False) -> Iterator:
        """Yield uint8 [B, S, S] batches (or (batch, dataset indices) with return_index)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = self.epoch_order(seed, epoch) if shuffle else np.arange(len(self))
        for b in range(self.num_batches(batch_size, drop_last)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            batch = self.images(idx)
            yield (batch, idx) if return_index else batch

    def __repr__(self) -> str:
        return (f"ShardDataset({self.root!r}, n={len(self)}, size={self.size}, "
                f"format={self.meta.get('format')!r})")
