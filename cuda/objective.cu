// The AFiRe objective on the GPU: the twin of csrc/core/objective.c (contracts in objective.h and
// cuda/objective.cuh), one function per equation with the CPU's names (structure_consistency,
// category_consistency, ...). Same math: log space, double accumulation wherever the CPU uses
// double.
//
// Determinism: every sum runs in a fixed order that depends only on the sizes (fixed thread to
// data maps, butterfly warp sums, shared-memory partials added in index order); there are no
// float atomics. Gradients that several tokens send to one token (the second argument of
// f(q_a, q_b) in L_cate) are GATHERED by the receiving token from a stored coefficient matrix
// instead of scattered.
//
// Reductions whose output has no scratch in the signature (Sinkhorn, af_recon_loss, the loss sum
// of af_released_loss) run in a single block of 1024 threads: correct and deterministic, a few
// hundred microseconds at ViT-B sizes; a multi-block version needs a scratch argument.
#include "common.cuh"
#include "objective.cuh"
#include "objective.h"

#define RED_THREADS 1024  // single-block reductions
#define WARP_BLOCK 256    // warp-per-row kernels: 8 rows per block

// ---- deterministic reductions ---------------------------------------------------------------

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;  // xor butterfly: every lane ends with the very same value
}
__device__ __forceinline__ double warp_max_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ long long warp_sum_ll(long long v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim a multiple of 32); every thread gets the total. sh: 32 doubles.
__device__ double block_sum_d(double v, double *sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0) sh[w] = v;
    __syncthreads();
    return warp_sum_d(lane < nw ? sh[lane] : 0.0);
}
__device__ double block_max_d(double v, double *sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max_d(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    return warp_max_d(lane < nw ? sh[lane] : -INFINITY);
}
__device__ long long block_sum_ll(long long v, long long *sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_ll(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    return warp_sum_ll(lane < nw ? sh[lane] : 0ll);
}

// Warp-per-row helpers: every lane of the warp gets the same value.
// sum_k x[k] over a row of K floats, in double
__device__ __forceinline__ double warp_row_sum_d(const float *x, int K, int lane) {
    double rs = 0.0;
    for (int k = lane; k < K; k += 32) rs += x[k];
    return warp_sum_d(rs);
}
// log sum_k exp(s[k] / tau_s), max-shifted, in double
__device__ __forceinline__ double warp_row_lse_d(const float *st, int K, float tau_s, int lane) {
    double mx = -INFINITY;
    for (int k = lane; k < K; k += 32) mx = fmax(mx, (double)st[k] / tau_s);
    mx = warp_max_d(mx);
    double se = 0.0;
    for (int k = lane; k < K; k += 32) se += exp((double)st[k] / tau_s - mx);
    return mx + log(warp_sum_d(se));
}

static inline int positive_finite(float v) { return isfinite(v) && v > 0.0f; }
static inline unsigned warp_rows_grid(int64_t rows) {
    return (unsigned)((rows + WARP_BLOCK / 32 - 1) / (WARP_BLOCK / 32));
}

// ---- Sinkhorn-Knopp (METHOD §3), one block; q may equal logits (each entry is read, then ----
// ---- written by the same thread after the max is known) ------------------------------------

__global__ void __launch_bounds__(RED_THREADS)
sinkhorn_kernel(float *q, const float *logits, int N, int K, float eps, int iters) {
    __shared__ double red[32];
    __shared__ double colpart[32][33];
    __shared__ double colscale[32];
    const int tid = threadIdx.x, nth = blockDim.x;
    const int lane = tid & 31, grp = tid >> 5, ngrp = nth >> 5;
    const size_t n = (size_t)N * K;

    double mx = -INFINITY;  // the global max (exact in any order)
    for (size_t i = tid; i < n; i += nth) mx = fmax(mx, (double)logits[i]);
    mx = block_max_d(mx, red);
    const float mxf = (float)mx;
    double part = 0.0;
    for (size_t i = tid; i < n; i += nth) {
        float v = (float)exp(((double)logits[i] - (double)mxf) / (double)eps);
        q[i] = v;
        part += v;
    }
    const double total = block_sum_d(part, red);  // >= 1: the max entry is exp(0)
    for (size_t i = tid; i < n; i += nth) q[i] = (float)((double)q[i] / total);
    __syncthreads();

    for (int it = 0; it < iters; it++) {
        // columns -> 1/K: 32 columns at a time, 32 row groups, partials added in group order
        for (int k0 = 0; k0 < K; k0 += 32) {
            const int k = k0 + lane;
            double cs = 0.0;
            if (k < K)
                for (int r = grp; r < N; r += ngrp) cs += q[(size_t)r * K + k];
            colpart[grp][lane] = cs;
            __syncthreads();
            if (grp == 0) {
                double t = 0.0;
                for (int g = 0; g < ngrp; g++) t += colpart[g][lane];
                colscale[lane] = t > 0.0 ? 1.0 / (t * K) : -1.0;  // -1: leave the column
            }
            __syncthreads();
            const double sc = colscale[lane];
            if (k < K && sc >= 0.0)
                for (int r = grp; r < N; r += ngrp)
                    q[(size_t)r * K + k] = (float)((double)q[(size_t)r * K + k] * sc);
            __syncthreads();
        }
        // rows -> 1/N: one warp per row
        for (int r = grp; r < N; r += ngrp) {
            float *qr = q + (size_t)r * K;
            const double rs = warp_row_sum_d(qr, K, lane);
            if (rs > 0.0) {
                const double sc = 1.0 / (rs * N);
                for (int k = lane; k < K; k += 32) qr[k] = (float)((double)qr[k] * sc);
            }
        }
        __syncthreads();
    }
    // rows become distributions; a row with no mass becomes uniform
    for (int r = grp; r < N; r += ngrp) {
        float *qr = q + (size_t)r * K;
        const double rs = warp_row_sum_d(qr, K, lane);
        for (int k = lane; k < K; k += 32)
            qr[k] = rs > 0.0 ? (float)((double)qr[k] / rs) : 1.0f / (float)K;
    }
}

static af_status sinkhorn_checks(const float *q, const float *logits, int N, int K, float eps,
                                 int iters) {
    AF_CUDA_CHECK(q != nullptr && logits != nullptr, "sinkhorn_knopp: NULL buffer");
    AF_CUDA_CHECK(N > 0 && K > 0, "sinkhorn_knopp: N=%d and K=%d must be > 0", N, K);
    AF_CUDA_CHECK(positive_finite(eps), "sinkhorn_knopp: eps must be > 0, got %g", (double)eps);
    AF_CUDA_CHECK(iters >= 0, "sinkhorn_knopp: iters must be >= 0, got %d", iters);
    return AF_OK;
}

extern "C" af_status af_cuda_sinkhorn_knopp(af_cuda_context *ctx, float *q, const float *logits,
                                            int N, int K, float eps, int iters) {
    AF_TRY(sinkhorn_checks(q, logits, N, K, eps, iters));
    sinkhorn_kernel<<<1, RED_THREADS, 0, ctx->stream>>>(q, logits, N, K, eps, iters);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// ---- data-parallel Sinkhorn (af_sinkhorn_knopp_dist): the phases of sinkhorn_kernel as ------
// ---- kernels of their own, reduced across the ranks in between. Every phase keeps the loops --
// ---- and the thread-to-data map of sinkhorn_kernel (one block of RED_THREADS), so one rank ----
// ---- reproduces it bit for bit. -------------------------------------------------------------

__global__ void __launch_bounds__(RED_THREADS)
sk_max_kernel(double *mx, const float *logits, size_t n) {
    __shared__ double red[32];
    double m = -INFINITY;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) m = fmax(m, (double)logits[i]);
    m = block_max_d(m, red);
    if (threadIdx.x == 0) *mx = m;
}

// q = exp((logits - max) / eps) with the max of every rank; *total = this rank's sum
__global__ void __launch_bounds__(RED_THREADS)
sk_exp_kernel(float *q, double *total, const float *logits, size_t n, float eps,
              const double *mx) {
    __shared__ double red[32];
    const float mxf = (float)*mx;
    double part = 0.0;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        float v = (float)exp(((double)logits[i] - (double)mxf) / (double)eps);
        q[i] = v;
        part += v;
    }
    part = block_sum_d(part, red);
    if (threadIdx.x == 0) *total = part;
}

__global__ void __launch_bounds__(RED_THREADS) sk_div_kernel(float *q, size_t n, const double *total) {
    const double t = *total;  // of every rank
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) q[i] = (float)((double)q[i] / t);
}

