// One AdamW step (PyTorch semantics): the twin of csrc/ops/adamw.c.
#include <math.h>

#include "common.cuh"

__global__ void adamw_kernel(float *params, const float *grads, float *m, float *v, size_t n,
                             float beta1, float beta2, float eps, float decay, float step_size,
                             float bc2_sqrt) {
    AF_GRID_STRIDE(size_t, i, n) {
        float g = grads[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        params[i] = params[i] * decay - step_size * mi / denom;  // decay: decoupled, pre-step p
    }
}

extern "C" af_status af_cuda_adamw_update(af_cuda_context *ctx, float *params, const float *grads,
                                          float *m, float *v, size_t n, float lr, float beta1,
                                          float beta2, float eps, float weight_decay, int t) {
    AF_CUDA_CHECK(t >= 1, "adamw_update: step t must be >= 1, got %d", t);
    if (n == 0) return AF_OK;
    AF_CUDA_CHECK(params && grads && m && v, "adamw_update: NULL pointer");
    // bias corrections in double on the host, as PyTorch (and the CPU twin) compute them
    double bc1 = 1.0 - pow((double)beta1, (double)t);
    float bc2_sqrt = (float)sqrt(1.0 - pow((double)beta2, (double)t));
    float step_size = (float)((double)lr / bc1), decay = 1.0f - lr * weight_decay;
    adamw_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(
        params, grads, m, v, n, beta1, beta2, eps, decay, step_size, bc2_sqrt);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
