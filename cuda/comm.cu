// NCCL between GPU ranks (comm.cuh): creation with the id exchange, device collectives on a
// stream, the deadline-bounded wait and the staged host collectives.
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "comm.cuh"
#include "common.cuh"

#ifdef AFIRE_HAVE_NCCL
#include <nccl.h>

struct af_nccl {
    ncclComm_t comm;
    int rank, size, device;
    double timeout;
    int broken, closed;
    cudaStream_t stream;  // the host collectives' staging stream
    void *staging;        // device buffer of staging_bytes for the host collectives
    size_t staging_bytes;
};

static double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void pause_after(double waited) {
    if (waited < 2e-3) {
        sched_yield();
    } else {
        struct timespec ts = {0, 50000};
        nanosleep(&ts, nullptr);
    }
}

static af_status broken_error(af_nccl *n, const char *what, const char *why) {
    if (!n->broken && n->comm != nullptr) ncclCommAbort(n->comm);  // ends kernels still waiting
    n->broken = 1;
    n->comm = nullptr;
    return af_error(AF_ECOMM, "rank %d of %d: NCCL %s %s; the job cannot continue", n->rank,
                    n->size, what, why);
}

// A non-blocking communicator answers ncclInProgress while it works in the background: wait
// (against the deadline) until it has settled.
static af_status settle(af_nccl *n, ncclResult_t r, const char *what) {
    const double t0 = now_s();
    while (r == ncclInProgress) {
        double waited = now_s() - t0;
        if (n->timeout > 0 && waited > n->timeout) {
            char why[160];
            snprintf(why, sizeof why, "did not complete within %g s (AFIRE_COMM_TIMEOUT): "
                     "another rank died or hangs", n->timeout);
            return broken_error(n, what, why);
        }
        pause_after(waited);
        if (ncclCommGetAsyncError(n->comm, &r) != ncclSuccess) break;
    }
    if (r != ncclSuccess) {
        char why[256];
        snprintf(why, sizeof why, "failed: %s (%s)", ncclGetErrorString(r), ncclGetLastError(n->comm));
        return broken_error(n, what, why);
    }
    return AF_OK;
}

static af_status usable(af_nccl *n, const char *what) {
    AF_CUDA_CHECK(n != nullptr, "nccl: NULL communicator");
    if (n->closed) return af_error(AF_ECOMM, "NCCL %s: the communicator is closed", what);
    if (n->broken)
        return af_error(AF_ECOMM, "rank %d of %d: NCCL %s: the communicator failed earlier (a "
                        "rank died or hung); the job cannot continue", n->rank, n->size, what);
    return AF_OK;
}

static ncclDataType_t nccl_type(af_comm_type t) {
    switch (t) {
    case AF_COMM_F32: return ncclFloat32;
    case AF_COMM_F64: return ncclFloat64;
    case AF_COMM_I64: return ncclInt64;
    default: return ncclUint8;
    }
}

static ncclRedOp_t nccl_op(af_comm_op op) {
    return op == AF_COMM_MAX ? ncclMax : op == AF_COMM_MIN ? ncclMin : ncclSum;
}

extern "C" af_status af_nccl_create(af_nccl **out, int rank, int world, int device,
                                    af_comm *host, const char *addr, int port, double timeout_s) {
    *out = nullptr;
    AF_CUDA_CHECK(world >= 1 && rank >= 0 && rank < world, "nccl: rank %d of %d", rank, world);
    AF_CUDA_CHECK(timeout_s >= 0, "nccl: timeout must be >= 0");
    AF_CUDA_TRY(cudaSetDevice(device));
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (rank == 0 && ncclGetUniqueId(&id) != ncclSuccess)
        return af_error(AF_ECOMM, "ncclGetUniqueId failed (is the network usable?)");
    if (host != nullptr) {
        AF_CUDA_CHECK(af_comm_rank(host) == rank && af_comm_size(host) == world,
                      "nccl: rank %d of %d, but MPI says %d of %d", rank, world,
                      af_comm_rank(host), af_comm_size(host));
        AF_TRY(af_comm_broadcast(host, &id, sizeof id, 0, "NCCL id broadcast"));
    } else {
        AF_TRY(af_rendezvous_broadcast(&id, sizeof id, rank, world, addr, port, timeout_s));
    }
    af_nccl *n = (af_nccl *)calloc(1, sizeof *n);
    if (n == nullptr) return af_error(AF_ENOMEM, "nccl: out of memory");
    n->rank = rank;
    n->size = world;
    n->device = device;
    n->timeout = timeout_s;
    cudaError_t e = cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        free(n);
        return af_error(AF_ECUDA, "nccl: cudaStreamCreate failed: %s", cudaGetErrorString(e));
    }
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every call returns at once; settle()/af_nccl_wait keep the deadline
    ncclResult_t r = ncclCommInitRankConfig(&n->comm, world, id, rank, &config);
    af_status st = (n->comm == nullptr && r != ncclSuccess)
                       ? af_error(AF_ECOMM, "rank %d of %d: ncclCommInitRank failed: %s", rank,
                                  world, ncclGetErrorString(r))
                       : settle(n, r, "initialisation");
    if (st != AF_OK) {
        af_nccl_free(n);
        return st;
    }
    *out = n;
    return AF_OK;
}

