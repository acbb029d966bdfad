"""What each rank of the MPI tests runs (tests/test_dist_mpi.py starts it with mpirun):

    python tests/dist_worker.py steps OUT.npz B_CAP B0,B1,... [objective [device]]
        (objective: paper, released, or teacher_token = paper with that stru_target)
        AFiRe train_step on fixed phantom batches: rank r takes B_r images of each global
        batch (the sizes may differ between ranks); rank 0 saves the stats and the state.
        Without a launcher (one process) it trains on the whole global batches. device
        "cuda": each rank on the GPU of its local rank, fp32 (tests/gpu/run_dist_checks.sh).
    python tests/dist_worker.py compare ONE.npz RANKS.npz
        Exit 1 unless the two `steps` results agree within test_dist_mpi.py's tolerances.
    python tests/dist_worker.py die MODE STEP
        `afire.pretrain` of the demo network (on AFIRE_TEST_DEVICE, default cpu, into
        AFIRE_TEST_OUT) in which rank 1 kills itself (MODE kill), hangs (hang) or raises
        (raise) at STEP.
    python tests/dist_worker.py group
        The Group helpers: agree, check_identical, broadcast_bytes, allreduce.
    python tests/dist_worker.py single_rank OUT.npz
        One process through the collective code path (a one-rank MPI group) vs the plain
        one: saves both states.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

import afire
from afire import dist
from afire.data import phantom_dataset

STATS = ("loss", "l_stru", "l_cate", "l_cst", "l_recon", "grad_norm", "abnormal_fraction")


def _config(objective: str = "paper", batch: int = 12) -> afire.Config:
    """objective "teacher_token": the paper objective with stru_target="teacher_token"."""
    extra = {"stru_target": "teacher_token"} if objective == "teacher_token" else {}
    objective = "paper" if objective == "teacher_token" else objective
    return afire.Config.preset_config("test", batch_size=batch, epochs=2, objective=objective,
                                      base_lr=2e-2, warmup_epochs=1, precision="fp32", **extra)


def steps(out: str, cap: str, sizes: str, objective: str = "paper", device: str = "cpu") -> None:
    sizes_r = [int(v) for v in sizes.split(",")]
    group = dist.init(device)
    rank = group.rank if group is not None else 0
    if group is not None:
        device = group.device
    if group is not None:
        assert group.world_size == len(sizes_r), (group.world_size, sizes_r)
        mine = slice(sum(sizes_r[:rank]), sum(sizes_r[:rank + 1]))
    else:
        mine = slice(0, sum(sizes_r))
    total = sum(sizes_r)
    cfg = _config(objective)
    images = phantom_dataset(total * 6, size=cfg.img_size, seed=3)["images"]
    model = afire.AFiRe(cfg, device=device, steps_per_epoch=3, batch_size=int(cap), group=group)
    rows = []
    for s in range(6):  # two epochs: the prototypes are overwritten, then EMA'd
        batch = images[s * total:(s + 1) * total][mine]
        st = model.train_step(batch)
        rows.append([st[k] for k in STATS])
    if rank == 0:
        np.savez(out, stats=np.array(rows), **model.state_tensors())


def without_key_bias(name: str, x: np.ndarray) -> np.ndarray:
    """x with the key part of a qkv bias zeroed: its gradient is zero in exact arithmetic
    (softmax ignores a constant added to every key's score), so it is pure rounding noise,
    which Adam's normalisation turns into +-lr steps that differ between any two summation
    orders (one process vs several ranks alike). Every other value is compared."""
    if name.endswith("attn.qkv.bias"):
        x = x.copy()
        w = x.shape[-1] // 3
        x[..., w:2 * w] = 0
    return x


def compare(one: str, ranks: str) -> None:
    a, b = np.load(one), np.load(ranks)
    np.testing.assert_allclose(b["stats"], a["stats"], rtol=5e-5, atol=1e-6)
    assert (b["stats"][:, -1] == a["stats"][:, -1]).all(), "the SLM draws differ"
    worst = 0.0
    for k in a.files:
        if k != "stats":
            x, y = without_key_bias(k, a[k]), without_key_bias(k, b[k])
            np.testing.assert_allclose(y, x, atol=1e-4, rtol=1e-4, err_msg=k)
            worst = max(worst, float(np.abs(y - x).max()))
    print(f"agree: statistics within 5e-5 relative, state within {worst:.3g} absolute")


def die(mode: str, at: str) -> None:
    at_step = int(at)

    def callback(row: dict) -> None:
        g = dist.current()
        if g.rank != 1 or row["step"] != at_step:
            return
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "hang":
            time.sleep(3600)
        else:
            raise RuntimeError("rank 1 failed on purpose")

    out = os.environ["AFIRE_TEST_OUT"]
    batch = 4 * dist.detect().world_size
    cfg = afire.pretrain.__globals__["demo_config"](epochs=2, batch_size=batch)
    afire.pretrain(cfg, data=8 * batch, out=out, overwrite=True, progress=False, callback=callback,
                   report=False, device=os.environ.get("AFIRE_TEST_DEVICE", "cpu"))


def group_helpers() -> None:
    g = dist.init("cpu")
    r, w = g.rank, g.world_size
    assert g.allreduce(np.array([r + 1.0]))[0] == w * (w + 1) / 2
    assert g.allreduce(np.array([r], np.int64), "max")[0] == w - 1
    assert (g.allgather(np.array([r * 10], np.int64)).ravel() == np.arange(w) * 10).all()
    assert g.broadcast_bytes(b"from rank 0" if r == 0 else None) == b"from rank 0"
    g.agree(None, "nothing")
    try:
        g.agree(ValueError("bad input") if r == w - 1 else None, "the test step")
    except ValueError as e:
        assert r == w - 1 and dist.is_consistent(e)
    except dist.RankError as e:
        assert r != w - 1 and "the test step failed on rank" in str(e) and "bad input" in str(e)
    else:
        raise AssertionError("agree did not raise")
    same = {"a": np.arange(5.0), "b": np.ones(3, np.float32)}
    g.check_identical(same, "same arrays")
    differ = {"a": np.arange(5.0) + (r == 1), "b": np.ones(3, np.float32)}
    try:
        g.check_identical(differ, "the test state")
    except dist.RankError as e:
        assert "a differs between rank 0 and rank(s) [1]" in str(e), str(e)
    else:
        raise AssertionError("check_identical did not raise")
    print(f"group helpers ok on rank {r}")


def single_rank(out: str) -> None:
    cfg = _config()
    images = phantom_dataset(24, size=cfg.img_size, seed=3)["images"]
    plain = afire.AFiRe(cfg, steps_per_epoch=3, batch_size=12)
    group = dist.init("cpu", force=True)
    assert group.world_size == 1
    ranked = afire.AFiRe(cfg, steps_per_epoch=3, batch_size=12, group=group)
    sp, sr = [], []
    for s in range(2):
        sp.append([plain.train_step(images[s * 12:(s + 1) * 12])[k] for k in STATS])
        sr.append([ranked.train_step(images[s * 12:(s + 1) * 12])[k] for k in STATS])
    np.savez(out, stats_plain=np.array(sp), stats_ranked=np.array(sr),
             **{"plain/" + k: v for k, v in plain.state_tensors().items()},
             **{"ranked/" + k: v for k, v in ranked.state_tensors().items()})


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"steps": steps, "compare": compare, "die": die, "group": group_helpers,
     "single_rank": single_rank}[cmd](*args)
