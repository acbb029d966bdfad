/* The C-callable surface of the CUDA backend (the files under cuda/). Only declared when the build has
 * CUDA; callers go through py_cuda.c, which raises a clear error on builds without it. */
#ifndef AFIRE_CUDA_API_H
#define AFIRE_CUDA_API_H
#include <stddef.h>
#include <stdint.h>

#include "afire.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of visible CUDA devices (0 when the driver or a GPU is missing: not an error). */
af_status af_cuda_device_count(int *count);
/* Versions of the linked libraries (cudart runtime, cuBLAS(Lt), cuDNN, NCCL). */
af_status af_cuda_versions(int *cudart, size_t *cublaslt, size_t *cudnn, int *nccl);
/* Fills host `out[n]` with af_rand_uniform(seed, stream, offset + i), drawn on the GPU:
 * the CPU/GPU twin check of the counter-based generator. */
af_status af_cuda_rand_uniform(float *out, int64_t n, uint64_t seed, uint64_t stream,
                               uint64_t offset);

#ifdef __cplusplus
}
#endif
#endif
