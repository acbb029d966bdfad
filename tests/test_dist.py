"""afire.dist without an MPI: launch detection, the sampler's split, the TCP rendezvous, the
refusals with their messages (tests/test_dist_mpi.py runs the ranks under mpirun)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from afire import _C, dist
from afire.data.loader import epoch_order, rank_slice


def test_detect_single_process():
    assert dist.detect({}) == dist.Launch()
    assert dist.detect({"PMI_RANK": "1", "PMI_SIZE": "4", "AFIRE_DIST": "0"}).world_size == 1


def test_detect_mpich_hydra():
    env = {"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4",
           # SLURM variables of the allocation hydra runs in do not describe the ranks
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert dist.detect(env) == dist.Launch(3, 8, 1, 4, "mpi", True, None, None)


def test_detect_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "MASTER_ADDR": "node1", "MASTER_PORT": "1234"}
    assert dist.detect(env) == dist.Launch(2, 4, 0, 2, "openmpi", False, "node1", 1234)


def test_detect_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert dist.detect(env) == dist.Launch(5, 16, 5, 8, "torchrun", False, "10.0.0.1", 29500)
    # torchrun's agent holds a TCP store on MASTER_PORT: afire's rendezvous takes the next one
    launched = dist.detect({**env, "TORCHELASTIC_RUN_ID": "abc"})
    assert launched.master_port == 29501
    assert dist.rendezvous_port(launched, {"AFIRE_MASTER_PORT": "40000"}) == 40000


def test_detect_slurm_srun():
    env = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "MASTER_ADDR": "gpu001"}
    assert dist.detect(env) == dist.Launch(9, 16, 1, 8, "slurm", False, "gpu001",
                                           dist.DEFAULT_PORT)
    # an sbatch script itself (no srun step) is one process
    assert dist.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}).world_size == 1


def test_rank_slice_covers_each_image_once():
    order = epoch_order(100, seed=1, epoch=2)
    B, W = 12, 3
    for b in range(100 // B):
        batch = order[b * B:(b + 1) * B]
        parts = [rank_slice(batch, r, W) for r in range(W)]
        assert np.array_equal(np.concatenate(parts), batch)
    seen = np.concatenate([rank_slice(order[b * B:(b + 1) * B], r, W)
                           for b in range(100 // B) for r in range(W)])
    assert len(np.unique(seen)) == len(seen) == (100 // B) * B
    with pytest.raises(ValueError, match="cannot be split evenly over 5 ranks"):
        rank_slice(order[:12], 0, 5)


def test_rank_batch():
    assert dist.rank_batch(64, 8) == 8
    with pytest.raises(ValueError, match="global batch of 64 images .* cannot be split evenly "
                                         "over 3 ranks"):
        dist.rank_batch(64, 3)


def test_gpu_for_local_rank():
    assert dist.gpu_for(3, 8, 8) == 3
    assert dist.gpu_for(5, 8, 1) == 0  # one GPU per rank (CUDA_VISIBLE_DEVICES / srun)
    with pytest.raises(ValueError, match="needs a GPU of its own but 4 are visible"):
        dist.gpu_for(5, 8, 4)


def test_timeout_from_env():
    assert dist.timeout_from_env({}) == dist.DEFAULT_TIMEOUT
    assert dist.timeout_from_env({"AFIRE_COMM_TIMEOUT": "2.5"}) == 2.5
    with pytest.raises(ValueError, match="AFIRE_COMM_TIMEOUT"):
        dist.timeout_from_env({"AFIRE_COMM_TIMEOUT": "soon"})


def test_cpu_threads_per_rank(monkeypatch):
    env = {"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert dist.cpu_threads_per_rank(env) == 8
    assert dist.cpu_threads_per_rank({}) is None


def test_mpi_library_from_env():
    assert dist.mpi_library({"AFIRE_MPI_LIB": "/opt/mpi/lib/libmpi.so.12"}) == \
        "/opt/mpi/lib/libmpi.so.12"


def test_comm_with_a_missing_library():
    with pytest.raises(RuntimeError, match="cannot load the MPI library /nonexistent/libmpi"):
        _C.comm.Comm("/nonexistent/libmpi.so.12", 1.0)


def test_cpu_ranks_need_mpi():
    launch = dist.Launch(0, 2, 0, 2, "torchrun", False, "127.0.0.1", 29500)
    with pytest.raises(ValueError, match="2 CPU processes started by torchrun need MPI"):
        dist.init("cpu", launch=launch)
    with pytest.raises(ValueError, match="give device 'cpu' or 'cuda'"):
        dist.init("cuda:1", launch=launch)


def _rendezvous(results, rank, world, port, timeout=20.0):
    data = np.full(128, 7 if rank == 0 else 0, np.uint8)  # the size of an NCCL unique id
    try:
        _C.comm.rendezvous_broadcast(data, rank, world, "127.0.0.1", port, timeout)
        results[rank] = data
    except RuntimeError as e:
        results[rank] = e


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_tcp_rendezvous_hands_rank_0s_bytes_to_every_rank():
    port, world, results = _free_port(), 4, {}
    # the others start first and retry until rank 0 listens
    threads = [threading.Thread(target=_rendezvous, args=(results, r, world, port))
               for r in (3, 1, 2, 0)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    for r in range(world):
        assert isinstance(results[r], np.ndarray), results[r]
        assert (results[r] == 7).all()


def test_tcp_rendezvous_times_out_with_a_clear_error():
    port, results = _free_port(), {}
    t0 = time.monotonic()
    _rendezvous(results, 1, 2, port, timeout=1.0)  # no rank 0
    assert time.monotonic() - t0 < 10
    assert "rank 1 could not reach rank 0 at 127.0.0.1" in str(results[1])
    t0 = time.monotonic()
    _rendezvous(results, 0, 3, port, timeout=1.0)  # no other rank
    assert "only 1 of 3 ranks reached rank 0" in str(results[0])


def test_tcp_rendezvous_refuses_another_jobs_rank():
    port, results = _free_port(), {}
    root = threading.Thread(target=_rendezvous, args=(results, 0, 3, port, 10.0))
    root.start()
    time.sleep(0.2)
    _rendezvous(results, 1, 2, port, timeout=1.0)  # a rank of a 2-rank job
    root.join(30)
    assert "joined a job of 3 ranks" in str(results[0])
