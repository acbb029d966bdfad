"""GPU time per op on ViT-B/16 shapes (B=64, T=197, D=768, H=12): afire's CUDA kernels next to PyTorch on the same GPU.

Prints ONE JSON object (and writes it to --out if given). Ours are timed in C with CUDA
events on device-resident buffers (afire.cuda.time_linear / time_attention); PyTorch
with torch.cuda.Event around the same number of calls. ratio = ours / torch (lower is
better for us). fp32 rows run with TF32 off on both sides; the tf32 rows allow it on both.

    python3 benchmarks/bench_gpu_ops.py [--batch 64] [--iters 20] [--out bench_gpu.json]
"""
import argparse
import json
import sys

try:  # torch first: its CUDA libraries are newer than the toolkit's; loaded later they clash
    import torch  # noqa: F401
except Exception:  # noqa: BLE001 - the benchmark reports "no torch" below
    pass


from afire import cuda  # noqa: E402
from _report import report  # noqa: E402



def linears(D):
    """(C, OC) of the four linear layers of a ViT block of width D (MLP ratio 4)."""
    return {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, 4 * D), "fc2": (4 * D, D)}


def torch_or_none():
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "no torch"
        return None, f"torch not importable: {e}"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device"
    return torch, None


def torch_time(torch, fn, warmup, iters):
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / iters


def torch_linear(torch, N, C, OC, warmup, iters):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(N, C, device="cuda", generator=g, requires_grad=True)
    w = torch.rand(OC, C, device="cuda", generator=g, requires_grad=True)
    b = torch.rand(OC, device="cuda", generator=g, requires_grad=True)
    dout = torch.rand(N, OC, device="cuda", generator=g)
    fwd = torch_time(torch, lambda: torch.nn.functional.linear(x, w, b), warmup, iters)
    out = torch.nn.functional.linear(x, w, b)
    bwd = torch_time(torch, lambda: torch.autograd.grad(out, (x, w, b), dout, retain_graph=True),
                     warmup, iters)
    return {"forward_ms": fwd, "backward_ms": bwd}


def torch_attention(torch, B, T, D, H, warmup, iters):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.rand(B, T, 3 * D, device="cuda", generator=g, requires_grad=True)
    dout = torch.rand(B, T, D, device="cuda", generator=g)

    def forward():  # timm's layout: qkv[B,T,3,H,hd] -> q, k, v [B,H,T,hd]
        q, k, v = qkv.reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(B, T, D)

    fwd = torch_time(torch, forward, warmup, iters)
    out = forward()
    bwd = torch_time(torch, lambda: torch.autograd.grad(out, (qkv,), dout, retain_graph=True),
                     warmup, iters)
    return {"forward_ms": fwd, "backward_ms": bwd}


def ratios(ours, ref):
    return {k.replace("_ms", "_ratio"): ours[k] / ref[k] for k in ("forward_ms", "backward_ms")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not cuda.compiled() or cuda.device_count() == 0:
        print(json.dumps({"error": "no CUDA build or no GPU visible",
                          "compiled": cuda.compiled(), "device_count": cuda.device_count()}))
        return 2
    B, T, D, H = a.batch, a.tokens, a.width, a.heads
    N = B * T
    torch, why = torch_or_none()
    res = {"shapes": {"B": B, "T": T, "D": D, "H": H, "N": N}, "iters": a.iters,
           "versions": cuda.versions(), "timing": "mean GPU ms per call, CUDA events",
           "linear": {}, "attention": {}}
    if torch is None:
        res["torch"] = why
    else:
        res["torch"] = torch.__version__
        res["device"] = torch.cuda.get_device_name(0)
    for mode in ("fp32", "tf32"):
        tf32 = mode == "tf32"
        if torch is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        for name, (C, OC) in linears(D).items():
            row = {"C": C, "OC": OC,
                   "afire": cuda.time_linear(N, C, OC, warmup=a.warmup, iters=a.iters, tf32=tf32)}
            if torch is not None:
                row["torch"] = torch_linear(torch, N, C, OC, a.warmup, a.iters)
                row.update(ratios(row["afire"], row["torch"]))
            res["linear"][f"{name}_{mode}"] = row
        row = {"afire": cuda.time_attention(B, T, D, H, warmup=a.warmup, iters=a.iters, tf32=tf32)}
        if torch is not None:
            row["torch"] = torch_attention(torch, B, T, D, H, a.warmup, a.iters)
            row.update(ratios(row["afire"], row["torch"]))
        res["attention"][mode] = row
    return report(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
