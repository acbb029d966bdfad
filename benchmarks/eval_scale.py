"""Does AFiRe pre-training beat random initialisation, and by how much, at a given scale?

    python benchmarks/eval_scale.py --data ../shared/data/kermany_native --device cuda \
        --preset vit_tiny --size 224 --steps 2000 --batch 64 --out eval_scale.json

The protocol of tests/eval at any model size: pre-train on the NORMAL images of a
patient-wise train split (60% of the groups), then on the held-out groups a 5-fold
patient-wise linear probe of the pre-trained teacher encoder and of ``--random-inits``
freshly initialised ones, and the anomaly protocol (adapt on normals, Eq. 51) from both.
Also records two image statistics that separate the classes on their own (image std, mean
absolute Laplacian), since a restoration-error score can simply follow them.

The learning rate is given as the PEAK (``--peak-lr``, default 1e-3 = the paper's 5e-4 x
512 / 256); base_lr is derived from it by METHOD §5's batch/256 rule. JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from afire import AFiRe, Config  # noqa: E402
from afire.evaluate import anomaly, linear_probe, load_data  # noqa: E402
from afire.evaluate import metrics as M  # noqa: E402
from afire.evaluate.common import group_holdout, json_safe, random_init  # noqa: E402


def image_statistics_auc(images: np.ndarray, abnormal: np.ndarray) -> dict[str, float]:
    """AUC (abnormal positive) of two one-number image summaries."""
    x = images.astype(np.float32) / 255.0
    lap = np.abs(4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1]
                 - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]).mean(axis=(1, 2))
    return {"image_std": M.roc_auc(abnormal, x.reshape(len(x), -1).std(axis=1)),
            "mean_abs_laplacian": M.roc_auc(abnormal, lap)}


def pretrain(cfg: Config, normals: np.ndarray, steps: int, device: str, seed: int) -> tuple:
    spe = max(1, len(normals) // cfg.batch_size)
    model = AFiRe(cfg, device=device, steps_per_epoch=spe)
    rng = np.random.default_rng(seed)
    log, t0 = [], time.perf_counter()
    for _ in range(steps):
        idx = np.sort(rng.choice(len(normals), cfg.batch_size, replace=False))
        log.append(model.train_step(normals[idx]))
    seconds = time.perf_counter() - t0
    return model, {"steps": steps, "seconds": seconds,
                   "images_per_s": steps * cfg.batch_size / seconds,
                   "loss_first50": float(np.mean([r["loss"] for r in log[:50]])),
                   "loss_last50": float(np.mean([r["loss"] for r in log[-50:]])),
                   "l_recon_last50": float(np.mean([r["l_recon"] for r in log[-50:]])),
                   "l_cst_last50": float(np.mean([r["l_cst"] for r in log[-50:]]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="kermany_native (shared layout)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="test")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--peak-lr", type=float, default=1e-3)
    ap.add_argument("--warmup-epochs", type=int, default=None,
                    help="default: 1/80 of the epochs (the paper's 10 of 800), at least 1")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for pre-training: --steps is lowered to what fits, "
                         "measured on 20 steps of a throw-away model")
    ap.add_argument("--random-inits", type=int, default=3)
    ap.add_argument("--adapt-steps", type=int, default=200)
    ap.add_argument("--probe-epochs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", nargs="*", default=[], help="Config overrides key=value "
                    "(values parsed as JSON when possible)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    t_all = time.perf_counter()
    d = load_data(a.data, a.size)
    held = group_holdout(d.groups, 0.4, seed=0)
    pre, ev = d.subset(np.flatnonzero(~held)), d.subset(np.flatnonzero(held))
    normals = pre.images[pre.abnormal == 0]
    over = {}
    for kv in a.override:
        k, v = kv.split("=", 1)
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    if a.patch:
        over["patch_size"] = a.patch
    scale = a.size / 224
    if a.preset != "test" and "slm_size" not in over:   # lesion sizes follow the image size
        over.update(slm_size=(max(2, round(16 * scale)), max(4, round(64 * scale))),
                    slm_crop=max(4, round(60 * scale)))
    spe = max(1, len(normals) // a.batch)

    def config(steps: int) -> Config:
        epochs = steps // spe + 1
        warmup = a.warmup_epochs if a.warmup_epochs is not None else max(1, round(epochs / 80))
        return Config.preset_config(a.preset, img_size=a.size, batch_size=a.batch,
                                    epochs=epochs, warmup_epochs=warmup,
                                    base_lr=a.peak_lr * 256 / a.batch, seed=a.seed, **over)
    if a.time_budget:
        probe_run = pretrain(config(20), normals, 20, a.device, a.seed)[1]
        fits = int(a.time_budget * probe_run["images_per_s"] / a.batch)
        print(f"timing: {probe_run['images_per_s']:.0f} img/s -> {fits} steps fit in "
              f"{a.time_budget:.0f} s", flush=True)
        a.steps = max(50, min(a.steps, fits))
    cfg = config(a.steps)
    print(f"{len(normals)} pre-training normals, {len(ev)} held-out images; {cfg.preset} "
          f"{cfg.img_size}px patch {cfg.patch_size}, {a.steps} steps of {a.batch} on {a.device}",
          flush=True)
    model, train = pretrain(cfg, normals, a.steps, a.device, a.seed)
    print(f"pre-training: {train['seconds']:.0f} s, {train['images_per_s']:.0f} img/s, loss "
          f"{train['loss_first50']:.3f} -> {train['loss_last50']:.3f}", flush=True)

    models = [("afire", model)] + [(f"random{k}", random_init(model, seed=k))
                                   for k in range(1, a.random_inits + 1)]
    probe = {}
    for name, m in models:
        r = linear_probe(m, ev, folds=5, epochs=a.probe_epochs, lr=1e-2, figures=False)
        probe[name] = {"mean_auc": r["metrics"]["mean_auc"],
                       "pooled_auc": r["metrics"]["pooled_out_of_fold"]["mean_auc"]}
        print(f"linear probe {name}: {probe[name]['mean_auc']['mean']:.3f} +- "
              f"{probe[name]['mean_auc']['std']:.3f}", flush=True)
    anom = {}
    for name, m in models[:2]:
        r = anomaly(m, ev, adapt_steps=a.adapt_steps, batch=a.batch, figures=False,
                    score="eq51")   # "auc" below is Eq. 51's (ablation_scale.py: every score)
        anom[name] = {"auc": r["metrics"]["auc"],
                      "feature_distance_auc": r["metrics"]["feature_distance"]["auc"],
                      "squid_acc": r["metrics"]["squid"]["acc"],
                      "val_threshold_acc": r["metrics"]["val_threshold"].get("acc")}
        print(f"anomaly {name}: Eq. 51 AUC {anom[name]['auc']:.3f}, feature distance AUC "
              f"{anom[name]['feature_distance_auc']:.3f}", flush=True)
    rand = [probe[f"random{k}"]["mean_auc"]["mean"] for k in range(1, a.random_inits + 1)]
    result = {
        "benchmark": "eval_scale", "device": a.device, "config": json.loads(cfg.to_json()),
        "steps": a.steps, "peak_lr": a.peak_lr, "pretrain": train,
        "counts": {"pretrain_normals": int(len(normals)), "held_out": ev.counts()},
        "linear_probe": probe,
        "linear_probe_afire_minus_random_mean": probe["afire"]["mean_auc"]["mean"] - float(np.mean(rand)),
        "anomaly": anom,
        "image_statistics_auc": image_statistics_auc(ev.images, ev.abnormal),
        "seconds_total": time.perf_counter() - t_all,
    }
    text = json.dumps(json_safe(result), indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
