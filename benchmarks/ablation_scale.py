"""Does AFiRe pre-training beat random initialisation, do its parts matter (paper Table 1),
and which anomaly score works -- with seeds, intervals and trivial baselines.

    python benchmarks/ablation_scale.py --data ../shared/data \\
        --out benchmarks/results/ablation_cpu.json                      # CPU scale, ~15 min
    python benchmarks/ablation_scale.py --data ../shared/data --device cuda --preset vit_small \\
        --size 224 --steps 3000 --batch 64 --out ablation_vit_small.json   # GPU (also vit_base)

Per dataset (``--datasets``, folders of the shared-data layout under ``--data``):

1. Split the patients (``group_id`` / ``patient_id``) once, seed 0: 60% of the groups
   pre-train (their NORMAL images only), 40% are held out; the held-out groups are split
   again by group into validation (40%, ``--val-fraction``) and test (60%). The split is
   the same for every model, and independent of every model's seed.
2. Pre-train each variant (``--variants``: the paper's objective and its Table 1 ablations)
   with each pre-training seed (``--pretrain-seeds``); ``--random-seeds`` random
   initialisations of the same configuration are the baseline.
3. Linear probe of every model (the eval suite's recipe, ``PROBE_RECIPE``: 5 patient-wise
   folds of all held-out images, fold seed 0 for every model): pooled out-of-fold AUC and
   the mean over folds.
4. Anomaly protocol of every model (``afire.evaluate.anomaly``): adapt on the pre-training
   normals (``--adapt-steps``), fit the reference statistics on them, score the validation
   and test images with every score of ``afire.model.ANOMALY_SCORES``; the baselines (blur,
   image std, pixel PCA) on the same images.
5. Summaries: mean, sd and n over seeds; the difference of each variant from random init and
   from the full model with a two-level bootstrap 95% interval (``--bootstrap`` resamples of
   the images AND of the seeds on each side, so both sources of noise count); every score
   against the blur baseline, paired on the same test images. The recommended anomaly
   score is the one with the best validation AUC averaged over the datasets (full model,
   mean over pre-training seeds); test AUCs play no part in that choice.

Variants: full (the paper's L_stru + L_cate + L_recon with SLM), no_stru (w_stru=0: no
structure consistency, the only loss that compares with the prototypes), no_cate (w_cate=0),
no_recon (w_recon=0: no restoration; the decoder stays untrained, so the restoration-based
anomaly scores measure nothing), no_slm (slm_strength=0: no synthetic lesion is added and no
token is abnormal, so L_cate has no negatives (0) and restoration is plain auto-encoding of
visible tokens; only L_stru and that auto-encoding train).

The CPU default: the test preset at 64 px (D=32, depth 2, P=8: 64 tokens), batch 16, peak lr
1e-3, 2000 steps; docs/RESULTS.md says why. JSON to ``--out`` (per model: the probe's
metrics, every anomaly score's AUCs; summaries; the wall times and the machine load).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from afire import AFiRe, Config  # noqa: E402
from afire.evaluate import PROBE_RECIPE, anomaly, linear_probe, load_data  # noqa: E402
from afire.evaluate import metrics as M  # noqa: E402
from afire.evaluate.anomaly import BASELINES  # noqa: E402
from afire.evaluate.common import EvalData, group_holdout, json_safe  # noqa: E402
from afire.model import ANOMALY_SCORES  # noqa: E402

VARIANTS = {"full": {}, "no_stru": {"w_stru": 0.0}, "no_cate": {"w_cate": 0.0},
            "no_recon": {"w_recon": 0.0}, "no_slm": {"slm_strength": 0.0},
            # not in the paper: the structure term against the teacher's tokens (RESULTS.md)
            "teacher_token": {"stru_target": "teacher_token"}}


# ---------------------------------------------------------------- statistics
def two_level_ci(y, a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0,
                 paired_seeds: bool = False) -> dict:
    """metrics.seed_bootstrap_ci (images and seeds resampled), None-valued when a side has
    non-finite scores (a score that needs a reference it could not fit)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return {"value": None, "low": None, "high": None, "n": 0}
    return M.seed_bootstrap_ci(y, a, b, n=n, seed=seed, paired_seeds=paired_seeds)


