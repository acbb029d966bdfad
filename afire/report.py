"""End-of-run report for `afire pretrain`: loss curves, sample restorations, a summary.

Writes into ``RUN/report/``: ``losses.png`` (matplotlib when importable, else drawn with
Pillow), ``samples.png`` (per row: x, x' = x + SLM, the restoration of x' with its abnormal
tokens masked as in training, and the squared error of that restoration against x),
``report.json`` and ``report.md``.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .model import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD

# every file write_report puts in RUN/report (an `--overwrite` removes these and no others)
REPORT_FILES = ("losses.png", "samples.png", "report.json", "report.md")
CURVES = (("loss", ("loss",)), ("consistency", ("l_cst", "l_stru", "l_cate")),
          ("restoration", ("l_recon",)), ("learning rate", ("lr",)))
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def _to_uint8(restored: np.ndarray) -> np.ndarray:
    """Normalised model pixels (B,S,S) or (B,3,S,S) -> uint8 gray (B,S,S)."""
    if restored.ndim == 4:
        m, s = IMAGENET_MEAN[None, :, None, None], IMAGENET_STD[None, :, None, None]
        gray = (restored * s + m).mean(1)
    else:
        gray = restored * GRAY_STD + GRAY_MEAN
    return np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8)


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) / 255 - GRAY_MEAN) / GRAY_STD


def _heat(v: np.ndarray) -> np.ndarray:
    """[0,1] -> RGB uint8 on a black-red-yellow-white ramp."""
    v = np.clip(v, 0, 1)[..., None]
    ramp = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1),
                           np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (ramp * 255 + 0.5).astype(np.uint8)


def sample_grid(model, images: np.ndarray, path: str, step: int | None = None) -> dict:
    """samples.png for up to 8 images; returns the per-image restoration errors."""
    from PIL import Image, ImageDraw

    cfg = model.cfg
    x = np.ascontiguousarray(images[:8])
    xp, _, abn = model.synthetic_lesions(x, model.step if step is None else step)
    rest = model.restore(xp, token_mask=abn)
    if rest.ndim == 4:
        m, s = IMAGENET_MEAN[None, :, None, None], IMAGENET_STD[None, :, None, None]
        err = ((rest - ((x[:, None] / 255.0) - m) / s) ** 2).mean(1)
    else:
        err = (rest - _normalised(x)) ** 2
    scale = max(1, 128 // cfg.img_size)
    S = cfg.img_size * scale
    pad, head, bar_w = 4, 18, 64
    cols = ("x (normal)", "x' = x + SLM", "restored x'", "error vs x")
    W = len(cols) * (S + pad) + pad + bar_w
    H = max(head + len(x) * (S + pad) + pad, head + 140)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        draw.text((pad + c * (S + pad), 4), name, fill=(0, 0, 0))
    emax = max(float(np.percentile(err, 99.5)), 1e-6)
    for r in range(len(x)):
        tiles = [np.repeat(x[r, :, :, None], 3, 2), np.repeat(xp[r, :, :, None], 3, 2),
                 np.repeat(_to_uint8(rest[r:r + 1])[0][:, :, None], 3, 2), _heat(err[r] / emax)]
        for c, t in enumerate(tiles):
            im = Image.fromarray(np.ascontiguousarray(t)).resize((S, S), Image.NEAREST)
            canvas.paste(im, (pad + c * (S + pad), head + r * (S + pad)))
    # colour scale of the error column: squared error in normalised pixel units
    x0, top, bar_h = W - bar_w + 6, head + 10, min(H - head - 30, 200)
    ramp = _heat(np.linspace(1, 0, bar_h)[:, None].repeat(12, 1))
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (x0, top))
    draw.rectangle((x0, top, x0 + 11, top + bar_h - 1), outline=(0, 0, 0))
    draw.text((x0 + 14, top - 4), f"{emax:.2g}", fill=(0, 0, 0))
    draw.text((x0 + 14, top + bar_h - 8), "0", fill=(0, 0, 0))
    draw.text((x0 - 4, top + bar_h + 4), "sq. error", fill=(0, 0, 0))
    canvas.save(path)
    return {"error_scale_max": round(emax, 6), "mse_vs_x": [round(float(e.mean()), 5) for e in err],
            "abnormal_tokens": [int(a.sum()) for a in abn]}


def _plot_matplotlib(rows: list[dict], path: str) -> None:
    # a Figure outside pyplot: pyplot's backend (Jupyter's inline one) stays as it is
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(10, 6.5))
    axes = fig.subplots(2, 2)
    for ax, (title, keys) in zip(axes.flat, CURVES):
        for k in keys:
            ax.plot(steps, [r[k] for r in rows], label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _fmt(v: float) -> str:
    return f"{v:.2e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3f}"


def _plot_pillow(rows: list[dict], path: str) -> None:
    from PIL import Image, ImageDraw

    pw, ph, ml, mb, mt = 460, 280, 64, 28, 22
    canvas = Image.new("RGB", (2 * pw, 2 * ph), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    steps = np.array([r["step"] for r in rows], float)
    for i, (title, keys) in enumerate(CURVES):
        ox, oy = (i % 2) * pw, (i // 2) * ph
        x0, y0, x1, y1 = ox + ml, oy + mt, ox + pw - 12, oy + ph - mb
        series = [np.array([r[k] for r in rows], float) for k in keys]
        allv = np.concatenate(series)
        allv = allv[np.isfinite(allv)]
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        smin, smax = float(steps.min()), float(steps.max())
        sspan = max(smax - smin, 1.0)
        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        draw.text((ox + ml, oy + 4), title, fill=(0, 0, 0))
        for f in (0.0, 0.5, 1.0):
            yy = y1 - f * (y1 - y0)
            draw.line((x0 - 4, yy, x0, yy), fill=(0, 0, 0))
            draw.text((ox + 4, yy - 6), _fmt(lo + f * (hi - lo)), fill=(0, 0, 0))
            xx = x0 + f * (x1 - x0)
            draw.line((xx, y1, xx, y1 + 4), fill=(0, 0, 0))
            draw.text((xx - 12, y1 + 8), f"{smin + f * sspan:.0f}", fill=(0, 0, 0))
        for j, (k, v) in enumerate(zip(keys, series)):
            px = x0 + (steps - smin) / sspan * (x1 - x0)
            py = y1 - (v - lo) / (hi - lo) * (y1 - y0)
            pts = [(float(a), float(b)) for a, b in zip(px, py) if np.isfinite(b)]
            if len(pts) > 1:
                draw.line(pts, fill=COLORS[j], width=2)
            elif pts:
                draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2),
                             fill=COLORS[j])
            if len(keys) > 1:
                draw.text((x1 - 90, y0 + 6 + 12 * j), k, fill=COLORS[j])
    canvas.save(path)


def plot_losses(rows: list[dict], path: str, backend: str | None = None) -> str:
    """Loss curves from log rows; returns the backend used ("matplotlib" or "pillow").

    ``backend=None`` uses matplotlib when it imports, else Pillow."""
    if backend not in (None, "matplotlib", "pillow"):
        raise ValueError(f"backend must be None, 'matplotlib' or 'pillow', got {backend!r}")
    if backend is None:
        try:
            import matplotlib.figure  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "pillow"
    (_plot_matplotlib if backend == "matplotlib" else _plot_pillow)(rows, path)
    return backend


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a positive > a negative), ties counting one half (Mann-Whitney)."""
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def anomaly_check(model, n: int = 16) -> dict:
    """Anomaly log-scores of n held-out normal phantoms vs n with a random lesion."""
    from .data import phantom_dataset

    S, seed = model.cfg.img_size, model.cfg.seed
    first = 1_000_000  # subjects far from any training phantom
    normal = phantom_dataset(n, size=S, seed=seed, first_subject=first)["images"]
    lesion = phantom_dataset(n, size=S, seed=seed, first_subject=first + n,
                             lesion="random")["images"]
    sn, sl = model.anomaly_log_score(normal), model.anomaly_log_score(lesion)
    return {"n": n, "auc": round(_auc(sn, sl), 4),
            "mean_log_score_normal": round(float(sn.mean()), 5),
            "mean_log_score_lesion": round(float(sl.mean()), 5)}


