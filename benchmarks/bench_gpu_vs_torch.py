"""One AFiRe training step: afire's CUDA trainer vs the same step in PyTorch, in ONE process.

Rows, per preset and batch (--presets, --batch, --extra):
  afire_bf16         Config.precision="bf16", the bf16 reference path (the default today)
  afire_bf16_fast    the same with AFIRE_CUDA_FAST=1: the fast bf16 path (cuda/fast.cuh)
  torch_bf16_eager   the PyTorch step (torch_afire.py) under bf16 autocast, SDPA attention
  torch_bf16_compile the same with torch.compile (teacher forward; student forward + losses,
                     whose backward AOTAutograd compiles) for the presets in --compile
  afire_fp32, torch_fp32 with --fp32 (TF32 off on both sides)
Same work on both sides: the reference starts from afire's initial weights (a CPU AFiRe of the
same config and seed), trains on afire's synthetic lesions of the first timed step, uses
afire's schedule values of that step (lr, weight decay, EMA momentum, teacher temperature) and
afire's AdamW decay groups, and computes the paper objective as objective.c does. On the CPU
in fp32 its first-step losses and gradients equal afire's (check_cpu below, and
tests/test_torch_reference.py); each row's first_loss is the loss of its first step (before any
update, same weights and inputs everywhere) so the GPU rows can be compared too. afire runs at
step 20 of 100 epochs of one step each (past warm-up and the last-layer freeze).

Timing: every step is synchronous (afire's ends with its one host synchronisation, torch's with
loss.item()). Each timed step is bracketed by CUDA events recorded on an idle device
(torch.cuda.synchronize() before the first), so step_ms is the GPU-clock time of the whole
step as a user sees it; the median over --steps timed steps after --warmup untimed ones.
images_per_s = batch / median. compile_s: the warm-up time of a compiled row.

MFU = flops_per_image * images_per_s / the GPU's dense bf16 peak (H100 SXM, H200: 989.4
TFLOP/s; H100 PCIe 756.5; H100 NVL 835.5; other GPUs: MFU not reported). flops_per_image
counts the model FLOPs of one step for one image (2 per multiply-add, no recomputation):
  linear [N,IC] -> [N,OC]: forward 2 N IC OC; backward 4 N IC OC (dinp and dweight), the patch
  embedding 2 N IC OC (no dinp); attention per block: forward 4 T^2 W (Q K^T and P V),
  backward 8 T^2 W; the weight-normalised last layer(s) as linears (K x Bn per position);
  teacher = encoder + head forward; student = encoder + head + decoder forward and backward;
  elementwise work, normalisations, the objective and the optimiser are not counted.
  vit_base at 224 px: 175.5 GFLOP per image; vit_small 43.6.
Memory: gpu_mem_gib = device memory in use after the steps minus before the model was built
(cudaMemGetInfo; afire allocates at construction and in its first step and frees nothing while
it lives, so this is its peak; torch's includes its caching allocator's reserve); torch rows
add torch_peak_allocated_gib (torch.cuda.max_memory_allocated).

The JSON (also written after every row, so a time-out keeps what finished) has the GPU name,
the library versions, afire's fast-path status (what cuBLASLt / cuDNN did), the rows and the
ratios afire / torch per preset. Import torch BEFORE afire's CUDA backend.

    python3 benchmarks/bench_gpu_vs_torch.py [--presets vit_base,vit_small] [--batch 64]
        [--extra vit_base:128] [--steps 10] [--warmup 3] [--compile vit_base] [--fp32]
        [--afire bf16,fast] [--out bench_gpu_vs_torch.json]
    python3 benchmarks/bench_gpu_vs_torch.py --device cpu
        (no GPU: the CPU check and a CPU smoke run of the PyTorch step on the test preset)
"""
import argparse
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import time

import torch  # first: torch's CUDA libraries must be loaded before afire's backend

import numpy as np  # noqa: E402

from afire import AFiRe, Config, cuda  # noqa: E402
from afire.model import synthetic_lesions  # noqa: E402
from _report import report  # noqa: E402
from torch_afire import TorchAFiRe, chest_like, check_against_afire, schedule_of  # noqa: E402

