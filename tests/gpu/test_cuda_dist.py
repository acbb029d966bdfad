"""The GPU trainer through the NCCL path (afire.dist, cuda/comm.cu, af_cuda_trainer_dist) with
one rank, against the same GPU trainer without it: the check a one-GPU machine can make.

Several NCCL ranks cannot share one GPU, so the multi-GPU path is checked by
tests/gpu/run_dist_checks.sh on a machine with 2+ GPUs (N ranks vs one process on the
combined batch, resume, a hung rank, scaling of the step time).

With one rank every collective is the identity and every data-parallel kernel keeps the
sums and the thread-to-data maps of the one-GPU kernels (Sinkhorn phases, prototype sums,
the objective on the "gathered" batch, the restoration share of 1), so the two paths are
expected to be bit-identical, with the gradient all-reduces overlapped (default) and not
(AFIRE_NCCL_OVERLAP=0). Skipped with a visible reason without a GPU.
"""
import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, dist

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]

STATS = ("loss", "l_stru", "l_cate", "l_cst", "l_recon", "grad_norm", "abnormal_fraction")


@pytest.fixture(scope="module")
def group():
    g = dist.init("cuda", force=True)  # one rank: NCCL on cuda:0, the id over local TCP
    assert g.world_size == 1 and g.rank == 0 and g.device == "cuda:0"
    return g


@pytest.mark.parametrize("overlap", ["1", "0"])
@pytest.mark.parametrize("objective", ["paper", "released"])
def test_nccl_world_one_equals_one_gpu(group, monkeypatch, overlap, objective):
    monkeypatch.setenv("AFIRE_NCCL_OVERLAP", overlap)  # read when the trainer joins the group
    cfg = small_cfg(precision="fp32", objective=objective)
    plain = AFiRe(cfg, device=group.device, steps_per_epoch=2)
    ranked = AFiRe(cfg, device=group.device, steps_per_epoch=2, group=group)
    for s in range(5):  # 2.5 epochs: prototypes overwritten, then EMA'd; last layer unfrozen
        x = phantom_like(4, seed=s)
        a, b = plain.train_step(x), ranked.train_step(x)
        for k in STATS:
            assert a[k] == b[k], (s, k, a[k], b[k])
    ta, tb = plain.state_tensors(), ranked.state_tensors()
    for k in ta:
        np.testing.assert_array_equal(tb[k], ta[k], err_msg=k)


def test_nccl_world_one_bf16_runs(group):
    cfg = small_cfg(precision="bf16")
    plain = AFiRe(cfg, device=group.device, steps_per_epoch=2)
    ranked = AFiRe(cfg, device=group.device, steps_per_epoch=2, group=group)
    x = phantom_like(4, seed=0)
    a, b = plain.train_step(x), ranked.train_step(x)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_nccl_host_collectives(group):
    assert group.allreduce(np.array([2.5]))[0] == 2.5
    assert group.allreduce(np.array([3], np.int64), "max")[0] == 3
    assert group.allgather(np.arange(3, dtype=np.float32)).shape == (1, 3)
    assert group.broadcast_bytes(b"id") == b"id"
    group.barrier()
    group.agree(None, "nothing")
    group.check_identical({"a": np.arange(4.0)}, "a test")
