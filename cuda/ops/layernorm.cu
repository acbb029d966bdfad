// LayerNorm over the last dim, one warp per row (N rows of IC): the twin of
// csrc/ops/layernorm.c. Parameter gradients are column sums in a fixed order. The fast
// path's fused residual + LayerNorm forward and one-kernel backward follow at the end.
#include "common.cuh"
#include "fast.cuh"

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

// ------------------------------------------------------------------ fast path (fast.cuh)
// One warp per row with the row in registers (V values per lane, W <= 32 V), two-pass
// statistics as the CPU. The fp32 residual stream comes in as `a`, a branch output as bf16 `b`.

static __device__ __forceinline__ void store_val(float *p, float v) { *p = v; }
static __device__ __forceinline__ void store_val(bf16 *p, float v) { *p = __float2bfloat16_rn(v); }
static __device__ __forceinline__ float load_val(const float *p) { return *p; }
static __device__ __forceinline__ float load_val(const bf16 *p) { return __bfloat162float(*p); }

template <int V, typename TO>
__global__ void residual_layernorm_kernel(float *res, TO *out, float *mean, float *rstd,
                                          const float *a, const bf16 *b, const float *weight,
                                          const float *bias, int N, int W, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const int64_t o = (int64_t)row * W;
    float x[V];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        int c = lane + 32 * i;
        float v = 0.0f;
        if (c < W) {
            v = a[o + c];
            if (b != nullptr) v += __bfloat162float(b[o + c]);
        }
        x[i] = v;
        s += v;
    }
    float m = af_warp_sum(s) / W;
    float q = 0.0f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        float d = lane + 32 * i < W ? x[i] - m : 0.0f;
        q += d * d;
    }
    float r = rsqrtf(af_warp_sum(q) / W + eps);
#pragma unroll
    for (int i = 0; i < V; i++) {
        int c = lane + 32 * i;
        if (c >= W) continue;
        if (res != nullptr && b != nullptr) res[o + c] = x[i];
        store_val(out + o + c, (x[i] - m) * r * weight[c] + bias[c]);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

template <int V>
static void launch_residual_layernorm(af_cuda_context *ctx, float *res, void *out, int out_f32,
                                      float *mean, float *rstd, const float *a, const bf16 *b,
                                      const float *w, const float *bias, int N, int W,
                                      float eps) {
    unsigned grid = (unsigned)((N + 7) / 8);
    if (out_f32)
        residual_layernorm_kernel<V, float><<<grid, 256, 0, ctx->stream>>>(
            res, (float *)out, mean, rstd, a, b, w, bias, N, W, eps);
    else
        residual_layernorm_kernel<V, bf16><<<grid, 256, 0, ctx->stream>>>(
            res, (bf16 *)out, mean, rstd, a, b, w, bias, N, W, eps);
}

af_status af_fast_residual_layernorm(af_cuda_context *ctx, float *res, void *out, int out_f32,
                                     float *mean, float *rstd, const float *a, const bf16 *b,
                                     const float *w, const float *bias, int N, int W,
                                     float eps) {
    AF_CUDA_CHECK(N > 0 && W > 0 && W <= 1024, "residual_layernorm: bad sizes N=%d W=%d "
                  "(the fast path supports W <= 1024)", N, W);
    AF_CUDA_CHECK(out && mean && rstd && a && w && bias, "residual_layernorm: NULL pointer");
    AF_CUDA_CHECK(b == nullptr || res != nullptr, "residual_layernorm: a branch needs res");
    if (W <= 128)
        launch_residual_layernorm<4>(ctx, res, out, out_f32, mean, rstd, a, b, w, bias, N, W, eps);
    else if (W <= 256)
        launch_residual_layernorm<8>(ctx, res, out, out_f32, mean, rstd, a, b, w, bias, N, W, eps);
    else if (W <= 512)
        launch_residual_layernorm<16>(ctx, res, out, out_f32, mean, rstd, a, b, w, bias, N, W, eps);
    else if (W <= 768)
        launch_residual_layernorm<24>(ctx, res, out, out_f32, mean, rstd, a, b, w, bias, N, W, eps);
    else
        launch_residual_layernorm<32>(ctx, res, out, out_f32, mean, rstd, a, b, w, bias, N, W, eps);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// The LayerNorm backward in one kernel. Warps walk rows (row = block*8 + warp, then + 8G);
// each lane keeps the dweight / dbias sums of its columns in registers; the 8 warps of a
// block add theirs into shared memory in warp order, the block writes its partial row
// partial[block] = [dweight (W) | dbias (W)], and the last block to finish (a counter)
// adds the G partials in block order into dweight, dbias and resets the counter.
#define LNB_WARPS 8
#define LNB_MAX_BLOCKS 128

template <int V, typename TI>
__global__ void __launch_bounds__(LNB_WARPS * 32)
    layernorm_backward_kernel(float *dres, bf16 *dres_h, int accumulate, float *dweight,
                              float *dbias, const TI *dout, const float *inp,
                              const float *weight, const float *mean, const float *rstd, int N,
                              int W, float *partial, unsigned *counter) {
    extern __shared__ float sh[];  // [2W]: the block's dweight | dbias
    __shared__ bool last;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float gw[V], gb[V];
#pragma unroll
    for (int i = 0; i < V; i++) gw[i] = gb[i] = 0.0f;
    for (int row = blockIdx.x * LNB_WARPS + warp; row < N; row += gridDim.x * LNB_WARPS) {
        const int64_t o = (int64_t)row * W;
        const float m = mean[row], r = rstd[row];
        float g[V], xh[V];
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int i = 0; i < V; i++) {
            int c = lane + 32 * i;
            g[i] = xh[i] = 0.0f;
            if (c < W) {
                g[i] = load_val(dout + o + c);
                xh[i] = (inp[o + c] - m) * r;
                float dn = g[i] * weight[c];
                s1 += dn;
                s2 += dn * xh[i];
            }
        }
        s1 = af_warp_sum(s1) / W;
        s2 = af_warp_sum(s2) / W;
#pragma unroll
        for (int i = 0; i < V; i++) {
            int c = lane + 32 * i;
            if (c >= W) continue;
            float dx = r * (g[i] * weight[c] - s1 - xh[i] * s2);
            float v = accumulate ? dres[o + c] + dx : dx;
            dres[o + c] = v;
            if (dres_h != nullptr) dres_h[o + c] = __float2bfloat16_rn(v);
            gw[i] += g[i] * xh[i];
            gb[i] += g[i];
        }
    }
    // the block's sums, warp by warp in order
    for (int k = 0; k < LNB_WARPS; k++) {
        if (warp == k) {
#pragma unroll
            for (int i = 0; i < V; i++) {
                int c = lane + 32 * i;
                if (c >= W) continue;
                sh[c] = k == 0 ? gw[i] : sh[c] + gw[i];
                sh[W + c] = k == 0 ? gb[i] : sh[W + c] + gb[i];
            }
        }
        __syncthreads();
    }
    float *mine = partial + (size_t)blockIdx.x * 2 * W;
    for (int c = threadIdx.x; c < 2 * W; c += blockDim.x) mine[c] = sh[c];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int c = threadIdx.x; c < 2 * W; c += blockDim.x) {
        float s = 0.0f;
        for (unsigned b = 0; b < gridDim.x; b++) s += __ldcg(partial + (size_t)b * 2 * W + c);
        float *dst = c < W ? dweight : dbias;
        if (dst != nullptr) dst[c < W ? c : c - W] += s;
    }
    if (threadIdx.x == 0) *counter = 0u;
}

