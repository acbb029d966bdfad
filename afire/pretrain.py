"""The pre-training loop: data, progress, logs, checkpoints, exact resume, report.

``afire.pretrain.pretrain(cfg, data, out)`` trains an :class:`afire.AFiRe` on NORMAL images
and leaves in ``out``::

    config.json                   the run's Config
    log.jsonl, log.csv            one row per logged step: every train_step stat + epoch,
                                  batch, images, images/s, time (same columns in both)
    checkpoints/step_NNNNNNNN.safetensors   periodic, the newest ``keep_last`` are kept
    last.safetensors              the newest checkpoint (an fsynced copy)
    backbone.safetensors          the teacher encoder with timm names (end of run)
    report/                       losses.png, samples.png, report.json, report.md

Resume is exact: the order of epoch e is a function of (seed, e) only, the checkpoint holds
the epoch and the batch position inside it, and the trainer's step counter drives the SLM
draws and every schedule, so N steps in one go and N/2 + resume + N/2 log the same losses.

Several processes (README "Several processes / GPUs"; ``mpirun``, ``torchrun``, ``srun``):
:mod:`afire.dist` finds the launch, every rank trains its slice of each global batch
(``batch_size`` is the GLOBAL batch; rank r reads images r*B/W .. (r+1)*B/W - 1 of it, see
:func:`afire.data.loader.rank_slice`), rank 0 alone writes the run files, every rank resumes
from them, and the ranks agree at every step on stopping (Ctrl-C, bad data) so that they
always run the same collectives.

Parts, in file order: the images (:func:`pretraining_set` -> :class:`PretrainingSet`), the
run files (logs, checkpoints, progress bar), starting a run (fresh, overwritten or resumed:
``_start_*``, ``_model_for``), the loop (``_Loop``: steps, log rows, checkpoints, Ctrl-C,
bad data), :func:`pretrain` tying them together, and the ``afire pretrain`` CLI.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import dist
from .config import Config
from .data import DataError, ShardDataset, phantom_dataset
from .data.loader import epoch_order, rank_slice
from .data.progress import Progress, format_seconds
from .device import require_device
from .display import PretrainSummary
from .model import AFiRe
from .report import REPORT_FILES, read_log, write_report

RUN_FORMAT = "afire-pretrain-1"
# The no-argument demo: the `test` network on 64x64 phantoms (lesion sizes scaled to S=64).
DEMO_OVERRIDES: dict[str, Any] = dict(img_size=64, slm_size=(6, 20), slm_crop=18,
                                      batch_size=16, epochs=40, warmup_epochs=4,
                                      base_lr=4e-3)
DEFAULT_PHANTOMS = 1024
# below this peak lr a short run barely moves the encoder (README: learning rate at small
# batches); `afire pretrain` says so
LOW_PEAK_LR = 1e-4
STAT_COLUMNS = ("step", "loss", "l_stru", "l_cate", "l_cst", "l_recon", "lr", "weight_decay",
                "ema_momentum", "teacher_temp", "grad_norm", "abnormal_fraction",
                "last_layer_frozen")
LOG_COLUMNS = STAT_COLUMNS[:1] + ("epoch", "batch", "images") + STAT_COLUMNS[1:] + (
    "images_per_s", "time")
CKPT_DIR = "checkpoints"
LAST = "last.safetensors"


def demo_config(**overrides: Any) -> Config:
    """The configuration `afire pretrain` uses when no preset is given."""
    return Config.preset_config("test", **{**DEMO_OVERRIDES, **overrides})


# ---------------------------------------------------------------------------- the images
class PretrainingSet:
    """The images a run trains on (see :func:`pretraining_set`): built-in phantoms or an
    array held in memory, or a :class:`~afire.data.ShardDataset` read with its checked
    reads (a shard that breaks mid-run is noticed and named).

    Attributes: ``desc`` (one line for logs and checkpoints), ``fingerprint`` (recorded in
    every checkpoint: a resume must read the same images, and an evaluation recognises
    them), ``size`` (S), ``dataset`` (the ShardDataset, None for images in memory),
    ``bad`` (the shard files found broken, path -> reason).
    """

    def __init__(self, desc: str, fingerprint: str, *, images: np.ndarray | None = None,
                 dataset: ShardDataset | None = None, split: str | None = None,
                 abnormal: int | None = None):
        if (images is None) == (dataset is None):
            raise ValueError("give images or a dataset")
        self.desc, self.fingerprint = desc, fingerprint
        self.images, self.dataset = images, dataset
        self.size = dataset.size if dataset is not None else images.shape[1]
        self._split, self._abnormal = split, abnormal

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.images)

    @property
    def bad(self) -> dict[str, str]:
        return self.dataset.bad if self.dataset is not None else {}

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch`` (a function of (seed, epoch) only: exact resume)."""
        return epoch_order(len(self), seed, epoch)

    def read(self, idx: np.ndarray, on_bad: str = "raise") -> tuple[np.ndarray, list[str]]:
        """The images ``idx`` minus those in broken files, and the newly broken files
        (``ShardDataset.read``; images in memory cannot break)."""
        if self.dataset is None:
            return self.images[idx], []
        return self.dataset.read(idx, on_bad)

    def provenance(self) -> dict:
        """What a checkpoint records about its pre-training images (``train_data``): for
        shards, the prepared directory and the manifest selection (evaluation keeps these
        images out of its test sets)."""
        if self.dataset is None:
            return {"kind": "memory"}
        return {"kind": "shards", "root": os.path.abspath(self.dataset.root),
                "split": self._split, "abnormal": self._abnormal}


