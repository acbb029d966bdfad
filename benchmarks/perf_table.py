"""Markdown tables for docs/PERFORMANCE.md from a device-check run's JSON files:
bench_gpu_vs_torch.py's rows (images/s, MFU, memory, first loss) and ratios, and the kernel
profiles of profile_gpu_step.py (top kernels, shares per category).

    python3 benchmarks/perf_table.py DIR     (DIR: the run's $OUT, e.g. /tmp/afire_device_checks)
"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def bench_table(b):
    v = b.get("versions", {})
    lines = [f"{b.get('gpu')}, {b.get('date')}; torch {v.get('torch')} (CUDA {v.get('torch_cuda')}, "
             f"cuDNN {v.get('torch_cudnn')}); afire {v.get('afire_commit')} linked "
             f"{v.get('afire_linked')}", "",
             "| preset | batch | impl | step ms (median) | img/s | TFLOP/s | MFU | GPU mem GiB | "
             "first loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in b.get("rows", []):
        if "impl" not in r:
            lines.append(f"| {r.get('preset')} | {r.get('batch')} | error | {r.get('error')} "
                         "| | | | | |")
            continue
        mem = r.get("gpu_mem_gib")
        peak = r.get("torch_peak_allocated_gib")
        mem_s = fmt(mem, ".2f") + (f" (peak alloc {peak:.2f})" if peak is not None else "")
        lines.append(f"| {r['preset']} | {r['batch']} | {r['impl']} | {r['step_ms_median']:.1f} "
                     f"| {r['images_per_s']:.0f} | {r['tflops_per_s']:.0f} | "
                     f"{fmt(r.get('mfu'), '.1%')} | {mem_s} | {r['first_loss']:.4f} |")
    lines += ["", "| preset@batch | afire / torch | img/s ratio | memory ratio (vs torch peak "
              "allocated) | first-loss gap |", "|---|---|---|---|---|"]
    for key, rs in b.get("ratios", {}).items():
        for pair, r in rs.items():
            lines.append(f"| {key} | {pair} | {r['images_per_s']:.2f} | {fmt(r['gpu_mem'], '.2f')} "
                         f"({fmt(r.get('gpu_mem_vs_torch_peak_allocated'), '.2f')}) | "
                         f"{r['first_loss_rel_gap']:.1e} |")
    return "\n".join(lines)


def profile_table(p):
    lines = [f"{p.get('path')} path, {p.get('preset')} B={p.get('batch')}, {p.get('tool')}: "
             f"{p.get('kernel_ms_per_step', 0):.1f} ms of kernels per step, "
             f"{p.get('kernels')} distinct kernels", "",
             "| category | share |", "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in p.get("categories", {}).items()]
    lines += ["", "| kernel | ms/step | share | launches/step |", "|---|---|---|---|"]
    for k in p.get("top", [])[:12]:
        name = k["name"].replace("|", "/")[:90]
        lines.append(f"| `{name}` | {k['ms_per_step']:.2f} | {k['share']:.1%} | "
                     f"{k['launches_per_step']:.0f} |")
    return "\n".join(lines)


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/afire_device_checks"
    out = []
    b = load(os.path.join(d, "bench_gpu_vs_torch.json"))
    if b:
        out += ["## Step: afire vs PyTorch", "", bench_table(b), ""]
    for path in ("bf16", "fast"):
        p = load(os.path.join(d, f"profile_{path}.json"))
        if p and "top" in p:
            out += [f"## Profile: {path}", "", profile_table(p), ""]
    text = "\n".join(out) or "no results found in " + d
    print(text)
    return 0 if out else 1


if __name__ == "__main__":
    sys.exit(main())