// colsum[k] = this rank's sum of column k
__global__ void __launch_bounds__(RED_THREADS)
sk_colsum_kernel(double *colsum, const float *q, int N, int K) {
    __shared__ double colpart[32][33];
    const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5, ngrp = blockDim.x >> 5;
    for (int k0 = 0; k0 < K; k0 += 32) {
        const int k = k0 + lane;
        double cs = 0.0;
        if (k < K)
            for (int r = grp; r < N; r += ngrp) cs += q[(size_t)r * K + k];
        colpart[grp][lane] = cs;
        __syncthreads();
        if (grp == 0 && k < K) {
            double t = 0.0;
            for (int g = 0; g < ngrp; g++) t += colpart[g][lane];
            colsum[k] = t;
        }
        __syncthreads();
    }
}

// columns -> 1/K with the column sums of every rank, then rows -> 1/rows (the global count)
__global__ void __launch_bounds__(RED_THREADS)
sk_scale_kernel(float *q, const double *colsum, int N, int K, double rows) {
    const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5, ngrp = blockDim.x >> 5;
    for (int k0 = 0; k0 < K; k0 += 32) {
        const int k = k0 + lane;
        const double t = k < K ? colsum[k] : 0.0;
        if (k < K && t > 0.0) {
            const double sc = 1.0 / (t * K);
            for (int r = grp; r < N; r += ngrp)
                q[(size_t)r * K + k] = (float)((double)q[(size_t)r * K + k] * sc);
        }
    }
    __syncthreads();
    for (int r = grp; r < N; r += ngrp) {
        float *qr = q + (size_t)r * K;
        const double rs = warp_row_sum_d(qr, K, lane);
        if (rs > 0.0) {
            const double sc = 1.0 / (rs * rows);
            for (int k = lane; k < K; k += 32) qr[k] = (float)((double)qr[k] * sc);
        }
    }
}

__global__ void __launch_bounds__(RED_THREADS) sk_final_kernel(float *q, int N, int K) {
    const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5, ngrp = blockDim.x >> 5;
    for (int r = grp; r < N; r += ngrp) {
        float *qr = q + (size_t)r * K;
        const double rs = warp_row_sum_d(qr, K, lane);
        for (int k = lane; k < K; k += 32)
            qr[k] = rs > 0.0 ? (float)((double)qr[k] / rs) : 1.0f / (float)K;
    }
}

