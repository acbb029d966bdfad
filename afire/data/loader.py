"""Reading prepared shards: :class:`ShardDataset`.

A shard is a ``.npy`` file of uint8 [n, S, S] (images, or lesion masks); ``_Shard`` is the
one place that reads that format. A dataset reads it two ways: memory-mapped (``ds[i]``,
``images``, ``batches``: the evaluation's fast path) and with checked explicit file reads
(``read``: pre-training, where a shard deleted, truncated or rewritten mid-run must be
noticed and named, which a memory map cannot do: it keeps the old inode, or SIGBUSes).

Shuffling is deterministic: the order of epoch ``e`` under ``seed`` is
``numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence([seed, e])))
.permutation(len(dataset))`` (:func:`epoch_order`), so a run resumed at epoch e sees the
very same batches. Several ranks (data-parallel pre-training) all compute that order and
each reads its contiguous share of every global batch (:func:`rank_slice`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from tokenize import TokenError

import numpy as np

from .prepare import shard_name

ON_BAD = ("raise", "skip")


class DataError(ValueError):
    """A data file vanished or became unreadable during training (``path`` names it)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` items for (seed, epoch) (the module docstring's rule)."""
    ss = np.random.SeedSequence([int(seed), int(epoch)])
    return np.random.Generator(np.random.PCG64(ss)).permutation(n)


def rank_slice(batch_idx: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of one global batch ``batch_idx`` (indices into the dataset)
    when ``world_size`` ranks train together: the contiguous block
    ``batch_idx[rank * b:(rank + 1) * b]``, b = len(batch_idx) // world_size (which must
    divide evenly). Every rank derives the same epoch order (:func:`epoch_order`), so each
    image of an epoch is read by exactly one rank, once, and rank 0's images followed by
    rank 1's, ... are the batch one process would train on."""
    n = len(batch_idx)
    if world_size < 1 or not 0 <= rank < world_size or n % world_size:
        raise ValueError(f"a batch of {n} images cannot be split evenly over {world_size} "
                         f"ranks (rank {rank})")
    b = n // world_size
    return batch_idx[rank * b:(rank + 1) * b]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_set(x) -> set | None:
    if x is None:
        return None
    if isinstance(x, (str, int)):
        return {x}
    return set(x)


class _Shard:
    """One shard file, uint8 [rows, S, S] in .npy format, as it was when opened: its header
    bytes, data offset and file size are kept so that `read_rows` notices a later change.

    Raises ValueError (naming the file) when it is missing, unreadable, truncated, or not
    uint8 [n, S, S] in C order."""

    def __init__(self, path: str, size: int):
        self.path = path
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0), (3, 0)):
                    raise ValueError(f"unsupported .npy version {version}")
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(f)
                self.offset = f.tell()
                f.seek(0)
                self.header = f.read(self.offset)
                self.file_size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise ValueError(f"{path}: missing shard file") from None
        except (ValueError, OSError, EOFError, SyntaxError, TokenError, RecursionError) as e:
            # numpy parses the header with tokenize and ast: a garbled one raises their errors
            raise ValueError(f"{path}: unreadable or truncated shard ({e})") from None
        if dtype != np.uint8 or len(shape) != 3 or shape[1:] != (size, size) or fortran:
            raise ValueError(f"{path}: expected uint8 [n, {size}, {size}], got {dtype} "
                             f"{shape}" + (" in Fortran order" if fortran else ""))
        self.rows, self.size, self.row_bytes = int(shape[0]), size, size * size
        need = self.offset + self.rows * self.row_bytes
        if self.file_size < need:
            raise ValueError(f"{path}: unreadable or truncated shard ({self.file_size} bytes, "
                             f"its header needs {need})")

    def map(self) -> np.ndarray:
        """The rows, memory-mapped read-only (uint8 [rows, S, S])."""
        shape = (self.rows, self.size, self.size)
        if self.rows == 0:
            return np.empty(shape, np.uint8)
        try:
            return np.memmap(self.path, np.uint8, "r", offset=self.offset, shape=shape)
        except (ValueError, OSError) as e:
            raise ValueError(f"{self.path}: unreadable or truncated shard ({e})") from None

    def read_rows(self, rows: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """Read rows ``rows`` into ``out[dest[j]]`` with explicit file reads, each into a
        view of ``out`` (so the bytes land in the caller's array; ``out[dest]`` would be a
        copy). DataError if the file vanished, changed size or header, or reads short."""
        path, n = self.path, self.row_bytes
        try:
            with open(path, "rb") as f:
                now = os.fstat(f.fileno()).st_size
                if now != self.file_size:
                    raise DataError(path, f"file size changed to {now} bytes (expected "
                                          f"{self.file_size}; truncated or rewritten?)")
                if f.read(len(self.header)) != self.header:
                    raise DataError(path, "header changed (file rewritten or corrupt)")
                for j, r in zip(dest.tolist(), rows.tolist()):
                    f.seek(self.offset + r * n)
                    if f.readinto(memoryview(out[j]).cast("B")) != n:
                        raise DataError(path, "short read (file truncated?)")
        except FileNotFoundError:
            raise DataError(path, "file disappeared") from None
        except OSError as e:
            raise DataError(path, f"unreadable ({e.strerror or e})") from None


class ShardDataset:
    """Images prepared by ``afire prepare``: memory-mapped, or read with checked reads.

    Args:
        root: the output directory of ``afire prepare``.
        split: keep records of this split (str or iterable of str), None = all.
        label: keep records with this label name (str or iterable), None = all.
        abnormal: keep records with this abnormal flag (0, 1, -1 or an iterable).
        masks: also map the lesion-mask shards (error if the preparation has none).

    Attributes: ``size`` (S), ``records`` (the kept manifest rows, dicts), ``meta``,
    ``fingerprint`` (identifies the kept images), ``bad`` (files `read` found broken).
    ``ds[i]`` is uint8 [S, S]; ``ds.images(idx)`` gathers uint8 [len(idx), S, S] from the
    memory maps; ``ds.read(idx)`` reads them with checked file reads (training).
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
        self._shards: dict[int, _Shard] = {}
        self._arrays: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}
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
            self._shards[k] = self._open(shard_name(k, "shard"), len(rws))
            self._arrays[k] = self._shards[k].map()
            if sorted(rws) != list(range(len(rws))):
                raise ValueError(f"{man_p}: rows of shard {k} are not 0..{len(rws) - 1}")
            if masks:
                if not self.meta.get("masks"):
                    raise ValueError(f"{root}: this preparation has no masks")
                self._masks[k] = self._open(shard_name(k, "mask"), len(rws)).map()
        for k in range(n_shards):
            if k not in per_shard:
                # a shard whose every file failed is legitimately empty; anything else is not
                rows = self._open(shard_name(k, "shard"), None).rows
                if rows != 0:
                    raise ValueError(f"{root}: {shard_name(k)}.npy has {rows} rows but "
                                     "the manifest lists none (manifest truncated?)")
        sp, lb, ab = _as_set(split), _as_set(label), _as_set(abnormal)
        self.records = [r for r in rows
                        if (sp is None or r["split"] in sp) and (lb is None or r["label"] in lb)
                        and (ab is None or r.get("abnormal", -1) in ab)]
        self._loc = np.array([(r["shard"], r["row"]) for r in self.records],
                             dtype=np.int64).reshape(-1, 2)
        self.bad: dict[str, str] = {}
        self._fingerprint: str | None = None

    def _open(self, name: str, rows: int | None) -> _Shard:
        shard = _Shard(os.path.join(self.root, name + ".npy"), self.size)
        if rows is not None and shard.rows != rows:
            raise ValueError(f"{shard.path}: {shard.rows} rows but the manifest lists {rows}")
        return shard

    @property
    def fingerprint(self) -> str:
        """``"shards:"`` + 32 hex digits of a SHA-256 over meta.json and the kept records'
        (path, shard, row): equal for the same selection of the same preparation. ``afire
        pretrain`` records it in its checkpoints (resume and evaluation compare it)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
            for r in self.records:
                h.update(f"\0{r['path']}\0{r['shard']}\0{r['row']}".encode(
                    "utf-8", "surrogateescape"))
            self._fingerprint = "shards:" + h.hexdigest()[:32]
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> np.ndarray:
        k, r = self._loc[i]
        return np.array(self._arrays[int(k)][int(r)])

    def mask(self, i: int) -> np.ndarray:
        if not self._masks:
            raise ValueError("open the dataset with masks=True to read masks")
        k, r = self._loc[i]
        return np.array(self._masks[int(k)][int(r)])

    def images(self, idx: Iterable[int], masks: bool = False) -> np.ndarray:
        """uint8 [len(idx), S, S] gathered from the shards (a fresh contiguous array)."""
        idx = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
        src = self._masks if masks else self._arrays
        if masks and not src:
            raise ValueError("open the dataset with masks=True to read masks")
        out = np.empty((len(idx), self.size, self.size), np.uint8)
        for j, i in enumerate(idx):
            k, r = self._loc[i]
            out[j] = src[int(k)][int(r)]
        return out

    def read(self, idx: Iterable[int], on_bad: str = "raise") -> tuple[np.ndarray, list[str]]:
        """The images ``idx`` read with checked explicit file reads: (uint8 [n, S, S],
        newly bad files).

        A shard file deleted, truncated, rewritten or unreadable since the dataset was
        opened raises :class:`DataError` naming it (``on_bad="raise"``), or
        (``on_bad="skip"``) is recorded in ``bad`` (path -> reason) and returned among the
        newly bad files, and its images are left out of this and every later call: the
        batch then holds fewer than ``len(idx)`` images, in the order of ``idx``.
        """
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        idx = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
        loc = self._loc[idx]
        out = np.empty((len(idx), self.size, self.size), np.uint8)
        keep = np.ones(len(idx), bool)
        new_bad = []
        for k in np.unique(loc[:, 0]).tolist():
            sel = np.flatnonzero(loc[:, 0] == k)
            shard = self._shards[k]
            if shard.path not in self.bad:
                try:
                    shard.read_rows(loc[sel, 1], out, sel)
                    continue
                except DataError as e:
                    if on_bad == "raise":
                        raise
                    self.bad[shard.path] = e.reason
                    new_bad.append(shard.path)
            keep[sel] = False
        return (out if keep.all() else out[keep]), new_bad

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
        return epoch_order(len(self), seed, epoch)

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
