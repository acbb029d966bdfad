// Residual add: the twin of csrc/ops/residual.c. Its backward is where two gradient paths
// meet: the one op whose input gradients accumulate (cuda_api.h).
#include "common.cuh"

__global__ void residual_forward_kernel(float *out, const float *a, const float *b, size_t n) {
    AF_GRID_STRIDE(size_t, i, n)
        out[i] = a[i] + b[i];
}

__global__ void residual_backward_kernel(float *da, float *db, const float *dout, size_t n) {
    AF_GRID_STRIDE(size_t, i, n) {
        float g = dout[i];
        if (da) da[i] += g;
        if (db) db[i] += g;
    }
}

extern "C" af_status af_cuda_residual_forward(af_cuda_context *ctx, float *out, const float *a,
                                              const float *b, size_t n) {
    if (n == 0) return AF_OK;
    AF_CUDA_CHECK(out && a && b, "residual_forward: NULL pointer");
    residual_forward_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(out, a, b, n);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_residual_backward(af_cuda_context *ctx, float *da, float *db,
                                               const float *dout, size_t n) {
    if (n == 0 || (da == nullptr && db == nullptr)) return AF_OK;
    AF_CUDA_CHECK(dout != nullptr, "residual_backward: NULL dout");
    residual_backward_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(da, db, dout, n);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
