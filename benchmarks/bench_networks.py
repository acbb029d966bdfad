"""Encoder forward+backward throughput (images/s) of afire's CPU networks, next to PyTorch.

    python3 benchmarks/bench_networks.py [--threads N] [--out result.json]

For each preset (test at S=32, vit_tiny at S=224) it times encoder_forward + encoder_backward
on a small batch and, when torch and timm are importable, the same ViT in PyTorch (timm
VisionTransformer, fp32, forward_features + backward) with torch.set_num_threads(N) equal to
our OpenMP/OpenBLAS thread count. Prints one JSON document. Sized to finish in well under two
minutes on 2 cores. The head uses one shared last layer here only to keep the memory small;
the encoder, which is what is timed, is unaffected.

OMP_WAIT_POLICY defaults to "passive" here (recorded in the JSON): with GCC's default active
spin-wait, idle OpenMP threads compete with OpenBLAS's threads for the cores and a 2-core run
was measured 3-6x slower than with passive waiting.
"""
import argparse
import json
import os
import sys
import time

CASES = [  # preset, batch, timed iterations
    ("test", 16, 10),
    ("vit_tiny", 2, 3),
]


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    return ap.parse_args()


def timed(step, iters):
    step()  # warm-up: first-touch of the activation memory, BLAS thread start
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


def bench_afire(model, preset, B, iters):
    import numpy as np
    n = model.Networks(preset, shared_last_layer=True)
    cfg = n.config
    r = np.random.default_rng(0)
    img = r.standard_normal((B, cfg["in_chans"], cfg["image_size"], cfg["image_size"]),
                            dtype=np.float32)
    dtok = r.standard_normal((B, cfg["num_tokens"], cfg["embed_dim"]), dtype=np.float32)

    def step():
        n.encoder_forward(img)
        n.encoder_backward(dtok)

    return cfg, timed(step, iters)


def bench_torch(cfg, B, iters, threads):
    import torch
    from timm.models.vision_transformer import VisionTransformer
    torch.set_num_threads(threads)
    net = VisionTransformer(img_size=cfg["image_size"], patch_size=cfg["patch_size"],
                            in_chans=cfg["in_chans"], embed_dim=cfg["embed_dim"],
                            depth=cfg["depth"], num_heads=cfg["num_heads"],
                            mlp_ratio=cfg["mlp_ratio"], qkv_bias=True, num_classes=0)
    x = torch.randn(B, cfg["in_chans"], cfg["image_size"], cfg["image_size"])
    dtok = torch.randn(B, cfg["num_tokens"], cfg["embed_dim"])

    def step():
        net.zero_grad(set_to_none=False)
        net.forward_features(x).backward(dtok)

    return timed(step, iters)


def main():
    args = parse()
    # thread counts must be fixed before OpenMP / OpenBLAS start
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import afire  # noqa: F401
    from afire._C import model

    torch_ok = False
    if not args.no_torch:
        try:
            import timm  # noqa: F401
            import torch  # noqa: F401
            torch_ok = True
        except ImportError:
            pass
    results = []
    for preset, B, iters in CASES:
        cfg, sec = bench_afire(model, preset, B, iters)
        row = {"preset": preset, "image_size": cfg["image_size"], "batch": B, "iters": iters,
               "afire_s_per_step": sec, "afire_images_per_s": B / sec}
        if torch_ok:
            tsec = bench_torch(cfg, B, iters, args.threads)
            row.update(torch_s_per_step=tsec, torch_images_per_s=B / tsec,
                       afire_over_torch=(B / sec) / (B / tsec))
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    doc = {"benchmark": "encoder forward+backward, CPU fp32", "threads": args.threads,
           "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "torch": torch_ok,
           "results": results}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