extern "C" af_status af_cuda_sinkhorn_knopp_dist(af_cuda_context *ctx, float *q,
                                                 const float *logits, int N, int K, float eps,
                                                 int iters, int64_t N_global, double *scratch,
                                                 const af_reducer *red) {
    if (red == nullptr) {
        AF_CUDA_CHECK(N_global == N, "sinkhorn_knopp: %lld rows in all for %d on the only rank",
                      (long long)N_global, N);
        return af_cuda_sinkhorn_knopp(ctx, q, logits, N, K, eps, iters);
    }
    AF_TRY(sinkhorn_checks(q, logits, N, K, eps, iters));
    AF_CUDA_CHECK(scratch != nullptr && N_global >= N,
                  "sinkhorn_knopp: %lld rows in all for %d on this rank (or no scratch)",
                  (long long)N_global, N);
    const size_t n = (size_t)N * K;
    double *colsum = scratch, *mx = scratch + K, *total = scratch + K + 1;
    cudaStream_t st = ctx->stream;
    sk_max_kernel<<<1, RED_THREADS, 0, st>>>(mx, logits, n);
    AF_CUDA_LAUNCHED();
    AF_TRY(red->allreduce(red->ctx, mx, 1, AF_COMM_F64, AF_COMM_MAX, "Sinkhorn max"));
    sk_exp_kernel<<<1, RED_THREADS, 0, st>>>(q, total, logits, n, eps, mx);
    AF_CUDA_LAUNCHED();
    AF_TRY(red->allreduce(red->ctx, total, 1, AF_COMM_F64, AF_COMM_SUM, "Sinkhorn total"));
    sk_div_kernel<<<1, RED_THREADS, 0, st>>>(q, n, total);
    AF_CUDA_LAUNCHED();
    for (int it = 0; it < iters; it++) {
        sk_colsum_kernel<<<1, RED_THREADS, 0, st>>>(colsum, q, N, K);
        AF_CUDA_LAUNCHED();
        AF_TRY(red->allreduce(red->ctx, colsum, (size_t)K, AF_COMM_F64, AF_COMM_SUM,
                              "Sinkhorn column sums"));
        sk_scale_kernel<<<1, RED_THREADS, 0, st>>>(q, colsum, N, K, (double)N_global);
        AF_CUDA_LAUNCHED();
    }
    sk_final_kernel<<<1, RED_THREADS, 0, st>>>(q, N, K);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// ---- Eq. 7: the spatial prototypes, METHOD §3; the same sums in the same order as the CPU ---

__global__ void prototypes_kernel(float *protos, const float *src, int B, size_t LK, float m,
                                  int overwrite) {
    AF_GRID_STRIDE(size_t, e, LK) {
        double acc = 0.0;
        for (int b = 0; b < B; b++) acc += (double)src[(size_t)b * LK + e];
        double qbar = acc / B;
        protos[e] = overwrite ? (float)qbar
                              : (float)__dadd_rn(__dmul_rn((double)m, (double)protos[e]),
                                                 __dmul_rn(1.0 - (double)m, qbar));
    }
}

extern "C" af_status af_cuda_prototypes_update(af_cuda_context *ctx, float *protos,
                                               const float *src, int B, int L, int K, float m,
                                               int overwrite) {
    AF_CUDA_CHECK(protos != nullptr && src != nullptr, "prototypes_update: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0 && K > 0, "prototypes_update: B=%d, L=%d, K=%d must be > 0", B,
                  L, K);
    AF_CUDA_CHECK(isfinite(m) && m >= 0.0f && m <= 1.0f,
                  "prototypes_update: m must be in [0, 1], got %g", (double)m);
    size_t LK = (size_t)L * K;
    prototypes_kernel<<<af_grid_1d((int64_t)LK, 256), 256, 0, ctx->stream>>>(protos, src, B, LK,
                                                                             m, overwrite);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// Data-parallel prototypes: this rank's batch sums, reduced, then the EMA with the global mean
// (prototypes_kernel's operations, so one rank gives its numbers).
__global__ void proto_sums_kernel(double *sums, const float *src, int B, size_t LK) {
    AF_GRID_STRIDE(size_t, e, LK) {
        double acc = 0.0;
        for (int b = 0; b < B; b++) acc += (double)src[(size_t)b * LK + e];
        sums[e] = acc;
    }
}

__global__ void proto_apply_kernel(float *protos, const double *sums, double B_global, size_t LK,
                                   float m, int overwrite) {
    AF_GRID_STRIDE(size_t, e, LK) {
        double qbar = sums[e] / B_global;
        protos[e] = overwrite ? (float)qbar
                              : (float)__dadd_rn(__dmul_rn((double)m, (double)protos[e]),
                                                 __dmul_rn(1.0 - (double)m, qbar));
    }
}

extern "C" af_status af_cuda_prototypes_update_dist(af_cuda_context *ctx, float *protos,
                                                    const float *src, int B, int64_t B_global,
                                                    int L, int K, float m, int overwrite,
                                                    double *sums, const af_reducer *red) {
    if (red == nullptr) {
        AF_CUDA_CHECK(B_global == B, "prototypes_update: %lld images in all for %d on the only "
                      "rank", (long long)B_global, B);
        return af_cuda_prototypes_update(ctx, protos, src, B, L, K, m, overwrite);
    }
    AF_CUDA_CHECK(protos != nullptr && src != nullptr && sums != nullptr,
                  "prototypes_update: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0 && K > 0 && B_global >= B,
                  "prototypes_update: B=%d (of %lld), L=%d, K=%d", B, (long long)B_global, L, K);
    AF_CUDA_CHECK(isfinite(m) && m >= 0.0f && m <= 1.0f,
                  "prototypes_update: m must be in [0, 1], got %g", (double)m);
    const size_t LK = (size_t)L * K;
    proto_sums_kernel<<<af_grid_1d((int64_t)LK, 256), 256, 0, ctx->stream>>>(sums, src, B, LK);
    AF_CUDA_LAUNCHED();
    AF_TRY(red->allreduce(red->ctx, sums, LK, AF_COMM_F64, AF_COMM_SUM, "prototype sums"));
    proto_apply_kernel<<<af_grid_1d((int64_t)LK, 256), 256, 0, ctx->stream>>>(
        protos, sums, (double)B_global, LK, m, overwrite);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// ---- the student side that Eq. 12 and Eq. 14-16 share ---------------------------------------

// out[m, n] = alpha * sum_k a[m, k] * b'[k, n], b' = b^T (TB: b is [N, Kd]) or b ([Kd, N]);
// 16 x 16 output tiles, double accumulation in k order; batch z offsets every operand.
template <bool TB>
__global__ void gemm_f64acc_kernel(float *out, int64_t ldo, int64_t so, const float *a,
                                   int64_t lda, int64_t sa, const float *b, int64_t ldb,
                                   int64_t sb, int M, int N, int Kd, double alpha) {
    __shared__ float As[16][17], Bs[16][17];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int m0 = blockIdx.y * 16, n0 = blockIdx.x * 16;
    a += blockIdx.z * sa;
    b += blockIdx.z * sb;
    out += blockIdx.z * so;
    double acc = 0.0;
    for (int k0 = 0; k0 < Kd; k0 += 16) {
        As[ty][tx] = (m0 + ty < M && k0 + tx < Kd) ? a[(int64_t)(m0 + ty) * lda + k0 + tx] : 0.0f;
        if (TB)  // element (n0 + ty, k0 + tx) of b, stored as Bs[k][n]
            Bs[tx][ty] = (n0 + ty < N && k0 + tx < Kd) ? b[(int64_t)(n0 + ty) * ldb + k0 + tx] : 0.0f;
        else
            Bs[ty][tx] = (k0 + ty < Kd && n0 + tx < N) ? b[(int64_t)(k0 + ty) * ldb + n0 + tx] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < 16; kk++) acc += (double)As[ty][kk] * (double)Bs[kk][tx];
        __syncthreads();
    }
    if (m0 + ty < M && n0 + tx < N) out[(int64_t)(m0 + ty) * ldo + n0 + tx] = (float)(alpha * acc);
}

template <bool TB>
static af_status gemm_f64acc(af_cuda_context *ctx, float *out, int64_t ldo, int64_t so,
                             const float *a, int64_t lda, int64_t sa, const float *b, int64_t ldb,
                             int64_t sb, int M, int N, int Kd, double alpha, int batch) {
    AF_CUDA_CHECK((M + 15) / 16 <= 65535, "objective: %d rows exceed the GEMM grid", M);
    for (int z0 = 0; z0 < batch; z0 += 65535) {  // gridDim.z is at most 65535
        int nz = batch - z0 < 65535 ? batch - z0 : 65535;
        dim3 grid((unsigned)((N + 15) / 16), (unsigned)((M + 15) / 16), (unsigned)nz);
        gemm_f64acc_kernel<TB><<<grid, dim3(16, 16), 0, ctx->stream>>>(
            out + z0 * so, ldo, so, a + z0 * sa, lda, sa, b + z0 * sb, ldb, sb, M, N, Kd, alpha);
        AF_CUDA_LAUNCHED();
    }
    return AF_OK;
}

// q = softmax(s / tau_s), logq = its log (student_probs of objective.c); one warp per token.
__global__ void student_probs_kernel(float *q, float *logq, const float *s, int64_t NT, int K,
                                     float tau_s) {
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (t >= NT) return;
    const float *st = s + t * K;
    const double lse = warp_row_lse_d(st, K, tau_s, lane);
    for (int k = lane; k < K; k += 32) {
        double lq = (double)st[k] / tau_s - lse;
        logq[t * K + k] = (float)lq;
        q[t * K + k] = (float)exp(lq);
    }
}

// logc[l, :] = log(max(c_l, floor)), c_l = protos_l / sum(protos_l) (prototype_logs of
// objective.c); one warp per row. protos is trusted (see objective.cuh).
__global__ void prototype_logs_kernel(float *logc, const float *protos, int L, int K) {
    const int l = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (l >= L) return;
    const float *cl = protos + (size_t)l * K;
    const double rs = warp_row_sum_d(cl, K, lane);
    for (int k = lane; k < K; k += 32)
        logc[(size_t)l * K + k] = (float)log(fmax((double)cl[k] / rs, (double)AF_LOGC_FLOOR));
}

// cnt[0] = normal tokens, cnt[1] = anchors, cnt[2 + j] = normal tokens at position j.
__global__ void __launch_bounds__(RED_THREADS)
paper_counts_kernel(int *cnt, const uint8_t *abn, int B, int L) {
    __shared__ long long red[32];
    long long nn_all = 0, anchors = 0;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        int nn = 0;
        for (int b = 0; b < B; b++) nn += abn[(size_t)b * L + j] == 0;
        cnt[2 + j] = nn;
        nn_all += nn;
        anchors += nn >= 2 ? nn : 0;
    }
    nn_all = block_sum_ll(nn_all, red);
    anchors = block_sum_ll(anchors, red);
    if (threadIdx.x == 0) {
        cnt[0] = (int)nn_all;
        cnt[1] = (int)anchors;
    }
}

// *mean = the mean of tl over the normal tokens (anchors = 0, count cnt[0]) or over the anchors
// (anchors = 1: normal tokens at a position with >= 2 of them, count cnt[1]), in one block
// (fixed order); 0 when there are none.
__global__ void __launch_bounds__(RED_THREADS)
token_mean_kernel(float *mean, const float *tl, const uint8_t *abn, const int *cnt, int64_t NT,
                  int L, int anchors) {
    __shared__ double red[32];
    double s = 0.0;
    for (int64_t t = threadIdx.x; t < NT; t += blockDim.x) {
        if (abn[t] || (anchors && cnt[2 + t % L] < 2)) continue;
        s += tl[t];
    }
    s = block_sum_d(s, red);
    if (threadIdx.x == 0) {
        const int n = cnt[anchors];
        *mean = n ? (float)(s / n) : 0.0f;
    }
}

// Scratch layout, in floats (the two double arrays first, so they stay 8-byte aligned):
//   lall  [B*L]    doubles: log of the full denominator of each anchor
//   coef  [L*B*B]  doubles: coef[j,i,b] = dL_cate/dF[j,i,b] * (1/tau) (0 off anchors, i == b)
//   cnt   [2+L]    ints: n_normal, n_anchor, normal tokens per position
//   q, logq [B*L*K], logc [L*K], A [B*L*L] (log f(q_t, c_l)), dA [B*L*L] (dL_stru/dA / tau),
//   dq [B*L*K] (dA @ logc), F [L*B*B] (log f(q_ij, q_bj)), tl_stru, tl_cate [B*L]
typedef struct {
    size_t lall, coef, cnt, q, logq, logc, A, dA, dq, F, tl_s, tl_c, total;
} paper_layout;

static int paper_layout_of(int B, int L, int K, paper_layout *o) {
    if (B <= 0 || L <= 0 || K <= 0) return 0;
    double b = B, l = L, k = K, nt = b * l;
    double need = 2 * nt + 2 * l * b * b + (2 + l + 1) + 3 * nt * k + l * k + 2 * nt * l +
                  l * b * b + 2 * nt;
    if (need * sizeof(float) > (double)(SIZE_MAX / 2) || nt > 2147483647.0) return 0;
    size_t NT = (size_t)B * L, off = 0;
    o->lall = off; off += 2 * NT;
    o->coef = off; off += 2 * (size_t)L * B * B;
    o->cnt = off; off += 2 + (size_t)L; off += off & 1;
    o->q = off; off += NT * K;
    o->logq = off; off += NT * K;
    o->logc = off; off += (size_t)L * K;
    o->A = off; off += NT * L;
    o->dA = off; off += NT * L;
    o->dq = off; off += NT * K;
    o->F = off; off += (size_t)L * B * B;
    o->tl_s = off; off += NT;
    o->tl_c = off; off += NT;
    o->total = off;
    return 1;
}

extern "C" size_t af_cuda_paper_loss_scratch_floats(int B, int L, int K) {
    paper_layout lay;
    return paper_layout_of(B, L, K, &lay) ? lay.total : 0;
}

// The paper objective's working set on the device (paper_terms of objective.c).
typedef struct {
    const uint8_t *abn;
    const int *cnt;
    int B, L, K;
    float tau_s;
    double inv_tau;
    float *q, *logq, *logc, *A, *dA, *dq, *F, *tl_s, *tl_c;
    double *lall, *coef;
} paper_terms;

// ---- Eq. 12: structure consistency, METHOD §4 -----------------------------------------------

// Per normal token: tl = lse_l A[t, l] - A[t, j]; dA[t, l] = (softmax_l - [l == j]) / tau * c.
__global__ void structure_rows_kernel(float *tl, float *dA, const float *A, const uint8_t *abn,
                                      const int *cnt, int64_t NT, int L, double inv_tau,
                                      float w_stru) {
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (t >= NT) return;
    float *wt = dA ? dA + t * L : nullptr;
    if (abn[t]) {
        if (lane == 0) tl[t] = 0.0f;
        if (wt)
            for (int l = lane; l < L; l += 32) wt[l] = 0.0f;
        return;
    }
    const int j = (int)(t % L);
    const float *a = A + t * L;
    double mx = -INFINITY;
    for (int l = lane; l < L; l += 32) mx = fmax(mx, (double)a[l]);
    mx = warp_max_d(mx);
    double se = 0.0;
    for (int l = lane; l < L; l += 32) se += exp((double)a[l] - mx);
    const double lse = mx + log(warp_sum_d(se));
    if (lane == 0) tl[t] = (float)(lse - a[j]);
    if (wt == nullptr) return;
    const double c_stru = (double)w_stru / cnt[0];  // cnt[0] >= 1: this token is normal
    for (int l = lane; l < L; l += 32)
        wt[l] = (float)((exp((double)a[l] - lse) - (l == j)) * inv_tau * c_stru);
}

// ds[t] += q_t * (g_t - <q_t, g_t>) / tau_s for normal t, g = dq (the softmax Jacobian).
__global__ void structure_grad_kernel(float *ds, const float *dq, const float *q,
                                      const uint8_t *abn, int64_t NT, int K, float tau_s) {
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (t >= NT || abn[t]) return;
    const float *qt = q + t * K, *gt = dq + t * K;
    double qg = 0.0;
    for (int k = lane; k < K; k += 32) qg += (double)qt[k] * gt[k];
    qg = warp_sum_d(qg);
    for (int k = lane; k < K; k += 32)
        ds[t * K + k] += (float)((double)qt[k] * ((double)gt[k] - qg) / tau_s);
}

// Over the normal tokens t = (i, j):
//   L_stru = -(1/|N|) sum_t log[ f(q_t, c_j) / sum_l f(q_t, c_l) ]
//          = mean_t (log-sum-exp_l A[t,l] - A[t,j]).
// *l_stru = L_stru (device float); ds += w * dL_stru/ds when ds is not NULL.
static af_status structure_consistency(af_cuda_context *ctx, float *l_stru, float *ds,
                                       const paper_terms *p, float w) {
    const int64_t NT = (int64_t)p->B * p->L;
    cudaStream_t st = ctx->stream;
    structure_rows_kernel<<<warp_rows_grid(NT), WARP_BLOCK, 0, st>>>(
        p->tl_s, ds ? p->dA : nullptr, p->A, p->abn, p->cnt, NT, p->L, p->inv_tau, w);
    AF_CUDA_LAUNCHED();
    if (ds != nullptr) {  // ds += softmax-Jacobian of (dA @ logc)
        AF_TRY(gemm_f64acc<false>(ctx, p->dq, p->K, 0, p->dA, p->L, 0, p->logc, p->K, 0, (int)NT,
                                  p->K, p->L, 1.0, 1));
        structure_grad_kernel<<<warp_rows_grid(NT), WARP_BLOCK, 0, st>>>(ds, p->dq, p->q, p->abn,
                                                                         NT, p->K, p->tau_s);
        AF_CUDA_LAUNCHED();
    }
    token_mean_kernel<<<1, RED_THREADS, 0, st>>>(l_stru, p->tl_s, p->abn, p->cnt, NT, p->L, 0);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// ---- Eq. 14-16: category consistency, METHOD §4 ---------------------------------------------

// Per anchor (i, j): lpos, lall (log-sum-exp of the positive set and of everything), the
// token loss lall - lpos, and the coefficients coef[j, i, b] of every F[j, i, b].
__global__ void category_anchor_kernel(float *tl, double *lall_out, double *coef,
                                       const float *F, const float *A, const uint8_t *abn,
                                       const int *cnt, int B, int L, double inv_tau,
                                       float w_cate, int want_coef) {
    const int64_t ti = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (ti >= (int64_t)B * L) return;
    const int i = (int)(ti / L), j = (int)(ti % L);
    double *ci = coef + ((size_t)j * B + i) * B;
    if (abn[ti] || cnt[2 + j] < 2) {  // not an anchor
        if (lane == 0) {
            tl[ti] = 0.0f;
            lall_out[ti] = 0.0;
        }
        if (want_coef)
            for (int b = lane; b < B; b += 32) ci[b] = 0.0;
        return;
    }
    const float *Fi = F + ((size_t)j * B + i) * B;
    double mp = -INFINITY, ma = -INFINITY;
    for (int b = lane; b < B; b += 32) {
        if (b == i) continue;
        const size_t tb = (size_t)b * L + j;
        double f = Fi[b];
        ma = fmax(ma, f);
        if (!abn[tb]) mp = fmax(mp, f);
        else ma = fmax(ma, (double)A[tb * L + j]);  // f(q_bj, c_j), abnormal b
    }
    mp = warp_max_d(mp);
    ma = warp_max_d(ma);
    double sp = 0.0, sa = 0.0;
    for (int b = lane; b < B; b += 32) {
        if (b == i) continue;
        const size_t tb = (size_t)b * L + j;
        double f = Fi[b];
        sa += exp(f - ma);
        if (!abn[tb]) sp += exp(f - mp);
        else sa += exp((double)A[tb * L + j] - ma);
    }
    const double lpos = mp + log(warp_sum_d(sp)), lall = ma + log(warp_sum_d(sa));
    if (lane == 0) {
        tl[ti] = (float)(lall - lpos);
        lall_out[ti] = lall;
    }
    if (!want_coef) return;
    const double c = (double)w_cate / cnt[1] * inv_tau;  // cnt[1] >= 2 here
    for (int b = lane; b < B; b += 32) {
        if (b == i) {
            ci[b] = 0.0;
            continue;
        }
        double f = Fi[b], cf = exp(f - lall);
        if (!abn[(size_t)b * L + j]) cf -= exp(f - lpos);
        ci[b] = cf * c;
    }
}

// One block per token (b, j), blocks of one position adjacent. Gathers everything L_cate
// sends to token (b, j):
//   anchor b (first argument):      q_b * (gi - <q_b, gi>),  gi = sum_b' coef[j,b,b'] logq_b'
//   every b (second argument):      sum_i coef[j,i,b] * (q_i - q_b)
//   abnormal b (f(q_bj, c_j) term): q_b * (wG logc_j - <q_b, wG logc_j>),
//                                   wG = sum_anchors i exp(A[b,j,j] - lall_i) / tau * c
// and adds the sum / tau_s to ds.
__global__ void category_grad_kernel(float *ds, const double *coef, const double *lall,
                                     const float *q, const float *logq, const float *logc,
                                     const float *A, const uint8_t *abn, const int *cnt, int B,
                                     int L, int K, double inv_tau, float w_cate, float tau_s) {
    extern __shared__ double sh_coef[];  // [2*B]: row coef[j,b,:], column coef[j,:,b]
    __shared__ double red[32];
    const int j = blockIdx.x / B, b = blockIdx.x % B;
    if (cnt[2 + j] < 2) return;  // uniform in the block
    const size_t tb = (size_t)b * L + j;
    const int normal = !abn[tb];
    double *row = sh_coef, *col = sh_coef + B;
    for (int i = threadIdx.x; i < B; i += blockDim.x) {
        row[i] = coef[((size_t)j * B + b) * B + i];
        col[i] = coef[((size_t)j * B + i) * B + b];
    }
    float wG = 0.0f;
    if (!normal) {
        const double c = (double)w_cate / cnt[1] * inv_tau;
        const double a = A[tb * L + j];
        double acc = 0.0;
        for (int i = 0; i < B; i++)
            if (!abn[(size_t)i * L + j]) acc += exp(a - lall[(size_t)i * L + j]) * c;
        wG = (float)acc;
    }
    __syncthreads();
    const float *qb = q + tb * K, *lcj = logc + (size_t)j * K;
    // pass 1: the two inner products of the softmax Jacobians
    double d1 = 0.0, d2 = 0.0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        if (normal) {
            double gi = 0.0;
            for (int i = 0; i < B; i++) gi += row[i] * logq[((size_t)i * L + j) * K + k];
            d1 += (double)qb[k] * gi;
        } else {
            d2 += (double)qb[k] * (double)__fmul_rn(wG, lcj[k]);
        }
    }
    d1 = block_sum_d(d1, red);
    d2 = block_sum_d(d2, red);
    // pass 2: the gradient
    const float inv_tau_s = 1.0f / tau_s;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const double qk = qb[k];
        double g = 0.0;
        for (int i = 0; i < B; i++)
            g += col[i] * ((double)q[((size_t)i * L + j) * K + k] - qk);
        if (normal) {
            double gi = 0.0;
            for (int i = 0; i < B; i++) gi += row[i] * logq[((size_t)i * L + j) * K + k];
            g += qk * (gi - d1);
        } else {
            g += qk * ((double)__fmul_rn(wG, lcj[k]) - d2);
        }
        ds[tb * K + k] = __fadd_rn(ds[tb * K + k], __fmul_rn((float)g, inv_tau_s));
    }
}

