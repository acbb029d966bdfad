// The CUDA context (stream + cuBLAS handle), device memory helpers, the host-level runner
// used by the test entry points, event timing for the benchmarks, and the fast path's
// per-context resources (cuBLASLt, aux scratch; cuDNN in sdpa.cu).
#include <cublasLt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "fast.cuh"
#include "rng.h"

extern "C" af_status af_cuda_context_create(af_cuda_context **out, int device, int allow_tf32) {
    *out = nullptr;
    int count = 0;
    af_cuda_device_count(&count);
    if (count <= 0) return af_error(AF_ECUDA, "no CUDA device is visible (driver missing or no GPU)");
    AF_CUDA_CHECK(device >= 0 && device < count, "device %d out of range: %d visible", device,
                  count);
    AF_CUDA_TRY(cudaSetDevice(device));
    af_cuda_context *ctx = (af_cuda_context *)calloc(1, sizeof(af_cuda_context));
    if (ctx == nullptr) return af_error(AF_ENOMEM, "cannot allocate the CUDA context");
    ctx->device = device;
    cudaError_t e = cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        free(ctx);
        return af_error(AF_ECUDA, "cudaStreamCreate failed: %s", cudaGetErrorString(e));
    }
    cublasStatus_t b = cublasCreate(&ctx->cublas);
    if (b == CUBLAS_STATUS_SUCCESS) b = cublasSetStream(ctx->cublas, ctx->stream);
    if (b != CUBLAS_STATUS_SUCCESS) {
        if (ctx->cublas) cublasDestroy(ctx->cublas);
        cudaStreamDestroy(ctx->stream);
        free(ctx);
        return af_error(AF_ECUDA, "cuBLAS initialisation failed: %s", cublasGetStatusString(b));
    }
    af_status st = af_cuda_context_set_tf32(ctx, allow_tf32);
    if (st != AF_OK) {
        af_cuda_context_destroy(ctx);
        return st;
    }
    *out = ctx;
    return AF_OK;
}

extern "C" void af_cuda_context_destroy(af_cuda_context *ctx) {
    if (ctx == nullptr) return;
    cudaStreamSynchronize(ctx->stream);
    af_cuda_fast_release(ctx);
    cublasDestroy(ctx->cublas);
    cudaStreamDestroy(ctx->stream);
    free(ctx);
}

extern "C" af_status af_cuda_context_set_tf32(af_cuda_context *ctx, int allow_tf32) {
    // CUBLAS_DEFAULT_MATH keeps fp32 GEMMs exact fp32 (no TF32) since CUDA 11.
    AF_CUBLAS_TRY(cublasSetMathMode(ctx->cublas, allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH
                                                            : CUBLAS_DEFAULT_MATH));
    ctx->allow_tf32 = allow_tf32 ? 1 : 0;
    return AF_OK;
}

extern "C" af_status af_cuda_synchronize(af_cuda_context *ctx) {
    AF_CUDA_TRY(cudaStreamSynchronize(ctx->stream));
    return AF_OK;
}

extern "C" af_status af_cuda_malloc(af_cuda_context *ctx, float **out, size_t count) {
    (void)ctx;  // plain cudaMalloc: the context is kept in the signature for pooling later
    *out = nullptr;
    if (count == 0) return AF_OK;
    AF_CUDA_CHECK(count <= SIZE_MAX / sizeof(float), "device allocation of %zu floats overflows",
                  count);
    cudaError_t e = cudaMalloc((void **)out, count * sizeof(float));
    if (e != cudaSuccess) {
        *out = nullptr;
        cudaGetLastError();
        return af_error(e == cudaErrorMemoryAllocation ? AF_ENOMEM : AF_ECUDA,
                        "cudaMalloc of %zu floats failed: %s", count, cudaGetErrorString(e));
    }
    return AF_OK;
}

extern "C" void af_cuda_free(float *p) {
    if (p) cudaFree(p);
}

extern "C" af_status af_cuda_upload(af_cuda_context *ctx, float *dst, const float *host,
                                    size_t count) {
    if (count == 0) return AF_OK;
    AF_CUDA_TRY(cudaMemcpyAsync(dst, host, count * sizeof(float), cudaMemcpyHostToDevice,
                                ctx->stream));
    return AF_OK;
}