def pretraining_set(data: Any, img_size: int, seed: int = 0,
                    say: Callable[[str], None] | None = None) -> PretrainingSet:
    """The images ``afire pretrain`` trains on for ``data`` (see :func:`pretrain`): None
    (``DEFAULT_PHANTOMS`` built-in normal phantoms of seed ``seed``), an int (that many
    phantoms), a prepared directory (its NORMAL images, of split "train" if it has one; if
    no image is labelled, the unlabelled ones, and ``say`` is told), a ShardDataset (used
    as given) or a uint8 array [N, S, S]. Images must be ``img_size`` square."""
    if data is None or (isinstance(data, int) and not isinstance(data, bool)):
        n = DEFAULT_PHANTOMS if data is None else int(data)
        if n < 1:
            raise ValueError(f"data: the number of phantom images must be >= 1, got {n}")
        imgs = phantom_dataset(n, size=img_size, seed=seed)["images"]
        return PretrainingSet(f"{n} built-in phantom images (normal, seed {seed})",
                              f"phantom:{n}:{img_size}:{seed}", images=imgs)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"data must be uint8 grayscale images, got dtype {data.dtype}")
        if data.ndim != 3 or data.shape[1:] != (img_size, img_size):
            raise ValueError(f"data must have shape (N, {img_size}, {img_size}), "
                             f"got {data.shape}")
        arr = np.ascontiguousarray(data)
        h = hashlib.sha256(arr.tobytes()).hexdigest()[:32]
        return PretrainingSet(f"{len(arr)} images from an array", f"array:{arr.shape}:{h}",
                              images=arr)
    if isinstance(data, ShardDataset):
        ds, what = data, f"{len(data)} images of {data.root} (as given)"
        split = abnormal = None
    elif isinstance(data, (str, os.PathLike)):
        ds, what, split, abnormal = _normal_images(os.fspath(data), say)
    else:
        raise TypeError("data must be None, a number of phantoms, a prepared directory, a "
                        f"ShardDataset or a uint8 array, got {type(data).__name__}")
    if ds.size != img_size:
        raise ValueError(f"data: images are {ds.size}x{ds.size} but the config's img_size is "
                         f"{img_size} (re-run `afire prepare --size {img_size}` or "
                         f"set img_size={ds.size})")
    return PretrainingSet(what, ds.fingerprint, dataset=ds, split=split, abnormal=abnormal)


def _normal_images(root: str, say: Callable[[str], None] | None):
    """(dataset, description, split, abnormal) of the images pre-training reads in a
    prepared directory: abnormal == 0 of split "train" (or of all splits when none is
    "train"); abnormal == -1 (unknown) when no image is labelled normal."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data: {root} is not a directory (a prepared dataset; run "
                                "`afire prepare SRC OUT` first)")
    splits = set(ShardDataset(root).field("split"))
    split = "train" if "train" in splits else None
    ds = ShardDataset(root, split=split, abnormal=0)
    if len(ds):
        return ds, f"{len(ds)} normal images of {root}" + (" (split train)" if split else ""), \
            split, 0
    ds = ShardDataset(root, split=split, abnormal=-1)
    if len(ds) == 0:
        raise ValueError(f"data: {root} holds no normal image (abnormal == 0)"
                         + (" in split 'train'" if split else ""))
    if say is not None:
        say(f"note: {root} labels no image normal; training on its {len(ds)} unlabelled "
            "images (abnormal images are never used)")
    return ds, (f"{len(ds)} images of {root} with unknown labels, taken as normal (no image "
                "is labelled normal)"), split, -1


# ---------------------------------------------------------------------------- run files
class _RunLog:
    """log.jsonl + log.csv (+ TensorBoard). On resume, rows at or after the resumed step
    are dropped first so the logs read as one uninterrupted run."""

    def __init__(self, out: str, keep_below: int | None, tensorboard: bool, say):
        self.jsonl_path = os.path.join(out, "log.jsonl")
        self.csv_path = os.path.join(out, "log.csv")
        rows = []
        if keep_below is not None:
            rows = [r for r in read_log(self.jsonl_path) if r["step"] < keep_below]
        # rewrite both files beside the old ones and swap, so a crash here loses nothing
        for path, fill in ((self.jsonl_path, self._fill_jsonl), (self.csv_path, self._fill_csv)):
            with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
                fill(f, rows)
            os.replace(path + ".tmp", path)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._csv_f = open(self.csv_path, "a", encoding="utf-8", newline="")
        self._csv = csv.writer(self._csv_f)
        self.tb = None
        if tensorboard:
            self.tb = _tensorboard_writer(os.path.join(out, "tb"), keep_below, say)

    @staticmethod
    def _fill_jsonl(f, rows: list[dict]) -> None:
        for r in rows:
            f.write(json.dumps({c: r.get(c) for c in LOG_COLUMNS}) + "\n")

    @staticmethod
    def _fill_csv(f, rows: list[dict]) -> None:
        w = csv.writer(f)
        w.writerow(LOG_COLUMNS)
        for r in rows:
            w.writerow([r.get(c) for c in LOG_COLUMNS])

    def _write(self, row: dict) -> None:
        self._fill_jsonl(self._jsonl, [row])
        self._csv.writerow([row.get(c) for c in LOG_COLUMNS])

    def _flush(self) -> None:
        self._jsonl.flush()
        self._csv_f.flush()

    def write(self, row: dict) -> None:
        self._write(row)
        self._flush()
        if self.tb is not None:
            for c in LOG_COLUMNS[4:]:
                self.tb.add_scalar(f"train/{c}", float(row[c]), row["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._csv_f.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(logdir: str, purge_step: int | None, say):
    try:
        from tensorboardX import SummaryWriter  # type: ignore[import-not-found]
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore[import-not-found]
        except ImportError:
            say("--tensorboard: neither tensorboardX nor torch.utils.tensorboard can be "
                "imported (pip install tensorboard); logging to log.jsonl/log.csv only")
            return None
    return SummaryWriter(logdir, purge_step=purge_step)


def _step_files(d: str) -> list[str]:
    """Names of afire's step checkpoints in ``d``, oldest first."""
    if not os.path.isdir(d):
        return []
    return sorted(f for f in os.listdir(d)
                  if f.startswith("step_") and f.endswith(".safetensors"))


def _copy_atomic(src: str, dst: str) -> None:
    """dst becomes an independent copy of src (temp file, fsync, rename): a corruption of
    one never reaches the other, as it would through a hard link."""
    import shutil

    tmp = dst + ".tmp"
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, dst)


