// Weight-normalised linear without bias, gain 1 (weight_norm, dim=0): the twin of
// csrc/ops/wn_linear.c. w_eff[OC,IC] = v / ||v_k||, out[N,OC] = inp @ w_eff^T.
// Backward: dinp = dout @ w_eff (written); dw_eff = dout^T inp (into scratch[OC,IC]), g_k its
// row k, dv_k += (g_k - w_eff_k (g_k . w_eff_k)) / ||v_k|| (a parameter: accumulated).
#include "ops_internal.cuh"

__global__ void wn_normalise_kernel(float *w_eff, float *vnorm, const float *v, int OC, int IC) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= OC) return;
    const float *x = v + (int64_t)row * IC;
    float s = 0.0f;
    for (int c = lane; c < IC; c += 32) s += x[c] * x[c];
    float n = sqrtf(af_warp_sum(s));
    float inv = 1.0f / n;
    float *w = w_eff + (int64_t)row * IC;
    for (int c = lane; c < IC; c += 32) w[c] = x[c] * inv;
    if (lane == 0) vnorm[row] = n;
}

__global__ void wn_dv_kernel(float *dv, const float *dw_eff, const float *w_eff,
                             const float *vnorm, int OC, int IC) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= OC) return;
    const float *g = dw_eff + (int64_t)row * IC, *w = w_eff + (int64_t)row * IC;
    float d = 0.0f;
    for (int c = lane; c < IC; c += 32) d += g[c] * w[c];
    d = af_warp_sum(d);
    float inv = 1.0f / vnorm[row];
    float *o = dv + (int64_t)row * IC;
    for (int c = lane; c < IC; c += 32) o[c] += (g[c] - w[c] * d) * inv;
}

af_status af_wn_normalise_rows(af_cuda_context *ctx, float *w_eff, float *vnorm, const float *v,
                               int OC, int IC) {
    wn_normalise_kernel<<<(OC + 7) / 8, 256, 0, ctx->stream>>>(w_eff, vnorm, v, OC, IC);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

af_status af_wn_dv_rows(af_cuda_context *ctx, float *dv, const float *dw_eff, const float *w_eff,
                        const float *vnorm, int OC, int IC) {
    wn_dv_kernel<<<(OC + 7) / 8, 256, 0, ctx->stream>>>(dv, dw_eff, w_eff, vnorm, OC, IC);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_wn_linear_forward(af_cuda_context *ctx, float *out, float *w_eff,
                                               float *vnorm, const float *inp, const float *v,
                                               int N, int IC, int OC) {
    AF_CUDA_CHECK(N > 0 && IC > 0 && OC > 0, "wn_linear_forward: bad sizes N=%d IC=%d OC=%d", N,
                  IC, OC);
    AF_CUDA_CHECK(out && w_eff && vnorm && inp && v, "wn_linear_forward: NULL pointer");
    AF_TRY(af_wn_normalise_rows(ctx, w_eff, vnorm, v, OC, IC));
    return af_cuda_linear_forward(ctx, out, inp, w_eff, nullptr, N, IC, OC);
}

extern "C" af_status af_cuda_wn_linear_backward(af_cuda_context *ctx, float *dinp, float *dv,
                                                float *scratch, const float *dout,
                                                const float *inp, const float *w_eff,
                                                const float *vnorm, int N, int IC, int OC) {
    AF_CUDA_CHECK(N > 0 && IC > 0 && OC > 0, "wn_linear_backward: bad sizes N=%d IC=%d OC=%d", N,
                  IC, OC);
    AF_CUDA_CHECK(dout && inp && w_eff && vnorm, "wn_linear_backward: NULL pointer");
    if (dinp != nullptr)
        AF_TRY(af_cuda_linear_backward(ctx, dinp, nullptr, nullptr, dout, inp, w_eff, N, IC, OC));
    if (dv != nullptr) {
        AF_CUDA_CHECK(scratch != nullptr, "wn_linear_backward: dv needs scratch[OC*IC]");
        AF_CUDA_TRY(cudaMemsetAsync(scratch, 0, (size_t)OC * IC * sizeof(float), ctx->stream));
        AF_TRY(af_cuda_linear_backward(ctx, nullptr, scratch, nullptr, dout, inp, w_eff, N, IC,
                                       OC));
        AF_TRY(af_wn_dv_rows(ctx, dv, scratch, w_eff, vnorm, OC, IC));
    }
    return AF_OK;
}
