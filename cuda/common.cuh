// Error checks and shared pieces of the CUDA backend: every runtime/library call turns into
// an af_status with a message naming the call; nothing aborts.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "afire.h"
#include "common.h"
#include "cuda_api.h"

#define AF_CUDA_TRY(call)                                                                   \
    do {                                                                                    \
        cudaError_t af_e_ = (call);                                                         \
        if (af_e_ != cudaSuccess)                                                           \
            return af_error(AF_ECUDA, "%s failed: %s (%s:%d)", #call, cudaGetErrorString(af_e_), \
                            __FILE__, __LINE__);                                            \
    } while (0)

#define AF_CUBLAS_TRY(call)                                                                 \
    do {                                                                                    \
        cublasStatus_t af_b_ = (call);                                                      \
        if (af_b_ != CUBLAS_STATUS_SUCCESS)                                                 \
            return af_error(AF_ECUDA, "%s failed: %s (%s:%d)", #call,                       \
                            cublasGetStatusString(af_b_), __FILE__, __LINE__);              \
    } while (0)

// A kernel launch is checked right after it is queued (bad configuration, no device).
#define AF_CUDA_LAUNCHED() AF_CUDA_TRY(cudaGetLastError())

// Reject bad sizes / missing pointers in the public entry points.
#define AF_CUDA_CHECK(cond, ...)                                  \
    do {                                                          \
        if (!(cond)) return af_error(AF_EINVAL, __VA_ARGS__);     \
    } while (0)

struct af_lt_cache;    // gemm_lt.cu: cuBLASLt descriptors and algorithms, one per GEMM shape
struct af_sdpa_cache;  // sdpa.cu: cuDNN SDPA execution plans, one per attention shape

// One stream and one cuBLAS handle, created once and reused by every op. The fast path's
// resources (fast.cuh) are created by af_cuda_fast_init on first need and freed with the
// context.
struct af_cuda_context {
    int device;
    int allow_tf32;  // 0: exact fp32 GEMMs (the check path); 1: TF32 tensor cores
    cudaStream_t stream;
    cublasHandle_t cublas;
    // fast path: cuBLASLt (handle, workspace, per-shape plans), cuDNN (handle as void * so
    // this header needs no cudnn.h; per-shape SDPA plans and their workspace)
    void *lt;
    void *lt_ws;
    size_t lt_ws_bytes;
    struct af_lt_cache *lt_cache;
    int lt_epilogues;  // 0: plain GEMMs + our bias / bias-gradient kernels (AFIRE_CUDA_LT_EPILOGUE=0)
    void *cudnn;
    struct af_sdpa_cache *sdpa_cache;
    void *sdpa_ws;
    size_t sdpa_ws_bytes;
    float *fast_aux;         // AF_FAST_AUX_FLOATS: bias gradients, column-sum / LN partials
    unsigned *fast_counter;  // the LayerNorm backward's block counter (0 between launches)
};

// Grid for a grid-stride loop over n elements.
static inline unsigned af_grid_1d(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b > 65535LL * 16) b = 65535LL * 16;
    if (b < 1) b = 1;
    return (unsigned)b;
}

// Grid-stride loop over [0, n) with an index of type T:  AF_GRID_STRIDE(int64_t, i, n) { ... }
#define AF_GRID_STRIDE(T, i, n)                                            \
    for (T i = (T)blockIdx.x * blockDim.x + threadIdx.x; i < (n);          \
         i += (T)gridDim.x * blockDim.x)

// Sum over a warp with a fixed butterfly pattern: deterministic.
__device__ __forceinline__ float af_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float af_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// colsum[c] += sum_r x[r, c] for x[N,IC], rows in a fixed order (deterministic, no atomics):
// defined in cuda/ops/reduce.cu, used for bias and LayerNorm parameter gradients.
af_status af_cuda_colsum_accumulate(af_cuda_context *ctx, float *colsum, const float *x, int N,
                                    int IC);
