"""afire.AFiRe: the model users train, query, save and load.

All compute runs in C (`afire._C.trainer.Trainer`, or `afire._C_cuda.cuda.Trainer` on a GPU):
one call per training step. This module only validates arguments, splits large inputs into
batches, and names tensors for checkpoints and timm export.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _C
from .config import Config
from .device import device_index, require_device

CHECKPOINT_FORMAT = "afire-checkpoint"
CHECKPOINT_VERSION = "1"
_NETS = ("encoder", "head", "decoder")
# state buffer prefixes: which networks each one holds
_STATE = {"student": _NETS, "teacher": ("encoder", "head"), "adam_m": _NETS, "adam_v": _NETS}
# ImageNet statistics timm models are fed with; their channel mean is afire's gray mean 0.449
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
GRAY_MEAN, GRAY_STD = 0.449, 0.226

# The anomaly scores of `AFiRe.anomaly_scores` (computed in C: csrc/core/anomaly.c and
# objective.c, CUDA twins in cuda/): name -> (in the paper?, what it is). Higher = more abnormal.
ANOMALY_SCORES: dict[str, tuple[bool, str]] = {
    "eq51": (True, "Eq. 51: log(1/A(x)), log-mean-exp of the per-token restoration errors "
                   "(every token visible)"),
    "inpaint": (False, "masked in-painting: mean per-token error of the decoder predicting each "
                       "token from a mask token (complementary masks: every token hidden once)"),
    "inpaint_z": (False, "in-painting error in log space, standardised per position by the "
                         "adaptation normals (mean of the z-scores)"),
    "inpaint_ratio_z": (False, "log(in-painting error / restoration error with the token "
                               "visible), standardised per position by the adaptation normals"),
    "restore_z": (False, "Eq. 51's per-token restoration errors in log space, standardised per "
                         "position by the adaptation normals"),
    "token_knn": (False, "per-position density of teacher tokens: squared distance to the "
                         "nearest adaptation-normal token at the same position"),
    "token_gauss": (False, "per-position density of teacher tokens: Mahalanobis distance to a "
                           "Gaussian of the adaptation normals' tokens at each position"),
    "feature_distance": (False, "pooled-feature distance: Mahalanobis distance of the GAP "
                                "teacher feature to the adaptation normals' Gaussian"),
}
# scores that need an AnomalyReference fitted on normal images
_NEEDS_REFERENCE = ("inpaint_z", "inpaint_ratio_z", "restore_z", "token_knn", "token_gauss",
                    "feature_distance")


@dataclass
class AnomalyReference:
    """Statistics of NORMAL images that the reference-based anomaly scores compare with,
    fitted in C by :meth:`AFiRe.anomaly_reference` (csrc/core/anomaly.h):
    per-position mean / std of log errors (``stats[kind] = (mean[L], std[L])``), the
    per-position and pooled Gaussians of teacher tokens (``gauss[kind] = (mean[G,D],
    prec[G,D,D])``) and the teacher tokens themselves for the nearest-neighbour score
    (``tokens`` [N,T,D]). ``settings`` records how (mask stride / block, k, shrinkage, eps)."""

    n_images: int
    kinds: tuple[str, ...]
    settings: dict
    stats: dict = field(default_factory=dict)
    gauss: dict = field(default_factory=dict)
    tokens: np.ndarray | None = None

    def summary(self) -> dict:
        return {"normal_images": self.n_images, "scores": list(self.kinds), **self.settings}


def _as_images(images: Any, size: int) -> np.ndarray:
    """uint8 [B,S,S] (a single [S,S] image is promoted); clear errors otherwise."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise TypeError(f"images must be uint8 grayscale, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != (size, size):
        raise ValueError(f"images must have shape (B, {size}, {size}), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("images is empty")
    return np.ascontiguousarray(a)


def _output_path(path: str | os.PathLike) -> str:
    """`path` as a str, its parent directories created (so ``save("run/ckpt.safetensors")``
    works in a fresh directory). What the target itself may be is checked by the C writer."""
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not isinstance(p, str) or not p:
        raise ValueError(f"path must be a non-empty file name, got {path!r}")
    parent = os.path.dirname(p)
    if parent and not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(errno.ENOTDIR, f"cannot save to {p!r}: a part of "
                                     f"{parent!r} is a file, not a directory", p) from None
        except OSError as e:
            raise OSError(e.errno, f"cannot save to {p!r}: cannot create the directory "
                          f"{parent!r} ({e.strerror})", p) from None
    return p


def slm_kwargs(cfg: Config) -> dict[str, Any]:
    """``afire._C.slm.slm_generate`` keyword arguments for ``cfg``'s SLM settings, the
    patch size included: what the trainer reads from the Config (region_rule is the C
    default, "random", as in the trainer)."""
    return dict(patch=cfg.patch_size, lesions_min=cfg.slm_lesions[0],
                lesions_max=cfg.slm_lesions[1], size_min=cfg.slm_size[0],
                size_max=cfg.slm_size[1], crop_max=cfg.slm_crop, gamma2=cfg.slm_gamma2,
                strength=cfg.slm_strength, token_rule=cfg.token_rule)


def _count(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) \
            or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def synthetic_lesions(cfg: Config, images: Any, step: int, first_index: int = 0, *,
                      seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The synthetic lesions (METHOD §1) that training step ``step`` of a model with config
    ``cfg`` adds to ``images``; see :meth:`AFiRe.synthetic_lesions` (this form needs no
    model, e.g. to feed another implementation the same inputs)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be an afire.Config, got {type(cfg).__name__}")
    x = _as_images(images, cfg.img_size)
    seed = cfg.seed if seed is None else _count(seed, "seed")
    return _C.slm.slm_generate(x, seed, _count(step, "step"), _count(first_index, "first_index"),
                               **slm_kwargs(cfg))


def _in_chunks(fn, per_image: dict, chunk: int = 256, **fixed):
    """``fn(**per_image chunks, **fixed)`` over consecutive chunks of the images (the first
    axis of the ``per_image`` arrays; None passes through), each result concatenated: bounds
    the scratch one kernel call takes."""
    n = len(next(v for v in per_image.values() if v is not None))
    outs = [fn(**{k: None if v is None else v[i:i + chunk] for k, v in per_image.items()},
               **fixed) for i in range(0, n, chunk)]
    return tuple(np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(len(outs[0])))


class AFiRe:
    """An AFiRe model: student/teacher ViT, projection heads, restoration decoder, prototypes.

    Args:
        cfg: a validated `Config` (e.g. ``Config.preset_config("vit_tiny")``).
        device: ``"cpu"`` (the C reference) or ``"cuda"`` / ``"cuda:N"`` (the GPU trainer; its
            state lives on the device and `state_tensors` returns host copies).
        steps_per_epoch: optimiser steps per epoch; with ``cfg.epochs`` it fixes the
            per-iteration schedules (warm-up, cosine lr/wd/EMA, last-layer freeze).
        batch_size: the largest batch a call may pass (default ``cfg.batch_size``); buffers
            are sized once for it.
        precision: GEMM arithmetic, ``"fp32"`` or ``"bf16"`` (bf16 operands, fp32 accumulation,
            fp32 master weights, optimiser state, norms, softmax and losses). On the CPU the
            default is ``"fp32"`` whatever ``cfg.precision`` says (that field picks the GPU's
            arithmetic, bf16 by default); ``"bf16"`` there uses the CPU's bf16 dot products
            (AMX / AVX512-BF16) when it has them and exact-bf16-rounding fp32 GEMMs otherwise.
            On a GPU the default is ``cfg.precision``.
        inference: build only what `encode`, `restore` and `anomaly_score` need (CPU): the
            student and teacher encoders and the decoder, no head, gradients, optimiser state
            or training activations. Such a model cannot `train_step` or `save`; load weights
            into it with ``AFiRe.load(path, inference=True)`` or `import_backbone`.
        group: an :class:`afire.dist.Group` (``afire.dist.init``): the model is then one
            rank of a data-parallel run: `train_step` is collective (every rank calls it with
            its own images) and equals one step on all ranks' images together; ``device``
            must be the group's. None: one process.
    """

    def __init__(self, cfg: Config, device: str = "cpu", steps_per_epoch: int = 100,
                 batch_size: int | None = None, group: Any = None, *,
                 precision: str | None = None, inference: bool = False) -> None:
        if not isinstance(cfg, Config):
            raise TypeError(f"cfg must be an afire.Config, got {type(cfg).__name__}")
        device = require_device(device)
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        batch = cfg.batch_size if batch_size is None else batch_size
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch!r}")
        if precision is not None and precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if not isinstance(inference, bool):
            raise TypeError(f"inference must be a bool, got {inference!r}")
        self.cfg = cfg
        self.device = device
        self.steps_per_epoch = steps_per_epoch
        self.batch_capacity = batch
        self.inference = inference
        self.group = group
        if group is not None and group.device != device:
            raise ValueError(f"device {device!r} is not this rank's ({group.device!r}, from "
                             "afire.dist.init)")
        if group is not None and inference:
            raise ValueError("inference=True builds no training state; it takes no group")
        if device == "cpu":
            comm = group.comm if group is not None else None
            self.precision = precision or "fp32"
            self._t = _C.trainer.Trainer(cfg.to_dict(), batch, steps_per_epoch, comm,
                                         precision=self.precision, inference=inference)
        else:
            from . import cuda

            if inference:
                raise ValueError("inference=True is a CPU option (a cuda model keeps its full "
                                 "training state)")
            if precision is not None and precision != cfg.precision:
                cfg = dataclasses.replace(cfg, precision=precision)
                self.cfg = cfg
            self.precision = cfg.precision
            index = device_index(device)
            nccl = group.nccl if group is not None else None
            self._t = cuda.backend().Trainer(cfg.to_dict(), batch, steps_per_epoch, index, nccl)
        d = self._t.dims
        self.num_patches, self.num_tokens = d["L"], d["T"]
        self.embed_dim, self.patch_values = d["D"], d["Q"]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of one branch (the student; the teacher mirrors its encoder
        and head) per network: encoder, head, decoder."""
        return {net: sum(int(np.prod(p["shape"])) for p in self._t.param_table(net))
                for net in _NETS}

    def __repr__(self) -> str:
        c = self.cfg
        extra = (f", precision={self.precision!r}" if self.precision != "fp32" else "") + \
            (", inference=True" if self.inference else "")
        return (f"AFiRe(preset={c.preset!r}, img_size={c.img_size}, patch_size={c.patch_size}, "
                f"embed_dim={c.embed_dim}, depth={c.depth}, "
                f"parameters={sum(self.parameter_counts().values())}, step={self.step}, "
                f"device={self.device!r}{extra})")

    def _repr_html_(self) -> str:
        from .display import model_html

        return model_html(self)

    # ------------------------------------------------------------------ training
    @property
    def step(self) -> int:
        """Completed training steps: the next `train_step` is step ``step``.

        Setting it (an int >= 0) moves the model along its schedules without training:
        learning rate, weight decay, EMA momentum, teacher temperature, last-layer freeze
        and the SLM draws of the next step follow the new value; weights, optimiser moments
        and prototypes are unchanged. ``load`` restores it from the checkpoint; set it only
        to start somewhere else on purpose (e.g. a benchmark past the warm-up).
        """
        return self._t.step

    @step.setter
    def step(self, value: int) -> None:
        self._t.step = _count(value, "step")

    def train_step(self, batch: Any) -> dict[str, float]:
        """One AFiRe step on a uint8 batch (B,S,S) of NORMAL images (B <= batch capacity).

        Returns the total and per-term losses, lr, weight decay, EMA momentum, teacher
        temperature, gradient norm (before clipping) and the fraction of abnormal tokens.
        A non-finite loss raises FloatingPointError and leaves the model unchanged.
        """
        return self._t.train_step(_as_images(batch, self.cfg.img_size))

    def synthetic_lesions(self, images: Any, step: int, first_index: int = 0, *,
                          seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The synthetic lesions (METHOD §1) that training step ``step`` adds to ``images``.

        Returns ``(x_prime, mask, token_labels)``: ``x_prime`` uint8 (B, S, S) is
        clip(x + M, 0, 255) (equal to ``images`` wherever M == 0), ``mask`` uint8 (B, S, S)
        is the lesion mask M, ``token_labels`` uint8 (B, L) is 1 for an abnormal patch
        token (``cfg.token_rule``). The draws depend only on (seed, step, image index) and
        the image: image b has index ``first_index + b``. `train_step` numbers its batch
        from 0, so ``synthetic_lesions(batch, model.step)`` is exactly what the next
        ``train_step(batch)`` trains on (its ``abnormal_fraction`` is
        ``token_labels.mean()``); the same arguments always give the same output. The SLM
        settings are the model's (``cfg.slm_*``, ``cfg.token_rule``, ``cfg.patch_size``)
        and ``seed`` defaults to ``cfg.seed``. Runs on the CPU for every device (the GPU
        trainer draws bit-identical masks). ``images``: uint8 (B, S, S) or one (S, S).
        """
        return synthetic_lesions(self.cfg, images, step, first_index, seed=seed)

    # ------------------------------------------------------------------ inference
    def _batched(self, images: Any, fn, *extra):
        x = _as_images(images, self.cfg.img_size)
        outs = [fn(x[i:i + self.batch_capacity], *[e[i:i + self.batch_capacity] for e in extra])
                for i in range(0, len(x), self.batch_capacity)]
        if isinstance(outs[0], tuple):
            return tuple(np.concatenate(parts) for parts in zip(*outs))
        return np.concatenate(outs)

    def encode(self, images: Any, branch: str = "teacher", device_output: bool = False):
        """Encoder tokens (B, T, D) float32, cls first. ``branch``: 'teacher' or 'student'.

        ``device_output=True`` (cuda models only) keeps the tokens on the GPU: returns an
        ``afire.cuda.DeviceTensor`` of a fresh device buffer that outlives the model and that
        ``torch.from_dlpack`` / ``cupy.asarray`` take without a copy; ``.numpy()`` downloads.
        """
        if branch not in ("teacher", "student"):
            raise ValueError(f"branch must be 'teacher' or 'student', got {branch!r}")
        if device_output:
            if self.device == "cpu":
                raise ValueError("device_output=True needs a cuda model (this one runs on the "
                                 "cpu; use AFiRe(cfg, device='cuda'))")
            return self._t.encode_device(_as_images(images, self.cfg.img_size), branch)
        return self._batched(images, lambda x: self._t.encode(x, branch))

    def restore(self, images: Any, token_mask: Any = None) -> np.ndarray:
        """Restoration (B, S, S) (or (B, C, S, S) for in_chans=3) in normalised pixel units.

        ``token_mask`` (B, L) bool/uint8 replaces the selected tokens by mask tokens.
        """
        if token_mask is None:
            pred, _ = self._batched(images, lambda x: self._t.restore(x))
        else:
            m = np.ascontiguousarray(np.asarray(token_mask).astype(np.uint8, copy=False))
            pred, _ = self._batched(images, lambda x, mm: self._t.restore(x, mm), m)
        return self.unpatchify(pred)

    def unpatchify(self, patches: np.ndarray) -> np.ndarray:
        """(B, L, P*P*C) MAE-order patches -> (B, S, S) or (B, C, S, S)."""
        c = self.cfg
        g, p = c.img_size // c.patch_size, c.patch_size
        x = patches.reshape(len(patches), g, g, p, p, c.in_chans)
        x = x.transpose(0, 5, 1, 3, 2, 4).reshape(len(patches), c.in_chans, c.img_size, c.img_size)
        return x[:, 0] if c.in_chans == 1 else x

    def anomaly_score(self, images: Any, return_map: bool = False, log: bool = True):
        """Anomaly score per image (B,) float64, higher = more abnormal (Eq. 51).

        The paper scores an image by 1/A(x) = (1/L) sum_j exp(e_j), e_j the squared
        restoration error of patch token j (normalised pixel units). At 224 px the e_j reach
        hundreds, so that mean overflows float64 (inf, or ~1e305 with no ordering left). By
        default (``log=True``) this returns its natural logarithm, log(1/A(x)), computed as a
        log-mean-exp: always finite for finite errors and ranked exactly as 1/A(x), so AUCs
        and thresholds are unchanged. ``log=False`` returns the paper's raw 1/A(x) =
        exp(log score), which may be ``inf``.

        With ``return_map=True`` also returns the per-token squared errors e_j
        (B, S/P, S/P) for heat maps.
        """
        score, log_score, err = self._batched(images, self._t.anomaly)
        out = log_score if log else score
        if not return_map:
            return out
        g = self.cfg.img_size // self.cfg.patch_size
        return out, err.reshape(len(err), g, g)

    def anomaly_log_score(self, images: Any) -> np.ndarray:
        """log(1/A(x)) per image: the same as ``anomaly_score(images)``; always finite."""
        return self._batched(images, self._t.anomaly)[1]

    # ------------------------------------------------------------------ anomaly scores
    def _anomaly_ops(self):
        """The C anomaly kernels of this model's device: afire._C.anomaly on the CPU, their
        CUDA twins (the op table's host-level entry points, on the op table's context:
        device 0) for a GPU model."""
        if self.device == "cpu":
            return _C.anomaly
        from . import cuda

        return cuda.backend()

    def restoration_errors(self, images: Any) -> np.ndarray:
        """float32 (B, L): the mean squared restoration error of every patch token with every
        token visible (the errors Eq. 51 sums, divided by the P*P*C values of a patch)."""
        ops = self._anomaly_ops()
        return self._batched(images, lambda x: np.asarray(ops.token_error(*self._t.restore(x))))

    def inpaint_errors(self, images: Any, stride: int = 2, block: int = 1) -> np.ndarray:
        """float32 (B, L): masked in-painting errors (not in the paper). The decoder restores
        the image ``stride**2`` times, each time with a complementary set of tokens replaced by
        mask tokens (``afire._C.anomaly.inpaint_masks``: token (r, c) is hidden in mask
        ((r // block) % stride) * stride + (c // block) % stride), as the restoration task
        trains it; each token's error is the mean squared error of the pass that hid it."""
        g = self.cfg.img_size // self.cfg.patch_size
        masks = _C.anomaly.inpaint_masks(g, stride=stride, block=block)
        ops = self._anomaly_ops()

        def run(x):
            err = None
            for m in masks:
                mm = np.ascontiguousarray(np.broadcast_to(m, (len(x), len(m))))
                pred, target = self._t.restore(x, mm)
                err = np.asarray(ops.token_error(pred, target, mm, err))
            return err
        return self._batched(images, run)

    def _anomaly_parts(self, images: Any, kinds: tuple[str, ...], stride: int, block: int):
        x = _as_images(images, self.cfg.img_size)
        need_tok = any(k in ("token_knn", "token_gauss", "feature_distance") for k in kinds)
        need_vis = any(k in ("restore_z", "inpaint_ratio_z") for k in kinds)
        need_inp = any(k.startswith("inpaint") for k in kinds)
        return {"tokens": self.encode(x) if need_tok else None,
                "visible": self.restoration_errors(x) if need_vis else None,
                "inpaint": self.inpaint_errors(x, stride, block) if need_inp else None}

    @staticmethod
    def _check_kinds(kind: Any) -> tuple[str, ...]:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        bad = [k for k in kinds if k not in ANOMALY_SCORES]
        if bad or not kinds:
            raise ValueError(f"unknown anomaly score(s) {bad or kind!r}; choose from "
                             f"{list(ANOMALY_SCORES)}")
        return kinds

    def anomaly_reference(self, normals: Any, kinds: Any = _NEEDS_REFERENCE, *,
                          stride: int = 2, block: int = 1, k: int = 1,
                          shrinkage: float = 0.1, eps: float = 1e-4) -> AnomalyReference:
        """Fit, in C, the statistics of NORMAL images (the anomaly protocol's adaptation
        normals, at least 2) that the reference-based scores of :meth:`anomaly_scores` need:
        per-position mean / std of log errors, per-position and pooled Gaussians of teacher
        tokens (covariance shrunk towards tr/D I by ``shrinkage``), or the tokens themselves
        (nearest neighbours, ``k`` of them). ``stride`` / ``block``: the in-painting masks."""
        kinds = tuple(k_ for k_ in self._check_kinds(kinds) if k_ in _NEEDS_REFERENCE)
        x = _as_images(normals, self.cfg.img_size)
        if len(x) < 2:
            raise ValueError(f"an anomaly reference needs at least 2 normal images, got {len(x)}")
        if "token_knn" in kinds and not 1 <= k <= len(x):
            raise ValueError(f"k={k} nearest neighbours need at least k normal images "
                             f"(got {len(x)})")
        parts = self._anomaly_parts(x, kinds, stride, block)
        ops = self._anomaly_ops()
        ref = AnomalyReference(len(x), kinds, {"inpaint_stride": stride, "inpaint_block": block,
                                               "knn_k": k, "shrinkage": shrinkage, "eps": eps})
        num_den = {"inpaint_z": ("inpaint", None), "restore_z": ("visible", None),
                   "inpaint_ratio_z": ("inpaint", "visible")}
        for kind in kinds:
            if kind in num_den:
                num, den = num_den[kind]
                ref.stats[kind] = tuple(np.asarray(a) for a in ops.position_stats(
                    parts[num], None if den is None else parts[den], eps=eps))
            elif kind in ("token_gauss", "feature_distance"):
                ref.gauss[kind] = tuple(np.asarray(a) for a in ops.gauss_fit(
                    parts["tokens"], pooled=kind == "feature_distance", shrinkage=shrinkage))
            elif kind == "token_knn":
                ref.tokens = parts["tokens"]
        return ref

    def anomaly_scores(self, images: Any, kind: Any = "eq51",
                       reference: AnomalyReference | None = None):
        """Anomaly scores (higher = more abnormal) and token-level heat maps, computed in C.

        ``kind``: one name of ``afire.model.ANOMALY_SCORES`` (which says which are the
        paper's: only "eq51") -> ``(score (B,) float64, map (B, g, g) float32)``; a list of
        names -> ``{name: (score, map)}`` (the restorations and features are shared). The
        maps are per patch token (g = img_size / patch_size; feature_distance: (B, 1, 1)).
        Every score but "eq51" and "inpaint" compares with ``reference``
        (:meth:`anomaly_reference` of normal images)."""
        kinds = self._check_kinds(kind)
        missing = [k for k in kinds if k in _NEEDS_REFERENCE and
                   (reference is None or k not in reference.kinds)]
        if missing:
            raise ValueError(f"score(s) {missing} need a reference fitted on normal images: "
                             "reference=model.anomaly_reference(normals, kinds=...)")
        st = reference.settings if reference is not None else {}
        stride, block = st.get("inpaint_stride", 2), st.get("inpaint_block", 1)
        parts = self._anomaly_parts(images, kinds, stride, block)
        ops = self._anomaly_ops()
        g = self.cfg.img_size // self.cfg.patch_size
        out = {}
        for kd in kinds:
            if kd == "eq51":
                s, m = self.anomaly_score(images, return_map=True)
                out[kd] = (np.asarray(s, np.float64), m.astype(np.float32))
                continue
            if kd == "inpaint":
                e = parts["inpaint"]
                s, m = e.astype(np.float64).mean(axis=1), e
            elif kd in reference.stats:
                num = parts["visible"] if kd == "restore_z" else parts["inpaint"]
                den = parts["visible"] if kd == "inpaint_ratio_z" else None
                mean, std = reference.stats[kd]
                s, m = _in_chunks(ops.position_zscore, {"num": num, "den": den}, mean=mean,
                                  std=std, eps=st["eps"])
            elif kd in reference.gauss:
                mean, prec = reference.gauss[kd]
                s, m = _in_chunks(ops.gauss_score, {"tokens": parts["tokens"]}, mean=mean,
                                  prec=prec, pooled=kd == "feature_distance")
            else:
                s, m = _in_chunks(ops.knn_score, {"tokens": parts["tokens"]},
                                  ref=reference.tokens, k=st["knn_k"])
            m = np.asarray(m, np.float32)
            side = 1 if kd == "feature_distance" else g
            out[kd] = (np.asarray(s, np.float64), m.reshape(len(m), side, side))
        return out[kinds[0]] if isinstance(kind, str) else out

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the training state, named: zero-copy views of the C buffers on the
        CPU, host copies on a GPU (writing to them changes nothing there). An inference model
        has only the student and teacher encoders, the student decoder and the prototypes."""
        return self._state_views()[1]

    def set_state_tensors(self, tensors: dict[str, np.ndarray],
                          skip_prefixes: tuple[str, ...] = ()) -> None:
        """Overwrite the named training-state tensors of this model (on its device) with
        ``tensors`` (every name of `state_tensors` except those starting with one of
        ``skip_prefixes``). Shapes must match; on an error nothing is written."""
        bufs, views = self._state_views()
        todo = {k: v for k, v in views.items() if not k.startswith(skip_prefixes)}
        for name, dst in todo.items():
            if name not in tensors:
                raise ValueError(f"state tensor {name!r} missing")
            if np.shape(tensors[name]) != dst.shape:
                raise ValueError(f"state tensor {name}: shape {list(np.shape(tensors[name]))}, "
                                 f"expected {list(dst.shape)}")
        for name, dst in todo.items():
            dst[...] = tensors[name]
        self._push(bufs)

    def _push(self, bufs: dict[str, np.ndarray]) -> None:
        """After writing through `_state_views`: upload the state to the GPU (on the CPU the
        views already are the C buffers)."""
        if self.device != "cpu":
            self._t.load_buffers({k: v for k, v in bufs.items() if not k.startswith("grad.")})

    def _state_views(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(flat buffers, named views into them)."""
        bufs = self._t.buffers()
        tables = {net: self._t.param_table(net) for net in _NETS}
        out: dict[str, np.ndarray] = {}
        for prefix, nets in _STATE.items():
            for net in nets:
                if f"{prefix}.{net}" not in bufs:  # an inference model keeps less
                    continue
                flat = bufs[f"{prefix}.{net}"]
                for p in tables[net]:
                    n = int(np.prod(p["shape"]))
                    view = flat[p["offset"]:p["offset"] + n]
                    out[f"{prefix}.{net}.{p['name']}"] = view.reshape(p["shape"])
        out["prototypes"] = bufs["prototypes"].reshape(self.num_patches, self.cfg.num_prototypes)
        return bufs, out

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
        """Write the complete training state as safetensors, atomically (temp, fsync, rename).

        Missing parent directories are created. ``path`` must be a new file, a regular file
        or a link to one; anything else (a directory, a device such as /dev/full, a FIFO)
        is refused. Any failure (permissions, a full disk) raises an OSError naming the path
        and the reason, and leaves an existing file unchanged. An inference model has no
        training state to save (ValueError; `export_backbone` works).
        """
        if self.inference:
            raise ValueError("this model was made for inference (AFiRe(..., inference=True)): "
                             "it has no head or optimiser state to save; use export_backbone, "
                             "or save the training model it was loaded from")
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "config": self.cfg.to_json(), "step": str(self.step),
                "steps_per_epoch": str(self.steps_per_epoch),
                "batch_capacity": str(self.batch_capacity),
                "prototypes_set": "1" if self._t.prototypes_set else "0"}
        for k, v in (extra_metadata or {}).items():
            if k in meta:
                raise ValueError(f"extra_metadata key {k!r} is reserved")
            meta[k] = str(v)
        _C.io.save_safetensors(_output_path(path), self.state_tensors(), meta)

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, str]:
        """The checkpoint's metadata (validates the whole file)."""
        return _C.io.load_safetensors(os.fspath(path))[1]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu",
             batch_size: int | None = None, group: Any = None, *,
             precision: str | None = None, inference: bool = False) -> "AFiRe":
        """Rebuild a model from `save`; ValueError if the file is malformed or incomplete.

        ``group``: as for the constructor (every rank loads the same file).
        ``inference=True`` (CPU) reads only the tensors an inference model keeps (see
        `AFiRe`); ``precision`` as `AFiRe`."""
        tensors, meta = _C.io.load_safetensors(os.fspath(path))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not an afire checkpoint (metadata format="
                             f"{meta.get('format')!r}); use import_backbone for foreign weights")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: unsupported checkpoint version {meta.get('version')!r}")
        try:
            cfg = Config.from_json(meta["config"])
            step = int(meta["step"])
            spe = int(meta["steps_per_epoch"])
            cap = int(meta.get("batch_capacity", cfg.batch_size))
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt checkpoint metadata ({e})") from e
        model = cls(cfg, device=device, steps_per_epoch=spe,
                    batch_size=cap if batch_size is None else batch_size, group=group,
                    precision=precision, inference=inference)
        bufs, views = model._state_views()
        missing = sorted(set(views) - set(tensors))
        unexpected = sorted(set(tensors) - set(views))
        if inference:  # the head, gradients and moments of the file are not needed
            unexpected = [k for k in unexpected if not k.startswith(
                ("adam_m.", "adam_v.", "student.head.", "teacher.head."))]
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match its config: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, dst in views.items():
            src = tensors[name]
            if src.shape != dst.shape or src.dtype != np.float32:
                raise ValueError(f"{path}: tensor {name} has {src.dtype}{list(src.shape)}, "
                                 f"expected float32{list(dst.shape)}")
            if not np.isfinite(src).all():
                raise ValueError(f"{path}: tensor {name} contains NaN or Inf")
            dst[...] = src
        model._push(bufs)
        model._t.step = step
        model._t.prototypes_set = meta.get("prototypes_set") == "1"
        return model

    # ------------------------------------------------------------------ interop
    def backbone_state_dict(self, branch: str = "teacher") -> dict[str, np.ndarray]:
        """The encoder with timm `vit_*_patch16_224` names (copies).

        A 1-channel model is exported with a 3-channel patch embedding whose weights fold
        afire's gray normalisation into ImageNet's: timm's standard preprocessing of the
        gray image replicated to RGB gives exactly afire's tokens.
        """
        if branch not in ("teacher", "student"):
            raise ValueError(f"branch must be 'teacher' or 'student', got {branch!r}")
        views = self.state_tensors()
        prefix = f"{branch}.encoder."
        sd = {k[len(prefix):]: v.copy() for k, v in views.items() if k.startswith(prefix)}
        if self.cfg.in_chans == 1:
            w = sd["patch_embed.proj.weight"]  # [D,1,P,P]
            scale = (IMAGENET_STD / (3 * GRAY_STD)).astype(np.float32)
            sd["patch_embed.proj.weight"] = np.ascontiguousarray(
                np.concatenate([w * s for s in scale], axis=1))
        return sd

    def export_backbone(self, path: str | os.PathLike, branch: str = "teacher") -> None:
        """Write the (teacher) encoder as a timm-loadable safetensors file (created like
        `save`: atomically, parent directories made, non-regular targets refused)."""
        sd = self.backbone_state_dict(branch)
        _C.io.save_safetensors(_output_path(path), sd,
                               {"format": "pt", "afire_config": self.cfg.to_json()})

    def import_backbone(self, path: str | os.PathLike, branch: str = "both") -> list[str]:
        """Load ViT encoder weights (timm / DINO / MAE / the released AFiRe checkpoint).

        Reads safetensors, or a PyTorch .pth/.pt state dict WITHOUT torch (a restricted
        unpickler that only rebuilds tensors and plain containers). ``branch``: 'student',
        'teacher' or 'both'. Returns the names that were loaded.
        """
        from .backbone import load_encoder_state

        sd = load_encoder_state(path)
        branches = ("student", "teacher") if branch == "both" else (branch,)
        for b in branches:
            if b not in ("student", "teacher"):
                raise ValueError(f"branch must be 'student', 'teacher' or 'both', got {branch!r}")
        bufs, views = self._state_views()
        prefix = "student.encoder."
        encoder = {k[len(prefix):]: v for k, v in views.items() if k.startswith(prefix)}
        converted = self._convert_foreign(sd, encoder, Path(path))
        for b in branches:
            for name, arr in converted.items():
                views[f"{b}.encoder.{name}"][...] = arr
        self._push(bufs)
        return sorted(converted)

    @staticmethod
    def _convert_foreign(sd: dict[str, np.ndarray], encoder: dict[str, np.ndarray],
                         path: Path) -> dict[str, np.ndarray]:
        """Foreign encoder tensors, checked and reshaped to this model's `encoder` views."""
        out: dict[str, np.ndarray] = {}
        for name, dst in encoder.items():
            if name not in sd:
                raise ValueError(f"{path}: encoder tensor {name!r} not found (have e.g. "
                                 f"{sorted(sd)[:6]})")
            src = np.asarray(sd[name], dtype=np.float32)
            if name == "patch_embed.proj.weight" and src.shape[1] == 3 and dst.shape[1] == 1:
                src = (src * (GRAY_STD / IMAGENET_STD)[None, :, None, None]).sum(1, keepdims=True)
                # the bias absorbs the mean shift between gray and ImageNet normalisation
                shift = ((GRAY_MEAN - IMAGENET_MEAN) / IMAGENET_STD)[None, :, None, None]
                bias = sd["patch_embed.proj.bias"].astype(np.float64)
                out["patch_embed.proj.bias"] = (bias + (np.asarray(sd[name]) * shift).sum((1, 2, 3))
                                                ).astype(np.float32)
            if src.size == dst.size and src.shape != dst.shape:
                src = src.reshape(dst.shape)
            if src.shape != dst.shape:
                raise ValueError(f"{path}: {name} has shape {list(src.shape)}, this model "
                                 f"needs {list(dst.shape)} (different size or patch?)")
            if not np.isfinite(src).all():
                raise ValueError(f"{path}: {name} contains NaN or Inf")
            out.setdefault(name, src)
        return out
