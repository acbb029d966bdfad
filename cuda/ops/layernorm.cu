// LayerNorm over the last dim, one warp per row (N rows of IC): the twin of
// csrc/ops/layernorm.c. Parameter gradients are column sums in a fixed order.
#include "common.cuh"

__global__ void layernorm_forward_kernel(float *out, float *mean, float *rstd, const float *inp,
                                         const float *weight, const float *bias, int N, int IC,
                                         float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *x = inp + (int64_t)row * IC;
    float s = 0.0f;
    for (int c = lane; c < IC; c += 32) s += x[c];
    float m = af_warp_sum(s) / IC;
    float v = 0.0f;
    for (int c = lane; c < IC; c += 32) {
        float d = x[c] - m;
        v += d * d;
    }
    float r = rsqrtf(af_warp_sum(v) / IC + eps);
    float *o = out + (int64_t)row * IC;
    for (int c = lane; c < IC; c += 32) o[c] = (x[c] - m) * r * weight[c] + bias[c];
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = r;
    }
}

// dinp = rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = dout * weight.
__global__ void layernorm_dinp_kernel(float *dinp, const float *dout, const float *inp,
                                      const float *weight, const float *mean, const float *rstd,
                                      int N, int IC) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *x = inp + (int64_t)row * IC, *g = dout + (int64_t)row * IC;
    float m = mean[row], r = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int c = lane; c < IC; c += 32) {
        float dn = g[c] * weight[c];
        s1 += dn;
        s2 += dn * (x[c] - m) * r;
    }
    s1 = af_warp_sum(s1) / IC;
    s2 = af_warp_sum(s2) / IC;
    float *dx = dinp + (int64_t)row * IC;
    for (int c = lane; c < IC; c += 32) {
        float xhat = (x[c] - m) * r;
        dx[c] = r * (g[c] * weight[c] - s1 - xhat * s2);
    }
}

// dweight[c] += sum_r dout[r,c] * xhat[r,c]; same fixed-order layout as colsum_kernel.
__global__ void layernorm_dweight_kernel(float *dweight, const float *dout, const float *inp,
                                         const float *mean, const float *rstd, int N, int IC) {
    __shared__ float part[16][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (c < IC)
        for (int r = threadIdx.y; r < N; r += 16) {
            int64_t i = (int64_t)r * IC + c;
            s += dout[i] * (inp[i] - mean[r]) * rstd[r];
        }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < IC) {
        float t = 0.0f;
        for (int k = 0; k < 16; k++) t += part[k][threadIdx.x];
        dweight[c] += t;
    }
}

extern "C" af_status af_cuda_layernorm_forward(af_cuda_context *ctx, float *out, float *mean,
                                               float *rstd, const float *inp,
                                               const float *weight, const float *bias, int N,
                                               int IC, float eps) {
    AF_CUDA_CHECK(N > 0 && IC > 0, "layernorm_forward: bad sizes N=%d IC=%d", N, IC);
    AF_CUDA_CHECK(out && inp && weight && bias, "layernorm_forward: NULL pointer");
    layernorm_forward_kernel<<<(N + 7) / 8, 256, 0, ctx->stream>>>(out, mean, rstd, inp, weight,
                                                                    bias, N, IC, eps);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_layernorm_backward(af_cuda_context *ctx, float *dinp,
                                                float *dweight, float *dbias, const float *dout,
                                                const float *inp, const float *weight,
                                                const float *mean, const float *rstd, int N,
                                                int IC) {
    AF_CUDA_CHECK(N > 0 && IC > 0, "layernorm_backward: bad sizes N=%d IC=%d", N, IC);
    AF_CUDA_CHECK(dout && inp && weight && mean && rstd, "layernorm_backward: NULL pointer");
    if (dinp != nullptr) {
        layernorm_dinp_kernel<<<(N + 7) / 8, 256, 0, ctx->stream>>>(dinp, dout, inp, weight,
                                                                     mean, rstd, N, IC);
        AF_CUDA_LAUNCHED();
    }
    if (dweight != nullptr) {
        layernorm_dweight_kernel<<<(IC + 31) / 32, dim3(32, 16), 0, ctx->stream>>>(
            dweight, dout, inp, mean, rstd, N, IC);
        AF_CUDA_LAUNCHED();
    }
    if (dbias != nullptr) AF_TRY(af_cuda_colsum_accumulate(ctx, dbias, dout, N, IC));
    return AF_OK;
}