extern "C" af_status af_cuda_download(af_cuda_context *ctx, float *host, const float *src,
                                      size_t count) {
    if (count == 0) return AF_OK;
    AF_CUDA_TRY(cudaMemcpyAsync(host, src, count * sizeof(float), cudaMemcpyDeviceToHost,
                                ctx->stream));
    AF_CUDA_TRY(cudaStreamSynchronize(ctx->stream));
    return AF_OK;
}

extern "C" af_status af_cuda_zero(af_cuda_context *ctx, float *dst, size_t count) {
    if (count == 0) return AF_OK;
    AF_CUDA_TRY(cudaMemsetAsync(dst, 0, count * sizeof(float), ctx->stream));
    return AF_OK;
}

__global__ void fill_uniform_kernel(float *dst, size_t n, uint64_t seed) {
    AF_GRID_STRIDE(size_t, i, n)
        dst[i] = af_rand_uniform(seed, 0, (uint64_t)i) * 2.0f - 1.0f;
}

extern "C" af_status af_cuda_fill_uniform(af_cuda_context *ctx, float *dst, size_t count,
                                          uint64_t seed) {
    if (count == 0) return AF_OK;
    fill_uniform_kernel<<<af_grid_1d((int64_t)count, 256), 256, 0, ctx->stream>>>(dst, count,
                                                                                   seed);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// Upload, run, download; every device buffer is released whatever fails.
extern "C" af_status af_cuda_run_host(af_cuda_context *ctx, int nargs, const af_cuda_buf *bufs,
                                      af_cuda_fn fn, const void *user) {
    AF_CUDA_CHECK(nargs >= 0 && nargs <= AF_CUDA_MAX_ARGS, "af_cuda_run_host: %d buffers", nargs);
    void *dev[AF_CUDA_MAX_ARGS] = {nullptr};
    af_status st = AF_OK;
    cudaError_t e = cudaSetDevice(ctx->device);
    if (e != cudaSuccess) st = af_error(AF_ECUDA, "cudaSetDevice: %s", cudaGetErrorString(e));
    for (int i = 0; st == AF_OK && i < nargs; i++) {
        const af_cuda_buf *b = &bufs[i];
        if (b->bytes == 0 || (b->host == nullptr && b->role != AF_CUDA_SCRATCH)) continue;
        e = cudaMalloc(&dev[i], b->bytes);
        if (e != cudaSuccess) {
            dev[i] = nullptr;
            cudaGetLastError();
            st = af_error(e == cudaErrorMemoryAllocation ? AF_ENOMEM : AF_ECUDA,
                          "cudaMalloc of %zu bytes failed: %s", b->bytes, cudaGetErrorString(e));
            break;
        }
        e = b->role == AF_CUDA_OUT || b->role == AF_CUDA_SCRATCH
                ? cudaMemsetAsync(dev[i], 0, b->bytes, ctx->stream)
                : cudaMemcpyAsync(dev[i], b->host, b->bytes, cudaMemcpyHostToDevice, ctx->stream);
        if (e != cudaSuccess) st = af_error(AF_ECUDA, "upload failed: %s", cudaGetErrorString(e));
    }
    if (st == AF_OK) st = fn(ctx, dev, user);
    for (int i = 0; st == AF_OK && i < nargs; i++) {
        const af_cuda_buf *b = &bufs[i];
        if (dev[i] == nullptr || (b->role != AF_CUDA_OUT && b->role != AF_CUDA_INOUT)) continue;
        e = cudaMemcpyAsync(b->host, dev[i], b->bytes, cudaMemcpyDeviceToHost, ctx->stream);
        if (e != cudaSuccess) st = af_error(AF_ECUDA, "download failed: %s", cudaGetErrorString(e));
    }
    e = cudaStreamSynchronize(ctx->stream);  // drain before freeing what queued work uses
    if (st == AF_OK && e != cudaSuccess)
        st = af_error(AF_ECUDA, "kernel failed: %s", cudaGetErrorString(e));
    for (int i = 0; i < nargs; i++)
        if (dev[i] != nullptr) cudaFree(dev[i]);
    return st;
}

extern "C" af_status af_cuda_time(af_cuda_context *ctx, af_cuda_fn fn, void *const *dev,
                                  const void *user, int warmup, int iters, float *ms) {
    AF_CUDA_CHECK(iters > 0 && warmup >= 0, "need iters > 0 and warmup >= 0");
    *ms = 0.0f;
    for (int i = 0; i < warmup; i++) AF_TRY(fn(ctx, dev, user));
    cudaEvent_t start, stop;
    AF_CUDA_TRY(cudaEventCreate(&start));
    cudaError_t e = cudaEventCreate(&stop);
    if (e != cudaSuccess) {
        cudaEventDestroy(start);
        return af_error(AF_ECUDA, "cudaEventCreate: %s", cudaGetErrorString(e));
    }
    af_status st = AF_OK;
    e = cudaEventRecord(start, ctx->stream);
    for (int i = 0; e == cudaSuccess && st == AF_OK && i < iters; i++) st = fn(ctx, dev, user);
    if (e == cudaSuccess) e = cudaEventRecord(stop, ctx->stream);
    if (e == cudaSuccess) e = cudaEventSynchronize(stop);
    float total = 0.0f;
    if (e == cudaSuccess && st == AF_OK) e = cudaEventElapsedTime(&total, start, stop);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (st != AF_OK) return st;
    if (e != cudaSuccess) return af_error(AF_ECUDA, "event timing failed: %s", cudaGetErrorString(e));
    *ms = total / (float)iters;
    return AF_OK;
}

// ------------------------------------------------------------------ fast path resources

void af_sdpa_release(af_cuda_context *ctx);  // sdpa.cu

void af_cuda_fast_release(af_cuda_context *ctx) {
    af_sdpa_release(ctx);
    af_lt_cache_free(ctx->lt_cache);
    ctx->lt_cache = nullptr;
    if (ctx->lt) cublasLtDestroy((cublasLtHandle_t)ctx->lt);
    ctx->lt = nullptr;
    if (ctx->lt_ws) cudaFree(ctx->lt_ws);
    if (ctx->fast_aux) cudaFree(ctx->fast_aux);
    if (ctx->fast_counter) cudaFree(ctx->fast_counter);
    ctx->lt_ws = nullptr, ctx->fast_aux = nullptr, ctx->fast_counter = nullptr;
    ctx->lt_ws_bytes = 0;
}

static af_status fast_malloc(void **p, size_t bytes) {
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        *p = nullptr;
        return af_error(e == cudaErrorMemoryAllocation ? AF_ENOMEM : AF_ECUDA,
                        "cudaMalloc of %zu bytes (fast path workspace) failed: %s", bytes,
                        cudaGetErrorString(e));
    }
    return AF_OK;
}

