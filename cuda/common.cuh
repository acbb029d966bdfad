// Error checks for the CUDA backend: every runtime/library call turns into an af_status
// with a message naming the call; nothing aborts.
#pragma once
#include <cuda_runtime.h>

#include "afire.h"

#define AF_CUDA_TRY(call)                                                                   \
    do {                                                                                    \
        cudaError_t af_e_ = (call);                                                         \
        if (af_e_ != cudaSuccess)                                                           \
            return af_error(AF_ECUDA, "%s failed: %s (%s:%d)", #call, cudaGetErrorString(af_e_), \
                            __FILE__, __LINE__);                                            \
    } while (0)
