"""Step time of data-parallel pre-training on N GPUs (weak scaling: a fixed batch per GPU).

Run it as every rank of a job (torchrun, mpirun, or N processes with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, as tests/gpu/run_dist_checks.sh does), or as one
process for the one-GPU baseline. Each rank trains `preset` at `--batch` images per GPU
(global batch = batch x ranks) in Config.precision bf16, times `--steps` steps after
`--warmup`, and rank 0 prints ONE JSON object (and writes --out): the median step time,
images/s of the whole job, and the gradient all-reduce volume per step. AFIRE_NCCL_OVERLAP=0
times the path without the backward/all-reduce overlap. Efficiency on N GPUs =
step time on 1 GPU / step time on N GPUs (the same per-GPU work).

    python3 benchmarks/bench_gpu_dist.py [--preset vit_base] [--batch 64] [--steps 10]
        [--warmup 3] [--out bench_gpu_dist.json]
"""
import argparse
import json
import os
import time

import numpy as np

from afire import AFiRe, Config, dist
from chest_images import chest_like


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vit_base")
    ap.add_argument("--batch", type=int, default=64, help="images per GPU and step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    group = dist.init("cuda")
    world = group.world_size if group is not None else 1
    rank = group.rank if group is not None else 0
    device = group.device if group is not None else "cuda"
    cfg = Config.preset_config(args.preset, batch_size=args.batch * world, epochs=100,
                               precision=args.precision)
    model = AFiRe(cfg, device=device, steps_per_epoch=1000, batch_size=args.batch, group=group)
    model.step = 2000  # past the first epoch: prototypes EMA'd, last layer trained
    x = chest_like(args.batch, cfg.img_size, seed=rank)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        stats = model.train_step(x)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    grads = sum(int(np.prod(p["shape"])) for net in ("encoder", "head", "decoder")
                for p in model._t.param_table(net))
    ms = 1e3 * float(np.median(times))
    row = {"what": "AFiRe training step, data-parallel over GPUs (weak scaling)",
           "preset": args.preset, "precision": args.precision, "ranks": world,
           "batch_per_gpu": args.batch, "global_batch": args.batch * world,
           "launcher": group.launcher if group is not None else "single",
           "backend": group.backend if group is not None else None,
           "overlap": os.environ.get("AFIRE_NCCL_OVERLAP", "1") != "0",
           "step_ms_median": ms, "step_ms_min": 1e3 * min(times),
           "images_per_s": args.batch * world / (ms / 1e3),
           "gradient_allreduce_mb": 4 * grads / 1e6, "last_loss": stats["loss"]}
    if rank == 0:
        text = json.dumps(row, indent=1)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