extern "C" void af_nccl_close(af_nccl *n) {
    if (n == nullptr || n->closed) return;
    n->closed = 1;
    cudaSetDevice(n->device);
    if (n->comm != nullptr) {
        if (!n->broken && settle(n, ncclCommFinalize(n->comm), "finalisation") == AF_OK)
            ncclCommDestroy(n->comm);
        else if (n->comm != nullptr)  // settle() aborted it unless it failed otherwise
            ncclCommAbort(n->comm);
        n->comm = nullptr;
    }
}

extern "C" void af_nccl_free(af_nccl *n) {
    if (n == nullptr) return;
    af_nccl_close(n);
    if (n->staging) cudaFree(n->staging);
    if (n->stream) cudaStreamDestroy(n->stream);
    free(n);
}

extern "C" int af_nccl_rank(const af_nccl *n) { return n->rank; }
extern "C" int af_nccl_size(const af_nccl *n) { return n->size; }
extern "C" int af_nccl_device(const af_nccl *n) { return n->device; }
extern "C" double af_nccl_timeout(const af_nccl *n) { return n->timeout; }
extern "C" int af_nccl_broken(const af_nccl *n) { return n->broken; }

extern "C" af_status af_nccl_allreduce(af_nccl *n, void *buf, size_t count, af_comm_type type,
                                       af_comm_op op, void *stream, const char *what) {
    AF_TRY(usable(n, what));
    if (count == 0) return AF_OK;
    return settle(n, ncclAllReduce(buf, buf, count, nccl_type(type), nccl_op(op), n->comm,
                                   (cudaStream_t)stream), what);
}

extern "C" af_status af_nccl_allgather(af_nccl *n, const void *send, void *recv, size_t bytes,
                                       void *stream, const char *what) {
    AF_TRY(usable(n, what));
    if (bytes == 0) return AF_OK;
    return settle(n, ncclAllGather(send, recv, bytes, ncclUint8, n->comm, (cudaStream_t)stream),
                  what);
}

extern "C" af_status af_nccl_wait(af_nccl *n, void *stream, const char *what) {
    AF_TRY(usable(n, what));
    const double t0 = now_s();
    for (;;) {
        cudaError_t e = cudaStreamQuery((cudaStream_t)stream);
        if (e == cudaSuccess) return AF_OK;
        if (e != cudaErrorNotReady)
            return af_error(AF_ECUDA, "rank %d: waiting for %s: %s", n->rank, what,
                            cudaGetErrorString(e));
        ncclResult_t r = ncclSuccess;
        ncclCommGetAsyncError(n->comm, &r);
        if (r != ncclSuccess && r != ncclInProgress) {
            char why[256];
            snprintf(why, sizeof why, "failed: %s", ncclGetErrorString(r));
            return broken_error(n, what, why);
        }
        double waited = now_s() - t0;
        if (n->timeout > 0 && waited > n->timeout) {
            char why[160];
            snprintf(why, sizeof why, "did not complete within %g s (AFIRE_COMM_TIMEOUT): "
                     "another rank died or hangs", n->timeout);
            return broken_error(n, what, why);
        }
        pause_after(waited);
    }
}

// ---- host buffers, staged through the device on the communicator's own stream

static af_status staging(af_nccl *n, size_t bytes) {
    if (bytes <= n->staging_bytes) return AF_OK;
    if (n->staging) cudaFree(n->staging);
    n->staging = nullptr;
    n->staging_bytes = 0;
    AF_CUDA_TRY(cudaMalloc(&n->staging, bytes));
    n->staging_bytes = bytes;
    return AF_OK;
}

