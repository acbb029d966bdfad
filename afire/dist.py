"""Several processes / GPUs: how this process was launched, and its process group.

afire trains data-parallel (README "Several processes / GPUs"): every rank (process) holds
the whole model, reads its slice of each global batch and takes part in one collective
C step (csrc/core/trainer.h, af_trainer_dist). This module finds out who this process is
(:func:`detect`), opens the communicators (:func:`init`) and offers the few host
collectives the pre-training loop needs (:class:`Group`).

Launchers (:func:`detect`, first match wins):

- ``mpirun`` / ``mpiexec`` of an MPICH-ABI MPI (the ``mpich`` wheel of the ``dist`` extra,
  MPICH, Intel MPI, MVAPICH; hydra sets ``PMI_RANK``, ``PMI_SIZE``), Open MPI's ``mpirun``
  (``OMPI_COMM_WORLD_*``: GPU only, its MPI has another ABI);
- ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``);
- SLURM's ``srun`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``).

Engines: MPI for host buffers (the CPU trainer; MPI is needed for several CPU processes),
NCCL for GPU buffers, its id exchanged through MPI when MPI launched the job and otherwise
over TCP on ``MASTER_ADDR:MASTER_PORT`` (``AFIRE_MASTER_PORT`` overrides the port; under
torchrun, whose own store holds ``MASTER_PORT``, the default is ``MASTER_PORT + 1``).

Environment: ``AFIRE_MPI_LIB`` (an MPICH-ABI ``libmpi.so.12`` to use instead of the wheel's),
``AFIRE_COMM_TIMEOUT`` (seconds a collective may take before every rank stops with an error,
default 600), ``AFIRE_DIST=0`` (ignore the launcher: one process).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_TIMEOUT = 600.0
DEFAULT_PORT = 29500
MPI_SONAME = "libmpi.so.12"  # the MPICH ABI (csrc/core/comm.h)
INSTALL_HINT = 'pip install -e ".[dist]" (the mpich wheel) or set AFIRE_MPI_LIB'


class RankError(RuntimeError):
    """Another rank of the run failed (its own error is on its output)."""


def mark_consistent(error: BaseException) -> BaseException:
    """Marks ``error`` as raised on every rank alike (an agreed stop, a verdict made on
    global values): the ranks then finish normally instead of aborting the job."""
    try:
        error._afire_consistent = True  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return error


def is_consistent(error: BaseException) -> bool:
    return isinstance(error, RankError) or getattr(error, "_afire_consistent", False)


@dataclass(frozen=True)
class Launch:
    """Who this process is, as its launcher says.

    ``launcher``: "single", "mpi" (an MPICH-ABI mpirun), "openmpi", "torchrun" or "slurm".
    ``mpi``: MPI_Init will find its launcher (PMI), so MPI can carry host collectives.
    ``local_rank``/``local_world_size`` may be None under an MPI launcher that does not say
    (MPI then tells, once initialised)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int | None = 0
    local_world_size: int | None = 1
    launcher: str = "single"
    mpi: bool = False
    master_addr: str | None = None
    master_port: int | None = None


def _int(env, *names: str) -> int | None:
    for n in names:
        v = env.get(n)
        if v is not None and v.strip().lstrip("-").isdigit():
            return int(v)
    return None


def _first_slurm_host(nodelist: str | None) -> str | None:
    """The first host of a SLURM node list ("node[03-04,07]" -> node03), via scontrol."""
    if not nodelist or shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _tasks_per_node(spec: str | None) -> int | None:
    """The first count of a SLURM tasks-per-node list ("8(x2),4" -> 8)."""
    if not spec:
        return None
    head = spec.split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else None


