/* NCCL between the GPU ranks of a data-parallel run: the device half of csrc/core/comm.h.
 *
 * One communicator per rank and GPU. Its unique id travels from rank 0 through MPI (an
 * af_comm, when MPI launched the job) or over TCP (af_rendezvous_broadcast on
 * MASTER_ADDR:MASTER_PORT, for torchrun / srun); NCCL then does every collective.
 *
 * Timeouts: the communicator is non-blocking (ncclConfig_t.blocking = 0), so creating it and
 * enqueueing never block; af_nccl_wait waits for a stream with a deadline while watching
 * ncclCommGetAsyncError. A rank that died or hangs leaves the others' NCCL kernels waiting:
 * at the deadline the communicator is aborted (ncclCommAbort, which ends those kernels) and
 * AF_ECOMM names the stage; the communicator is broken from then on.
 *
 * Device collectives are queued on the caller's stream (cudaStream_t passed as void *: this
 * header is plain C, read by the bindings). Host buffers are staged through a device buffer
 * on the communicator's own stream and waited for (the few small exchanges of the training
 * loop when no MPI runs: counts, agreements, digests).
 *
 * A build without NCCL (AFIRE_HAVE_NCCL undefined) has the same functions; they return
 * AF_ENOTSUP.
 */
#ifndef AFIRE_CUDA_COMM_CUH
#define AFIRE_CUDA_COMM_CUH

#include <stddef.h>

#include "comm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct af_nccl af_nccl;

/* Rank `rank` of `world` on CUDA device `device`. The id goes through `host` (may be NULL)
 * or else the TCP rendezvous at addr:port (rank 0 listens). timeout_s > 0 bounds the
 * creation and every af_nccl_wait. */
af_status af_nccl_create(af_nccl **out, int rank, int world, int device, af_comm *host,
                         const char *addr, int port, double timeout_s);
/* Finalise (or abort, when broken): later calls fail with AF_ECOMM; the struct stays valid
 * for whoever still holds it. af_nccl_free closes and frees (NULL is ignored). */
void af_nccl_close(af_nccl *n);
void af_nccl_free(af_nccl *n);
int af_nccl_rank(const af_nccl *n);
int af_nccl_size(const af_nccl *n);
int af_nccl_device(const af_nccl *n);
double af_nccl_timeout(const af_nccl *n);
int af_nccl_broken(const af_nccl *n);

/* Queued on `stream`: in-place all-reduce of buf[count] (device), all-gather of `bytes` per
 * rank (recv holds size * bytes), broadcast of `bytes` from `root`. `what` names the stage
 * in error messages. */
af_status af_nccl_allreduce(af_nccl *n, void *buf, size_t count, af_comm_type type,
                            af_comm_op op, void *stream, const char *what);
af_status af_nccl_allgather(af_nccl *n, const void *send, void *recv, size_t bytes, void *stream,
                            const char *what);
/* Waits until `stream` has finished, against the deadline (module comment). */
af_status af_nccl_wait(af_nccl *n, void *stream, const char *what);

/* Host buffers (staged through the device; synchronous): as comm.h's af_comm_* calls. */
af_status af_nccl_host_allreduce(af_nccl *n, void *buf, size_t count, af_comm_type type,
                                 af_comm_op op, const char *what);
af_status af_nccl_host_allgather(af_nccl *n, const void *send, void *recv, size_t bytes,
                                 const char *what);
af_status af_nccl_host_broadcast(af_nccl *n, void *buf, size_t bytes, int root,
                                 const char *what);
af_status af_nccl_host_barrier(af_nccl *n, const char *what);

#ifdef __cplusplus
}
#endif
#endif