def seed_summary(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": int(len(v)), "values": [float(x) for x in values]}


# ---------------------------------------------------------------- experiment
def load_load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pretrain(cfg: Config, normals: np.ndarray, steps: int, device: str, seed: int) -> tuple:
    spe = max(1, len(normals) // cfg.batch_size)
    model = AFiRe(cfg, device=device, steps_per_epoch=spe)
    rng = np.random.default_rng(seed)
    log, t0 = [], time.perf_counter()
    for _ in range(steps):
        idx = np.sort(rng.choice(len(normals), cfg.batch_size, replace=False))
        log.append(model.train_step(normals[idx]))
    last = log[-max(1, len(log) // 20):]
    return model, {"steps": steps, "seconds": time.perf_counter() - t0,
                   **{f"{k}_last5pct": float(np.mean([r[k] for r in last]))
                      for k in ("loss", "l_stru", "l_cate", "l_recon")}}


def make_config(preset: str, size: int, batch: int, steps: int, n_normals: int,
                peak_lr: float, seed: int, **extra) -> tuple[Config, int]:
    """(Config, steps per epoch) of a run of ``steps`` steps over ``n_normals`` images: the
    epochs cover the steps, warm-up 1/80 of them (the paper's 10 of 800, at least 1), base_lr
    from the peak by METHOD §5's batch/256 rule."""
    spe = max(1, n_normals // batch)
    epochs = steps // spe + 1
    return Config.preset_config(preset, img_size=size, batch_size=batch, epochs=epochs,
                                warmup_epochs=max(1, round(epochs / 80)),
                                base_lr=peak_lr * 256 / batch, seed=seed, **extra), spe


def split(d: EvalData, val_fraction: float = 0.4):
    """(pre-training part, held-out part, its validation groups, its test groups): 60% of
    the groups pre-train (seed 0, as benchmarks/eval_scale.py and tests/eval), the held-out
    groups split again by group (seed 1)."""
    held = group_holdout(d.groups, 0.4, seed=0)
    pre, ev = d.subset(np.flatnonzero(~held)), d.subset(np.flatnonzero(held))
    val = group_holdout(ev.groups, val_fraction, seed=1)
    return pre, ev, ev.subset(np.flatnonzero(val)), ev.subset(np.flatnonzero(~val))


def evaluate_model(m: AFiRe, pre: EvalData, ev: EvalData, val: EvalData, test: EvalData,
                   adapt_steps: int, batch: int) -> dict:
    t0 = time.perf_counter()
    p = linear_probe(m, ev, **PROBE_RECIPE, figures=False, progress=False)
    t1 = time.perf_counter()
    normals = pre.subset(np.flatnonzero(pre.abnormal == 0))
    a = anomaly(m, normals, test_data=test, val_data=val, adapt_steps=adapt_steps,
                batch=batch, figures=False, progress=False, say=lambda t: None)
    t2 = time.perf_counter()
    am, arr = a["metrics"], a["arrays"]
    return {
        "probe": {"pooled_auc": p["metrics"]["pooled_out_of_fold"]["mean_auc"],
                  "fold_mean_auc": p["metrics"]["mean_auc"]["mean"],
                  "fold_sd": p["metrics"]["mean_auc"]["std"]},
        "probe_logits": p["arrays"]["logits"][:, 0].astype(float),
        "probe_rows": p["arrays"]["rows"],
        "probe_y": p["arrays"]["targets"][:, 0].astype(int),
        "anomaly": {k: {"auc": v["auc"], "auc_val": v.get("auc_val")}
                    for k, v in am["scores"].items()},
        "anomaly_test": {k: (arr["test_log_score"] if k == "eq51" else arr[f"test_{k}"])
                         for k in am["scores"]},
        "baselines": {k: {"auc": v["auc"], "auc_val": v.get("auc_val")}
                      for k, v in am["baselines"].items()},
        "baseline_test": {k: arr[f"test_baseline_{k}"] for k in am["baselines"]},
        "test_abnormal": arr["test_abnormal"],
        "seconds": {"probe": t1 - t0, "anomaly": t2 - t1},
    }


def summarise(models: dict, variants: list[str], n_boot: int) -> dict:
    """Probe and anomaly summaries of one dataset (see the module docstring)."""
    rand = [k for k in models if k.startswith("random")]
    by_var = {v: [k for k in models if k.startswith(v + "_s")] for v in variants}
    any_model = models[rand[0]]
    out: dict = {"probe": {}, "anomaly": {}, "baselines": {}}
    # probe: every model scored the same rows (same folds, fold seed 0)
    y_probe = any_model["probe_y"]
    for m in models.values():
        np.testing.assert_array_equal(m["probe_rows"], any_model["probe_rows"])
    logit = {k: m["probe_logits"] for k, m in models.items()}
    for name, keys in list(by_var.items()) + [("random", rand)]:
        if not keys:
            continue
        out["probe"][name] = {
            "pooled_auc": seed_summary([models[k]["probe"]["pooled_auc"] for k in keys]),
            "fold_mean_auc": seed_summary([models[k]["probe"]["fold_mean_auc"] for k in keys])}
        if name != "random":
            out["probe"][name]["minus_random"] = two_level_ci(
                y_probe, np.stack([logit[k] for k in keys]), np.stack([logit[k] for k in rand]),
                n_boot)
            if name != "full" and by_var.get("full"):
                out["probe"][name]["minus_full"] = two_level_ci(
                    y_probe, np.stack([logit[k] for k in keys]),
                    np.stack([logit[k] for k in by_var["full"]]), n_boot, paired_seeds=True)
    y = any_model["test_abnormal"]
    blur = any_model["baseline_test"]["blur"]
    for b in any_model["baselines"]:
        out["baselines"][b] = {"auc": any_model["baselines"][b]["auc"],
                               "auc_val": any_model["baselines"][b]["auc_val"],
                               "ci": M.bootstrap_ci(y, any_model["baseline_test"][b], n=n_boot),
                               "label": BASELINES[b]}
    out["blur_confound"] = {}
    for score in list(ANOMALY_SCORES) + [f"baseline_{b}" for b in any_model["baselines"]]:
        keys = by_var.get("full") or []
        if not keys:
            break
        base = score.startswith("baseline_")
        ss = [any_model["baseline_test"][score[9:]]] if base else \
            [models[k]["anomaly_test"][score] for k in keys]
        if not all(np.isfinite(v).all() for v in ss):
            continue
        out["blur_confound"][score] = {
            "blur_matched_auc": seed_summary([M.matched_auc(y, v, blur) for v in ss]),
            "spearman_with_blur_normals": seed_summary([M.spearman(v[y == 0], blur[y == 0])
                                                        for v in ss]),
            "spearman_with_blur_abnormals": seed_summary([M.spearman(v[y == 1], blur[y == 1])
                                                          for v in ss])}
    for score in ANOMALY_SCORES:
        res = {}
        for name, keys in list(by_var.items()) + [("random", rand)]:
            if not keys:
                continue
            r = {"auc": seed_summary([models[k]["anomaly"][score]["auc"] for k in keys]),
                 "auc_val": seed_summary([models[k]["anomaly"][score]["auc_val"] for k in keys])}
            s = np.stack([models[k]["anomaly_test"][score] for k in keys])
            if name != "random":
                r["minus_random"] = two_level_ci(
                    y, s, np.stack([models[k]["anomaly_test"][score] for k in rand]), n_boot)
                r["minus_blur"] = two_level_ci(y, s, blur[None], n_boot)
                if name != "full" and by_var.get("full"):
                    r["minus_full"] = two_level_ci(
                        y, s, np.stack([models[k]["anomaly_test"][score] for k in by_var["full"]]),
                        n_boot, paired_seeds=True)
            res[name] = r
        out["anomaly"][score] = dict(res, in_paper=ANOMALY_SCORES[score][0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("AFIRE_DATA", "../shared/data"),
                    help="the shared data folder (holds the --datasets)")
    ap.add_argument("--datasets", nargs="+", default=["kermany_native", "nih14_dev"])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                    default=[v for v in VARIANTS if v != "teacher_token"])
    ap.add_argument("--ablation-datasets", nargs="*", default=["kermany_native"],
                    help="datasets that run every variant; the others run 'full' only")
    ap.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--random-seeds", type=int, nargs="+", default=[101, 102, 103, 104, 105])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="test")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--peak-lr", type=float, default=1e-3)
    ap.add_argument("--adapt-steps", type=int, default=100)
    ap.add_argument("--val-fraction", type=float, default=0.4)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--override", nargs="*", default=[], help="Config overrides key=value")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    t_all = time.perf_counter()
    over = {}
    for kv in a.override:
        k, v = kv.split("=", 1)
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    if a.preset != "test" and "slm_size" not in over:   # lesion sizes follow the image size
        sc = a.size / 224
        over.update(slm_size=(max(2, round(16 * sc)), max(4, round(64 * sc))),
                    slm_crop=max(4, round(60 * sc)))
    result: dict = {"benchmark": "ablation_scale", "argv": sys.argv[1:] if argv is None else argv,
                    "device": a.device, "preset": a.preset, "size": a.size, "steps": a.steps,
                    "batch": a.batch, "peak_lr": a.peak_lr, "adapt_steps": a.adapt_steps,
                    "probe_recipe": PROBE_RECIPE, "pretrain_seeds": a.pretrain_seeds,
                    "random_seeds": a.random_seeds, "variants": {v: VARIANTS[v] for v in a.variants},
                    "overrides": over, "load_start": load_load(), "datasets": {}}
    for ds in a.datasets:
        d = load_data(os.path.join(a.data, ds), a.size)
        pre, ev, val, test = split(d, a.val_fraction)
        normals = pre.images[pre.abnormal == 0]

        def config(seed: int, **extra) -> tuple[Config, int]:
            return make_config(a.preset, a.size, a.batch, a.steps, len(normals), a.peak_lr,
                               seed, **{**over, **extra})
        variants = a.variants if ds in a.ablation_datasets else ["full"]
        info = {"counts": {"pretrain_normals": int(len(normals)), "held_out": ev.counts(),
                           "val": val.counts(), "test": test.counts()},
                "variants_run": variants, "models": {}}
        print(f"{ds}: {len(normals)} pre-training normals; held out {ev.counts()}; val "
              f"{val.counts()['images']}, test {test.counts()['images']}", flush=True)
        models = {}
        jobs = [(f"{v}_s{s}", v, s) for v in variants for s in a.pretrain_seeds] + \
               [(f"random{s}", None, s) for s in a.random_seeds]
        for name, var, seed in jobs:
            t0 = time.perf_counter()
            if var is None:
                cfg, spe = config(seed)
                m, train = AFiRe(cfg, device=a.device,
                                 steps_per_epoch=spe), {"steps": 0, "seconds": 0.0}
            else:
                m, train = pretrain(config(seed, **VARIANTS[var])[0], normals, a.steps,
                                    a.device, seed)
            r = evaluate_model(m, pre, ev, val, test, a.adapt_steps, a.batch)
            r["pretrain"] = train
            models[name] = r
            info["models"][name] = {"pretrain": train, "probe": r["probe"],
                                    "anomaly": r["anomaly"], "seconds": r["seconds"],
                                    "wall_s": time.perf_counter() - t0, "load": load_load()}
            best = max((k for k in r["anomaly"] if r["anomaly"][k]["auc"] is not None),
                       key=lambda k: r["anomaly"][k]["auc_val"] or 0)
            print(f"  {name}: pre-train {train['seconds']:.0f} s; probe {r['probe']['pooled_auc']:.3f}"
                  f"; anomaly test AUC eq51 {r['anomaly']['eq51']['auc']:.3f}, token_knn "
                  f"{r['anomaly']['token_knn']['auc']:.3f}, inpaint_ratio_z "
                  f"{r['anomaly']['inpaint_ratio_z']['auc']:.3f} (best on val: {best}); "
                  f"{time.perf_counter() - t0:.0f} s, load {load_load()}", flush=True)
        info["baselines"] = models[jobs[-1][0]]["baselines"]
        last = models[jobs[-1][0]]
        info["test_arrays"] = {
            "abnormal": last["test_abnormal"],
            "baselines": last["baseline_test"],
            "models": {k: m["anomaly_test"] for k, m in models.items()
                       if k.startswith(("full_", "random"))}}
        info["summary"] = summarise(models, variants, a.bootstrap)
        result["datasets"][ds] = info
    # the recommended score: the best validation AUC of the full model, averaged over datasets
    val_auc = {k: [result["datasets"][ds]["summary"]["anomaly"][k]["full"]["auc_val"]["mean"]
                   for ds in a.datasets] for k in ANOMALY_SCORES}
    val_mean = {k: float(np.mean(v)) for k, v in val_auc.items() if None not in v}
    result["selection"] = {
        "rule": "the score with the highest validation AUC of the full model (mean over "
                "pre-training seeds), averaged over the datasets; test AUCs are not used",
        "val_auc": val_auc, "val_auc_mean": val_mean,
        "recommended": max(val_mean, key=val_mean.get) if val_mean else None}
    result["seconds_total"] = time.perf_counter() - t_all
    result["load_end"] = load_load()
    text = json.dumps(json_safe(result), indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(tables(result))
    return 0


# ---------------------------------------------------------------- tables
def _ms(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} (n={s['n']})"


def _ci(c: dict | None) -> str:
    if not c or c.get("value") is None:
        return "-"
    return f"{c['value']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def tables(result: dict) -> str:
    """Markdown tables of a result (also: ``--tables FILE``)."""
    out = []
    for ds, info in result["datasets"].items():
        s = info["summary"]
        out += [f"\n### {ds}: linear probe (pooled out-of-fold AUC, 5 patient-wise folds)\n",
                "| model | probe AUC | fold-mean AUC | minus random [95% CI] | minus full [95% CI] |",
                "|---|---|---|---|---|"]
        for name, r in s["probe"].items():
            out.append(f"| {name} | {_ms(r['pooled_auc'])} | {_ms(r['fold_mean_auc'])} | "
                       f"{_ci(r.get('minus_random'))} | {_ci(r.get('minus_full'))} |")
        out += [f"\n### {ds}: anomaly detection, test AUC (validation AUC)\n",
                "| score | paper? | " + " | ".join(k for k in s["anomaly"]["eq51"]
                                                  if k != "in_paper") + " |",
                "|---|---|" + "---|" * (len(s["anomaly"]["eq51"]) - 1)]
        for score, r in s["anomaly"].items():
            cells = [f"{_ms(v['auc'])} ({v['auc_val']['mean']:.3f})"
                     if v["auc"]["mean"] is not None else "-"
                     for k, v in r.items() if k != "in_paper"]
            out.append(f"| {score} | {'yes' if r['in_paper'] else 'no'} | " + " | ".join(cells)
                       + " |")
        out += ["\n| score | full minus random [95% CI] | full minus blur [95% CI] |",
                "|---|---|---|"]
        for score, r in s["anomaly"].items():
            f = r.get("full", {})
            out.append(f"| {score} | {_ci(f.get('minus_random'))} | {_ci(f.get('minus_blur'))} |")
        out += ["\n| baseline (same test images) | test AUC [95% CI] | validation AUC |",
                "|---|---|---|"]
        for b, r in s["baselines"].items():
            out.append(f"| {b} | {r['auc']:.3f} [{r['ci']['low']:.3f}, {r['ci']['high']:.3f}] | "
                       f"{r['auc_val']:.3f} |")
        if s.get("blur_confound"):
            out += [f"\n### {ds}: is it a blur detector? (full model, test images)\n",
                    "| score | blur-matched AUC | Spearman with blur, normals | abnormals |",
                    "|---|---|---|---|"]
            for k, r in s["blur_confound"].items():
                out.append(f"| {k} | {_ms(r['blur_matched_auc'])} | "
                           f"{_ms(r['spearman_with_blur_normals'], 2)} | "
                           f"{_ms(r['spearman_with_blur_abnormals'], 2)} |")
    sel = result.get("selection")
    if sel:
        out += ["\n### selection of the default score (validation AUC, full model)\n",
                "| score | " + " | ".join(result["datasets"]) + " | mean |",
                "|---|" + "---|" * (len(result["datasets"]) + 1)]
        for k, v in sel["val_auc"].items():
            out.append(f"| {k} | " + " | ".join("-" if x is None else f"{x:.3f}" for x in v)
                       + f" | {sel['val_auc_mean'].get(k, float('nan')):.3f} |")
        out.append(f"\nrecommended: {sel['recommended']}")
    out.append(f"\ntotal {result['seconds_total']:.0f} s; load {result['load_start']} -> "
               f"{result['load_end']}")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--tables":
        print(tables(json.loads(Path(sys.argv[2]).read_text())))
        sys.exit(0)
    sys.exit(main())
