"""afire on the CPU vs the same work in PyTorch: the full AFiRe training step and inference.

Every measurement runs in a FRESH process (one contender, one shape, one thread count, one
precision), so peak RSS is that process's own and no allocator or thread pool carries over.
The processes are interleaved: for each shape the contenders run back to back, their order
alternating between repetitions, and the whole grid is repeated `--runs` times, so machine
load drifts hit both alike. Reported per row: the median over runs of each run's median step
time, the spread (min and max of the run medians), images/s from the median, and peak RSS
(ru_maxrss, median over runs; `rss_base_mib` is the same process right after its imports,
before any model exists). Ratios afire / torch use the medians of the same grid.

Contenders (vit_tiny by default; `--preset`):
  train  afire: `AFiRe.train_step` (SLM, teacher, Sinkhorn, prototypes, student + head +
         decoder, paper losses, backward, per-tensor clipping, AdamW, EMA: one C call), at
         step 20 so every tensor is updated. torch: `TorchAFiRe.step` of
         benchmarks/bench_gpu_vs_torch.py (the same step written in idiomatic PyTorch, handed
         x' and the token labels that afire's SLM draws), fp32 or bf16 autocast.
  infer  afire: `AFiRe.encode` (teacher tokens, uint8 in, float32 numpy out) of a model
         made with ``inference=True`` when afire supports it. torch: timm VisionTransformer
         `forward_features` under `torch.inference_mode()`, the same uint8 -> normalised input
         conversion and numpy output, fp32 or bf16 autocast.
Threads: OMP_NUM_THREADS for afire; torch.set_num_threads (and 1 inter-op thread) for torch.
bf16 rows run only where the CPU has bf16 dot products (avx512_bf16 or amx_bf16 in
/proc/cpuinfo); afire's bf16 is `AFiRe(..., precision="bf16")` when it exists.

    python benchmarks/bench_cpu_vs_torch.py [--modes train,infer] [--batches 1,4,8,16,32]
        [--sizes 64,128,224] [--threads 1,2] [--precisions fp32,bf16] [--runs 3]
        [--steps 3] [--warmup 1] [--torch-python /work/venv-torch/bin/python]
        [--out benchmarks/results/cpu_vs_torch.json]
    python benchmarks/bench_cpu_vs_torch.py --table RESULT_JSON   (the Markdown table)

The torch process needs torch (and timm for `infer`) and numpy; it does not import afire
(the driver draws the SLM inputs and hands them over in a temporary .npz).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types

# The environment as the user started the driver: every worker starts from it, NOT from the
# driver's after `import afire` (which sets afire's OpenMP defaults, e.g. GOMP_SPINCOUNT, and
# would hand them to the torch workers too). Each afire worker applies afire's own defaults.
USER_ENV = dict(os.environ)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GRAY_MEAN, GRAY_STD = 0.449, 0.226


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def omp_wait() -> str:
    """This process's OpenMP idle-wait settings (what afire's import set, for afire)."""
    return (f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} "
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')}")


def timed(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


# ---------------------------------------------------------------------------- workers

def worker_afire(a) -> dict:
    sys.path.insert(0, ROOT)
    import numpy as np

    import afire
    from afire import AFiRe, Config
    base = rss_mib()
    cfg = Config.preset_config(a.preset, img_size=a.size, batch_size=a.batch, epochs=100)
    kw = {}
    if a.precision != "fp32":
        kw["precision"] = a.precision
    from chest_images import chest_like
    x = chest_like(a.batch, a.size, 0)
    if a.mode == "train":
        m = AFiRe(cfg, steps_per_epoch=1, **kw)
        m.step = 20  # past warm-up and the last-layer freeze: every tensor is updated
        out = {}

        def fn():
            out.update(m.train_step(x))
        times = timed(fn, a.steps, a.warmup)
        check = float(out["loss"])
    else:
        try:
            m = AFiRe(cfg, inference=True, **kw)
            kind = "inference"
        except TypeError:  # an afire without inference-only models
            m = AFiRe(cfg, **kw)
            kind = "full"
        res = {}

        def fn():
            res["t"] = m.encode(x)
        times = timed(fn, a.steps, a.warmup)
        check = float(np.abs(res["t"]).mean())
    r = {"times": times, "rss_peak_mib": rss_mib(), "rss_base_mib": base, "check": check,
         "afire_version": afire.__version__, "omp_wait": omp_wait()}
    if a.mode == "infer":
        r["afire_model"] = kind
    return r


def _torch_reference():
    """benchmarks/bench_gpu_vs_torch.py's TorchAFiRe without importing afire: its module-level
    `from afire ...` imports get placeholders (only the GPU harness uses them)."""
    for name in ("afire", "afire.model"):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.AFiRe = mod.Config = mod.cuda = mod.synthetic_lesions = None
            sys.modules[name] = mod
    sys.path.insert(0, HERE)
    import bench_gpu_vs_torch as ref
    return ref


def worker_torch(a) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    bf16 = a.precision == "bf16"
    inputs = np.load(a.inputs)
    x = inputs["x"]
    if a.mode == "train":
        ref = _torch_reference()
        base = rss_mib()
        cfg = types.SimpleNamespace(**json.loads(a.cfg))
        torch.manual_seed(0)
        t = ref.TorchAFiRe(cfg, "cpu", bf16=bf16)
        xs = [torch.from_numpy(v) for v in (x, inputs["xp"], inputs["abn"])]
        out = {}

        def fn():
            out["loss"] = t.step(*xs)
        times = timed(fn, a.steps, a.warmup)
        check = float(out["loss"])
    else:
        from timm.models.vision_transformer import VisionTransformer
        base = rss_mib()
        c = json.loads(a.cfg)
        torch.manual_seed(0)
        net = VisionTransformer(img_size=c["img_size"], patch_size=c["patch_size"],
                                in_chans=c["in_chans"], embed_dim=c["embed_dim"],
                                depth=c["depth"], num_heads=c["num_heads"],
                                mlp_ratio=c["mlp_ratio"], qkv_bias=True, num_classes=0).eval()
        xt = torch.from_numpy(x)
        res = {}

        def fn():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                        enabled=bf16):
                img = ((xt.float() / 255.0 - GRAY_MEAN) / GRAY_STD)[:, None]
                res["t"] = net.forward_features(img).float().numpy()
        times = timed(fn, a.steps, a.warmup)
        check = float(np.abs(res["t"]).mean())
    return {"times": times, "rss_peak_mib": rss_mib(), "rss_base_mib": base, "check": check,
            "torch_version": torch.__version__, "omp_wait": omp_wait()}


# ---------------------------------------------------------------------------- driver

def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), [])
        info["isa"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    return info


def has_bf16(info) -> bool:
    return any(f in info.get("isa", []) for f in ("avx512_bf16", "amx_bf16"))


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_worker(python, args, threads, timeout):
    env = dict(USER_ENV, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    t0 = time.time()
    p = subprocess.run([python, os.path.abspath(__file__), "--worker"] + args, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"],
                "wall_s": time.time() - t0}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["wall_s"] = time.time() - t0
    return r


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def summarise(case, runs):
    ok = [r for r in runs if "error" not in r]
    row = dict(case)
    if not ok:
        row["error"] = runs[-1].get("error") if runs else "not run"
        return row
    meds = [median(r["times"]) for r in ok]
    m = median(meds)
    row.update(runs=len(ok), step_s_median=m, step_s_min=min(meds), step_s_max=max(meds),
               images_per_s=case["batch"] / m,
               images_per_s_range=[case["batch"] / max(meds), case["batch"] / min(meds)],
               rss_peak_mib=median([r["rss_peak_mib"] for r in ok]),
               rss_base_mib=median([r["rss_base_mib"] for r in ok]),
               check=ok[-1]["check"], loadavg=[r.get("loadavg") for r in ok])
    for k in ("afire_model", "omp_wait"):
        if k in ok[-1]:
            row[k] = ok[-1][k]
    return row


def markdown(res) -> str:
    """The rows of a result file as a Markdown table: per shape, afire vs torch."""
    rows = {}
    for r in res["rows"]:
        key = (r["mode"], r["size"], r["batch"], r["threads"], r["precision"])
        rows.setdefault(key, {})[r["contender"]] = r
    out = ["| mode | px | batch | thr | prec | afire img/s [range] | torch img/s [range] | "
           "speed afire/torch [range] | afire RSS MiB (-base) | torch RSS MiB (-base) | "
           "RSS ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = {(r["mode"], r["size"], r["batch"], r["threads"], r["precision"]): r
              for r in res["ratios"]}
    for key in sorted(rows, key=lambda k: (k[0] != "train", -k[1], k[4], k[3], k[2])):
        a, t = rows[key].get("afire", {}), rows[key].get("torch", {})

        def ips(r):
            if "images_per_s" not in r:
                return "error"
            lo, hi = r["images_per_s_range"]
            return f"{r['images_per_s']:.2f} [{lo:.2f}-{hi:.2f}]"
        q = ratios.get(key)
        sp = (f"{q['speed_afire_over_torch']:.2f} [{q['speed_range'][0]:.2f}-"
              f"{q['speed_range'][1]:.2f}]" if q else "-")
        rss = f"{q['rss_afire_over_torch']:.2f}" if q else "-"

        def mem(r):
            if "rss_peak_mib" not in r:
                return "-"
            return f"{r['rss_peak_mib']:.0f} ({r['rss_peak_mib'] - r['rss_base_mib']:.0f})"
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {ips(a)} | "
                   f"{ips(t)} | {sp} | {mem(a)} | {mem(t)} | {rss} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--contender", choices=("afire", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("train", "infer"), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="vit_tiny")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--infer-batches", default="32", help="batches of the infer rows")
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--torch-python", default=os.environ.get("AFIRE_TORCH_PYTHON",
                                                             "/work/venv-torch/bin/python"))
    ap.add_argument("--afire-python", default=sys.executable)
    ap.add_argument("--out")
    ap.add_argument("--table", metavar="RESULT_JSON",
                    help="print the Markdown table of a result file and exit")
    a = ap.parse_args(argv)
    if a.table:
        with open(a.table) as f:
            print(markdown(json.load(f)))
        return 0
    if a.worker:
        a.threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        r = (worker_afire if a.contender == "afire" else worker_torch)(a)
        r["loadavg"] = loadavg()
        print(json.dumps(r))
        return 0

    import numpy as np
    sys.path.insert(0, ROOT)
    from afire import Config
    from afire.model import synthetic_lesions

    info = cpu_info()
    precisions = [p for p in a.precisions.split(",") if p == "fp32" or has_bf16(info)]
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    cases = []
    for mode in a.modes.split(","):
        batches = ints(a.batches if mode == "train" else a.infer_batches)
        for size, batch, threads, prec in itertools.product(ints(a.sizes), batches,
                                                             ints(a.threads), precisions):
            cases.append(dict(mode=mode, size=size, batch=batch, threads=threads,
                              precision=prec))
    from chest_images import chest_like
    tmp = tempfile.mkdtemp(prefix="afire_bench_")
    inputs = {}
    for c in cases:
        key = (c["size"], c["batch"])
        if key in inputs:
            continue
        cfg = Config.preset_config(a.preset, img_size=c["size"], batch_size=c["batch"],
                                   epochs=100)
        x = chest_like(c["batch"], c["size"], 0)
        xp, _, abn = synthetic_lesions(cfg, x, step=20)  # what afire's step 20 trains on
        path = os.path.join(tmp, f"in_{c['size']}_{c['batch']}.npz")
        np.savez(path, x=x, xp=xp, abn=abn)
        d = cfg.to_dict()
        d["lr"] = cfg.lr
        inputs[key] = (path, json.dumps(d))
    results = {(i, who): [] for i in range(len(cases)) for who in ("afire", "torch")}
    started = time.time()
    for rep in range(a.runs):
        for i, c in enumerate(cases):
            order = ("afire", "torch") if (rep + i) % 2 == 0 else ("torch", "afire")
            path, cfgjson = inputs[(c["size"], c["batch"])]
            for who in order:
                args = ["--contender", who, "--mode", c["mode"], "--size", str(c["size"]),
                        "--batch", str(c["batch"]), "--precision", c["precision"],
                        "--preset", a.preset, "--steps", str(a.steps), "--warmup",
                        str(a.warmup), "--inputs", path, "--cfg", cfgjson]
                py = a.afire_python if who == "afire" else a.torch_python
                try:
                    r = run_worker(py, args, c["threads"], a.timeout)
                except subprocess.TimeoutExpired:
                    r = {"error": f"timeout after {a.timeout} s"}
                results[(i, who)].append(r)
                t = median(r["times"]) if "times" in r else float("nan")
                print(f"[{time.time() - started:7.0f}s] run {rep + 1}/{a.runs} {who:5s} "
                      f"{c['mode']} S={c['size']} B={c['batch']} thr={c['threads']} "
                      f"{c['precision']}: {t * 1e3:.1f} ms/step, "
                      f"{r.get('rss_peak_mib', float('nan')):.0f} MiB"
                      f"{' ' + str(r['error']) if 'error' in r else ''}",
                      file=sys.stderr, flush=True)
    rows, ratios = [], []
    for i, c in enumerate(cases):
        pair = {}
        for who in ("afire", "torch"):
            row = summarise(dict(c, contender=who), results[(i, who)])
            rows.append(row)
            pair[who] = row
        if "error" not in pair["afire"] and "error" not in pair["torch"]:
            fa, ft = pair["afire"], pair["torch"]
            ratios.append(dict(c, speed_afire_over_torch=ft["step_s_median"] / fa["step_s_median"],
                               speed_range=[ft["step_s_min"] / fa["step_s_max"],
                                            ft["step_s_max"] / fa["step_s_min"]],
                               rss_afire_over_torch=fa["rss_peak_mib"] / ft["rss_peak_mib"]))
    res = {"what": "afire vs PyTorch on the CPU: full AFiRe training step and inference "
                   "(encode vs timm forward_features), fresh process per measurement, "
                   "interleaved, repeated",
           "preset": a.preset, "cpu": info, "runs": a.runs, "steps": a.steps,
           "warmup": a.warmup, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "loadavg_end": loadavg(), "wall_s": time.time() - started,
           "rows": rows, "ratios": ratios}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