af_status af_cuda_fast_init(af_cuda_context *ctx) {
    if (ctx->lt != nullptr) return AF_OK;
    AF_CUDA_TRY(cudaSetDevice(ctx->device));
    cublasLtHandle_t lt = nullptr;
    AF_CUBLAS_TRY(cublasLtCreate(&lt));
    ctx->lt = lt;
    af_status st = fast_malloc(&ctx->lt_ws, AF_LT_WORKSPACE_BYTES);
    if (st == AF_OK) st = fast_malloc((void **)&ctx->fast_aux, AF_FAST_AUX_FLOATS * sizeof(float));
    if (st == AF_OK) st = fast_malloc((void **)&ctx->fast_counter, 256);
    if (st == AF_OK && cudaMemsetAsync(ctx->fast_counter, 0, 256, ctx->stream) != cudaSuccess)
        st = af_error(AF_ECUDA, "cudaMemsetAsync of the fast path counter failed");
    if (st == AF_OK) {
        ctx->lt_cache = (af_lt_cache *)calloc(1, af_lt_cache_bytes());
        if (ctx->lt_cache == nullptr) st = af_error(AF_ENOMEM, "cannot allocate the GEMM plan cache");
    }
    if (st != AF_OK) {
        af_cuda_fast_release(ctx);
        return st;
    }
    ctx->lt_ws_bytes = AF_LT_WORKSPACE_BYTES;
    const char *epi = getenv("AFIRE_CUDA_LT_EPILOGUE");
    ctx->lt_epilogues = !(epi != nullptr && strcmp(epi, "0") == 0);
    return AF_OK;
}

extern "C" void af_cuda_fast_status(char *buf, size_t n) {
    char lt[400], sdpa[700];
    af_lt_status(lt, sizeof lt);
    af_sdpa_status(sdpa, sizeof sdpa);
    snprintf(buf, n, "%s\n%s", lt, sdpa);
}
