// Device discovery, linked-library versions and the GPU twin of the counter-based RNG.
#include <cublasLt.h>
#ifdef AFIRE_HAVE_CUDNN
#include <cudnn.h>
#endif
#ifdef AFIRE_HAVE_NCCL
#include <nccl.h>
#endif

#include "common.cuh"
#include "cuda_api.h"
#include "rng.h"

extern "C" af_status af_cuda_device_count(int *count) {
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) {  // no driver / no device: report zero, clear the sticky error
        cudaGetLastError();
        *count = 0;
    }
    return AF_OK;
}

extern "C" af_status af_cuda_versions(int *cudart, size_t *cublaslt, size_t *cudnn, int *nccl) {
    AF_CUDA_TRY(cudaRuntimeGetVersion(cudart));
    *cublaslt = cublasLtGetVersion();
    *cudnn = 0;
    *nccl = 0;
#ifdef AFIRE_HAVE_CUDNN
    *cudnn = cudnnGetVersion();
#endif
#ifdef AFIRE_HAVE_NCCL
    if (ncclGetVersion(nccl) != ncclSuccess) *nccl = 0;
#endif
    return AF_OK;
}

extern "C" af_status af_cuda_mem_info(int device, size_t *free_bytes, size_t *total_bytes) {
    *free_bytes = *total_bytes = 0;
    AF_CUDA_TRY(cudaSetDevice(device));
    AF_CUDA_TRY(cudaMemGetInfo(free_bytes, total_bytes));
    return AF_OK;
}

__global__ void rand_uniform_kernel(float *out, int64_t n, uint64_t seed, uint64_t stream,
                                    uint64_t offset) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = af_rand_uniform(seed, stream, offset + (uint64_t)i);
}

extern "C" af_status af_cuda_rand_uniform(float *out, int64_t n, uint64_t seed, uint64_t stream,
                                          uint64_t offset) {
    if (n <= 0) return AF_OK;
    float *d = nullptr;
    AF_CUDA_TRY(cudaMalloc(&d, (size_t)n * sizeof(float)));
    int threads = 256;
    int64_t blocks = (n + threads - 1) / threads;
    rand_uniform_kernel<<<(unsigned)blocks, threads>>>(d, n, seed, stream, offset);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaMemcpy(out, d, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost);
    cudaFree(d);
    if (e != cudaSuccess)
        return af_error(AF_ECUDA, "rand_uniform on the GPU failed: %s", cudaGetErrorString(e));
    return AF_OK;
}