def detect(environ: dict[str, str] | None = None) -> Launch:
    """The launch of this process from its environment (the module docstring's rules)."""
    env = os.environ if environ is None else environ
    if env.get("AFIRE_DIST", "").strip().lower() in ("0", "off", "no", "false"):
        return Launch()
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT")
    rank, size = _int(env, "PMI_RANK", "MV2_COMM_WORLD_RANK"), _int(env, "PMI_SIZE",
                                                                      "MV2_COMM_WORLD_SIZE")
    if rank is not None and size is not None:
        return Launch(rank, size, _int(env, "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"),
                      _int(env, "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE"), "mpi", True,
                      addr, port)
    rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    if rank is not None and size is not None:
        return Launch(rank, size, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
                      _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"), "openmpi", False, addr, port)
    rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is not None and size is not None:
        if env.get("AFIRE_MASTER_PORT") is None and port is not None and \
                env.get("TORCHELASTIC_RUN_ID") is not None:
            port += 1  # torchrun's own TCP store listens on MASTER_PORT
        return Launch(rank, size, _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE"),
                      "torchrun", False, addr, port)
    rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    if rank is not None and size is not None:
        addr = addr or _first_slurm_host(env.get("SLURM_STEP_NODELIST")
                                         or env.get("SLURM_JOB_NODELIST"))
        return Launch(rank, size, _int(env, "SLURM_LOCALID"),
                      _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE")), "slurm", False,
                      addr, port if port is not None else DEFAULT_PORT)
    return Launch()


def rendezvous_port(launch: Launch, environ: dict[str, str] | None = None) -> int | None:
    """The TCP port of the NCCL id exchange without MPI (AFIRE_MASTER_PORT wins)."""
    env = os.environ if environ is None else environ
    return _int(env, "AFIRE_MASTER_PORT") or launch.master_port


def timeout_from_env(environ: dict[str, str] | None = None) -> float:
    """AFIRE_COMM_TIMEOUT in seconds (default 600); 0 means no limit."""
    env = os.environ if environ is None else environ
    v = env.get("AFIRE_COMM_TIMEOUT")
    if v is None or not v.strip():
        return DEFAULT_TIMEOUT
    try:
        t = float(v)
    except ValueError:
        raise ValueError(f"AFIRE_COMM_TIMEOUT must be a number of seconds, got {v!r}") from None
    if not t >= 0:
        raise ValueError(f"AFIRE_COMM_TIMEOUT must be >= 0, got {v!r}")
    return t


def mpi_library(environ: dict[str, str] | None = None) -> str | None:
    """The MPI library afire loads: AFIRE_MPI_LIB, else the ``mpich`` wheel's libmpi.so.12
    (installed with the ``dist`` extra), else None."""
    env = os.environ if environ is None else environ
    if env.get("AFIRE_MPI_LIB"):
        return env["AFIRE_MPI_LIB"]
    from importlib import metadata

    try:
        files = metadata.distribution("mpich").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == MPI_SONAME:
            path = str(f.locate())
            if os.path.exists(path):
                return os.path.realpath(path)
    return None


def mpirun_path(environ: dict[str, str] | None = None) -> str | None:
    """The ``mpirun`` of the installation whose library :func:`mpi_library` loads (a launcher
    must belong to the same MPI as the library): <prefix>/bin/mpirun beside <prefix>/lib."""
    lib = mpi_library(environ)
    if lib is None or os.sep not in lib:
        return None
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(lib)))
    path = os.path.join(prefix, "bin", "mpirun")
    return path if os.access(path, os.X_OK) else None


def cpu_threads_per_rank(environ: dict[str, str] | None = None) -> int | None:
    """OpenMP threads for one of several CPU ranks on a node (cores / ranks on the node), or
    None with one process per node. afire/__init__.py applies it before loading the C core
    unless OMP_NUM_THREADS is set."""
    launch = detect(environ)
    local = launch.local_world_size
    if launch.world_size <= 1 or not local or local <= 1:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // local)


def gpu_for(local_rank: int, local_world_size: int | None, visible: int) -> int:
    """The GPU index of a rank: its local rank, or 0 when the launcher gave each rank one GPU
    of its own (CUDA_VISIBLE_DEVICES, srun --gpus-per-task=1). NCCL cannot put two ranks on
    one GPU, so fewer GPUs than ranks on a node is an error."""
    if visible == 1:
        return 0
    if local_rank < visible and (local_world_size is None or local_world_size <= visible):
        return local_rank
    raise ValueError(f"local rank {local_rank} of {local_world_size} on this node needs a GPU "
                     f"of its own but {visible} are visible; start at most one rank per GPU "
                     "(e.g. --nproc_per_node / -np = the number of GPUs)")


