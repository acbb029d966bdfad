// One AdamW step (PyTorch semantics): the twin of csrc/ops/adamw.c.
#include <math.h>

#include "common.cuh"

__global__ void adamw_kernel(float *params, const float *grads, float *m, float *v, size_t n,
                             float lr, float beta1, float beta2, float eps, float weight_decay,
                             float bc1, float bc2) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = grads[i], p = params[i];
        p -= lr * weight_decay * p;  // decoupled decay on the pre-step parameter
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        params[i] = p - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

extern "C" af_status af_cuda_adamw_update(af_cuda_context *ctx, float *params, const float *grads,
                                          float *m, float *v, size_t n, float lr, float beta1,
                                          float beta2, float eps, float weight_decay, int t) {
    AF_CUDA_CHECK(t >= 1, "adamw_update: step t must be >= 1, got %d", t);
    if (n == 0) return AF_OK;
    AF_CUDA_CHECK(params && grads && m && v, "adamw_update: NULL pointer");
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    adamw_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(
        params, grads, m, v, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
