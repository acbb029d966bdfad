"""Training-step throughput and peak memory of the CPU reference, as JSON.

    python benchmarks/bench_step.py [--presets test vit_tiny] [--batch 8] [--steps 5]

Images/s of `AFiRe.train_step` (SLM, teacher, student, head, decoder, losses, backward,
clipping, AdamW, EMA: one C call) and the process's peak resident memory after each preset
(ru_maxrss, so later presets include earlier ones' peak). Threads: OMP_NUM_THREADS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from afire import AFiRe, Config
from afire.data import phantom_dataset


def bench(preset: str, batch: int, steps: int, warmup: int) -> dict:
    cfg = Config.preset_config(preset, batch_size=batch, epochs=1, warmup_epochs=0)
    model = AFiRe(cfg, steps_per_epoch=steps + warmup)
    images = phantom_dataset(batch, size=cfg.img_size, seed=1)["images"]
    for _ in range(warmup):
        model.train_step(images)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_step(images)
        times.append(time.perf_counter() - t0)
    best, median = min(times), float(np.median(times))
    return {"preset": preset, "batch": batch, "img_size": cfg.img_size, "steps": steps,
            "step_s_median": median, "step_s_best": best,
            "images_per_s_median": batch / median, "images_per_s_best": batch / best,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["test", "vit_tiny"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args(argv)
    rows = [bench(p, a.batch, a.steps, a.warmup) for p in a.presets]
    print(json.dumps({"benchmark": "train_step_cpu", "threads": os.environ.get(
        "OMP_NUM_THREADS", str(os.cpu_count())), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
