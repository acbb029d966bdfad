"""``afire prepare``: decode a dataset once into memory-mappable uint8 shards.

Output directory layout::

    meta.json              format, size, resize mode, shard size, shard count, version
    shard_00000.npy        uint8 [n, S, S] (numpy .npy, np.load(..., mmap_mode="r"))
    mask_00000.npy         uint8 [n, S, S] lesion masks, only for formats with masks (SIIM)
    shard_00000.jsonl      the manifest rows of this shard
    shard_00000.done       written last: fingerprint of the shard's inputs and its row count
    manifest.jsonl         all rows: index, path, label, abnormal, labels, split, group,
                           shard, row (+ format extras); NaN labels are written as null
    errors.txt             every file that could not be read, with the reason

Records are cut into shards of ``shard_size`` in reader order (sorted by path), so shard k
always plans the same inputs. A shard counts as finished when its done-marker names the
same fingerprint (inputs, size, resize mode, format version) and the .npy header and the
.jsonl agree with the row count; re-running skips finished shards and redoes the others.
Unreadable files are reported by name, listed in errors.txt and left out of the shard.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from .image import RESIZE_MODES, is_dicom_path, load_gray, resize_square
from .progress import Progress
from .readers import Record, decode_rle, read_dataset

PREPARE_VERSION = 1
PHANTOM_PREFIX = "phantom://"


def shard_name(k: int, kind: str = "shard") -> str:
    return f"{kind}_{k:05d}"


def _json_safe(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _fingerprint(recs: list[Record], size: int, resize: str, fmt: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([PREPARE_VERSION, fmt, size, resize]).encode())
    for r in recs:
        h.update(b"\0" + r.path.encode("utf-8", "surrogateescape"))
        if "rle" in r.extra:
            h.update(json.dumps(r.extra["rle"]).encode())
    return h.hexdigest()


def _npy_shape(path: str):
    """Shape and dtype from a .npy header without reading the data (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            data_bytes = int(np.prod(shape)) * dtype.itemsize
            header_end = f.tell()
            f.seek(0, os.SEEK_END)
            complete = f.tell() - header_end == data_bytes
        return (tuple(shape), dtype, complete) if not fortran else None
    except (OSError, ValueError):
        return None


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def shard_is_done(out: str, k: int, fingerprint: str, size: int, has_masks: bool) -> bool:
    marker = os.path.join(out, shard_name(k) + ".done")
    try:
        with open(marker, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    if m.get("fingerprint") != fingerprint:
        return False
    n = m.get("rows")
    kinds = ("shard", "mask") if has_masks else ("shard",)
    for kind in kinds:
        info = _npy_shape(os.path.join(out, shard_name(k, kind) + ".npy"))
        if info is None or info[0] != (n, size, size) or info[1] != np.uint8 or not info[2]:
            return False
    try:
        return _count_lines(os.path.join(out, shard_name(k) + ".jsonl")) == n
    except OSError:
        return False


# ---------------------------------------------------------------- per-image work (workers)


def _phantom_image(path: str, size: int):
    from .. import _C

    seed, subject, p = path[len(PHANTOM_PREFIX):].split("/")
    d = _C.phantom.generate(1, size=size, seed=int(seed), first_subject=int(subject),
                            p_abnormal=float(p))
    return d["images"][0], d["lesion_masks"][0]


def load_and_resize(task):
    """Worker: (index, path, size, mode, rle|None, relative) -> (index, img, mask, error)."""
    idx, path, size, mode, rle, relative = task
    try:
        if path.startswith(PHANTOM_PREFIX):
            img, mask = _phantom_image(path, size)
            return idx, img, mask, None
        img = load_gray(path)
        mask = None
        if rle is not None:
            h, w = img.shape
            full = np.zeros((h, w), np.uint8)
            for r in rle:
                full |= decode_rle(r, h, w, relative)
            mask = (resize_square(full * np.uint8(255), size, mode, nearest=True) > 127)
            mask = mask.astype(np.uint8)
        return idx, resize_square(img, size, mode), mask, None
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is reported per file
        return idx, None, None, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- the driver


def phantom_records(n: int, seed: int = 0, p_abnormal: float = 0.0) -> list[Record]:
    """Records of n synthetic radiographs (subjects 0..n-1); labels drawn now (the lesion
    decision does not depend on the image size)."""
    from .. import _C

    labels = _C.phantom.generate(n, size=8, seed=seed, p_abnormal=p_abnormal)["labels"]
    names = ("normal", "nodule", "consolidation", "effusion")
    return [Record(path=f"{PHANTOM_PREFIX}{seed}/{i}/{p_abnormal!r}", label=names[int(k)],
                   abnormal=int(k > 0), labels={"lesion": float(k > 0)},
                   split="train" if i % 5 else "test", group=str(i),
                   extra={"subject": i, "has_mask": True})
            for i, k in enumerate(labels)]


def _atomic_save_npy(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _manifest_row(r: Record, shard: int, row: int) -> dict:
    d = {"path": r.path, "label": r.label, "abnormal": r.abnormal, "labels": r.labels,
         "split": r.split, "group": r.group, "shard": shard, "row": row}
    for k, v in r.extra.items():
        if k in ("rle", "rle_relative"):
            continue
        d.setdefault(k, v)
    if "rle" in r.extra:
        d["has_mask"] = True
    return _json_safe(d)


def _check_meta(out: str, meta: dict) -> None:
    p = os.path.join(out, "meta.json")
    if not os.path.exists(p):
        return
    try:
        with open(p, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError:
        return
    for key in ("format", "size", "resize", "shard_size"):
        if old.get(key) != meta[key]:
            raise ValueError(
                f"{out} already holds a preparation with {key}={old.get(key)!r}, this run asks "
                f"for {meta[key]!r}; use another output directory or delete it first")


def prepare(src: str, out: str, fmt: str = "folder", size: int = 224, workers: int | None = None,
            shard_size: int = 1024, resize: str = "crop", progress: bool = True,
            records: list[Record] | None = None, **reader_options) -> dict:
    """Decode the dataset at ``src`` (layout ``fmt``) into shards under ``out``.

    Returns a summary dict: images (rows written, all shards), failed (files left out),
    shards, skipped_shards (already finished), seconds, out. ``records`` bypasses the
    reader (used for the phantom and by tests). Raises ValueError for bad arguments or an
    ``out`` prepared with other settings, ImportError when DICOM files need pydicom."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.monotonic()
    if records is None:
        records = read_dataset(fmt, src, **reader_options)
    if any(is_dicom_path(r.path) for r in records):
        from .image import _pydicom

        _pydicom()  # fail once, clearly, instead of once per file
    has_masks = any("rle" in r.extra or r.extra.get("has_mask") for r in records)
    os.makedirs(out, exist_ok=True)
    n_shards = (len(records) + shard_size - 1) // shard_size
    source = "phantom" if fmt == "phantom" else os.path.abspath(src)
    meta = {"version": PREPARE_VERSION, "format": fmt, "source": source, "size": size,
            "resize": resize, "shard_size": shard_size, "shards": n_shards,
            "records": len(records), "masks": has_masks}
    _check_meta(out, meta)
    _atomic_write_text(os.path.join(out, "meta.json"), json.dumps(meta, indent=1) + "\n")

    plan = [records[k * shard_size:(k + 1) * shard_size] for k in range(n_shards)]
    prints = [_fingerprint(p, size, resize, fmt) for p in plan]
    pending = [k for k in range(n_shards)
               if not shard_is_done(out, k, prints[k], size, has_masks)]
    skipped = n_shards - len(pending)
    total = sum(len(plan[k]) for k in pending)
    bar = Progress(total, desc="prepare", enabled=progress)
    if skipped:
        bar.message(f"afire prepare: {skipped} of {n_shards} shards already finished, skipped")

    def tasks():
        for k in pending:
            for i, r in enumerate(plan[k]):
                yield ((k, i), r.path, size, resize, r.extra.get("rle"),
                       r.extra.get("rle_relative", True))

    failed_now = 0
    pool = None
    try:
        if workers > 1 and total > 1:
            pool = mp.get_context().Pool(workers)
            results = pool.imap(load_and_resize, tasks(), chunksize=4)
        else:
            results = map(load_and_resize, tasks())
        for k in pending:
            imgs, masks, rows, errors = [], [], [], []
            for _ in plan[k]:
                (kk, i), img, mask, err = next(results)
                if kk != k:  # imap keeps the order of tasks()
                    raise RuntimeError(f"prepare: result of shard {kk} while writing {k}")
                r = plan[k][i]
                bar.update()
                if err is not None:
                    errors.append({"path": r.path, "error": err})
                    bar.message(f"afire prepare: cannot read {r.path}: {err}")
                    continue
                rows.append(_manifest_row(r, k, len(imgs)))
                imgs.append(img)
                if has_masks:
                    masks.append(mask if mask is not None else np.zeros((size, size), np.uint8))
            failed_now += len(errors)
            _write_shard(out, k, imgs, masks if has_masks else None, rows, errors, prints[k],
                         size)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()

    summary = _finish(out, n_shards, size)
    summary.update(shards=n_shards, skipped_shards=skipped, seconds=time.monotonic() - t0,
                   out=out, failed_this_run=failed_now)
    return summary


def _write_shard(out, k, imgs, masks, rows, errors, fingerprint, size) -> None:
    base = os.path.join(out, shard_name(k))
    arr = np.stack(imgs) if imgs else np.zeros((0, size, size), np.uint8)
    _atomic_save_npy(base + ".npy", arr)
    if masks is not None:
        m = np.stack(masks) if masks else np.zeros((0, size, size), np.uint8)
        _atomic_save_npy(os.path.join(out, shard_name(k, "mask") + ".npy"), m)
    _atomic_write_text(base + ".jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _atomic_write_text(base + ".done", json.dumps(
        {"fingerprint": fingerprint, "rows": len(rows), "errors": errors}) + "\n")


def _finish(out: str, n_shards: int, size: int) -> dict:
    """Concatenate the shard manifests into manifest.jsonl (global index) and errors.txt."""
    lines, errors = [], []
    index = 0
    for k in range(n_shards):
        with open(os.path.join(out, shard_name(k) + ".done"), encoding="utf-8") as f:
            errors += json.load(f).get("errors", [])
        with open(os.path.join(out, shard_name(k) + ".jsonl"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    row = {"index": index, **row}
                    lines.append(json.dumps(row) + "\n")
                    index += 1
    _atomic_write_text(os.path.join(out, "manifest.jsonl"), "".join(lines))
    _atomic_write_text(os.path.join(out, "errors.txt"),
                       "".join(f"{e['path']}\t{e['error']}\n" for e in errors))
    return {"images": index, "failed": len(errors),
            "failed_files": [e["path"] for e in errors]}


def print_summary(summary: dict, stream=None) -> None:
    stream = stream if stream is not None else sys.stderr
    stream.write(
        f"afire prepare: {summary['images']} images in {summary['shards']} shards "
        f"({summary['skipped_shards']} already done), {summary['failed']} unreadable, "
        f"{summary['seconds']:.1f} s -> {summary['out']}\n")
    if summary["failed"]:
        stream.write(f"afire prepare: unreadable files are listed in "
                     f"{os.path.join(summary['out'], 'errors.txt')}\n")
