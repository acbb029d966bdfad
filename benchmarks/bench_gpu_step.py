"""Images/s and GPU memory of one full AFiRe training step on the GPU, in both precisions:
Config.precision="fp32" (exact fp32 GEMMs, TF32 off) and "bf16" (the fast path: bf16 GEMM
operands, fp32 accumulation, master weights and optimiser state), and the bf16 speed-up.

One step = SLM, teacher encoder + head, Sinkhorn, prototypes, student encoder + head,
decoder, both losses, backward, clipping, AdamW, EMA (AFiRe(cfg, device="cuda").train_step).
Each step ends with one host synchronisation, so wall-clock time per step is GPU time.
Memory: device memory in use (cudaMemGetInfo through torch when importable, else
nvidia-smi) after the steps minus before the model was built; the trainer allocates
everything at construction, so this is its peak. No PyTorch reference step (not written).

Prints ONE JSON object (and writes it to --out if given).

    python3 benchmarks/bench_gpu_step.py [--presets vit_small,vit_base] [--batch 64]
        [--precisions fp32,bf16] [--steps 5] [--out bench_gpu_step.json]
"""
import argparse
import json
import subprocess
import sys
import time

try:  # torch first: its CUDA libraries are newer than the toolkit's; loaded later they clash
    import torch
except Exception:  # noqa: BLE001 - memory then comes from nvidia-smi
    torch = None

import numpy as np

from afire import AFiRe, Config, cuda  # noqa: E402
from _report import report  # noqa: E402
from chest_images import chest_like  # noqa: E402


def used_bytes():
    if torch is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return total - free
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout.split()[0]
    return int(out) * 1024 * 1024


def bench(preset, precision, batch, steps, warmup):
    cfg = Config.preset_config(preset, batch_size=batch, epochs=100, precision=precision)
    before = used_bytes()
    t0 = time.perf_counter()
    m = AFiRe(cfg, device="cuda", steps_per_epoch=1000)
    build_s = time.perf_counter() - t0
    x = chest_like(batch, cfg.img_size, 0)
    for _ in range(warmup):
        m.train_step(x)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        out = m.train_step(x)
        times.append(time.perf_counter() - t)
    mem = used_bytes() - before
    med = float(np.median(times))
    row = {"preset": preset, "precision": precision, "batch": batch, "steps": steps, "warmup": warmup,
           "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3,
           "images_per_s": batch / med, "gpu_mem_gib": mem / 2**30,
           "build_s": build_s, "last_loss": out["loss"], "finite": bool(np.isfinite(out["loss"]))}
    del m
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="vit_small,vit_base")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    if not cuda.compiled() or cuda.device_count() == 0:
        print(json.dumps({"error": "no CUDA build or no GPU visible"}))
        return 3
    res = {"what": "AFiRe training step on one GPU: fp32 (TF32 off) and bf16",
           "device_count": cuda.device_count(), "versions": cuda.versions(),
           "gpu": (torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available()
                   else None),
           "rows": []}
    for p in a.presets.split(","):
        for prec in a.precisions.split(","):
            try:
                res["rows"].append(bench(p.strip(), prec.strip(), a.batch, a.steps, a.warmup))
            except Exception as e:  # noqa: BLE001 - report and go on with the next one
                res["rows"].append({"preset": p, "precision": prec,
                                    "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(res["rows"][-1]), file=sys.stderr, flush=True)
    # step time fp32 / step time bf16, per preset (same batch, same images)
    ms = {(r["preset"], r["precision"]): r["step_ms_median"] for r in res["rows"] if "error" not in r}
    res["speedup_bf16_over_fp32"] = {p.strip(): ms[(p.strip(), "fp32")] / ms[(p.strip(), "bf16")]
                                     for p in a.presets.split(",")
                                     if (p.strip(), "fp32") in ms and (p.strip(), "bf16") in ms}
    return report(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
