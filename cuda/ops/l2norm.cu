// Row L2 normalisation (F.normalize): the twin of csrc/ops/l2norm.c. One warp per row.
// out = x / max(||x||, eps); norm[N] keeps ||x|| (unclamped) for the backward.
#include "common.cuh"

__global__ void l2norm_forward_kernel(float *out, float *norm, const float *inp, int N, int IC,
                                      float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *x = inp + (int64_t)row * IC;
    float s = 0.0f;
    for (int c = lane; c < IC; c += 32) s += x[c] * x[c];
    float n = sqrtf(af_warp_sum(s));
    float inv = 1.0f / fmaxf(n, eps);
    float *y = out + (int64_t)row * IC;
    for (int c = lane; c < IC; c += 32) y[c] = x[c] * inv;
    if (lane == 0 && norm) norm[row] = n;
}

// Unclamped (n > eps): d(x/n) = dout/n - x (x.dout)/n^3; clamped: dout/eps.
__global__ void l2norm_backward_kernel(float *dinp, const float *dout, const float *inp,
                                       const float *norm, int N, int IC, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *x = inp + (int64_t)row * IC, *g = dout + (int64_t)row * IC;
    float *dx = dinp + (int64_t)row * IC;
    float n = norm[row];
    if (n > eps) {
        float d = 0.0f;
        for (int c = lane; c < IC; c += 32) d += x[c] * g[c];
        d = af_warp_sum(d);
        float inv = 1.0f / n, k = d * inv * inv * inv;
        for (int c = lane; c < IC; c += 32) dx[c] = g[c] * inv - x[c] * k;
    } else {
        float inv = 1.0f / eps;
        for (int c = lane; c < IC; c += 32) dx[c] = g[c] * inv;
    }
}

extern "C" af_status af_cuda_l2norm_forward(af_cuda_context *ctx, float *out, float *norm,
                                            const float *inp, int N, int IC, float eps) {
    AF_CUDA_CHECK(N > 0 && IC > 0, "l2norm_forward: bad sizes N=%d IC=%d", N, IC);
    AF_CUDA_CHECK(out && inp, "l2norm_forward: NULL pointer");
    l2norm_forward_kernel<<<(N + 7) / 8, 256, 0, ctx->stream>>>(out, norm, inp, N, IC, eps);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_l2norm_backward(af_cuda_context *ctx, float *dinp,
                                             const float *dout, const float *inp,
                                             const float *norm, int N, int IC, float eps) {
    AF_CUDA_CHECK(N > 0 && IC > 0, "l2norm_backward: bad sizes N=%d IC=%d", N, IC);
    if (dinp == nullptr) return AF_OK;
    AF_CUDA_CHECK(dout && inp && norm, "l2norm_backward: NULL pointer");
    l2norm_backward_kernel<<<(N + 7) / 8, 256, 0, ctx->stream>>>(dinp, dout, inp, norm, N, IC, eps);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
