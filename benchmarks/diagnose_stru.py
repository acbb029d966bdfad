"""Why does L_stru collapse, and what does the student learn from it? (issue 14, item 1)

    python benchmarks/diagnose_stru.py --out benchmarks/results/diagnose_stru.json
    python benchmarks/diagnose_stru.py --variants shared_last k4 --seeds 0 1 2 --time-budget 0
    python benchmarks/diagnose_stru.py --tables benchmarks/results/diagnose_stru*.json

(defaults: --data $AFIRE_DATA/kermany_native, --variants paper cst_only recon_only,
--seeds 0 1, --steps 3000; about 5 minutes on 2 cores.)

Pre-trains the ``test`` network at 64 px on the NORMAL images of a patient-wise train split
of Kermany (60% of the groups, as benchmarks/eval_scale.py) with batch 16 and a peak lr of
1e-3, once per (variant, seed), and measures at a few checkpoints on a fixed diagnostic set
(the held-out normals, with SLMs drawn by a fixed seed):

- the three losses, and what a predictor that ignores image content reaches on them:
  ``posmean`` (each token's student distribution replaced by the mean over images at its
  position), ``blank`` (the student's output for a uniform gray image) and ``shuffled``
  (outputs permuted across images at each position: the same per-position marginals, no
  link to the token's own content or its abnormal label);
- the teacher's Sinkhorn assignments: argmax class per (image, position); H(class),
  I(class; position), and I(class; image | position) = H(class | position) (hard
  assignments are a function of (image, position)); the same from the soft probabilities;
- features: mean pairwise cosine of GAP teacher features, linear CKA to the features at
  initialisation, their effective rank, the share of token variance explained by position,
  and how well a linear read-out of a token restores its patch's pixels (R^2);
- per-loss gradients into the student encoder (each term alone, no clipping) and their
  cosines;
- the 5-fold patient-wise linear probe (held-out groups, both classes) of the teacher's
  GAP features, at every checkpoint and at the end (with the same seed's initialisation).

The teacher/student head logits are not exposed by ``AFiRe``; they are recomputed by an
``afire._C.model.Networks`` mirror holding the model's head weights (copied by name from
``state_tensors``) on the tokens of ``AFiRe.encode``. The per-term gradients run the C
trainer binding (``afire._C.trainer.Trainer.gradients``) on a copy of the model's state.
tests/test_stru_diagnosis.py checks that both reproduce the trainer exactly (prototypes,
losses, gradients). ``--time-budget`` (seconds, default 540) lowers ``--steps`` so that
all runs fit. JSON to ``--out``; ``--tables FILE ...`` prints the markdown tables of
docs/RESULTS.md from result files (every variant and seed in them, paired by seed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from afire import AFiRe, Config, _C  # noqa: E402
from afire.evaluate import linear_probe, load_data  # noqa: E402
from afire.evaluate.common import gap_features, group_holdout, json_safe  # noqa: E402

# named Config departures tried against the paper settings (test preset, 64 px)
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cst_only": {"w_recon": 0.0},
    "recon_only": {"w_stru": 0.0, "w_cate": 0.0},
    "no_stru": {"w_stru": 0.0},
    "shared_last": {"per_position_last_layer": False},
    "k4": {"num_prototypes": 4},
    "k64": {"num_prototypes": 64},
    "k256": {"num_prototypes": 256},
    "tau_sim1": {"tau_similarity": 1.0},
    "w_recon_0.1": {"w_recon": 0.1},
    "w_recon_0.3": {"w_recon": 0.3},
    # restoration mostly of the masked (abnormal) tokens: weight 2 there, 0.1 elsewhere
    "masked_recon": {"w_recon": 0.1, "w_abnormal": 20.0},
    "slm_big": {"slm_size": (8, 32), "slm_crop": 32},
    # not in the paper: the structure term against the teacher's tokens at the same position
    # in the other images of the batch (Config.stru_target; RESULTS.md structure §5)
    "teacher_token": {"stru_target": "teacher_token"},
}


# ---------------------------------------------------------------- information measures
def entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits of distributions along ``axis`` (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    p = p / p.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, -p * np.log2(p), 0.0)
    return t.sum(axis=axis)


def assignment_information(assign: np.ndarray, K: int) -> dict[str, float]:
    """Hard class assignments ``assign`` int [N images, L positions] in [0, K).

    With position uniform over the L positions and images equally weighted:
    H(class); H(class | position) = mean over positions of the entropy of the class across
    images; I(class; position) = H(class) - H(class | position);
    I(class; image | position) = H(class | position) (the class is a function of (image,
    position)); I(class; image) = H(class) - mean over images of the entropy across
    positions. ``modal_share``: fraction of tokens whose class is their position's most
    frequent one. ``bias_bound``: the Miller-Madow upward bias bound (K-1)/(2N ln 2) of a
    per-position plug-in entropy (N images). All in bits (plug-in estimates)."""
    a = np.asarray(assign)
    N, L = a.shape
    onehot = np.zeros((N, L, K))
    np.put_along_axis(onehot, a[..., None], 1.0, axis=-1)
    per_pos = onehot.sum(0)                       # [L, K] counts over images
    per_img = onehot.sum(1)                       # [N, K] counts over positions
    h = float(entropy_bits(per_pos.sum(0)))
    h_pos = float(entropy_bits(per_pos, -1).mean())
    h_img = float(entropy_bits(per_img, -1).mean())
    return {"H_class": h, "H_class_given_position": h_pos,
            "I_class_position": h - h_pos, "I_class_image_given_position": h_pos,
            "I_class_image": h - h_img, "modal_share": float(per_pos.max(1).sum() / (N * L)),
            "classes_used": int((per_pos.sum(0) > 0).sum()),
            "bias_bound": (K - 1) / (2 * N * np.log(2)), "images": N}


def soft_information(q: np.ndarray) -> dict[str, float]:
    """The same decomposition from probabilities q [N, L, K] (each token a distribution over
    the classes; the class drawn from q): I(class; position) = H(mean q) - mean_j H(mean_i
    q_ij); I(class; image | position) = mean_j [H(mean_i q_ij) - mean_i H(q_ij)]."""
    q = np.asarray(q, np.float64)
    h = float(entropy_bits(q.mean((0, 1))))
    h_pos = float(entropy_bits(q.mean(0), -1).mean())
    h_tok = float(entropy_bits(q, -1).mean())
    return {"H_class": h, "I_class_position": h - h_pos,
            "I_class_image_given_position": h_pos - h_tok, "H_token": h_tok}


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between feature matrices [N, D1] and [N, D2]."""
    x = np.asarray(x, np.float64) - np.mean(x, 0)
    y = np.asarray(y, np.float64) - np.mean(y, 0)
    num = np.linalg.norm(y.T @ x) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