def read_log(path: str) -> list[dict]:
    """The rows of a run's log.jsonl (a torn last line from a crash is ignored)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows


def write_report(out: str, model, summary: dict, sample_images: np.ndarray,
                 anomaly: bool = True) -> dict:
    """Write RUN/report/{losses.png, samples.png, report.json, report.md}; return their paths
    and the numbers."""
    d = os.path.join(out, "report")
    os.makedirs(d, exist_ok=True)
    rows = read_log(os.path.join(out, "log.jsonl"))
    res: dict[str, Any] = {"dir": d}
    if rows:
        res["losses_png"] = os.path.join(d, "losses.png")
        res["plot_backend"] = plot_losses(rows, res["losses_png"])
    if len(sample_images):
        res["samples_png"] = os.path.join(d, "samples.png")
        res["samples"] = sample_grid(model, sample_images, res["samples_png"])
    if anomaly:
        res["anomaly"] = anomaly_check(model)
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    tail = rows[-max(1, len(rows) // 10):]
    keys = ("loss", "l_stru", "l_cate", "l_cst", "l_recon")
    info = {
        "run": {k: summary[k] for k in ("out", "preset", "device", "data", "stopped", "steps",
                                        "total_steps", "images_seen", "seconds_total",
                                        "images_per_s", "checkpoint", "bad_files")},
        "first_logged": {k: first.get(k) for k in ("step",) + keys},
        "final_logged": {k: last.get(k) for k in ("step",) + keys},
        "mean_last_10pct": {k: round(float(np.mean([r[k] for r in tail])), 5) for k in keys}
        if rows else {},
        **{k: v for k, v in res.items() if k not in ("dir",)},
        "config": model.cfg.to_dict(),
    }
    res["json"] = os.path.join(d, "report.json")
    with open(res["json"], "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, default=str)
        f.write("\n")
    res["markdown"] = os.path.join(d, "report.md")
    with open(res["markdown"], "w", encoding="utf-8") as f:
        f.write(_markdown(info))
    return res


def _markdown(info: dict) -> str:
    r = info["run"]
    lines = [f"# afire pretrain report: {r['out']}", "",
             f"- preset `{r['preset']}`, device {r['device']}, data: {r['data']}",
             f"- {r['steps']}/{r['total_steps']} steps ({r['stopped']}), {r['images_seen']} "
             f"images, {r['seconds_total']:.1f} s of training, {r['images_per_s']:.1f} img/s "
             "(last segment)",
             f"- checkpoint `{r['checkpoint']}`"]
    if r["bad_files"]:
        lines.append(f"- skipped data files: {', '.join(sorted(r['bad_files']))}")
    if info["final_logged"].get("step") is not None:
        lines += ["", "| term | first logged | final logged | mean of last 10% |",
                  "|---|---|---|---|"]
        for k in ("loss", "l_stru", "l_cate", "l_cst", "l_recon"):
            lines.append(f"| {k} | {info['first_logged'][k]:.4f} | "
                         f"{info['final_logged'][k]:.4f} | {info['mean_last_10pct'][k]:.4f} |")
    if "anomaly" in info:
        a = info["anomaly"]
        lines += ["", f"Anomaly check on held-out phantoms ({a['n']} normal, {a['n']} with a "
                      f"lesion): AUC {a['auc']:.3f}; mean log(1/A) normal "
                      f"{a['mean_log_score_normal']:.4f}, lesion {a['mean_log_score_lesion']:.4f}."]
    if "losses_png" in info:
        lines += ["", f"![losses](losses.png) (drawn with {info['plot_backend']})"]
    if "samples_png" in info:
        lines += ["", "Columns: x, x' = x + SLM, restoration of x' (abnormal tokens masked), "
                      "squared error against x (colour scale on the right, in normalised pixel "
                      "units; its top is the 99.5th percentile).", "", "![samples](samples.png)"]
    return "\n".join(lines) + "\n"