// Per position j, for each anchor: a normal token (i, j) whose position holds another normal
// token in the batch (pos > 0). Abnormal tokens are never pulled together (Appendix E).
//   pos = sum_{b != i, (b,j) normal} f(q_ij, q_bj)                              (Eq. 14)
//   neg = sum_{(b,j) abnormal} f(q_ij, q_bj) + f(q_bj, c_j)                     (Eq. 15)
//   L_cate = -(1/|N'|) sum_anchors log[ pos / (pos + neg) ]                     (Eq. 16)
// *l_cate = L_cate (device float); ds += w * dL_cate/ds when ds is not NULL.
static af_status category_consistency(af_cuda_context *ctx, float *l_cate, float *ds,
                                      const paper_terms *p, float w) {
    const int B = p->B, L = p->L, K = p->K;
    const int64_t NT = (int64_t)B * L, LK = (int64_t)L * K, BB = (int64_t)B * B;
    cudaStream_t st = ctx->stream;
    // F[j, i, b] = (1/tau) <q_ij, log q_bj>, batched over positions j
    AF_TRY(gemm_f64acc<true>(ctx, p->F, B, BB, p->q, LK, K, p->logq, LK, K, B, B, K, p->inv_tau,
                             L));
    category_anchor_kernel<<<warp_rows_grid(NT), WARP_BLOCK, 0, st>>>(
        p->tl_c, p->lall, p->coef, p->F, p->A, p->abn, p->cnt, B, L, p->inv_tau, w, ds != nullptr);
    AF_CUDA_LAUNCHED();
    if (ds != nullptr) {
        size_t shmem = 2 * (size_t)B * sizeof(double);
        AF_CUDA_CHECK(shmem <= 48 * 1024, "paper_loss: B=%d is too large for the GPU kernel", B);
        category_grad_kernel<<<(unsigned)NT, 128, shmem, st>>>(ds, p->coef, p->lall, p->q, p->logq,
                                                               p->logc, p->A, p->abn, p->cnt, B, L,
                                                               K, p->inv_tau, w, p->tau_s);
        AF_CUDA_LAUNCHED();
    }
    token_mean_kernel<<<1, RED_THREADS, 0, st>>>(l_cate, p->tl_c, p->abn, p->cnt, NT, L, 1);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// ---- Eq. 17: L_cst = L_stru + L_cate, the paper objective -----------------------------------

extern "C" af_status af_cuda_paper_loss(af_cuda_context *ctx, float *l_stru, float *l_cate,
                                        float *ds_stru, float *ds_cate, const float *s,
                                        const float *protos, const uint8_t *abn, int B, int L,
                                        int K, float tau_s, float tau, float w_stru, float w_cate,
                                        float *scratch) {
    AF_CUDA_CHECK(l_stru && l_cate && s && protos && abn && scratch, "paper_loss: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0 && K > 0, "paper_loss: B=%d, L=%d, K=%d must be > 0", B, L, K);
    AF_CUDA_CHECK(positive_finite(tau_s), "paper_loss: tau_s must be > 0, got %g", (double)tau_s);
    AF_CUDA_CHECK(positive_finite(tau), "paper_loss: tau must be > 0, got %g", (double)tau);
    AF_CUDA_CHECK(isfinite(w_stru) && isfinite(w_cate),
                  "paper_loss: w_stru and w_cate must be finite");
    paper_layout lay;
    if (!paper_layout_of(B, L, K, &lay))
        return af_error(AF_ENOMEM, "paper_loss: B=%d, L=%d, K=%d need too much scratch", B, L, K);
    AF_CUDA_CHECK(((uintptr_t)scratch & 7u) == 0, "paper_loss: scratch must be 8-byte aligned");

    const int64_t NT = (int64_t)B * L;
    int *cnt = (int *)(scratch + lay.cnt);
    paper_terms p = {abn, cnt, B, L, K, tau_s, 1.0 / tau,
                     scratch + lay.q, scratch + lay.logq, scratch + lay.logc, scratch + lay.A,
                     scratch + lay.dA, scratch + lay.dq, scratch + lay.F, scratch + lay.tl_s,
                     scratch + lay.tl_c, (double *)(scratch + lay.lall),
                     (double *)(scratch + lay.coef)};
    cudaStream_t st = ctx->stream;

    paper_counts_kernel<<<1, RED_THREADS, 0, st>>>(cnt, abn, B, L);
    AF_CUDA_LAUNCHED();
    prototype_logs_kernel<<<warp_rows_grid(L), WARP_BLOCK, 0, st>>>(p.logc, protos, L, K);
    AF_CUDA_LAUNCHED();
    student_probs_kernel<<<warp_rows_grid(NT), WARP_BLOCK, 0, st>>>(p.q, p.logq, s, NT, K, tau_s);
    AF_CUDA_LAUNCHED();
    // prototype_affinity of objective.c: A[t, l] = (1/tau) <q_t, log c_l>
    AF_TRY(gemm_f64acc<true>(ctx, p.A, L, 0, p.q, K, 0, p.logc, K, 0, (int)NT, L, K, p.inv_tau,
                             1));
    AF_TRY(structure_consistency(ctx, l_stru, ds_stru, &p, w_stru));
    return category_consistency(ctx, l_cate, ds_cate, &p, w_cate);
}

// ---- Eq. 20: weighted restoration loss, METHOD §4 -------------------------------------------

// dy += 2 w / (B L Q) * weight * (y - x): the CPU's operations in its order (bit-identical).
__global__ void recon_grad_kernel(float *dy, const float *y, const float *x, const uint8_t *abn,
                                  size_t n, int Q, double inv_n, float w_abn, float weight) {
    AF_GRID_STRIDE(size_t, e, n) {
        const double w = (abn && abn[e / Q]) ? (double)w_abn : 1.0;
        const double c = __dmul_rn(__dmul_rn(__dmul_rn(2.0, w), inv_n), (double)weight);
        dy[e] = __fadd_rn(dy[e], (float)__dmul_rn(c, __dsub_rn((double)y[e], (double)x[e])));
    }
}

// loss = sum_t w_t ||y_t - x_t||^2 * inv_n, one warp per token, warp partials in order.
__global__ void __launch_bounds__(RED_THREADS)
recon_loss_kernel(float *loss, const float *y, const float *x, const uint8_t *abn, int64_t NT,
                  int Q, double inv_n, float w_abn) {
    __shared__ double red[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    double acc = 0.0;  // identical in every lane of the warp
    for (int64_t t = w; t < NT; t += nw) {
        const float *yt = y + t * Q, *xt = x + t * Q;
        double e = 0.0;
        for (int p = lane; p < Q; p += 32) {
            double d = (double)yt[p] - xt[p];
            e += d * d;
        }
        e = warp_sum_d(e);
        acc += ((abn && abn[t]) ? (double)w_abn : 1.0) * e;
    }
    if (lane == 0) red[w] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int k = 0; k < nw; k++) s += red[k];
        *loss = (float)(s * inv_n);
    }
}

extern "C" af_status af_cuda_recon_loss(af_cuda_context *ctx, float *loss, float *dy,
                                        const float *y, const float *x, const uint8_t *abn, int B,
                                        int L, int Q, float w_abn, float weight) {
    AF_CUDA_CHECK(loss && y && x, "recon_loss: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0 && Q > 0, "recon_loss: B=%d, L=%d, Q=%d must be > 0", B, L,
                  Q);
    AF_CUDA_CHECK(isfinite(w_abn) && w_abn >= 0.0f,
                  "recon_loss: w_abn must be finite and >= 0, got %g", (double)w_abn);
    AF_CUDA_CHECK(isfinite(weight), "recon_loss: weight must be finite");
    const int64_t NT = (int64_t)B * L;
    const size_t n = (size_t)NT * Q;
    const double inv_n = 1.0 / ((double)NT * Q);
    if (dy != nullptr) {
        recon_grad_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(
            dy, y, x, abn, n, Q, inv_n, w_abn, weight);
        AF_CUDA_LAUNCHED();
    }
    recon_loss_kernel<<<1, RED_THREADS, 0, ctx->stream>>>(loss, y, x, abn, NT, Q, inv_n, w_abn);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// ---- released objective (METHOD §4, "released") ---------------------------------------------

// One warp per token: z = s / tau_s, lse, -sum_k target_k (z_k - lse) and sum_k target_k.
__device__ __forceinline__ void released_token(const float *st, const float *tj, int K,
                                               float tau_s, int lane, double *lse_out,
                                               double *ce_out, double *psum_out) {
    const double lse = warp_row_lse_d(st, K, tau_s, lane);
    double ce = 0.0, ps = 0.0;
    for (int k = lane; k < K; k += 32) {
        ce -= (double)tj[k] * ((double)st[k] / tau_s - lse);
        ps += tj[k];
    }
    *lse_out = lse;
    *ce_out = warp_sum_d(ce);
    *psum_out = warp_sum_d(ps);
}

// The loss and the count of normal tokens (written to *n_normal for the gradient kernel).
__global__ void __launch_bounds__(RED_THREADS)
released_loss_kernel(float *l_cst, int *n_normal, const float *s, const float *target,
                     const uint8_t *abn, int64_t NT, int L, int K, float tau_s) {
    __shared__ double red[32];
    __shared__ long long cred[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    double acc = 0.0;
    long long count = 0;
    for (int64_t t = w; t < NT; t += nw) {
        if (abn[t]) continue;
        double lse, ce, ps;
        released_token(s + t * K, target + (t % L) * K, K, tau_s, lane, &lse, &ce, &ps);
        acc += ce;
        count++;
    }
    if (lane != 0) {  // one copy per warp (every lane holds the same values)
        acc = 0.0;
        count = 0;
    }
    acc = block_sum_d(acc, red);
    count = block_sum_ll(count, cred);
    if (threadIdx.x == 0) {
        *n_normal = (int)count;
        *l_cst = count ? (float)(acc / count) : 0.0f;
    }
}

// ds += w_cst / n_normal * (softmax(z) * sum(target) - target) / tau_s on normal tokens.
__global__ void released_grad_kernel(float *ds, const int *n_normal, const float *s,
                                     const float *target, const uint8_t *abn, int64_t NT, int L,
                                     int K, float tau_s, float w_cst) {
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (t >= NT || abn[t]) return;
    const float *st = s + t * K, *tj = target + (t % L) * K;
    double lse, ce, ps;
    released_token(st, tj, K, tau_s, lane, &lse, &ce, &ps);
    const double c = (double)w_cst / *n_normal;  // >= 1: this token is normal
    for (int k = lane; k < K; k += 32) {
        double qk = exp((double)st[k] / tau_s - lse);
        ds[t * K + k] += (float)(c * (qk * ps - tj[k]) / tau_s);
    }
}

extern "C" size_t af_cuda_released_loss_scratch_floats(int L, int K) {
    if (L <= 0 || K <= 0) return 0;
    return (size_t)L * (size_t)K + 2;  // target, then the normal-token count (an int)
}

extern "C" af_status af_cuda_released_cst_loss(af_cuda_context *ctx, float *l_cst, float *ds,
                                               const float *s, const float *protos,
                                               const uint8_t *abn, int B, int L, int K,
                                               float tau_s, float eps, int iters, float w_cst,
                                               float *scratch) {
    AF_CUDA_CHECK(l_cst && s && protos && abn && scratch, "released_loss: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0 && K > 0, "released_loss: B=%d, L=%d, K=%d must be > 0", B, L,
                  K);
    AF_CUDA_CHECK(positive_finite(tau_s), "released_loss: tau_s must be > 0, got %g",
                  (double)tau_s);
    AF_CUDA_CHECK(isfinite(w_cst), "released_loss: w_cst must be finite");
    AF_CUDA_CHECK((double)B * L <= 2147483647.0, "released_loss: B*L too large");
    float *target = scratch;
    int *n_normal = (int *)(scratch + (size_t)L * K);
    AF_TRY(af_cuda_sinkhorn_knopp(ctx, target, protos, L, K, eps, iters));
    const int64_t NT = (int64_t)B * L;
    released_loss_kernel<<<1, RED_THREADS, 0, ctx->stream>>>(l_cst, n_normal, s, target, abn, NT,
                                                             L, K, tau_s);
    AF_CUDA_LAUNCHED();
    if (ds != nullptr) {
        released_grad_kernel<<<warp_rows_grid(NT), WARP_BLOCK, 0, ctx->stream>>>(
            ds, n_normal, s, target, abn, NT, L, K, tau_s, w_cst);
        AF_CUDA_LAUNCHED();
    }
    return AF_OK;
}

extern "C" af_status af_cuda_released_loss(af_cuda_context *ctx, float *l_cst, float *l_recon,
                                           float *ds, float *dy, const float *s,
                                           const float *protos, const uint8_t *abn,
                                           const float *y, const float *x, int B, int L, int K,
                                           int Q, float tau_s, float eps, int iters, float w_cst,
                                           float w_recon, float *scratch) {
    AF_CUDA_CHECK(l_cst && l_recon && s && protos && abn && y && x && scratch,
                  "released_loss: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0 && K > 0 && Q > 0,
                  "released_loss: B=%d, L=%d, K=%d, Q=%d must be > 0", B, L, K, Q);
    AF_TRY(af_cuda_released_cst_loss(ctx, l_cst, ds, s, protos, abn, B, L, K, tau_s, eps, iters,
                                     w_cst, scratch));
    return af_cuda_recon_loss(ctx, l_recon, dy, y, x, nullptr, B, L, Q, 1.0f, w_recon);
}

// ---- Eq. 51: anomaly score, METHOD §6 -------------------------------------------------------

// One block per image; warp w takes tokens w, w + 8, ... and keeps a running log-sum-exp;
// the 8 warp results are merged in warp order.
__global__ void anomaly_kernel(double *score, double *log_score, double *err, const float *y,
                               const float *x, int L, int Q) {
    __shared__ double wm[32], ws[32];
    const int i = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    double m = -INFINITY, s = 0.0;
    for (int j = w; j < L; j += nw) {
        const float *yj = y + ((size_t)i * L + j) * Q, *xj = x + ((size_t)i * L + j) * Q;
        double e = 0.0;
        for (int p = lane; p < Q; p += 32) {
            double d = (double)yj[p] - xj[p];
            e += d * d;
        }
        e = warp_sum_d(e);
        if (err && lane == 0) err[(size_t)i * L + j] = e;
        if (e <= m) {
            s += exp(e - m);
        } else {
            s = s * exp(m - e) + 1.0;
            m = e;
        }
    }
    if (lane == 0) {
        wm[w] = m;
        ws[w] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double M = -INFINITY;
        for (int k = 0; k < nw; k++) M = fmax(M, wm[k]);
        double S = 0.0;
        for (int k = 0; k < nw; k++)
            if (ws[k] > 0.0) S += ws[k] * exp(wm[k] - M);
        const double ls = M + log(S) - log((double)L);
        if (log_score) log_score[i] = ls;
        if (score) score[i] = exp(ls);
    }
}

extern "C" af_status af_cuda_anomaly_score(af_cuda_context *ctx, double *score,
                                           double *log_score, double *err, const float *y,
                                           const float *x, int B, int L, int Q) {
    AF_CUDA_CHECK(y && x, "anomaly_score: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0 && Q > 0, "anomaly_score: B=%d, L=%d, Q=%d must be > 0", B,
                  L, Q);
    anomaly_kernel<<<B, WARP_BLOCK, 0, ctx->stream>>>(score, log_score, err, y, x, L, Q);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