extern "C" af_status af_nccl_host_allreduce(af_nccl *n, void *buf, size_t count,
                                            af_comm_type type, af_comm_op op, const char *what) {
    AF_TRY(usable(n, what));
    AF_CUDA_TRY(cudaSetDevice(n->device));
    const size_t bytes = count * af_comm_type_size(type);
    AF_TRY(staging(n, bytes));
    AF_CUDA_TRY(cudaMemcpyAsync(n->staging, buf, bytes, cudaMemcpyHostToDevice, n->stream));
    AF_TRY(af_nccl_allreduce(n, n->staging, count, type, op, n->stream, what));
    AF_CUDA_TRY(cudaMemcpyAsync(buf, n->staging, bytes, cudaMemcpyDeviceToHost, n->stream));
    return af_nccl_wait(n, n->stream, what);
}

extern "C" af_status af_nccl_host_allgather(af_nccl *n, const void *send, void *recv,
                                            size_t bytes, const char *what) {
    AF_TRY(usable(n, what));
    AF_CUDA_TRY(cudaSetDevice(n->device));
    const size_t total = bytes * (size_t)n->size;
    AF_TRY(staging(n, total + bytes));
    char *dsend = (char *)n->staging + total;
    AF_CUDA_TRY(cudaMemcpyAsync(dsend, send, bytes, cudaMemcpyHostToDevice, n->stream));
    AF_TRY(af_nccl_allgather(n, dsend, n->staging, bytes, n->stream, what));
    AF_CUDA_TRY(cudaMemcpyAsync(recv, n->staging, total, cudaMemcpyDeviceToHost, n->stream));
    return af_nccl_wait(n, n->stream, what);
}

extern "C" af_status af_nccl_host_broadcast(af_nccl *n, void *buf, size_t bytes, int root,
                                            const char *what) {
    AF_TRY(usable(n, what));
    AF_CUDA_CHECK(root >= 0 && root < n->size, "nccl: broadcast root %d of %d ranks", root,
                  n->size);
    if (bytes == 0) return AF_OK;
    AF_CUDA_TRY(cudaSetDevice(n->device));
    AF_TRY(staging(n, bytes));
    AF_CUDA_TRY(cudaMemcpyAsync(n->staging, buf, bytes, cudaMemcpyHostToDevice, n->stream));
    AF_TRY(settle(n, ncclBroadcast(n->staging, n->staging, bytes, ncclUint8, root, n->comm,
                                   n->stream), what));
    AF_CUDA_TRY(cudaMemcpyAsync(buf, n->staging, bytes, cudaMemcpyDeviceToHost, n->stream));
    return af_nccl_wait(n, n->stream, what);
}

extern "C" af_status af_nccl_host_barrier(af_nccl *n, const char *what) {
    double one = 1.0;
    return af_nccl_host_allreduce(n, &one, 1, AF_COMM_F64, AF_COMM_SUM, what);
}

#else  // ---- a build without NCCL: every entry point says so

struct af_nccl {
    int unused;
};

static af_status no_nccl() {
    return af_error(AF_ENOTSUP, "this build of afire has no NCCL (nccl.h / libnccl were not "
                    "found when the CUDA backend was built): several GPU ranks need it");
}

extern "C" af_status af_nccl_create(af_nccl **out, int, int, int, af_comm *, const char *, int,
                                    double) {
    *out = nullptr;
    return no_nccl();
}
extern "C" void af_nccl_close(af_nccl *) {}
extern "C" void af_nccl_free(af_nccl *) {}
extern "C" int af_nccl_rank(const af_nccl *) { return 0; }
extern "C" int af_nccl_size(const af_nccl *) { return 1; }
extern "C" int af_nccl_device(const af_nccl *) { return 0; }
extern "C" double af_nccl_timeout(const af_nccl *) { return 0; }
extern "C" int af_nccl_broken(const af_nccl *) { return 0; }
extern "C" af_status af_nccl_allreduce(af_nccl *, void *, size_t, af_comm_type, af_comm_op,
                                       void *, const char *) {
    return no_nccl();
}
extern "C" af_status af_nccl_allgather(af_nccl *, const void *, void *, size_t, void *,
                                       const char *) {
    return no_nccl();
}
extern "C" af_status af_nccl_wait(af_nccl *, void *, const char *) { return no_nccl(); }
extern "C" af_status af_nccl_host_allreduce(af_nccl *, void *, size_t, af_comm_type, af_comm_op,
                                            const char *) {
    return no_nccl();
}
extern "C" af_status af_nccl_host_allgather(af_nccl *, const void *, void *, size_t,
                                            const char *) {
    return no_nccl();
}
extern "C" af_status af_nccl_host_broadcast(af_nccl *, void *, size_t, int, const char *) {
    return no_nccl();
}
extern "C" af_status af_nccl_host_barrier(af_nccl *, const char *) { return no_nccl(); }

#endif