def _save_checkpoint(model, out: str, meta: dict, keep_last: int) -> str:
    """checkpoints/step_N.safetensors (atomic), read back to validate it, last.safetensors as
    a copy of it, then prune the step files to the newest ``keep_last``. The file just
    written is the newest and has validated, so the newest good checkpoint is never pruned
    (invalid ones found by a resume were set aside as ``*.corrupt`` then)."""
    d = os.path.join(out, CKPT_DIR)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"step_{model.step:08d}.safetensors")
    model.save(path, extra_metadata=meta)
    AFiRe.read_metadata(path)  # validates the whole file; raises before anything is pruned
    _copy_atomic(path, os.path.join(out, LAST))
    for f in _step_files(d)[:-keep_last]:
        os.remove(os.path.join(d, f))
    return path


def _set_aside(path: str, reason: str, say) -> None:
    """A checkpoint that failed validation on resume: renamed to ``*.corrupt`` (kept for
    inspection, out of the rotation, so pruning can never prefer it to a good one)."""
    try:
        os.replace(path, path + ".corrupt")
        say(f"resume: {path} is not loadable ({reason}); renamed to {path}.corrupt")
    except OSError as e:
        say(f"resume: skipping {path} ({reason}; could not rename it: {e.strerror or e})")


def _remove_run_files(out: str) -> None:
    """--overwrite: delete what afire pretrain writes, nothing else (a user's notes in the
    run directory or its checkpoints/ folder stay); folders only when left empty."""
    names = [LAST, LAST + ".tmp", "log.jsonl", "log.csv", "config.json",
             "backbone.safetensors"]
    d = os.path.join(out, CKPT_DIR)
    if os.path.isdir(d):
        names += [os.path.join(CKPT_DIR, f) for f in os.listdir(d)
                  if f.startswith("step_") and (f.endswith(".safetensors")
                                                or f.endswith(".corrupt")
                                                or ".safetensors.tmp" in f)]
    names += [os.path.join("report", f) for f in REPORT_FILES]
    tb = os.path.join(out, "tb")
    if os.path.isdir(tb):  # TensorBoard event files (the writer's fixed prefix)
        names += [os.path.join("tb", f) for f in os.listdir(tb)
                  if f.startswith("events.out.tfevents.")]
    for f in names:
        p = os.path.join(out, f)
        if os.path.isfile(p) or os.path.islink(p):
            os.remove(p)
    for sub in (CKPT_DIR, "report", "tb"):
        try:
            os.rmdir(os.path.join(out, sub))
        except OSError:  # absent, or holds files afire did not write
            pass


def _find_resume(out: str) -> list[str]:
    """Candidates to resume from, best first: last.safetensors, then newest checkpoints."""
    d = os.path.join(out, CKPT_DIR)
    c = [os.path.join(out, LAST)] if os.path.exists(os.path.join(out, LAST)) else []
    return c + [os.path.join(d, f) for f in reversed(_step_files(d))]


class _SigintFlag:
    """First Ctrl-C: finish the current step, then checkpoint and stop. Second: at once.

    With several ranks (``ranks``) every Ctrl-C only sets the flag: a terminal's Ctrl-C
    reaches each rank twice (directly and forwarded by mpirun), and stopping at once would
    leave the other ranks in a collective; mpirun's own second Ctrl-C ends the job."""

    def __init__(self, ranks: bool = False):
        self.hit = False
        self.ranks = ranks
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit and not self.ranks:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _config_diff(a: Config, b: Config) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return sorted(k for k in da if da[k] != db.get(k))


