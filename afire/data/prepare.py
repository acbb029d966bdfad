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
Unreadable files are reported by name, listed in errors.txt and left out of the shard;
so are files above the pixel limit (``max_pixels``, checked from the header before
decoding, see :mod:`afire.data.image`).

Worker processes (``workers > 1``) are started with the "forkserver" start method ("spawn"
where there is none), never by forking this process: a fork copies the state of libgomp's
OpenMP thread pool (or of CUDA, OpenBLAS...) without its threads, and the child's next
parallel region waits forever for threads that do not exist. Phantom images are generated
here, in batches, by the multi-threaded C generator; only files go to the workers. As with
"spawn" (the default on macOS and Windows), workers import the main module: a script that
calls ``prepare(..., workers > 1)`` must do so under ``if __name__ == "__main__":``.

Errors that stop the run raise :class:`PrepareError` (a ValueError) with a message that
names the path and what to do: no images found, an output path that is a file or cannot be
written (permissions, read-only file system, disk full), a worker that died.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from .image import MAX_PIXELS, RESIZE_MODES, is_dicom_path, load_gray, resize_square
from .progress import Progress
from .readers import Record, decode_rle, read_dataset

PREPARE_VERSION = 1
PHANTOM_PREFIX = "phantom://"
MAX_SIZE = 4096                 # output side limit (the phantom generator's limit too)
MAX_SHARD_BYTES = 4 << 30       # one shard is assembled in memory before it is written
FILE_CHUNK = 4                  # files per worker call
PHANTOM_BATCH_BYTES = 64 << 20  # phantom images generated per C call (x3 arrays)


class PrepareError(ValueError):
    """``afire prepare`` cannot go on (no images, an unwritable output, a dead worker); the
    message names the path and what to do. The CLI prints it on one line, exit status 2."""


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


def _fingerprint(recs: list[Record], size: int, resize: str, fmt: str,
                 max_pixels: int | None = MAX_PIXELS) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([PREPARE_VERSION, fmt, size, resize]).encode())
    if max_pixels != MAX_PIXELS:  # another limit may admit or refuse other files
        h.update(json.dumps(["max_pixels", max_pixels]).encode())
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


def _parse_phantom(path: str) -> tuple[int, int, float]:
    seed, subject, p = path[len(PHANTOM_PREFIX):].split("/")
    return int(seed), int(subject), float(p)


def _phantom_chunk(tasks: list) -> list:
    """Phantom tasks with one seed and p_abnormal and consecutive subjects, in one call of
    the C generator (OpenMP over the batch; runs in this process, never in a worker)."""
    seed, first, p = _parse_phantom(tasks[0][1])
    size = tasks[0][2]
    from .. import _C

    d = _C.phantom.generate(len(tasks), size=size, seed=seed, first_subject=first,
                            p_abnormal=p)
    return [(t[0], d["images"][j], d["lesion_masks"][j], None) for j, t in enumerate(tasks)]


def load_and_resize(task):
    """Worker: (index, path, size, mode, rle|None, relative[, max_pixels]) ->
    (index, img, mask, error). Any failure of one file is returned as its error text."""
    idx, path, size, mode, rle, relative = task[:6]
    max_pixels = task[6] if len(task) > 6 else MAX_PIXELS
    try:
        if path.startswith(PHANTOM_PREFIX):
            return _phantom_chunk([task])[0]
        img = load_gray(path, max_pixels=max_pixels)
        mask = None
        if rle is not None:
            h, w = img.shape
            full = np.zeros((h, w), np.uint8)
            for r in rle:
                full |= decode_rle(r, h, w, relative)
            mask = (resize_square(full * np.uint8(255), size, mode, nearest=True,
                                  max_pixels=max_pixels) > 127)
            mask = mask.astype(np.uint8)
        return idx, resize_square(img, size, mode, max_pixels=max_pixels), mask, None
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is reported per file
        return idx, None, None, f"{type(e).__name__}: {e}"