class Group:
    """The ranks of one data-parallel run, as seen from this process.

    Attributes: ``rank``, ``world_size``, ``local_rank``, ``local_world_size``,
    ``launcher``, ``backend`` ("mpi", "nccl" or "mpi+nccl"), ``device`` (this rank's device
    string), ``comm`` (the MPI Comm, for the CPU trainer; None without MPI), ``nccl`` (the
    NCCL communicator, for the GPU trainer; None on the CPU).

    Host collectives (:meth:`allreduce`, :meth:`allgather`, :meth:`broadcast_bytes`,
    :meth:`barrier`) go through MPI when there is one, else through NCCL (staged on the
    GPU). Each is bounded by ``timeout`` seconds: a rank that died or hangs makes the others
    raise RuntimeError naming the collective. Every rank must call them in the same order.
    """

    def __init__(self, launch: Launch, device: str, comm: Any = None, nccl: Any = None):
        self.launch, self.device = launch, device
        self.comm, self.nccl = comm, nccl
        host = comm if comm is not None else nccl
        if host is None:
            raise ValueError("a Group needs an MPI or an NCCL communicator")
        self._host = host
        self.rank, self.world_size = host.rank, host.size
        self.local_rank = comm.local_rank if comm is not None else launch.local_rank or 0
        self.local_world_size = (comm.local_size if comm is not None
                                 else launch.local_world_size or 1)
        self.launcher = launch.launcher
        self.backend = "+".join(n for n, c in (("mpi", comm), ("nccl", nccl)) if c is not None)
        self.timeout = host.timeout
        self._abort_at_close = False

    def __repr__(self) -> str:
        return (f"Group(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, launcher={self.launcher!r}, "
                f"backend={self.backend!r}, device={self.device!r})")

    # ---- host collectives
    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """The reduction of ``array`` over all ranks (a new array)."""
        a = np.array(array, copy=True, order="C")
        self._host.allreduce(a, op)
        return a

    def allgather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's ``array`` stacked in rank order: shape (world_size, *array.shape)."""
        return self._host.allgather(np.ascontiguousarray(array))

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Rank ``root``'s bytes on every rank (others pass anything, e.g. None)."""
        n = np.array([len(data) if self.rank == root and data else 0], np.int64)
        self._host.broadcast(n, root)
        buf = np.zeros(int(n[0]), np.uint8)
        if self.rank == root and data:
            buf[:] = np.frombuffer(data, np.uint8)
        if len(buf):
            self._host.broadcast(buf, root)
        return buf.tobytes()

    def barrier(self) -> None:
        self._host.barrier()

    # ---- agreement
    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank reports whether its part of ``what`` failed; if any did, every rank
        raises: the failing ranks their own error, the others a RankError naming the first
        failing rank and its message. Keeps the ranks in step (no rank goes on into a
        collective the others will never reach)."""
        msg = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:1000]
        buf = np.zeros(1024, np.uint8)
        buf[0] = error is not None
        buf[1:1 + len(msg)] = np.frombuffer(msg, np.uint8)
        every = self.allgather(buf)
        bad = np.flatnonzero(every[:, 0])
        if len(bad) == 0:
            return
        if error is not None:
            raise mark_consistent(error)
        r = int(bad[0])
        text = every[r, 1:].tobytes().rstrip(b"\0").decode(errors="replace")
        raise RankError(f"{what} failed on rank {r} of {self.world_size} ({text}); stopping "
                        "every rank")

    def check_identical(self, arrays: dict[str, np.ndarray], what: str) -> None:
        """Raise on every rank when the named arrays are not bit-identical on all ranks (a
        digest per name is compared; the message names the first differing one)."""
        names = sorted(arrays)
        digests = np.zeros((len(names), 16), np.uint8)
        for i, n in enumerate(names):
            a = np.ascontiguousarray(arrays[n])
            digests[i] = np.frombuffer(hashlib.blake2b(memoryview(a).cast("B"),
                                                       digest_size=16).digest(), np.uint8)
        every = self.allgather(digests)
        for i, n in enumerate(names):
            differ = [r for r in range(self.world_size) if not (every[r, i] == every[0, i]).all()]
            if differ:
                raise RankError(f"{what}: {n} differs between rank 0 and rank(s) {differ}: the "
                                "ranks no longer hold the same model (a bug, or ranks started "
                                "from different checkpoints)")

    # ---- end
    def failed(self, error: BaseException) -> None:
        """Called with an exception leaving the training of this rank: unless every rank
        raised it alike (:func:`mark_consistent`), the others may be waiting in a collective
        for this one, so closing the group ends the whole job (MPI_Abort) instead of
        waiting for the timeout."""
        if not is_consistent(error):
            self._abort_at_close = True

    def close(self) -> None:
        """Finalise the communicators; the whole job is aborted instead when a collective
        failed or this rank failed alone (:meth:`failed`)."""
        import sys
        import time

        nccl, comm = self.nccl, self.comm
        self.nccl = self.comm = None
        sys.stdout.flush()
        sys.stderr.flush()
        if any(c is not None and c.broken for c in (comm, nccl)):
            # a collective timed out: the other survivors time out about now too; give them
            # a moment to say so before the abort below ends every process of the job
            time.sleep(min(10.0, max(2.0, 0.25 * self.timeout)))
        if self._abort_at_close and comm is not None:
            # said by this rank itself: the MPI library's own abort message is sometimes
            # dropped when the launcher tears the job down
            print(f"afire: rank {self.rank} of {self.world_size} failed alone; ending the "
                  "whole job (MPI_Abort) instead of leaving the others waiting",
                  file=sys.stderr, flush=True)
            time.sleep(2.0)  # mpirun forwards what this rank printed; an abort drops the rest
            comm.abort(1)
        if nccl is not None:
            nccl.close()
        if comm is not None:
            comm.close()

    def abort(self, code: int = 1) -> None:
        """End every process of the job now (MPI_Abort; NCCL alone: this process exits)."""
        if self.comm is not None:
            self.comm.abort(code)
        os._exit(code)


_GROUP: Group | None = None


def rank_tag() -> str:
    """" (rank r of W)" for messages of a multi-process run, "" for one process."""
    g = _GROUP
    rank, world = (g.rank, g.world_size) if g is not None else (detect().rank,
                                                                 detect().world_size)
    return f" (rank {rank} of {world})" if world > 1 else ""


def current() -> Group | None:
    """The Group :func:`init` opened in this process, if any."""
    return _GROUP


def init(device: str = "cpu", launch: Launch | None = None, timeout: float | None = None,
         force: bool = False) -> Group | None:
    """Open this process's Group for ``device`` ("cpu" or "cuda"; each rank then takes its
    GPU from its local rank), or return None for a single process (unless ``force``: a
    one-rank group, which runs the collective code paths, e.g. NCCL on one GPU). Called once
    per process; a second call returns the same Group.

    Raises ValueError/RuntimeError with what to do when the launch cannot work (several CPU
    processes without MPI, no MASTER_ADDR, more ranks than GPUs, an MPI library of another
    ABI, ...)."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    launch = detect() if launch is None else launch
    if launch.world_size <= 1 and not force:
        return None
    timeout = timeout_from_env() if timeout is None else float(timeout)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"with {launch.world_size} processes give device 'cpu' or 'cuda' (each "
                         f"rank takes the GPU of its local rank), not {device!r}")
    comm = _open_mpi(launch, timeout, required=device == "cpu")
    try:
        if device == "cpu":
            _GROUP = Group(launch, "cpu", comm=comm)
        else:
            _GROUP = _open_nccl(launch, comm, timeout)
    except BaseException:
        if comm is not None:
            comm.close()
        raise
    import atexit

    atexit.register(_close_at_exit)
    return _GROUP


