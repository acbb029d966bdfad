"""Where the GPU time of one AFiRe training step goes: the top kernels and their share.

Trains --warmup steps, then profiles --steps steps of AFiRe(preset, batch) on the bf16
reference path (--path bf16) or the fast path (--path fast, AFIRE_CUDA_FAST=1):
  - under Nsight Systems (tests/gpu/run_device_checks.sh runs
      nsys profile --capture-range=cudaProfilerApi ... this script --mark
    then `nsys stats -r cuda_gpu_kern_sum --format csv`): --mark brackets the profiled steps
    with cudaProfilerStart / cudaProfilerStop so the summary holds exactly them, and
    --summarize CSV turns nsys's kernel summary into the JSON below;
  - otherwise with torch.profiler when torch is importable (CUPTI records every kernel of the
    process, afire's included).
JSON: the GPU, path, preset, batch, steps, the kernel time per step, the top kernels (name,
ms per step, share of the kernel time, launches per step) and the share per category (GEMM,
attention, LayerNorm, GELU, softmax, optimiser, copies/other). Kernel time excludes gaps
between kernels, so it can be below the step time (bench_gpu_vs_torch.py).

    python3 benchmarks/profile_gpu_step.py --path fast [--preset vit_base] [--batch 64]
        [--steps 3] [--warmup 3] [--out profile_fast.json]
    python3 benchmarks/profile_gpu_step.py --summarize prof_cuda_gpu_kern_sum.csv --path fast
        --steps 3 --out profile_fast.json
"""
import argparse
import csv
import json
import os
import re
import sys

try:  # torch first: its CUDA libraries must be loaded before afire's backend
    import torch
except Exception:  # noqa: BLE001 - nsys mode needs no torch
    torch = None

import numpy as np  # noqa: E402

CATEGORIES = [  # (category, regular expression on the kernel name), first match wins
    ("attention", r"fmha|flash|sdpa|attn|cudnn|softmax_lse|probs_from_lse"),
    ("gemm", r"gemm|cutlass|xmma|sm90|sm80|cublas|matmul|splitk|nvjet"),
    ("layernorm", r"layernorm|layer_norm"),
    ("gelu", r"gelu"),
    ("softmax", r"softmax"),
    ("optimiser", r"adam|ema|clip|sumsq|norm_kernel|multi_tensor|foreach"),
    ("objective", r"sinkhorn|proto|paper|category|structure|recon|student_probs|token_mean"),
]


def category(name):
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def summary(kernels, steps, meta):
    """kernels: [(name, total_ns, launches)] over `steps` steps -> the JSON dict."""
    total = sum(k[1] for k in kernels) or 1
    top = sorted(kernels, key=lambda k: -k[1])
    cats = {}
    for name, ns, _ in kernels:
        cats[category(name)] = cats.get(category(name), 0) + ns
    out = dict(meta)
    out.update(
        steps=steps, kernel_ms_per_step=total / 1e6 / steps,
        top=[{"name": n[:160], "ms_per_step": ns / 1e6 / steps, "share": ns / total,
              "launches_per_step": c / steps, "category": category(n)} for n, ns, c in top[:25]],
        categories={k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        kernels=len(kernels))
    return out


def from_nsys_csv(path):
    """[(name, total_ns, launches)] from `nsys stats -r cuda_gpu_kern_sum --format csv`."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if any("Total Time" in c for c in r))
    cols = rows[head]
    ti = next(i for i, c in enumerate(cols) if "Total Time" in c)
    ni = next(i for i, c in enumerate(cols) if c.strip() == "Name")
    ci = next(i for i, c in enumerate(cols) if "Instances" in c or c.strip() == "Count")
    out = []
    for r in rows[head + 1:]:
        if len(r) > max(ti, ni, ci) and r[ti].strip():
            out.append((r[ni], float(r[ti]), int(float(r[ci]))))
    return out


def from_torch(prof):
    out = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
            continue
        ns = getattr(e, "self_device_time_total", None)
        if ns is None:
            ns = getattr(e, "self_cuda_time_total", 0)
        if ns > 0:
            out.append((e.key, ns * 1e3, e.count))  # us -> ns
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", choices=("bf16", "fast"), default="fast")
    ap.add_argument("--preset", default="vit_base")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mark", action="store_true",
                    help="bracket the profiled steps with cudaProfilerStart/Stop (for nsys)")
    ap.add_argument("--summarize", metavar="CSV", help="summarise an nsys kernel CSV and exit")
    ap.add_argument("--out")
    a = ap.parse_args()
    meta = {"path": a.path, "preset": a.preset, "batch": a.batch}
    if a.summarize:
        meta["tool"] = "nsys cuda_gpu_kern_sum"
        res = summary(from_nsys_csv(a.summarize), a.steps, meta)
    else:
        if a.path == "fast":
            os.environ["AFIRE_CUDA_FAST"] = "1"
        from afire import AFiRe, Config, cuda
        cfg = Config.preset_config(a.preset, batch_size=a.batch, epochs=100, precision="bf16")
        m = AFiRe(cfg, device="cuda", steps_per_epoch=1)
        os.environ.pop("AFIRE_CUDA_FAST", None)
        m.step = 20
        rng = np.random.default_rng(0)
        x = np.clip(rng.normal(150, 40, (a.batch, cfg.img_size, cfg.img_size)), 0, 255)
        x = x.astype(np.uint8)
        for _ in range(a.warmup):
            m.train_step(x)
        if a.mark:
            import ctypes
            rt = ctypes.CDLL("libcudart.so", mode=ctypes.RTLD_GLOBAL) if torch is None else None
            (torch.cuda.profiler.start if torch is not None else rt.cudaProfilerStart)()
            for _ in range(a.steps):
                m.train_step(x)
            (torch.cuda.profiler.stop if torch is not None else rt.cudaProfilerStop)()
            print(json.dumps({"profiled_steps": a.steps, **meta}))
            return 0
        if torch is None:
            print(json.dumps({"error": "neither nsys (run_device_checks.sh) nor torch: no "
                              "profiler", **meta}))
            return 2
        meta.update(tool="torch.profiler (CUPTI)", gpu=torch.cuda.get_device_name(0))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                m.train_step(x)
            torch.cuda.synchronize()
        res = summary(from_torch(prof), a.steps, meta)
        if a.path == "fast":
            res["fast_path_status"] = cuda.fast_path_status()
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