# ---------------------------------------------------------------------------- the run
class _Console:
    """Where pretrain's messages go: the stream, or above the progress bar once there is
    one (so that neither garbles the other). With several ranks only rank 0 speaks, except
    for `warn` (every rank, prefixed with its rank: e.g. a shard that broke on one rank)."""

    def __init__(self, stream, group: dist.Group | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.bar: Progress | None = None
        self.rank = group.rank if group is not None else 0
        self.prefix = f"[rank {group.rank}/{group.world_size}] " if group is not None else ""

    def __call__(self, text: str) -> None:
        if self.rank == 0:
            self._write(text)

    def warn(self, text: str) -> None:
        self._write(self.prefix + text)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.message(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


@dataclass
class _Start:
    """A run before its data are opened: its Config and directory, and for a resume the
    model and metadata of the checkpoint it continues (``model`` None: a fresh run)."""

    cfg: Config
    out: str
    model: AFiRe | None = None
    meta: dict[str, str] = field(default_factory=dict)
    path: str | None = None  # several ranks: the checkpoint every rank loads (_model_for)


@dataclass
class _Position:
    """How far a run has got besides the model's step: what a checkpoint records so that a
    resume continues exactly (the epoch, the next batch in it, the images trained on and
    the seconds spent before this call)."""

    epoch: int = 0
    batch: int = 0
    images: int = 0
    elapsed: float = 0.0

    @classmethod
    def of_checkpoint(cls, meta: dict[str, str]) -> _Position:
        return cls(int(meta["epoch"]), int(meta["batch_in_epoch"]), int(meta["images_seen"]),
                   float(meta["elapsed"]))


def _check_options(config: Config | None, resume: bool, on_bad_data: str,
                   **counts: int | None) -> None:
    if on_bad_data not in ("skip", "stop"):
        raise ValueError(f"on_bad_data must be 'skip' or 'stop', got {on_bad_data!r}")
    lowest = {"max_steps": 0}
    for name, v in counts.items():
        lo = lowest.get(name, 1)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if config is None and not resume:
        raise ValueError("config is required unless resume=True")
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an afire.Config, got {type(config).__name__}")


def _start_fresh(config: Config, out: str | None, overwrite: bool, rank: int = 0) -> _Start:
    """A new run in ``out``, which must hold no run unless ``overwrite`` (then rank 0
    removes its run files)."""
    out = out if out is not None else os.path.join("runs", f"afire-{config.preset}")
    if rank == 0 and (_find_resume(out) or os.path.exists(os.path.join(out, "log.jsonl"))):
        if not overwrite:
            raise ValueError(f"{out} already holds a run; resume it (--resume), start "
                             "afresh in it (--overwrite) or choose another --out")
        _remove_run_files(out)
    return _Start(config, out)


def _resume_dir(config: Config | None, out: str | None) -> str:
    if out is None:
        if config is None:
            raise ValueError("resume needs out (the run directory) or a config")
        out = os.path.join("runs", f"afire-{config.preset}")
    return out


def _check_resume_config(config: Config | None, ckpt: Config) -> None:
    if config is not None:
        diff = _config_diff(config, ckpt)
        if diff:
            raise ValueError(f"resume: the config differs from the checkpoint's in {diff}; "
                             "resume with the same settings (or none) for an exact run")


def _pick_checkpoint(out: str, say) -> str:
    """Several ranks, on rank 0: the newest checkpoint whose file validates (the others are
    set aside, as a single process does); every rank then loads it (_model_for)."""
    cands = _find_resume(out)
    if not cands:
        raise FileNotFoundError(f"resume: no checkpoint in {out} (nothing to resume; "
                                "start without --resume)")
    for c in cands:
        try:
            meta = AFiRe.read_metadata(c)
            if meta.get("run_format") != RUN_FORMAT:
                raise ValueError("not written by afire pretrain")
            Config.from_json(meta["config"])
            return c
        except (ValueError, KeyError) as e:
            _set_aside(c, str(e), say)
    raise ValueError(f"resume: no loadable checkpoint in {out}")


def _start_resumed_ranks(config: Config | None, out: str | None, say,
                         group: dist.Group) -> _Start:
    """_start_resumed for several ranks: rank 0 picks the checkpoint, every rank reads its
    metadata (the run directory must be on a file system every rank sees)."""
    out = _resume_dir(config, out)
    err, path = None, None
    try:
        path = _pick_checkpoint(out, say) if group.rank == 0 else None
    except Exception as e:  # noqa: BLE001  (handed to every rank by agree)
        err = e
    group.agree(err, "resume: choosing the checkpoint")
    path = group.broadcast_bytes(path.encode() if path else None).decode()
    err, meta, cfg = None, {}, None
    try:
        meta = AFiRe.read_metadata(path)
        cfg = Config.from_json(meta["config"])
        _check_resume_config(config, cfg)
    except FileNotFoundError as e:
        err = FileNotFoundError(e.errno, f"resume: rank {group.rank} cannot read {path} (run "
                                "directories must be on a file system that every rank sees)",
                                path)
    except Exception as e:  # noqa: BLE001
        err = e
    group.agree(err, "resume: reading the checkpoint")
    old = int(meta.get("world_size", "1"))
    say(f"resuming from {path} (step {meta['step']})"
        + (f"; it was written by a run of {old} rank(s), continuing on {group.world_size}"
           if old != group.world_size else ""))
    return _Start(cfg, out, None, meta, path)


def _start_resumed(config: Config | None, out: str | None, device: str, say) -> _Start:
    """The run in ``out`` from its newest loadable checkpoint (unloadable ones are set
    aside); a given ``config`` must equal the checkpoint's."""
    out = _resume_dir(config, out)
    cands = _find_resume(out)
    if not cands:
        raise FileNotFoundError(f"resume: no checkpoint in {out} (nothing to resume; "
                                "start without --resume)")
    model, meta = None, {}
    for c in cands:
        try:
            meta = AFiRe.read_metadata(c)
            if meta.get("run_format") != RUN_FORMAT:
                raise ValueError("not written by afire pretrain")
            model = AFiRe.load(c, device=device)
            break
        except ValueError as e:
            _set_aside(c, str(e), say)
    if model is None:
        raise ValueError(f"resume: no loadable checkpoint in {out}")
    say(f"resuming from {c} (step {model.step})")
    _check_resume_config(config, model.cfg)
    return _Start(model.cfg, out, model, meta)


def _check_model_inputs(start: _Start, src: PretrainingSet,
                        group: dist.Group | None) -> int:
    """The batches per epoch, once the data and world size can train ``start``'s run (the
    checks that need no model: with several ranks they run before the collective model
    construction)."""
    B = start.cfg.batch_size
    nb = len(src) // B
    if nb < 1:
        raise ValueError(f"data: {len(src)} images are fewer than one batch of {B}")
    if group is not None and start.meta and B % group.world_size:
        ok = [w for w in range(1, B + 1) if B % w == 0]
        raise ValueError(f"resume: the run's global batch of {B} images cannot be split evenly "
                         f"over {group.world_size} ranks (every rank trains the same number "
                         f"of images per step); resume on {', '.join(map(str, ok[:8]))}"
                         f"{', ...' if len(ok) > 8 else ''} ranks")
    if group is not None:
        dist.rank_batch(B, group.world_size)
    if start.meta and start.meta.get("data_fingerprint") != src.fingerprint:
        raise ValueError(f"resume: the data differs from the run's ({start.meta.get('data_desc')}"
                         f"; fingerprint {start.meta.get('data_fingerprint')} != "
                         f"{src.fingerprint}); pass the same data to resume exactly")
    return nb


def _model_for(start: _Start, src: PretrainingSet, device: str,
               group: dist.Group | None = None) -> tuple[AFiRe, _Position]:
    """The model to train on ``src`` and where it starts: a new model at the beginning, or
    the resumed one where its checkpoint left off, once ``src`` is checked to be the
    images it trained on, in as many batches per epoch. With several ranks each model holds
    the per-rank batch (the global batch / world size) and is built collectively."""
    B = start.cfg.batch_size
    nb = _check_model_inputs(start, src, group)
    if group is not None:
        rb = dist.rank_batch(B, group.world_size)
        if start.path is None:
            model = AFiRe(start.cfg, device=group.device, steps_per_epoch=nb, batch_size=rb,
                          group=group)
            return model, _Position()
        start.model = AFiRe.load(start.path, device=group.device, batch_size=rb, group=group)
    elif start.model is None:
        return AFiRe(start.cfg, device=device, steps_per_epoch=nb, batch_size=B), _Position()
    meta = start.meta
    if start.model.steps_per_epoch != nb:
        raise ValueError(f"resume: {nb} batches per epoch now, {start.model.steps_per_epoch} "
                         "in the checkpoint")
    return start.model, _Position.of_checkpoint(meta)


def _write_config(out: str, cfg: Config) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")


def _announce(cfg: Config, src: PretrainingSet, nb: int, device: str, out: str, say,
              group: dist.Group | None = None) -> None:
    """The first lines of a fresh run: what trains on what, and settings worth a note."""
    where = f"device {device}"
    batch = f"batch {cfg.batch_size}"
    if group is not None:
        where = (f"{group.world_size} ranks ({group.launcher}, {group.backend}; rank 0 on "
                 f"{device})")
        batch = (f"global batch {cfg.batch_size} = {group.world_size} ranks x "
                 f"{cfg.batch_size // group.world_size}")
    say(f"afire pretrain: preset {cfg.preset} (S={cfg.img_size}, P={cfg.patch_size}, "
        f"D={cfg.embed_dim}, depth {cfg.depth}, {cfg.objective} objective) on {src.desc}; "
        f"{batch}, {nb} steps/epoch x {cfg.epochs} epochs = {cfg.epochs * nb} "
        f"steps, {where}, out {out}")
    if cfg.warmup_epochs >= cfg.epochs:
        say(f"note: warmup_epochs={cfg.warmup_epochs} >= epochs={cfg.epochs}: the learning "
            "rate never leaves its warm-up (override warmup_epochs=... to change)")
    if cfg.lr < LOW_PEAK_LR:
        say(f"note: peak learning rate {cfg.lr:.2g} (base_lr {cfg.base_lr:g} x batch "
            f"{cfg.batch_size} / 256) is low for a short run; the paper's peak is 1e-3, "
            f"i.e. base_lr={1e-3 * 256 / cfg.batch_size:.2g} at this batch (README: "
            "learning rate at small batches)")


# ---------------------------------------------------------------------------- the loop
class _AgreedStop(KeyboardInterrupt):
    """Every rank stops here: one of them was interrupted (Ctrl-C, or the callback raised
    KeyboardInterrupt) and the per-step agreement told all of them."""

    _afire_consistent = True  # afire.dist.is_consistent: every rank stops alike


class _NoLog:
    """The run log of ranks other than 0: they write no files."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Loop:
    """The epoch/batch loop of one `pretrain` call: a step per batch, a log row on the
    fixed schedule, checkpoints (each epoch, every ``ckpt_every`` steps, at the end, and
    on Ctrl-C or a stop for bad data), the progress bar. ``run`` trains; ``summary``
    then describes the call. ``pos`` advances with every batch taken.

    With several ranks (``group``) each rank reads its slice of every global batch, and
    before each step the ranks exchange (images read, interrupted, data error): all of them
    then step, skip the batch (a rank read no image), stop with a checkpoint (Ctrl-C on
    any rank) or stop for bad data, together. Rank 0 draws the bar and writes the files;
    checkpoints are preceded by a check that every rank holds the same state."""

    def __init__(self, model: AFiRe, src: PretrainingSet, out: str, pos: _Position,
                 resumed: bool, *, total: int, log: _RunLog | _NoLog, console: _Console,
                 progress: bool, log_every: int, ckpt_every: int | None, keep_last: int,
                 on_bad: str, callback: Callable[[dict], None] | None,
                 group: dist.Group | None = None):
        self.group = group
        self.model, self.src, self.out, self.pos = model, src, out, pos
        self.cfg, self.nb, self.total = model.cfg, model.steps_per_epoch, total
        self.log, self.say = log, console
        self.log_every, self.ckpt_every, self.keep_last = log_every, ckpt_every, keep_last
        self.on_bad, self.callback = on_bad, callback
        self.step_start = model.step
        self.resumed = resumed
        self.last_saved = model.step if resumed else -1
        self.last_row: dict | None = None
        self.pending: tuple[int, int] | None = None  # (step before, batch size) while a step runs
        self.images_run = 0
        self.stopped = "complete"
        self.t0 = time.monotonic()
        self.interval_t, self.interval_img = self.t0, 0
        # the rate and ETA are this call's (a resumed run starts at model.step)
        self.bar = Progress(total, "pretrain", unit="step", stream=console.stream,
                            enabled=progress and console.rank == 0, initial=model.step)
        self.img_s = 0.0
        console.bar = self.bar

    # ---- checkpoints
    def checkpoint(self) -> str:
        g = self.group
        meta = {"run_format": RUN_FORMAT, "epoch": self.pos.epoch,
                "batch_in_epoch": self.pos.batch, "data_fingerprint": self.src.fingerprint,
                "data_desc": self.src.desc,
                "train_data": json.dumps(self.src.provenance(), sort_keys=True),
                "elapsed": f"{self.pos.elapsed + time.monotonic() - self.t0:.3f}",
                "images_seen": self.pos.images, "global_batch": self.cfg.batch_size,
                "world_size": 1 if g is None else g.world_size,
                "batch_per_rank": self.model.batch_capacity}
        path = os.path.join(self.out, CKPT_DIR, f"step_{self.model.step:08d}.safetensors")
        if g is None:
            path = _save_checkpoint(self.model, self.out, meta, self.keep_last)
        else:
            # the teacher, prototypes, student and moments must be bit-identical on all ranks
            g.check_identical(self.model.state_tensors(), f"checkpoint at step {self.model.step}")
            err = None
            if g.rank == 0:
                try:
                    _save_checkpoint(self.model, self.out, meta, self.keep_last)
                except Exception as e:  # noqa: BLE001  (every rank stops, rank 0 with e)
                    err = e
            g.agree(err, f"writing the checkpoint of step {self.model.step} on rank 0")
        self.last_saved = self.model.step
        return path

    def _checkpoint_if_new(self) -> None:
        if self.model.step != self.last_saved:
            self.checkpoint()

    # ---- the loop
    def run(self) -> None:
        """Train until the last epoch or ``total`` steps; always leaves a checkpoint of the
        last step taken (unless a step failed with a non-finite loss)."""
        try:
            with _SigintFlag(self.group is not None) as sigint:
                while self.pos.epoch < self.cfg.epochs and self.stopped == "complete":
                    self._epoch(sigint)
                self._checkpoint_if_new()
        except KeyboardInterrupt as e:
            if self.group is not None and not isinstance(e, _AgreedStop):
                # a second Ctrl-C on this rank alone, in the middle of a step: the ranks are
                # no longer in step, so no checkpoint (the last one stays); the job ends
                self.bar.close()
                self.say.warn(f"interrupted again at step {self.model.step}: stopping without "
                              f"a checkpoint (the last is {os.path.join(self.out, LAST)})")
                raise
            if self.pending is not None and self.model.step > self.pending[0]:
                # a second Ctrl-C landed between the C step and the bookkeeping: count it
                self.pos.batch += 1
                self.pos.images += self.pending[1]
            self._checkpoint_if_new()
            self.bar.close()
            self.say(f"interrupted at step {self.model.step}; checkpoint "
                     f"{os.path.join(self.out, LAST)}. Resume with: afire pretrain --out "
                     f"{self.out} --resume")
            raise
        except DataError as e:
            self._checkpoint_if_new()
            raise dist.mark_consistent(DataError(
                e.path, f"{e.reason}; training stopped (on_bad_data='stop') with a checkpoint "
                f"at step {self.model.step}; fix the data and resume with --out {self.out} "
                "--resume")) from None
        finally:
            self.bar.close()

    def _epoch(self, sigint: _SigintFlag) -> None:
        """The rest of the current epoch (from batch ``pos.batch``), or up to ``total``."""
        B, pos, g = self.cfg.batch_size, self.pos, self.group
        order = self.src.epoch_order(self.cfg.seed, pos.epoch)
        while pos.batch < self.nb:
            if self.model.step >= self.total:
                self.stopped = "max_steps"
                return
            idx = order[pos.batch * B:(pos.batch + 1) * B]
            if g is None:
                batch, new_bad = self.src.read(idx, self.on_bad)
                self._warn_bad(new_bad)
                n = len(batch)
            else:
                batch, n = self._read_agreed(rank_slice(idx, g.rank, g.world_size), sigint)
            if n == 0:
                pos.batch += 1
                continue
            row = self._record(self._step(batch, n), n)
            if self.ckpt_every is not None and self.model.step % self.ckpt_every == 0 \
                    and pos.batch < self.nb:
                self.checkpoint()
            if self.callback is not None:
                try:
                    self.callback(row)
                except KeyboardInterrupt:
                    if g is None:
                        raise
                    sigint.hit = True  # told to the other ranks at the next agreement
            if sigint.hit and g is None:
                raise KeyboardInterrupt
        pos.epoch, pos.batch = pos.epoch + 1, 0
        self.checkpoint()

    def _warn_bad(self, new_bad: list[str]) -> None:
        for p in new_bad:
            self.say.warn(f"warning: {p}: {self.src.bad[p]}; its images are skipped from now on")

    def _read_agreed(self, idx: np.ndarray, sigint: _SigintFlag) -> tuple[np.ndarray, int]:
        """Several ranks: this rank's images of the batch, then the per-step agreement.
        Returns (images, images of all ranks), 0 when some rank read none (every rank skips
        the batch); raises on every rank when one was interrupted or hit bad data."""
        g = self.group
        err, batch = None, idx[:0]
        try:
            batch, new_bad = self.src.read(idx, self.on_bad)
            self._warn_bad(new_bad)
        except DataError as e:
            err = e
        every = g.allgather(np.array([len(batch), sigint.hit, err is not None], np.int64))
        if every[:, 2].any():
            if err is None:
                r = int(np.flatnonzero(every[:, 2])[0])
                err = DataError(f"(a data file of rank {r})", "it broke during training "
                                f"(see rank {r}'s output)")
            raise dist.mark_consistent(err)
        if every[:, 1].any():
            raise _AgreedStop
        if every[:, 0].min() == 0:
            self.say(f"warning: batch {self.pos.batch} of epoch {self.pos.epoch} is skipped: "
                     f"rank {int(np.argmin(every[:, 0]))} could read none of its images")
            return batch, 0
        return batch, int(every[:, 0].sum())

    def _step(self, batch: np.ndarray, n: int) -> dict[str, float]:
        """One training step on ``batch`` (``n`` images on all ranks together); the position
        advances once it has happened."""
        before = self.model.step
        self.pending = (before, n)
        try:
            stats = self.model.train_step(batch)
        except FloatingPointError as e:
            good = (f"the last good checkpoint is {os.path.join(self.out, LAST)} "
                    f"(step {self.last_saved})" if self.last_saved >= 0 else
                    "no checkpoint had been written yet")
            # with several ranks every rank gets this verdict (made on global values)
            raise dist.mark_consistent(FloatingPointError(
                f"non-finite loss at step {before} (epoch {self.pos.epoch}, batch "
                f"{self.pos.batch}): {e}. Training stopped without writing a checkpoint; "
                f"{good}. Lower the learning rate (base_lr=...) or check the data."
            )) from None
        self.pos.batch += 1
        self.pos.images += n
        self.pending = None
        return stats

    def _record(self, stats: dict[str, float], n: int) -> dict:
        """The step's log row: written on the fixed schedule (steps 0, k, 2k, ... and the
        last, so that a resumed run logs the same rows), shown on the bar."""
        self.images_run += n
        self.interval_img += n
        now = time.monotonic()
        self.img_s = self.interval_img / max(now - self.interval_t, 1e-9)
        self.bar.fields(f"ep {self.pos.epoch + 1}/{self.cfg.epochs} loss {stats['loss']:.4f} "
                        f"stru {stats['l_stru']:.3f} cate {stats['l_cate']:.3f} "
                        f"recon {stats['l_recon']:.3f} | {self.img_s:.1f} img/s")
        row = {**{c: stats[c] for c in STAT_COLUMNS}, "epoch": self.pos.epoch,
               "batch": self.pos.batch - 1, "images": n,
               "last_layer_frozen": int(stats["last_layer_frozen"]),
               "images_per_s": round(self.img_s, 2),
               "time": round(self.pos.elapsed + now - self.t0, 3)}
        s = stats["step"]
        if s % self.log_every == 0 or s == self.cfg.epochs * self.nb - 1:
            self.log.write(row)
            self.interval_t, self.interval_img = now, 0
        self.last_row = row
        self.bar.update(1)
        return row

    def summary(self, device: str) -> dict[str, Any]:
        """What this call did (pretrain's return value, before the backbone and report)."""
        seconds = time.monotonic() - self.t0
        last_row = self.last_row
        if last_row is None:  # nothing logged in this call (a finished run resumed)
            last_row = (read_log(os.path.join(self.out, "log.jsonl")) or [None])[-1]
        cfg, model = self.cfg, self.model
        return {
            "out": self.out, "stopped": self.stopped, "steps": model.step,
            "total_steps": cfg.epochs * self.nb, "epochs_done": self.pos.epoch,
            "steps_this_run": model.step - self.step_start, "images_seen": self.pos.images,
            "seconds": round(seconds, 3), "seconds_total": round(self.pos.elapsed + seconds, 3),
            "images_per_s": round(self.images_run / seconds if seconds > 0 else 0.0, 2),
            "final": last_row, "checkpoint": os.path.join(self.out, LAST),
            "data": self.src.desc, "bad_files": dict(self.src.bad),
            "resumed_from": self.step_start if self.resumed else None,
            "preset": cfg.preset, "device": device,
            "world_size": 1 if self.group is None else self.group.world_size,
        }


def _finish(loop: _Loop, device: str, report: bool) -> dict:
    """The summary; for a complete run the backbone export; the report if asked for (rank 0
    alone writes them; every rank returns the summary once rank 0 is done)."""
    g = loop.group
    if g is None:
        return _finish_files(loop, device, report)
    err, summary = None, None
    try:
        summary = (_finish_files(loop, device, report) if g.rank == 0
                   else PretrainSummary(loop.summary(device)))
    except Exception as e:  # noqa: BLE001
        err = e
    g.agree(err, "the end of the run (backbone export, report) on rank 0")
    return summary


def _finish_files(loop: _Loop, device: str, report: bool) -> dict:
    summary = loop.summary(device)
    model, out, src = loop.model, loop.out, loop.src
    if loop.stopped == "complete":
        summary["backbone"] = os.path.join(out, "backbone.safetensors")
        model.export_backbone(summary["backbone"])
    if report:
        sample = src.read(src.epoch_order(model.cfg.seed, 0)[:min(4, len(src))], "skip")[0]
        # the held-out phantom check says something only about a model trained on phantoms
        summary["report"] = write_report(out, model, summary, sample,
                                         anomaly=src.fingerprint.startswith("phantom:"))
    return PretrainSummary(summary)


def pretrain(config: Config | None = None, data: Any = None, out: str | os.PathLike | None = None,
             resume: bool = False, device: str = "cpu", log_every: int = 10,
             ckpt_every: int | None = None, keep_last: int = 3, progress: bool = True,
             on_bad_data: str = "skip", tensorboard: bool = False, max_steps: int | None = None,
             overwrite: bool = False, report: bool = True,
             callback: Callable[[dict], None] | None = None, stream=None) -> PretrainSummary:
    """Pre-train AFiRe and return a summary dict (a :class:`~afire.display.PretrainSummary`,
    which Jupyter shows as a table).

    Args:
        config: the run's Config (None only with ``resume``: the checkpoint's is used).
            On resume a given config must equal the checkpoint's.
        data: None (``DEFAULT_PHANTOMS`` built-in normal phantoms), an int (that many
            phantoms), a directory from ``afire prepare`` (its NORMAL images, split "train"
            if it has one), a ShardDataset (used as given) or a uint8 array [N, S, S]
            (:func:`pretraining_set` says which images that is).
        out: run directory (default ``runs/afire-<preset>``).
        resume: continue from ``out/last.safetensors`` bit-identically.
        log_every: log steps 0, k, 2k, ... and the last one. ``ckpt_every``: also checkpoint
            every that many steps (there is always one per epoch and one at the end).
        keep_last: checkpoints kept in ``out/checkpoints``.
        on_bad_data: "skip" leaves out images of a shard that vanished or became unreadable
            (reported by name); "stop" checkpoints and raises :class:`DataError`.
        max_steps: stop (with a checkpoint) once the model has done this many steps.
        overwrite: start afresh in an ``out`` that already holds a run.
        callback: called with each step's log row (after logging and checkpointing; with
            several ranks on every rank, with the same global losses; a KeyboardInterrupt
            from it stops every rank at the next step, with a checkpoint).
        stream: where messages go (default sys.stderr), the progress bar included.

    Several processes (started by mpirun, torchrun or srun; :mod:`afire.dist`): call it on
    every rank with the same arguments. ``config.batch_size`` is the global batch, split
    evenly over the ranks; ``device`` "cpu" or "cuda" (each rank takes the GPU of its local
    rank); rank 0 alone writes ``out`` and prints; every rank returns the summary.

    Raises:
        KeyboardInterrupt after saving a checkpoint (Ctrl-C or from ``callback``);
        FloatingPointError on a non-finite loss (no checkpoint is written for it);
        DataError with on_bad_data="stop".
    """
    device = require_device(device)
    _check_options(config, resume, on_bad_data, log_every=log_every, keep_last=keep_last,
                   ckpt_every=ckpt_every, max_steps=max_steps)
    group = _group_for(device)
    say = _Console(stream, group)
    out = os.fspath(out) if out is not None else None
    opts = dict(data=data, resume=resume, overwrite=overwrite, tensorboard=tensorboard,
                max_steps=max_steps, report=report,
                loop=dict(progress=progress, log_every=log_every, ckpt_every=ckpt_every,
                          keep_last=keep_last, callback=callback,
                          on_bad="raise" if on_bad_data == "stop" else "skip"))
    if group is None:
        return _run(config, out, device, say, None, **opts)
    try:
        return _run(config, out, group.device, say, group, **opts)
    except BaseException as e:
        group.failed(e)  # a failure on this rank alone ends the whole job at exit
        raise


def _group_for(device: str) -> dist.Group | None:
    """The process group when a launcher started several processes (afire.dist), else
    None. Each rank then runs on the CPU or on the GPU of its local rank."""
    if dist.detect().world_size <= 1:
        return None
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: with several processes give 'cpu' or 'cuda' "
                         "(each rank takes the GPU of its local rank)")
    return dist.init(device)


def _run(config: Config | None, out: str | None, device: str, say: _Console,
         group: dist.Group | None, *, data: Any, resume: bool, overwrite: bool,
         tensorboard: bool, max_steps: int | None, report: bool, loop: dict) -> PretrainSummary:
    """pretrain() once the device and the process group are known."""
    rank = 0 if group is None else group.rank
    err, start, src = None, None, None
    try:
        if resume and group is not None:
            start = _start_resumed_ranks(config, out, say, group)
        elif resume:
            start = _start_resumed(config, out, device, say)
        else:
            start = _start_fresh(config, out, overwrite, rank)
        src = pretraining_set(data, start.cfg.img_size, start.cfg.seed, say)
        if group is not None:
            _check_model_inputs(start, src, group)
    except Exception as e:  # noqa: BLE001
        if group is None:
            raise
        err = e
    if group is not None:  # every rank can build its model (a collective) or none does
        group.agree(err, "opening the run and its data")
    cfg, out = start.cfg, start.out
    model, pos = _model_for(start, src, device, group)
    if group is not None:
        group.check_identical(model.state_tensors(), "the initial model")
    if rank == 0:
        _write_config(out, cfg)
    total = cfg.epochs * model.steps_per_epoch
    if max_steps is not None:
        total = min(total, max(max_steps, model.step))
    log = (_RunLog(out, model.step if resume else None, tensorboard, say) if rank == 0
           else _NoLog())
    try:
        if not resume:
            _announce(cfg, src, model.steps_per_epoch, device, out, say, group)
        run = _Loop(model, src, out, pos, resume, total=total, log=log, console=say,
                    group=group, **loop)
        run.run()
    finally:
        log.close()
    return _finish(run, device, report)


# ---------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    """Register ``afire pretrain`` on an argparse subparsers object."""
    p = sub.add_parser(
        "pretrain", help="pre-train AFiRe on normal chest X-rays (default: a phantom demo)",
        description="Pre-train AFiRe. Without --data, trains on built-in synthetic phantoms; "
                    "without --preset, a small demo (the test network on 64x64 images, "
                    f"{DEMO_OVERRIDES['epochs']} epochs of {DEFAULT_PHANTOMS} phantoms) that "
                    "takes 1-2 minutes on 2 CPU cores. Ctrl-C saves a checkpoint; "
                    "--resume continues exactly.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Config overrides, e.g. base_lr=1e-3 objective=released")
    p.add_argument("--data", default=None,
                   help="prepared dataset directory (afire prepare); default: phantoms")
    p.add_argument("--phantoms", type=int, default=None,
                   help=f"number of built-in phantom images without --data ({DEFAULT_PHANTOMS})")
    p.add_argument("--preset", default=None, choices=("test", "vit_tiny", "vit_small", "vit_base"),
                   help="model size (default: the demo, test network on 64x64 images)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (preset default)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (preset default)")
    p.add_argument("--seed", type=int, default=None, help="seed for init, SLM and data order")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default=None,
                   help="run directory (default runs/afire-demo or runs/afire-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an existing --out")
    p.add_argument("--log-every", type=int, default=10, help="log every N steps (10)")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help="checkpoint every N steps too (default: once per epoch)")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (3)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps in total")
    p.add_argument("--on-bad-data", default="skip", choices=("skip", "stop"),
                   help="a shard that vanishes or breaks mid-run: skip its images or stop")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to RUN/tb (needs tensorboard)")
    p.add_argument("--no-report", action="store_true", help="skip the end-of-run report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_cli)


def _cli_config(args) -> Config | None:
    given = [args.preset, args.epochs, args.batch_size, args.seed]
    if args.resume and all(v is None for v in given) and not args.overrides:
        return None
    cfg = Config.preset_config(args.preset) if args.preset else demo_config()
    changes = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                 ("seed", args.seed)) if v is not None}
    cfg = cfg.replace(**changes) if changes else cfg
    return cfg.with_overrides(args.overrides) if args.overrides else cfg