def _close_at_exit() -> None:
    global _GROUP
    if _GROUP is not None:
        g, _GROUP = _GROUP, None
        g.close()


def _open_mpi(launch: Launch, timeout: float, required: bool):
    """The MPI Comm: when MPI launched the job, or for a one-rank CPU group; else None (GPU
    ranks of a launcher without MPI) or, when MPI is required, an error."""
    if not launch.mpi and (launch.world_size > 1 or not required):
        if required:
            raise ValueError(f"{launch.world_size} CPU processes started by {launch.launcher} "
                             "need MPI for their collectives: launch with mpirun (an MPICH-ABI "
                             f"MPI: {INSTALL_HINT})")
        return None
    lib = mpi_library() or MPI_SONAME  # else a system MPICH, Intel MPI, ... on the loader's path
    from . import _C

    try:
        comm = _C.comm.Comm(lib, timeout)
    except RuntimeError as e:
        raise RuntimeError(f"{e} ({INSTALL_HINT})") from None
    if launch.launcher == "mpi" and comm.size != launch.world_size:
        comm.close()
        raise RuntimeError(f"MPI ({lib}) sees {comm.size} ranks but the launcher started "
                           f"{launch.world_size}: the mpirun that started the job belongs to "
                           "another MPI than the library afire loaded (use the mpirun of the "
                           "same installation, e.g. the dist extra's)")
    return comm


def _open_nccl(launch: Launch, comm, timeout: float) -> Group:
    from . import cuda

    n = cuda.device_count()
    if n == 0:
        raise RuntimeError("device 'cuda': no CUDA GPU is visible to this rank")
    local_rank = comm.local_rank if comm is not None else (launch.local_rank or 0)
    local_size = comm.local_size if comm is not None else launch.local_world_size
    index = gpu_for(local_rank, local_size, n)
    rank = comm.rank if comm is not None else launch.rank
    world = comm.size if comm is not None else launch.world_size
    port = rendezvous_port(launch) or DEFAULT_PORT
    addr = launch.master_addr or ("127.0.0.1" if world == 1 else None)
    if comm is None and world > 1 and addr is None:
        raise ValueError(f"{world} GPU processes started by {launch.launcher} without MPI need "
                         "MASTER_ADDR (and MASTER_PORT) for the NCCL id exchange")
    nccl = cuda.backend().Nccl(rank, world, index, comm, addr or "", port, timeout)
    return Group(launch, f"cuda:{index}", comm=comm, nccl=nccl)


def rank_batch(global_batch: int, world_size: int) -> int:
    """Images per rank and step: the global batch split evenly (ValueError otherwise)."""
    if global_batch % world_size:
        raise ValueError(f"the global batch of {global_batch} images (batch_size) cannot be "
                         f"split evenly over {world_size} ranks; use a batch_size divisible by "
                         f"{world_size}, or {world_size} ranks that divide it")
    return global_batch // world_size