START_STEP = 20
PEAK_BF16 = [("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.5e12),
             ("H100", 989.4e12)]  # dense bf16 tensor-core peaks; first match wins


def flops_per_image(c):
    """Model FLOPs of one AFiRe step per image (see the module docstring)."""
    L = (c.img_size // c.patch_size) ** 2
    T, Q, R = L + 1, c.patch_size ** 2 * c.in_chans, c.mlp_ratio
    D, Dd, Hh, Bn, K = c.embed_dim, c.decoder_dim, c.head_hidden, c.head_bottleneck, \
        c.num_prototypes

    def stack(W, NL):
        return NL * (T * 2 * (3 * W * W + W * W + 2 * R * W * W) + 4 * T * T * W)

    patch = 2 * L * Q * D
    enc = stack(D, c.depth) + patch
    head = L * 2 * (D * Hh + Hh * Hh + Hh * Bn + Bn * K)
    dec = stack(Dd, c.decoder_depth) + T * 2 * (D * Dd + Dd * Q)
    student = enc + head + dec
    return float((enc + head) + student + (2 * student - patch))


def peak_flops(name):
    for key, peak in PEAK_BF16:
        if key in (name or ""):
            return peak
    return None


def used_bytes():
    free, total = torch.cuda.mem_get_info()
    return total - free


def timed(fn, steps, warmup):
    """(first output, warm-up seconds, per-step seconds of the timed steps)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first = fn()
    for _ in range(warmup - 1):
        fn()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return first, warm_s, times


def row(impl, preset, batch, cfg, times, first_loss, mem, peak, extra=None):
    med = float(np.median(times))
    ips = batch / med
    fl = flops_per_image(cfg)
    r = {"impl": impl, "preset": preset, "batch": batch, "steps": len(times),
         "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3,
         "images_per_s": ips, "tflops_per_s": fl * ips / 1e12,
         "mfu": fl * ips / peak if peak else None,
         "gpu_mem_gib": mem / 2**30 if mem is not None else None,
         "first_loss": first_loss, "finite": bool(math.isfinite(first_loss))}
    r.update(extra or {})
    return r


def afire_config(preset, batch, precision):
    return Config.preset_config(preset, batch_size=batch, epochs=100, precision=precision)


def bench_afire(preset, batch, path, x, steps, warmup, peak):
    """path: fp32 | bf16 | fast. Returns (row, the first step's stats)."""
    precision = "fp32" if path == "fp32" else "bf16"
    cfg = afire_config(preset, batch, precision)
    gc.collect()
    torch.cuda.empty_cache()
    before = used_bytes()
    if path == "fast":
        os.environ["AFIRE_CUDA_FAST"] = "1"
    try:
        m = AFiRe(cfg, device="cuda", steps_per_epoch=1)
    finally:
        os.environ.pop("AFIRE_CUDA_FAST", None)
    m.step = START_STEP
    first, warm_s, times = timed(lambda: m.train_step(x), steps, warmup)
    mem = used_bytes() - before
    name = {"fp32": "afire_fp32", "bf16": "afire_bf16", "fast": "afire_bf16_fast"}[path]
    extra = {"warmup_s": warm_s}
    if path == "fast":
        extra["fast_path_status"] = cuda.fast_path_status()
    m = None  # free the trainer (and its device memory) before the next row
    return row(name, preset, batch, cfg, times, first["loss"], mem, peak, extra), first


def bench_torch(preset, batch, bf16, compile_, inputs, schedule, steps, warmup, peak, init):
    cfg = Config.preset_config(preset, batch_size=batch, epochs=100)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = used_bytes()
    torch.manual_seed(0)
    t = TorchAFiRe.from_afire(init, "cuda", bf16=bf16, compile_=compile_, schedule=schedule)
    xs = [torch.from_numpy(a).pin_memory() for a in inputs]
    first, warm_s, times = timed(lambda: t.step(*xs), steps, warmup)
    mem = used_bytes() - before
    name = "torch_fp32" if not bf16 else "torch_bf16_compile" if compile_ else "torch_bf16_eager"
    extra = {"torch_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
             "compiled": compile_, ("compile_s" if compile_ else "warmup_s"): warm_s}
    t = None
    return row(name, preset, batch, cfg, times, first, mem, peak, extra)


def versions():
    v = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "torch_cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
         else None, "python": sys.version.split()[0], "numpy": np.__version__}
    if cuda.compiled() and cuda.device_count() > 0:
        v["afire_linked"] = cuda.versions()
    try:
        v["afire_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                                           capture_output=True, check=True,
                                           cwd=os.path.dirname(os.path.abspath(__file__))
                                           ).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        v["afire_commit"] = None
    return v


def ratios(rows):
    """afire rows / torch rows of one (preset, batch): images/s, memory, first-loss gap."""
    out = {}
    for a in [r for r in rows if r["impl"].startswith("afire_")]:
        for t in [r for r in rows if r["impl"].startswith("torch_")]:
            out[f"{a['impl']}/{t['impl']}"] = {
                "images_per_s": a["images_per_s"] / t["images_per_s"],
                "gpu_mem": (a["gpu_mem_gib"] / t["gpu_mem_gib"]
                            if a["gpu_mem_gib"] and t["gpu_mem_gib"] else None),
                "gpu_mem_vs_torch_peak_allocated": (
                    a["gpu_mem_gib"] / t["torch_peak_allocated_gib"]
                    if a["gpu_mem_gib"] and t.get("torch_peak_allocated_gib") else None),
                "first_loss_rel_gap": abs(a["first_loss"] - t["first_loss"])
                / max(abs(t["first_loss"]), 1e-12)}
    return out


def cpu_smoke(res, steps):
    """No GPU: the PyTorch step on the CPU (test preset, fp32) from afire's weights."""
    cfg = Config.preset_config("test", batch_size=4, epochs=100)
    init = AFiRe(cfg, device="cpu", steps_per_epoch=1)
    init.step = START_STEP
    x = chest_like(4, cfg.img_size, 0)
    xp, _, abn = synthetic_lesions(cfg, x, step=START_STEP)
    first = init._t.gradients(x)
    t = TorchAFiRe.from_afire(init, "cpu", schedule=schedule_of(first))
    losses = [t.step(*(torch.from_numpy(a) for a in (x, xp, abn))) for _ in range(steps)]
    res["rows"].append({"impl": "torch_fp32_cpu", "preset": "test", "batch": 4,
                        "losses": losses, "afire_first_loss": first["loss"]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="vit_base,vit_small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--extra", default="vit_base:128",
                    help="more preset:batch pairs, comma separated ('' for none)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", default="vit_base",
                    help="presets that also get a torch.compile row at --batch ('' for none)")
    ap.add_argument("--afire", default="bf16,fast", help="afire rows: fp32, bf16, fast")
    ap.add_argument("--fp32", action="store_true", help="add the fp32 rows (TF32 off)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out")
    a = ap.parse_args()
    res = {"what": "AFiRe training step (paper objective): afire CUDA vs the same step in "
                   "PyTorch from afire's weights, one process",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": a.device, "versions": versions(), "start_step": START_STEP,
           "rows": [], "ratios": {}}
    try:
        res["check_cpu"] = check_against_afire()
    except AssertionError as e:
        res["check_cpu"] = {"error": f"the reference differs from afire on the CPU: {e}"}
    if a.device == "cpu":
        cpu_smoke(res, 2)
        return report(res, a.out)
    if not torch.cuda.is_available():
        res["error"] = "torch sees no CUDA GPU"
        report(res, a.out)
        return 3
    # exact fp32 on both sides where fp32 is measured (afire's context keeps TF32 off)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    res.update(gpu=name, peak_bf16_flops=peak)
    afire_gpu = cuda.compiled() and cuda.device_count() > 0
    if not afire_gpu:
        res["afire_skipped"] = "afire has no CUDA backend or sees no GPU"
    paths = [p.strip() for p in a.afire.split(",") if p.strip()]
    if a.fp32 and "fp32" not in paths:
        paths.insert(0, "fp32")
    compile_set = {p.strip() for p in a.compile.split(",") if p.strip()}
    jobs = [(p.strip(), a.batch) for p in a.presets.split(",") if p.strip()]
    jobs += [(e.split(":")[0], int(e.split(":")[1])) for e in a.extra.split(",") if e.strip()]
    for preset, batch in jobs:
        cfg = Config.preset_config(preset, batch_size=batch, epochs=100)
        res["flops_per_image"] = res.get("flops_per_image", {})
        res["flops_per_image"][preset] = flops_per_image(cfg)
        x = chest_like(batch, cfg.img_size, 0)
        xp, _, abn = synthetic_lesions(cfg, x, step=START_STEP)
        init = AFiRe(Config.preset_config(preset, batch_size=1, epochs=100), device="cpu",
                     steps_per_epoch=1)  # afire's initial weights (they do not depend on B)
        schedule = None
        rows = []

        def run(job):
            try:
                r = job()
            except Exception as e:  # noqa: BLE001 - report and go on (OOM at B=128, say)
                r = {"preset": preset, "batch": batch, "error": f"{type(e).__name__}: {e}"}
                gc.collect()
                torch.cuda.empty_cache()
            res["rows"].append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            if "impl" in r:
                rows.append(r)
            if a.out:  # keep what finished if a later row times out
                with open(a.out, "w") as f:
                    f.write(json.dumps(res, indent=1) + "\n")
            return r

        for path in (paths if afire_gpu else []):
            out = []
            run(lambda p=path: out.append(bench_afire(preset, batch, p, x, a.steps, a.warmup,
                                                      peak)) or out[-1][0])
            if out and schedule is None:
                schedule = schedule_of(out[-1][1])  # the schedule of afire's first timed step
        variants = ([(False, False)] if a.fp32 else []) + [(True, False)]
        if preset in compile_set and batch == a.batch:
            variants.append((True, True))
        for bf16, comp in variants:
            run(lambda b=bf16, c=comp: bench_torch(preset, batch, b, c, (x, xp, abn), schedule,
                                                   a.steps, a.warmup, peak, init))
        res["ratios"][f"{preset}@{batch}"] = ratios(rows)
        res.setdefault("schedule", {})[f"{preset}@{batch}"] = schedule or "config constants"
        init = None
    return report(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
