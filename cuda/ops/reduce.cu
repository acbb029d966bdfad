// Column sums in a fixed order (deterministic, no atomics), used for bias gradients.
#include "common.cuh"
#include "fast.cuh"

// Block (32, 16) owns 32 columns; thread (tx, ty) sums rows ty, ty+16, ... in order, then
// the 16 partials are added in order by ty == 0.
__global__ void colsum_kernel(float *colsum, const float *x, int N, int IC) {
    __shared__ float part[16][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (c < IC)
        for (int r = threadIdx.y; r < N; r += 16) s += x[(int64_t)r * IC + c];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < IC) {
        float t = 0.0f;
        for (int k = 0; k < 16; k++) t += part[k][threadIdx.x];
        colsum[c] += t;
    }
}

af_status af_cuda_colsum_accumulate(af_cuda_context *ctx, float *colsum, const float *x, int N,
                                    int IC) {
    colsum_kernel<<<(IC + 31) / 32, dim3(32, 16), 0, ctx->stream>>>(colsum, x, N, IC);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// ------------------------------------------------------------------ fast path (fast.cuh)
// bf16 x[N,C]: G chunks of consecutive rows, one thread per (column, chunk) summing its rows
// in order into partial[g, c]; then one thread per column adds the G partials in order.
#define COLSUM_CHUNKS 128

__global__ void colsum_bf16_partial_kernel(float *partial, const bf16 *x, int N, int C,
                                           int rows_per_chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, g = blockIdx.y;
    if (c >= C) return;
    int r0 = g * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
    float s = 0.0f;
    for (int r = r0; r < r1; r++) s += __bfloat162float(x[(int64_t)r * C + c]);
    partial[(int64_t)g * C + c] = s;
}

__global__ void colsum_bf16_finish_kernel(float *out, int accumulate, const float *partial,
                                          int C, int G) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int g = 0; g < G; g++) s += partial[(int64_t)g * C + c];
    out[c] = accumulate ? out[c] + s : s;
}

af_status af_fast_colsum_bf16(af_cuda_context *ctx, float *out, int accumulate, const bf16 *x,
                              int N, int C) {
    AF_CUDA_CHECK(N > 0 && C > 0, "colsum_bf16: bad sizes N=%d C=%d", N, C);
    AF_CUDA_CHECK(out && x, "colsum_bf16: NULL pointer");
    AF_TRY(af_cuda_fast_init(ctx));
    int G = (N + 63) / 64;
    if (G > COLSUM_CHUNKS) G = COLSUM_CHUNKS;
    AF_CUDA_CHECK((size_t)G * C <= AF_FAST_AUX_FLOATS, "colsum_bf16: C=%d too large", C);
    int rows = (N + G - 1) / G;
    G = (N + rows - 1) / rows;  // no empty chunk
    colsum_bf16_partial_kernel<<<dim3((C + 255) / 256, G), 256, 0, ctx->stream>>>(
        ctx->fast_aux, x, N, C, rows);
    AF_CUDA_LAUNCHED();
    colsum_bf16_finish_kernel<<<(C + 255) / 256, 256, 0, ctx->stream>>>(out, accumulate,
                                                                       ctx->fast_aux, C, G);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
