// Column sums in a fixed order (deterministic, no atomics), used for bias gradients.
#include "common.cuh"

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