def mean_pairwise_cosine(f: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of distinct rows of f [N, D]."""
    f = np.asarray(f, np.float64)
    u = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    g = u @ u.T
    n = len(f)
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


def effective_rank(f: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values of the centred features (Roy &
    Vetterli 2007): 1 when one direction carries everything, D when all are equal."""
    s = np.linalg.svd(np.asarray(f, np.float64) - np.mean(f, 0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def position_share(tokens: np.ndarray) -> float:
    """Fraction of the variance of patch tokens [N, L, D] explained by their position
    (between-position variance of the per-position means / total variance)."""
    t = np.asarray(tokens, np.float64)
    total = ((t - t.mean((0, 1))) ** 2).sum(-1).mean()
    between = ((t.mean(0) - t.mean((0, 1))) ** 2).sum(-1).mean()
    return float(between / total) if total > 0 else float("nan")


def pixel_r2(tokens: np.ndarray, images: np.ndarray, patch: int, ridge: float = 1e-3) -> float:
    """How linearly the pixels of each patch can be read from its token: ridge regression
    tokens [N, L, D] -> patch pixels of uint8 images [N, S, S], fitted on the first half of
    the images, R^2 (pooled over pixels) on the second half."""
    n, L, d = tokens.shape
    g = images.shape[1] // patch
    pix = images.reshape(n, g, patch, g, patch).transpose(0, 1, 3, 2, 4)
    pix = pix.reshape(n, L, patch * patch).astype(np.float64) / 255.0
    h = n // 2
    xa = np.asarray(tokens, np.float64).reshape(n, L, d)
    x_tr = np.concatenate([xa[:h].reshape(-1, d), np.ones((h * L, 1))], 1)
    x_te = np.concatenate([xa[h:].reshape(-1, d), np.ones(((n - h) * L, 1))], 1)
    y_tr, y_te = pix[:h].reshape(-1, patch * patch), pix[h:].reshape(-1, patch * patch)
    w = np.linalg.solve(x_tr.T @ x_tr + ridge * len(x_tr) * np.eye(d + 1), x_tr.T @ y_tr)
    resid = ((y_te - x_te @ w) ** 2).sum()
    return float(1.0 - resid / ((y_te - y_tr.mean(0)) ** 2).sum())


# ---------------------------------------------------------------- model internals
def head_mirror(cfg: Config):
    """A CPU ``Networks`` with the model's architecture: its head computes the logits the
    trainer's head computes once the weights are copied in (`head_logits`)."""
    c = cfg
    return _C.model.Networks(
        c.preset, image_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans,
        embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
        decoder_embed_dim=c.decoder_dim, decoder_depth=c.decoder_depth,
        decoder_num_heads=c.decoder_heads, out_dim=c.num_prototypes,
        head_hidden_dim=c.head_hidden, head_bottleneck_dim=c.head_bottleneck,
        shared_last_layer=not c.per_position_last_layer,
        shared_mask_token=not c.per_position_mask_token, learned_pos=c.learned_pos_embed)


def head_logits(model: AFiRe, net, images: np.ndarray, branch: str) -> np.ndarray:
    """float32 [B, L, K]: the ``branch`` head's logits (cosines) on the encoder tokens of
    uint8 images [B, S, S], computed by the mirror ``net`` with the model's weights."""
    tokens = model.encode(images, branch=branch)
    flat = net.params("head", teacher=branch == "teacher")
    state = model.state_tensors()
    for name, off, shape, *_ in net.named_parameters("head"):
        flat[off:off + int(np.prod(shape))] = state[f"{branch}.head.{name}"].ravel()
    return np.asarray(net.head_forward(tokens, branch=branch))


def slm(cfg: Config, images: np.ndarray, seed: int, step: int = 0):
    """(x', token labels [B, L]) as the trainer draws them for (seed, step)."""
    xp, _, abn = _C.slm.slm_generate(
        images, seed, step, 0, patch=cfg.patch_size, lesions_min=cfg.slm_lesions[0],
        lesions_max=cfg.slm_lesions[1], size_min=cfg.slm_size[0], size_max=cfg.slm_size[1],
        crop_max=cfg.slm_crop, gamma2=cfg.slm_gamma2, strength=cfg.slm_strength,
        token_rule=cfg.token_rule)
    return np.asarray(xp), np.asarray(abn)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def paper_losses(cfg: Config, logits: np.ndarray, protos: np.ndarray, abn: np.ndarray,
                 batch: int) -> tuple[float, float]:
    """(L_stru, L_cate) of student logits [N, L, K] in consecutive batches of ``batch``
    images (L_cate depends on the batch), token-weighted means over the batches."""
    ls = lc = ws = wc = 0.0
    for i in range(0, len(logits) - batch + 1, batch):
        s = np.ascontiguousarray(logits[i:i + batch], np.float32)
        a = np.ascontiguousarray(abn[i:i + batch])
        st, ca, _, _ = _C.objective.paper_loss(s, protos, a, tau_s=cfg.tau_student,
                                               tau=cfg.tau_similarity)
        n = float((a == 0).sum())
        ls, lc, ws, wc = ls + st * n, lc + ca * n, ws + n, wc + n
    return ls / max(ws, 1.0), lc / max(wc, 1.0)


def token_losses(cfg: Config, logits: np.ndarray, q_t: np.ndarray, abn: np.ndarray,
                 batch: int) -> float:
    """The teacher-token structure term (Config.stru_target="teacher_token") of student
    logits [N, L, K] against the teacher's Sinkhorn rows q_t [N, L, K], in consecutive batches
    of ``batch`` images (its candidates are the batch's images), token-weighted mean."""
    total = n_all = 0.0
    for i in range(0, len(logits) - batch + 1, batch):
        a = np.ascontiguousarray(abn[i:i + batch])
        v, _ = _C.objective.stru_token_loss(
            np.ascontiguousarray(logits[i:i + batch], np.float32),
            np.ascontiguousarray(q_t[i:i + batch], np.float32), a,
            tau_s=cfg.tau_student, tau=cfg.tau_similarity)
        n = float((a == 0).sum())
        total, n_all = total + v * n, n_all + n
    return total / max(n_all, 1.0)


def as_logits(q: np.ndarray, tau_s: float) -> np.ndarray:
    """Logits whose softmax at temperature tau_s is q."""
    return (tau_s * np.log(np.maximum(q, 1e-30))).astype(np.float32)


def diagnose(model: AFiRe, net, images: np.ndarray, seed: int, teacher_temp: float,
             init_features: np.ndarray | None, batch: int = 16) -> dict[str, Any]:
    """Every measurement at the model's current state on uint8 normal ``images``."""
    cfg = model.cfg
    n = len(images) // batch * batch
    x = images[:n]
    xp, abn = slm(cfg, x, seed=10_000 + seed)
    # teacher on the normal images: Sinkhorn per training-sized batch, as the trainer does
    t = head_logits(model, net, x, "teacher")
    B, L, K = batch, t.shape[1], t.shape[2]
    q_t = np.concatenate([np.asarray(_C.objective.sinkhorn_knopp(
        np.ascontiguousarray(t[i:i + B].reshape(B * L, K)), eps=teacher_temp,
        iters=cfg.sinkhorn_iters)).reshape(B, L, K) for i in range(0, n, B)])
    protos = np.ascontiguousarray(model.state_tensors()["prototypes"], np.float32)
    if not (protos.sum(1) > 0).all():      # before the first step: what it would set
        protos = np.ascontiguousarray(q_t.mean(0), np.float32)
    s = head_logits(model, net, xp, "student")
    q_s = softmax(s / cfg.tau_student)
    out: dict[str, Any] = {"abnormal_fraction": float(abn.mean())}
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(n) for _ in range(s.shape[1])], 1)      # [n, L]
    predictors = {
        "model": s,
        "posmean": np.broadcast_to(as_logits(q_s.mean(0), cfg.tau_student), s.shape),
        "blank": np.broadcast_to(head_logits(model, net, np.full_like(x[:1], int(x.mean())),
                                             "student")[0], s.shape),
        "shuffled": np.take_along_axis(s, perm[..., None], 0),
    }
    for name, lg in predictors.items():
        ls, lc = paper_losses(cfg, lg, protos, abn, batch)
        out[f"l_stru_{name}"], out[f"l_cate_{name}"] = ls, lc
        # the teacher-token term (whatever the run trains): log(batch) = chance
        out[f"l_tok_{name}"] = token_losses(cfg, lg, q_t, abn, batch)
    out["teacher"] = dict(assignment_information(q_t.argmax(-1), K),
                          soft=soft_information(q_t))
    normal = abn == 0
    a_s = np.where(normal, q_s.argmax(-1), -1)
    # student: hard assignments over normal tokens only (abnormal ones set aside)
    out["student"] = {"I_class_position_all_tokens": assignment_information(
        q_s.argmax(-1), K)["I_class_position"],
        "H_class_given_position": assignment_information(q_s.argmax(-1), K)[
            "H_class_given_position"],
        "agree_with_teacher": float((a_s == q_t.argmax(-1))[normal].mean())}
    protos_n = protos / protos.sum(1, keepdims=True)
    out["prototypes"] = {"max_entry_mean": float(protos_n.max(1).mean()),
                         "distinct_argmax": int(len(np.unique(protos_n.argmax(1)))),
                         "entropy_bits_mean": float(entropy_bits(protos_n, -1).mean())}
    tok = model.encode(x, branch="teacher")[:, 1:]
    f = tok.mean(1)
    out["features"] = {"mean_pairwise_cosine": mean_pairwise_cosine(f),
                       "effective_rank": effective_rank(f),
                       "position_share_teacher_tokens": position_share(tok),
                       "pixel_r2_teacher_tokens": pixel_r2(tok, x, cfg.patch_size),
                       "position_share_student_tokens": position_share(
                           model.encode(xp, branch="student")[:, 1:])}
    if init_features is not None:
        out["features"]["cka_to_init"] = linear_cka(f, init_features)
    return out


def term_gradients(model: AFiRe, images: np.ndarray) -> dict[str, np.ndarray]:
    """float64 [numel] student-encoder gradient of each loss term alone (weight 1, the
    others 0, no clipping) at the model's current state, on ``images`` with the SLMs of the
    model's next step. Nothing of ``model`` changes (each term runs in a fresh trainer
    holding a copy of its state)."""
    base = model.cfg.to_dict()
    grads = {}
    for term in ("stru", "cate", "recon"):
        d = dict(base, clip_grad=0.0, **{f"w_{k}": 1.0 if k == term else 0.0
                                         for k in ("stru", "cate", "recon")})
        t = _C.trainer.Trainer(d, len(images), model.steps_per_epoch)
        # the model's C trainer holds the flat state this one mirrors (same config but the
        # loss weights and clipping, hence the same layout)
        mine, src = t.buffers(), model._t.buffers()
        for k in src:
            if not k.startswith("grad."):
                mine[k][...] = src[k]
        t.step, t.prototypes_set = model.step, model.step > 0
        t.gradients(images)
        grads[term] = mine["grad.encoder"].astype(np.float64).copy()
    return grads


def gradient_shares(model: AFiRe, images: np.ndarray) -> dict[str, Any]:
    """Norms of `term_gradients` and their pairwise cosines."""
    grads = term_gradients(model, images)
    out: dict[str, Any] = {f"norm_{k}": float(np.linalg.norm(g)) for k, g in grads.items()}
    for a, b in (("stru", "cate"), ("stru", "recon"), ("cate", "recon")):
        na, nb = np.linalg.norm(grads[a]), np.linalg.norm(grads[b])
        out[f"cos_{a}_{b}"] = float(grads[a] @ grads[b] / (na * nb)) if na * nb > 0 else None
    return out


# ---------------------------------------------------------------- one run
def make_config(variant: dict, steps: int, spe: int, batch: int, peak_lr: float, size: int,
                seed: int, extra: dict) -> Config:
    """The eval_scale recipe: epochs from steps, warm-up 1/80 of the epochs (>= 1)."""
    epochs = steps // spe + 1
    return Config.preset_config("test", img_size=size, batch_size=batch, epochs=epochs,
                                warmup_epochs=max(1, round(epochs / 80)),
                                base_lr=peak_lr * 256 / batch, seed=seed,
                                **dict(variant, **extra))


def run(cfg: Config, normals: np.ndarray, diag_imgs: np.ndarray, ev, steps: int,
        checkpoints: list[int], seed: int, probe_epochs: int) -> dict[str, Any]:
    spe = max(1, len(normals) // cfg.batch_size)
    model = AFiRe(cfg, steps_per_epoch=spe)
    net = head_mirror(cfg)
    rng = np.random.default_rng(seed)                 # training batches
    grad_rng = np.random.default_rng(seed + 7777)     # gradient-probe batches
    init_f = gap_features(model, diag_imgs)
    log: list[dict] = []
    checks = []
    t0 = time.perf_counter()
    train_s = 0.0
    stop = sorted({c for c in checkpoints if c <= steps} | {steps})
    for step in range(steps + 1):
        if step in stop:
            tt = log[-1]["teacher_temp"] if log else cfg.teacher_temp
            rec = {"step": step}
            if log:
                w = log[-min(20, len(log)):]
                rec["train"] = {k: float(np.mean([r[k] for r in w]))
                                for k in ("l_stru", "l_cate", "l_recon", "grad_norm")}
            rec.update(diagnose(model, net, diag_imgs, seed, tt, init_f))
            idx = np.sort(grad_rng.choice(len(normals), cfg.batch_size, replace=False))
            rec["gradients"] = gradient_shares(model, normals[idx])
            rec["probe_auc"] = linear_probe(model, ev, folds=5, epochs=probe_epochs, lr=1e-2,
                                            figures=False)["metrics"]["mean_auc"]["mean"]
            checks.append(rec)
            print(f"  step {step}: l_stru {rec['l_stru_model']:.4f} (pos-mean "
                  f"{rec['l_stru_posmean']:.4f}, blank {rec['l_stru_blank']:.4f}) l_cate "
                  f"{rec['l_cate_model']:.3f} (shuffled {rec['l_cate_shuffled']:.3f}) | "
                  f"teacher I(c;pos) {rec['teacher']['I_class_position']:.2f} "
                  f"I(c;img|pos) {rec['teacher']['I_class_image_given_position']:.2f} bits | "
                  f"cos {rec['features']['mean_pairwise_cosine']:.3f} | probe "
                  f"{rec['probe_auc']:.3f}", flush=True)
        if step == steps:
            break
        idx = np.sort(rng.choice(len(normals), cfg.batch_size, replace=False))
        t1 = time.perf_counter()
        log.append(model.train_step(normals[idx]))
        train_s += time.perf_counter() - t1
    stru = np.array([r["l_stru"] for r in log])
    below = np.flatnonzero(stru < 0.01)
    curve = {k: [float(np.mean([r[k] for r in log[i:i + 25]])) for i in range(0, steps, 25)]
             for k in ("l_stru", "l_cate", "l_recon")}
    probes = {}
    for name, m in (("pretrained", model),
                    ("init", AFiRe(cfg, steps_per_epoch=spe))):
        r = linear_probe(m, ev, folds=5, epochs=probe_epochs, lr=1e-2, figures=False)
        probes[name] = {"mean_auc": r["metrics"]["mean_auc"],
                        "pooled_auc": r["metrics"]["pooled_out_of_fold"]["mean_auc"]}
    return {"seconds_train": train_s, "seconds_total": time.perf_counter() - t0,
            "first_step_l_stru_below_0.01": int(below[0]) if len(below) else None,
            "curve_mean_per_25_steps": curve, "checkpoints": checks, "probe": probes}


# two-sided 95% Student t quantiles t_{0.975, df}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}


def mean_ci(values) -> dict[str, Any]:
    """Mean, sample std and the 95% t interval of the mean (None with fewer than 2)."""
    a = np.asarray(values, np.float64)
    out: dict[str, Any] = {"mean": float(a.mean()), "n": len(a), "values": a.tolist(),
                           "std": None, "ci95": None}
    if len(a) > 1:
        sd = float(a.std(ddof=1))
        half = _T975.get(len(a) - 1, 1.96) * sd / np.sqrt(len(a))
        out.update(std=sd, ci95=[float(a.mean() - half), float(a.mean() + half)])
    return out


def paired_probe(runs: list[dict], variant: str, reference: str = "paper") -> dict | None:
    """Probe AUC of ``variant`` minus ``reference`` over the seeds both ran (same seed =
    same initialisation, data order and lesions), with its 95% t interval."""
    a = {r["seed"]: r["probe"]["pretrained"]["mean_auc"]["mean"] for r in runs
         if r["variant"] == variant}
    b = {r["seed"]: r["probe"]["pretrained"]["mean_auc"]["mean"] for r in runs
         if r["variant"] == reference}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return dict(mean_ci([a[s] - b[s] for s in seeds]), seeds=seeds)


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Per variant: mean, std and 95% interval over seeds of the final numbers."""
    out: dict[str, Any] = {}
    for v in sorted({r["variant"] for r in runs}):
        rs = [r for r in runs if r["variant"] == v]
        last = [r["checkpoints"][-1] for r in rs]

        ms = mean_ci
        out[v] = {
            "probe_auc_minus_paper_paired": paired_probe(runs, v) if v != "paper" else None,
            "probe_auc": ms([r["probe"]["pretrained"]["mean_auc"]["mean"] for r in rs]),
            "probe_auc_init": ms([r["probe"]["init"]["mean_auc"]["mean"] for r in rs]),
            **{k: ms([c[k] for c in last]) for k in (
                "l_stru_model", "l_stru_posmean", "l_stru_blank", "l_cate_model",
                "l_cate_posmean", "l_cate_shuffled")},
            "l_recon_train": ms([c["train"]["l_recon"] for c in last]),
            "teacher_I_class_position": ms([c["teacher"]["I_class_position"] for c in last]),
            "teacher_I_class_image_given_position": ms(
                [c["teacher"]["I_class_image_given_position"] for c in last]),
            "feature_mean_pairwise_cosine": ms(
                [c["features"]["mean_pairwise_cosine"] for c in last]),
            "feature_cka_to_init": ms([c["features"]["cka_to_init"] for c in last]),
        }
    return out


def tables(paths: list[str], reference: str = "paper") -> str:
    """Markdown tables over every run in the result files ``paths``: per variant (mean ±
    sd [95% interval] over its seeds, and the probe AUC minus ``reference`` paired by
    seed), then the ``reference`` variant's checkpoints (mean ± sd over its seeds)."""
    runs: dict[str, dict[int, dict]] = {}
    for p in paths:
        for r in json.loads(Path(p).read_text())["runs"]:
            runs.setdefault(r["variant"], {})[r["seed"]] = r

    def show(vals, fmt="{:.3f}", interval=False) -> str:
        m = mean_ci(vals)
        text = fmt.format(m["mean"])
        if m["std"] is not None:
            text += " ± " + fmt.format(m["std"])
            if interval:
                text += " [" + ", ".join(fmt.format(x) for x in m["ci95"]) + "]"
        return text

    def auc(r):
        return r["probe"]["pretrained"]["mean_auc"]["mean"]

    cols = [("l_stru", lambda c: c["l_stru_model"], "{:.4f}"),
            ("content-free l_stru", lambda c: min(c["l_stru_posmean"], c["l_stru_blank"]),
             "{:.4f}"),
            ("l_cate", lambda c: c["l_cate_model"], "{:.3f}"),
            ("shuffled l_cate", lambda c: c["l_cate_shuffled"], "{:.3f}"),
            ("l_recon (train)", lambda c: c["train"]["l_recon"], "{:.3f}"),
            ("I(c;pos) hard", lambda c: c["teacher"]["I_class_position"], "{:.2f}"),
            ("I(c;img|pos) hard", lambda c: c["teacher"]["I_class_image_given_position"],
             "{:.2f}"),
            ("I(c;pos) soft", lambda c: c["teacher"]["soft"]["I_class_position"], "{:.2f}"),
            ("I(c;img|pos) soft",
             lambda c: c["teacher"]["soft"]["I_class_image_given_position"], "{:.2f}"),
            ("CKA to init", lambda c: c["features"]["cka_to_init"], "{:.2f}"),
            ("pairwise cos", lambda c: c["features"]["mean_pairwise_cosine"], "{:.3f}"),
            ("eff. rank", lambda c: c["features"]["effective_rank"], "{:.1f}"),
            ("pixel R^2", lambda c: c["features"]["pixel_r2_teacher_tokens"], "{:.2f}")]
    head = ["variant", "seeds", "probe AUC", f"minus {reference} (paired)", "first step "
            "l_stru < 0.01"] + [c[0] for c in cols]
    out = ["| " + " | ".join(head).replace("|pos", "\\|pos") + " |",
           "|" + "---|" * len(head)]
    ref = runs.get(reference, {})
    for v, by_seed in runs.items():
        rs = [by_seed[k] for k in sorted(by_seed)]
        last = [r["checkpoints"][-1] for r in rs]
        common = sorted(set(by_seed) & set(ref)) if v != reference else []
        diff = show([auc(by_seed[k]) - auc(ref[k]) for k in common], "{:+.3f}", True) \
            if common else ""
        row = [v, ",".join(map(str, sorted(by_seed))), show([auc(r) for r in rs], "{:.3f}",
                                                              True), diff,
               ",".join(str(r["first_step_l_stru_below_0.01"]) for r in rs)]
        row += [show([fn(c) for c in last], fmt) for _, fn, fmt in cols]
        out.append("| " + " | ".join(row) + " |")
    if ref:
        rs = [ref[k] for k in sorted(ref)]
        out += ["", f"{reference}, seeds {','.join(map(str, sorted(ref)))}, per checkpoint:",
                "", "| step | " + " | ".join(c[0] for c in cols[:4] + cols[5:9]).replace(
                    "|pos", "\\|pos") + " | grad stru | grad cate | grad recon | probe AUC |",
                "|" + "---|" * 13]
        for i, c0 in enumerate(rs[0]["checkpoints"]):
            cs = [r["checkpoints"][i] for r in rs if len(r["checkpoints"]) > i]
            row = [str(c0["step"])] + [show([fn(c) for c in cs], fmt)
                                       for _, fn, fmt in cols[:4] + cols[5:9]]
            row += [show([c["gradients"][f"norm_{t}"] for c in cs])
                    for t in ("stru", "cate", "recon")]
            row.append(show([c["probe_auc"] for c in cs]))
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def rounded(v: Any) -> Any:
    """Floats to 6 significant digits (smaller JSON; far below the run-to-run spread)."""
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [rounded(x) for x in v]
    return float(f"{v:.6g}") if isinstance(v, float) else v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(os.environ.get(
        "AFIRE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
        / "kermany_native"), help="kermany_native (default: $AFIRE_DATA/kermany_native, "
        "else ../shared/data/kermany_native beside the repository)")
    ap.add_argument("--variants", nargs="+", default=["paper", "cst_only", "recon_only"],
                    help=f"named variants: {', '.join(VARIANTS)}; or a custom one as "
                         "name=key:value,key:value (values as JSON) or name={JSON object}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--checkpoints", nargs="+", type=int,
                    default=[0, 25, 50, 100, 200, 500, 1000, 2000])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--peak-lr", type=float, default=1e-3)
    ap.add_argument("--probe-epochs", type=int, default=200)
    ap.add_argument("--time-budget", type=float, default=540.0,
                    help="seconds for all runs: --steps is lowered to what fits, measured on "
                         "20 steps of a throw-away model (0: no limit)")
    ap.add_argument("--override", nargs="*", default=[],
                    help="Config overrides key=value applied to every variant")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tables", nargs="+", default=None, metavar="JSON",
                    help="print markdown tables over the runs in these result files (all "
                         "variants and seeds, paired against --reference) and exit")
    ap.add_argument("--reference", default="paper")
    a = ap.parse_args(argv)
    if a.tables:
        print(tables(a.tables, a.reference))
        return 0

    t_all = time.perf_counter()
    d = load_data(a.data, a.size)
    held = group_holdout(d.groups, 0.4, seed=0)
    pre, ev = d.subset(np.flatnonzero(~held)), d.subset(np.flatnonzero(held))
    normals = pre.images[pre.abnormal == 0]
    diag_imgs = ev.images[ev.abnormal == 0]
    diag_imgs = diag_imgs[:len(diag_imgs) // a.batch * a.batch]
    spe = max(1, len(normals) // a.batch)
    parsed = Config.preset_config("test").with_overrides(a.override).to_dict()
    extra = {kv.split("=", 1)[0].strip(): None for kv in a.override}
    extra = {k: parsed[k] for k in extra}
    variants: dict[str, dict] = {}
    for v in a.variants:
        if v in VARIANTS:
            variants[v] = VARIANTS[v]
        elif "=" in v:
            name, body = v.split("=", 1)
            variants[name] = json.loads(body) if body.startswith("{") else {
                kv.split(":", 1)[0]: json.loads(kv.split(":", 1)[1]) for kv in body.split(",")}
        else:
            ap.error(f"unknown variant {v!r}")
    n_runs = len(variants) * len(a.seeds)
    if a.time_budget:
        cfg = make_config({}, 20, spe, a.batch, a.peak_lr, a.size, 0, extra)
        m = AFiRe(cfg, steps_per_epoch=spe)
        t1 = time.perf_counter()
        for i in range(20):
            m.train_step(normals[i * a.batch % len(normals):][:a.batch])
        per_step = (time.perf_counter() - t1) / 20
        # ~25% on top of training: diagnostics, gradients, probes
        fits = int(a.time_budget / n_runs / (per_step * 1.25))
        if fits < a.steps:
            print(f"timing: {per_step * 1e3:.1f} ms/step -> {fits} steps per run fit "
                  f"{n_runs} runs in {a.time_budget:.0f} s", flush=True)
            a.steps = max(50, fits)
    print(f"{len(normals)} pre-training normals "
          f"({len(np.unique(pre.groups[pre.abnormal == 0]))} groups), "
          f"{len(diag_imgs)} held-out normals for diagnostics, {len(ev)} held-out images for "
          f"the probe; {n_runs} runs x {a.steps} steps", flush=True)
    runs = []
    for name, var in variants.items():
        for seed in a.seeds:
            cfg = make_config(var, a.steps, spe, a.batch, a.peak_lr, a.size, seed, extra)
            print(f"[{name} seed {seed}] {var or 'paper settings'}", flush=True)
            r = run(cfg, normals, diag_imgs, ev, a.steps, a.checkpoints, seed, a.probe_epochs)
            p = r["probe"]
            print(f"  probe AUC {p['pretrained']['mean_auc']['mean']:.3f} (init "
                  f"{p['init']['mean_auc']['mean']:.3f}); l_stru < 0.01 from step "
                  f"{r['first_step_l_stru_below_0.01']}; {r['seconds_total']:.0f} s", flush=True)
            runs.append(dict(r, variant=name, seed=seed, overrides=var,
                             config=json.loads(cfg.to_json())))
    result = {"benchmark": "diagnose_stru", "argv": sys.argv[1:] if argv is None else argv,
              "data": a.data, "steps": a.steps, "batch": a.batch, "peak_lr": a.peak_lr,
              "img_size": a.size,
              "counts": {"pretrain_normals": int(len(normals)),
                         "diagnostic_normals": int(len(diag_imgs)),
                         "probe_held_out": ev.counts()},
              "summary": summarise(runs), "runs": runs,
              "seconds_total": time.perf_counter() - t_all}
    text = json.dumps(rounded(json_safe(result)), indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(json.dumps(json_safe(result["summary"]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