template <int V>
static void launch_layernorm_backward(af_cuda_context *ctx, unsigned grid, float *dres,
                                      bf16 *dres_h, int accumulate, float *dweight, float *dbias,
                                      const void *dout, int dout_f32, const float *inp,
                                      const float *w, const float *mean, const float *rstd,
                                      int N, int W) {
    size_t shmem = 2 * (size_t)W * sizeof(float);
    if (dout_f32)
        layernorm_backward_kernel<V, float><<<grid, LNB_WARPS * 32, shmem, ctx->stream>>>(
            dres, dres_h, accumulate, dweight, dbias, (const float *)dout, inp, w, mean, rstd, N,
            W, ctx->fast_aux, ctx->fast_counter);
    else
        layernorm_backward_kernel<V, bf16><<<grid, LNB_WARPS * 32, shmem, ctx->stream>>>(
            dres, dres_h, accumulate, dweight, dbias, (const bf16 *)dout, inp, w, mean, rstd, N,
            W, ctx->fast_aux, ctx->fast_counter);
}

af_status af_fast_layernorm_backward(af_cuda_context *ctx, float *dres, bf16 *dres_h,
                                     int accumulate, float *dweight, float *dbias,
                                     const void *dout, int dout_f32, const float *inp,
                                     const float *w, const float *mean, const float *rstd,
                                     int N, int W) {
    AF_CUDA_CHECK(N > 0 && W > 0 && W <= 1024, "layernorm_backward (fast): bad sizes N=%d W=%d "
                  "(the fast path supports W <= 1024)", N, W);
    AF_CUDA_CHECK(dres && dout && inp && w && mean && rstd, "layernorm_backward (fast): NULL "
                  "pointer");
    AF_TRY(af_cuda_fast_init(ctx));
    int g = (N + LNB_WARPS - 1) / LNB_WARPS;
    unsigned grid = (unsigned)(g < LNB_MAX_BLOCKS ? g : LNB_MAX_BLOCKS);
    if (W <= 128)
        launch_layernorm_backward<4>(ctx, grid, dres, dres_h, accumulate, dweight, dbias, dout,
                                     dout_f32, inp, w, mean, rstd, N, W);
    else if (W <= 256)
        launch_layernorm_backward<8>(ctx, grid, dres, dres_h, accumulate, dweight, dbias, dout,
                                     dout_f32, inp, w, mean, rstd, N, W);
    else if (W <= 512)
        launch_layernorm_backward<16>(ctx, grid, dres, dres_h, accumulate, dweight, dbias, dout,
                                      dout_f32, inp, w, mean, rstd, N, W);
    else if (W <= 768)
        launch_layernorm_backward<24>(ctx, grid, dres, dres_h, accumulate, dweight, dbias, dout,
                                      dout_f32, inp, w, mean, rstd, N, W);
    else
        launch_layernorm_backward<32>(ctx, grid, dres, dres_h, accumulate, dweight, dbias, dout,
                                      dout_f32, inp, w, mean, rstd, N, W);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