def _load_chunk(tasks: list) -> list:
    return [load_and_resize(t) for t in tasks]


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it and stops the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _chunks(tasks, size: int):
    """Consecutive tasks grouped into ("phantom", [...]) runs the generator makes in one
    call and ("file", [...]) chunks of FILE_CHUNK for a worker."""
    per_batch = max(1, min(256, PHANTOM_BATCH_BYTES // (3 * size * size)))
    cur, kind, last = [], None, None
    for t in tasks:
        if t[1].startswith(PHANTOM_PREFIX):
            seed, subject, p = _parse_phantom(t[1])
            if kind == "phantom" and len(cur) < per_batch and last == (seed, subject - 1, p):
                cur.append(t)
            else:
                if cur:
                    yield kind, cur
                cur, kind = [t], "phantom"
            last = (seed, subject, p)
        else:
            if kind != "file" or len(cur) >= FILE_CHUNK:
                if cur:
                    yield kind, cur
                cur, kind = [], "file"
            cur.append(t)
    if cur:
        yield kind, cur


def _ordered_results(chunks, executor, window: int):
    """Per-task results in task order. File chunks go to the executor (at most ``window``
    in flight, so memory stays bounded) or run here when there is none; phantom chunks run
    here when their turn comes."""
    queue: deque = deque()
    it = iter(chunks)
    exhausted = False
    while True:
        while not exhausted and len(queue) < window:
            try:
                kind, tasks = next(it)
            except StopIteration:
                exhausted = True
                break
            if kind == "file" and executor is not None:
                queue.append((executor.submit(_load_chunk, tasks), tasks))
            else:
                queue.append((kind, tasks))
        if not queue:
            return
        job, tasks = queue.popleft()
        if isinstance(job, Future):
            try:
                results = job.result()
            except BrokenProcessPool:
                names = ", ".join(t[1] for t in tasks)
                raise PrepareError(
                    f"a decoding worker process died while reading one of: {names}. Either "
                    f"the system killed it (out of memory?): finished shards are kept, run "
                    f"again with --workers 1 to find the file; or it could not start: "
                    f"workers import the main module, so a script calling prepare() with "
                    f"workers > 1 needs `if __name__ == \"__main__\":`") from None
        elif job == "phantom":
            results = _phantom_chunk(tasks)
        else:
            results = _load_chunk(tasks)
        yield from results


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
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file
            e.filename = path
        raise


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file
            e.filename = path
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _output_error(e: OSError, out: str) -> PrepareError:
    """One actionable line for an OSError met while writing ``out``."""
    where = e.filename or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = ("no space left on the device (or disk quota exceeded); free some space and "
               "run the same command again: finished shards are kept")
    elif e.errno == errno.EROFS:
        why = "read-only file system; choose another output directory"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied; choose an output directory you can write to"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "a path component is a file, not a directory; choose another output directory"
    else:
        why = e.strerror or str(e)
    return PrepareError(f"cannot write the output {where}: {why}")


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


def _check_args(size, resize, shard_size, workers, max_pixels) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= MAX_SIZE:
        raise ValueError(f"size (--size) must be an integer from 8 to {MAX_SIZE}, got {size!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size (--shard-size) must be >= 1, got {shard_size!r}")
    if shard_size * size * size > MAX_SHARD_BYTES:
        fit = max(1, MAX_SHARD_BYTES // (size * size))
        raise ValueError(
            f"a shard of {shard_size} images at {size}x{size} would take "
            f"{shard_size * size * size / 2**30:.1f} GiB of memory while it is assembled; use "
            f"--shard-size {fit} or less at this size")
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < size):
        raise ValueError(f"max_pixels must be None or an int >= size, got {max_pixels!r}")
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers (--workers) must be >= 1, got {workers!r}")
    return workers


def _no_images(src: str, fmt: str) -> PrepareError:
    if fmt == "phantom":
        return PrepareError("nothing to prepare: 0 phantom images asked for")
    if fmt == "folder":
        what = "no .png/.jpg/.jpeg/.dcm/.dicom files (searched recursively)"
    else:
        what = f"no images in the {fmt!r} layout (listed files missing on disk are warned about)"
    return PrepareError(f"{src}: {what}; check the path and --format")


def prepare(src: str, out: str, fmt: str = "folder", size: int = 224, workers: int | None = None,
            shard_size: int = 1024, resize: str = "crop", progress: bool = True,
            records: list[Record] | None = None, max_pixels: int | None = MAX_PIXELS,
            **reader_options) -> dict:
    """Decode the dataset at ``src`` (layout ``fmt``) into shards under ``out``.

    Returns a summary dict: images (rows written, all shards), failed (files left out),
    shards, skipped_shards (already finished), seconds, out. ``records`` bypasses the
    reader (used for the phantom and by tests). ``max_pixels``: files declaring more pixels
    are refused before decoding and listed in errors.txt (None: no limit of ours).

    Raises ValueError for bad arguments or an ``out`` prepared with other settings,
    :class:`PrepareError` (a ValueError) when there are no images, none could be read, the
    output cannot be written or a worker died, FileNotFoundError for a missing ``src``,
    ImportError when DICOM files need pydicom."""
    workers = _check_args(size, resize, shard_size, workers, max_pixels)
    t0 = time.monotonic()
    if records is None:
        try:
            records = read_dataset(fmt, src, **reader_options)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise PrepareError(f"cannot read the dataset {e.filename or src}: "
                               f"{e.strerror or e}") from e
    if not records:
        raise _no_images(src, fmt)
    if any(is_dicom_path(r.path) for r in records):
        from .image import _pydicom

        _pydicom()  # fail once, clearly, instead of once per file
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"the output path {out} exists and is not a directory; give a "
                           f"new directory or one written by afire prepare")
    try:
        return _prepare(src, out, fmt, size, workers, shard_size, resize, progress, records,
                        max_pixels, t0)
    except OSError as e:
        raise _output_error(e, out) from e


def _prepare(src, out, fmt, size, workers, shard_size, resize, progress, records, max_pixels,
             t0) -> dict:
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
    prints = [_fingerprint(p, size, resize, fmt, max_pixels) for p in plan]
    pending = [k for k in range(n_shards)
               if not shard_is_done(out, k, prints[k], size, has_masks)]
    skipped = n_shards - len(pending)
    total = sum(len(plan[k]) for k in pending)
    n_files = sum(not r.path.startswith(PHANTOM_PREFIX) for k in pending for r in plan[k])
    bar = Progress(total, desc="prepare", enabled=progress)
    if skipped:
        bar.message(f"afire prepare: {skipped} of {n_shards} shards already finished, skipped")

    def tasks():
        for k in pending:
            for i, r in enumerate(plan[k]):
                yield ((k, i), r.path, size, resize, r.extra.get("rle"),
                       r.extra.get("rle_relative", True), max_pixels)

    failed_now = 0
    executor = None
    n_workers = min(workers, -(-n_files // FILE_CHUNK))
    try:
        if n_workers > 1:
            executor = ProcessPoolExecutor(n_workers, mp_context=_pool_context(),
                                           initializer=_worker_init)
        results = _ordered_results(_chunks(tasks(), size), executor, window=4 * n_workers + 2)
        for k in pending:
            imgs = np.empty((len(plan[k]), size, size), np.uint8)
            masks = np.zeros((len(plan[k]), size, size), np.uint8) if has_masks else None
            rows, errors = [], []
            for _ in plan[k]:
                (kk, i), img, mask, err = next(results)
                if kk != k:  # results come in the order of tasks()
                    raise RuntimeError(f"prepare: result of shard {kk} while writing {k}")
                r = plan[k][i]
                bar.update()
                if err is not None:
                    errors.append({"path": r.path, "error": err})
                    bar.message(f"afire prepare: cannot read {r.path}: {err}")
                    continue
                n = len(rows)
                rows.append(_manifest_row(r, k, n))
                imgs[n] = img
                if has_masks and mask is not None:
                    masks[n] = mask
            failed_now += len(errors)
            n = len(rows)
            _write_shard(out, k, imgs[:n], None if masks is None else masks[:n], rows, errors,
                         prints[k])
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        bar.close()

    summary = _finish(out, n_shards, size)
    summary.update(shards=n_shards, skipped_shards=skipped, seconds=time.monotonic() - t0,
                   out=out, failed_this_run=failed_now)
    if summary["images"] == 0:
        first = summary["failed_files"][:1]
        raise PrepareError(
            f"none of the {len(records)} files could be read (reasons in "
            f"{os.path.join(out, 'errors.txt')})" + (f"; first: {first[0]}" if first else ""))
    return summary


def _write_shard(out, k, imgs, masks, rows, errors, fingerprint) -> None:
    base = os.path.join(out, shard_name(k))
    _atomic_save_npy(base + ".npy", imgs)
    if masks is not None:
        _atomic_save_npy(os.path.join(out, shard_name(k, "mask") + ".npy"), masks)
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