def _run_cli(args) -> int:
    out = args.out or os.path.join("runs", f"afire-{args.preset or 'demo'}")
    data = args.data if args.data is not None else args.phantoms
    try:
        cfg = _cli_config(args)
        s = pretrain(cfg, data=data, out=out, resume=args.resume, device=args.device,
                     log_every=args.log_every, ckpt_every=args.ckpt_every,
                     keep_last=args.keep_last, progress=not args.quiet,
                     on_bad_data=args.on_bad_data, tensorboard=args.tensorboard,
                     max_steps=args.max_steps, overwrite=args.overwrite,
                     report=not args.no_report)
    except KeyboardInterrupt:
        print(f"afire pretrain{dist.rank_tag()}: interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as e:
        print(f"afire pretrain{dist.rank_tag()}: stopped: {e}", file=sys.stderr)
        return 3
    except (TypeError, RuntimeError, NotImplementedError) as e:
        print(f"afire pretrain{dist.rank_tag()}: error: {e}", file=sys.stderr)
        return 2
    print_summary(s)
    return 0


def print_summary(s: dict) -> None:
    g = dist.current()
    if g is not None and g.rank != 0:
        return  # rank 0 speaks for the run
    f = s.get("final") or {}
    print(f"done: {s['steps']}/{s['total_steps']} steps ({s['stopped']}), "
          f"{s['images_seen']} images, {format_seconds(s['seconds'])} this run, "
          f"{s['images_per_s']:.1f} img/s")
    if f:
        print(f"final losses (step {f['step']}): loss {f['loss']:.4f} = stru {f['l_stru']:.4f} "
              f"+ cate {f['l_cate']:.4f} + recon {f['l_recon']:.4f}")
    if s["bad_files"]:
        print(f"skipped data files: {', '.join(sorted(s['bad_files']))}")
    print(f"checkpoint: {s['checkpoint']}")
    if s.get("backbone"):
        print(f"backbone (teacher, timm names): {s['backbone']}")
    if s.get("report"):
        r = s["report"]
        an = r.get("anomaly")
        if an:
            print(f"phantom anomaly check: AUC {an['auc']:.3f} (lesion vs normal, "
                  f"{an['n']} + {an['n']} held-out phantoms)")
        print(f"report: {r['markdown']}")
