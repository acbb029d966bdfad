/* Communication between the processes of a data-parallel run (README "Several processes /
 * GPUs", docs/ARCHITECTURE.md).
 *
 * Every rank holds the whole model; what the method computes over the global batch is
 * reduced across ranks with these calls. Two engines, neither home-made:
 *   - MPI for host buffers (the CPU trainer, and small host exchanges on the GPU path),
 *     loaded at run time with dlopen from a path the caller gives (afire/dist.py finds the
 *     `mpich` wheel's library, or AFIRE_MPI_LIB names a system MPI). afire is built without
 *     MPI headers or libraries: `pip install afire` works unchanged without MPI.
 *   - NCCL for device buffers (cuda/comm.cuh), its unique id exchanged through MPI or, when
 *     a launcher without MPI started the job (torchrun, srun), through af_rendezvous_broadcast.
 *
 * ABI: the MPICH ABI (libmpi.so.12): MPICH and its wheel, Intel MPI, MVAPICH, Cray MPICH.
 * Its handles are ints with fixed values (mpi.h of MPICH >= 3.1, the "MPICH ABI
 * Compatibility Initiative"); comm.c declares the dozen functions and constants it uses.
 * Open MPI has another ABI and is refused with a clear message.
 *
 * Timeouts: MPI has no timeout on collectives, so every call here is non-blocking (MPI_I*)
 * and waited for with MPI_Test polling against a deadline (af_comm's timeout). A rank that
 * died or hangs makes the others return AF_ECOMM naming the collective within that time;
 * the communicator is then broken (every later call fails at once) and af_comm_close aborts
 * the job (MPI_Abort) instead of finalising, so no process is left waiting.
 *
 * Reduction order: whatever the MPI library picks (fixed for a given world size and
 * library), so N ranks match one process on the combined batch to float rounding, and a
 * run with the same world size is reproducible.
 */
#ifndef AFIRE_COMM_H
#define AFIRE_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "afire.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { AF_COMM_F32 = 0, AF_COMM_F64 = 1, AF_COMM_I64 = 2, AF_COMM_BYTE = 3 } af_comm_type;
typedef enum { AF_COMM_SUM = 0, AF_COMM_MAX = 1, AF_COMM_MIN = 2 } af_comm_op;

/* Bytes of one element of `type`. */
size_t af_comm_type_size(af_comm_type type);

/* An in-place all-reduce for code that must not know the transport (objective.c and its
 * CUDA twin): host buffers from af_comm_reducer, device buffers on the compute stream from
 * the NCCL communicator. `what` names the reduction in timeout messages. */
typedef struct {
    void *ctx;
    af_status (*allreduce)(void *ctx, void *buf, size_t count, af_comm_type type, af_comm_op op,
                           const char *what);
} af_reducer;

/* ------------------------------------------------------------------ MPI (host buffers) */

typedef struct af_comm af_comm;

/* Loads the MPI library at `library` (a path or a soname for dlopen), initialises MPI
 * (MPI_THREAD_SERIALIZED; an MPI already initialised by the process, e.g. by mpi4py, is
 * used and left for its owner to finalise) and duplicates MPI_COMM_WORLD. timeout_s > 0
 * bounds every collective. AF_ENOTSUP when the library cannot be loaded or has another ABI. */
af_status af_comm_mpi_open(af_comm **out, const char *library, double timeout_s);
/* MPI_Finalize (or MPI_Abort when the communicator is broken); later calls fail with
 * AF_ECOMM. Idempotent. af_comm_free closes and frees (NULL is ignored). */
af_status af_comm_close(af_comm *c);
void af_comm_free(af_comm *c);
/* Ends every process of the job (MPI_Abort) with exit status `code`. */
void af_comm_abort(af_comm *c, int code);

int af_comm_rank(const af_comm *c);
int af_comm_size(const af_comm *c);
/* Rank and number of ranks on this node (MPI_Comm_split_type, shared memory). */
int af_comm_local_rank(const af_comm *c);
int af_comm_local_size(const af_comm *c);
/* MPI_Get_library_version's string. */
const char *af_comm_library_version(const af_comm *c);
double af_comm_timeout(const af_comm *c);
/* 1 once a collective failed or timed out: every later call returns AF_ECOMM at once. */
int af_comm_broken(const af_comm *c);

/* In place: buf[count] of `type` becomes the reduction over all ranks. */
af_status af_comm_allreduce(af_comm *c, void *buf, size_t count, af_comm_type type,
                            af_comm_op op, const char *what);
/* Several in-place sum all-reduces in flight at once (MPI progresses them together), then
 * one wait: n buffers buf[i] of count[i] elements. The gradient buckets of the trainer. */
af_status af_comm_allreduce_many(af_comm *c, int n, void *const *buf, const size_t *count,
                                 af_comm_type type, af_comm_op op, const char *what);
/* recv[size * bytes] = every rank's send[bytes], in rank order. */
af_status af_comm_allgather(af_comm *c, const void *send, void *recv, size_t bytes,
                            const char *what);
/* buf[bytes] of rank `root` to every rank. */
af_status af_comm_broadcast(af_comm *c, void *buf, size_t bytes, int root, const char *what);
af_status af_comm_barrier(af_comm *c, const char *what);

/* A reducer over host buffers of c (af_reducer). */
af_reducer af_comm_reducer(af_comm *c);

/* ------------------------------------------------------------------ TCP rendezvous */

/* Rank 0's buf[bytes] to ranks 1..world-1 over TCP: rank 0 listens on `port` (all
 * interfaces), the others connect to addr:port (retrying until it listens) and check that
 * they belong to the same job (same world size). Only for the NCCL unique id when no MPI
 * launched the job (torchrun, srun): NCCL does the collectives. AF_ECOMM after timeout_s. */
af_status af_rendezvous_broadcast(void *buf, size_t bytes, int rank, int world, const char *addr,
                                  int port, double timeout_s);

#ifdef __cplusplus
}
#endif
#endif
