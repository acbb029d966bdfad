/* Raw device memory for afire._C_cuda.cuda.DeviceTensor (csrc/python/py_cuda_tensor.c): allocate,
 * free and copy bytes on a given device. Plain C. Each call selects `device` for itself and
 * restores the caller's current device, so a DeviceTensor may be created, read or freed from
 * any thread whatever device that thread holds. Copies are synchronous. */
#ifndef AFIRE_CUDA_DEVICE_TENSOR_CUH
#define AFIRE_CUDA_DEVICE_TENSOR_CUH

#include <stddef.h>

#include "afire.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { AF_COPY_H2D = 0, AF_COPY_D2H = 1, AF_COPY_D2D = 2 };

/* *out = `bytes` zero-filled bytes on `device` (bytes == 0: *out = NULL, nothing allocated). */
af_status af_cuda_bytes_alloc(void **out, size_t bytes, int device);
/* Frees memory from af_cuda_bytes_alloc (NULL is ignored). Waits for the device first: a
 * consumer (PyTorch, CuPy) may still have kernels queued that read it on its own stream. */
void af_cuda_bytes_free(void *p, int device);
/* Copies `bytes` bytes (kind AF_COPY_*). A download first waits for all work on the device,
 * so writes a consumer queued on any stream are included. */
af_status af_cuda_bytes_copy(void *dst, const void *src, size_t bytes, int kind, int device);

#ifdef __cplusplus
}
#endif
#endif
