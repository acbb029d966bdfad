"""GFLOP/s of afire's CPU linear and attention kernels next to NumPy matmul on the same shapes.

Prints ONE JSON object. Each timing is the best of `repeat` runs; ours and NumPy's are
measured in alternating blocks in the same process so machine load hits both alike. FLOPs count only
the matrix products (2 per multiply-add); ours includes the bias / softmax work, NumPy's is
the bare np.matmul of the same shapes. ratio = ours / numpy GFLOP/s.

  PYTHONPATH=. python3 benchmarks/bench_ops.py [--repeat 10] [--quick]
"""
import argparse
import json
import os
import time

import numpy as np

from afire._C import ops


def best_times(fa, fb, repeat, rounds=3):
    """Best-of seconds of fa and fb. Each round times a block of calls of fa, then a block
    of fb, the first call of a block untimed: calls are never interleaved one by one,
    because NumPy's threaded OpenBLAS keeps its threads spinning after a call and would
    slow the OpenMP threads of the next call of ours (and libgomp's spinning, NumPy's)."""
    ta = tb = float("inf")
    per = max(1, repeat // rounds)
    for _ in range(rounds):
        for f, which in ((fa, 0), (fb, 1)):
            f()
            for _ in range(per):
                t0 = time.perf_counter()
                f()
                dt = time.perf_counter() - t0
                if which == 0:
                    ta = min(ta, dt)
                else:
                    tb = min(tb, dt)
    return ta, tb


def entry(flops, fa, fb, repeat):
    t_ours, t_numpy = best_times(fa, fb, repeat)
    ours, ref = flops / t_ours / 1e9, flops / t_numpy / 1e9
    return {"gflops": round(ours, 2), "numpy_gflops": round(ref, 2),
            "ratio": round(ours / ref, 3), "ms": round(t_ours * 1e3, 3),
            "numpy_ms": round(t_numpy * 1e3, 3)}


def bench_linear(N, C, OC, repeat, rng):
    x = rng.standard_normal((N, C), dtype=np.float32)
    w = rng.standard_normal((OC, C), dtype=np.float32)
    b = rng.standard_normal(OC, dtype=np.float32)
    dy = rng.standard_normal((N, OC), dtype=np.float32)
    wt = np.ascontiguousarray(w.T)  # so numpy's matmul sees the layout it likes best
    f = 2.0 * N * C * OC
    fwd = entry(f, lambda: ops.linear_forward(x, w, b), lambda: np.matmul(x, wt), repeat)
    # backward = dinp (dy @ w) + dweight (dy^T @ x); the bias column sum is not counted
    bwd = entry(2 * f, lambda: ops.linear_backward(dy, x, w),
                lambda: (np.matmul(dy, w), np.matmul(dy.T, x)), repeat)
    return {"forward": fwd, "backward": bwd}


def bench_attention(B, T, D, H, repeat, rng):
    hd = D // H
    qkv = rng.standard_normal((B, T, 3 * D), dtype=np.float32)
    dy = rng.standard_normal((B, T, D), dtype=np.float32)
    out, att = ops.attention_forward(qkv, H)
    # NumPy does only the four batched matmuls on contiguous per-head tensors (no softmax,
    # no transposes): an upper bound for a NumPy attention
    q, k, v = (np.ascontiguousarray(qkv[:, :, s * D:(s + 1) * D].reshape(B, T, H, hd)
                                    .transpose(0, 2, 1, 3)) for s in range(3))
    kt = np.ascontiguousarray(k.transpose(0, 1, 3, 2))
    dyh = np.ascontiguousarray(dy.reshape(B, T, H, hd).transpose(0, 2, 1, 3))
    vt = np.ascontiguousarray(v.transpose(0, 1, 3, 2))
    att_t = np.ascontiguousarray(att.transpose(0, 1, 3, 2))
    f = 4.0 * B * H * T * T * hd  # q k^T and att v
    fwd = entry(f, lambda: ops.attention_forward(qkv, H),
                lambda: np.matmul(np.matmul(q, kt), v), repeat)
    bwd = entry(2 * f, lambda: ops.attention_backward(dy, qkv, att, H),
                lambda: (np.matmul(dyh, vt), np.matmul(att_t, dyh), np.matmul(att, k),
                         np.matmul(att_t, q)), repeat)
    return {"forward": fwd, "backward": bwd}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="smaller batch (smoke test)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    T = 197  # 224/16 = 14, 14*14 patches + cls
    configs = {"vit_base": dict(B=1 if args.quick else 4, D=768, H=12),
               "vit_tiny": dict(B=4 if args.quick else 16, D=192, H=3)}
    res = {"cpus": os.cpu_count(), "T": T, "repeat": args.repeat,
           "loadavg_before": round(os.getloadavg()[0], 2)}
    t0 = time.perf_counter()
    for name, c in configs.items():
        B, D, H = c["B"], c["D"], c["H"]
        N = B * T
        r = {"B": B, "N": N, "D": D, "H": H}
        for lname, (C, OC) in {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, 4 * D),
                               "fc2": (4 * D, D)}.items():
            r[f"linear_{lname}"] = bench_linear(N, C, OC, args.repeat, rng)
        r["attention"] = bench_attention(B, T, D, H, args.repeat, rng)
        res[name] = r
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["loadavg_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
