// Row softmax, one warp per row: the twin of csrc/ops/softmax.c, also used by attention.
#include "common.cuh"
#include "ops_internal.cuh"

__global__ void softmax_forward_kernel(float *out, const float *inp, int64_t N, int IC,
                                       float scale) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *x = inp + row * IC;
    float *y = out + row * IC;
    float m = -INFINITY;
    for (int c = lane; c < IC; c += 32) m = fmaxf(m, x[c] * scale);
    m = af_warp_max(m);
    float s = 0.0f;
    for (int c = lane; c < IC; c += 32) s += expf(x[c] * scale - m);
    s = af_warp_sum(s);
    float inv = 1.0f / s;
    for (int c = lane; c < IC; c += 32) y[c] = expf(x[c] * scale - m) * inv;
}

// dinp = out * (dout - sum(dout * out)). In place (dinp == dout) is safe: each element is read
// and written by the same lane after the row sum is known.
__global__ void softmax_backward_kernel(float *dinp, const float *dout, const float *out,
                                        int64_t N, int IC) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *g = dout + row * IC, *y = out + row * IC;
    float *dx = dinp + row * IC;
    float d = 0.0f;
    for (int c = lane; c < IC; c += 32) d += g[c] * y[c];
    d = af_warp_sum(d);
    for (int c = lane; c < IC; c += 32) dx[c] = y[c] * (g[c] - d);
}

af_status af_softmax_rows(af_cuda_context *ctx, float *out, const float *inp, int64_t N, int IC,
                          float scale) {
    softmax_forward_kernel<<<(unsigned)((N + 7) / 8), 256, 0, ctx->stream>>>(out, inp, N, IC,
                                                                               scale);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

af_status af_softmax_rows_backward(af_cuda_context *ctx, float *dinp, const float *dout,
                                   const float *out, int64_t N, int IC) {
    softmax_backward_kernel<<<(unsigned)((N + 7) / 8), 256, 0, ctx->stream>>>(dinp, dout, out, N,
                                                                               IC);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_softmax_forward(af_cuda_context *ctx, float *out, const float *inp,
                                             int N, int IC) {
    AF_CUDA_CHECK(N > 0 && IC > 0, "softmax_forward: bad sizes N=%d IC=%d", N, IC);
    AF_CUDA_CHECK(out && inp, "softmax_forward: NULL pointer");
    return af_softmax_rows(ctx, out, inp, N, IC, 1.0f);
}

extern "C" af_status af_cuda_softmax_backward(af_cuda_context *ctx, float *dinp,
                                              const float *dout, const float *out, int N,
                                              int IC) {
    AF_CUDA_CHECK(N > 0 && IC > 0, "softmax_backward: bad sizes N=%d IC=%d", N, IC);
    if (dinp == nullptr) return AF_OK;
    AF_CUDA_CHECK(dout && out, "softmax_backward: NULL pointer");
    return af_softmax_rows_backward(ctx, dinp, dout, out, N, IC);
}
