// The anomaly scores beside Eq. 51 on the GPU: the twin of csrc/core/anomaly.c (contracts in
// anomaly.h and cuda/anomaly.cuh; none of these scores is in the paper). Each output element
// is computed by one thread that sums in the CPU's order, so the twins agree to the rounding
// of fused multiply-adds; nothing uses atomics.
#include "anomaly.cuh"
#include "anomaly.h"
#include "anomaly_knn.h"
#include "common.cuh"

#define THREADS 256
#define STD_FLOOR 1e-6
#define SCALE_FLOOR 1e-12

namespace {

// ---- per-token restoration error ----------------------------------------------------------

__global__ void token_error_kernel(float *err, const float *y, const float *x,
                                   const uint8_t *mask, int64_t n, int Q) {
    AF_GRID_STRIDE(int64_t, t, n) {
        if (mask && !mask[t]) continue;
        const float *yt = y + t * Q, *xt = x + t * Q;
        double e = 0.0;
        for (int p = 0; p < Q; p++) {
            double d = (double)yt[p] - xt[p];
            e += d * d;
        }
        err[t] = (float)(e / Q);
    }
}

// ---- per-position z-scores -----------------------------------------------------------------

__device__ __forceinline__ double log_value(const float *num, const float *den, int64_t t,
                                            double eps) {
    double v = log((double)num[t] + eps);
    return den ? v - log((double)den[t] + eps) : v;
}

__global__ void position_stats_kernel(float *mean, float *std, const float *num,
                                      const float *den, int N, int L, double eps) {
    AF_GRID_STRIDE(int, j, L) {
        double s = 0.0;
        for (int n = 0; n < N; n++) s += log_value(num, den, (int64_t)n * L + j, eps);
        const double m = s / N;
        double ss = 0.0;
        for (int n = 0; n < N; n++) {
            double d = log_value(num, den, (int64_t)n * L + j, eps) - m;
            ss += d * d;
        }
        mean[j] = (float)m;
        std[j] = (float)fmax(sqrt(ss / (N - 1)), STD_FLOOR);
    }
}

__global__ void zscore_kernel(float *map, const float *num, const float *den, const float *mean,
                              const float *std, int64_t n, int L, double eps) {
    AF_GRID_STRIDE(int64_t, t, n) {
        int j = (int)(t % L);
        map[t] = (float)((log_value(num, den, t, eps) - mean[j]) / std[j]);
    }
}

// score[b] = mean of map[b, :], in token order
__global__ void row_mean_kernel(double *score, const float *map, int B, int L) {
    AF_GRID_STRIDE(int, b, B) {
        double s = 0.0;
        for (int j = 0; j < L; j++) s += map[(size_t)b * L + j];
        score[b] = s / L;
    }
}

// ---- Gaussian of encoder tokens --------------------------------------------------------------

// Z[(g*N + n)*D + d] (or [(n*G + g)*D + d] with `image_major`): the GAP feature (pooled) or
// token 1 + g of image n.
__global__ void token_vector_kernel(double *Z, const float *tokens, int N, int T, int D, int G,
                                    int pooled, int image_major) {
    const int64_t total = (int64_t)G * N * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        const int d = (int)(i % D);
        const int64_t r = i / D;
        const int g = image_major ? (int)(r % G) : (int)(r / N);
        const int n = image_major ? (int)(r / G) : (int)(r % N);
        const float *base = tokens + (size_t)n * T * D;
        double z;
        if (pooled) {
            z = 0.0;
            for (int t = 1; t < T; t++) z += base[(size_t)t * D + d];
            z /= (T - 1);
        } else {
            z = base[(size_t)(1 + g) * D + d];
        }
        Z[i] = z;
    }
}

__global__ void mean_kernel(double *mu, float *mean, const double *Z, int N, int D, int G) {
    const int64_t total = (int64_t)G * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        const int g = (int)(i / D), d = (int)(i % D);
        const double *z = Z + (size_t)g * N * D;
        double s = 0.0;
        for (int n = 0; n < N; n++) s += z[(size_t)n * D + d];
        mu[i] = s / N;
        mean[i] = (float)(s / N);
    }
}

__global__ void covariance_kernel(double *A, const double *Z, const double *mu, int N, int D,
                                  int G) {
    const int64_t total = (int64_t)G * D * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        const int g = (int)(i / ((int64_t)D * D));
        const int d = (int)(i / D % D), e = (int)(i % D);
        if (e > d) continue;
        const double *z = Z + (size_t)g * N * D, *m = mu + (size_t)g * D;
        double s = 0.0;
        for (int n = 0; n < N; n++) s += (z[(size_t)n * D + d] - m[d]) * (z[(size_t)n * D + e] - m[e]);
        double *a = A + (size_t)g * D * D;
        a[(size_t)d * D + e] = a[(size_t)e * D + d] = s / (N - 1);
    }
}

// One block per Gaussian: shrink towards tr/D * I, then Cholesky in place (lower triangle),
// column by column; *bad = the first Gaussian that is not positive definite (host checks).
__global__ void shrink_cholesky_kernel(double *A, int D, double a, int *bad) {
    __shared__ double scale, ljj;
    __shared__ int fail;
    double *m = A + (size_t)blockIdx.x * D * D;
    if (threadIdx.x == 0) {
        double tr = 0.0;
        for (int d = 0; d < D; d++) tr += m[(size_t)d * D + d];
        scale = fmax(tr / D, SCALE_FLOOR);
        fail = 0;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < (int64_t)D * D; i += blockDim.x) {
        const int d = (int)(i / D), e = (int)(i % D);
        m[i] = (1.0 - a) * m[i] + (d == e ? a * scale : 0.0);
    }
    __syncthreads();
    for (int j = 0; j < D; j++) {
        if (threadIdx.x == 0) {
            double s = m[(size_t)j * D + j];
            for (int k = 0; k < j; k++) s -= m[(size_t)j * D + k] * m[(size_t)j * D + k];
            if (!(s > 0.0)) fail = 1;
            ljj = s > 0.0 ? sqrt(s) : 1.0;
            m[(size_t)j * D + j] = ljj;
        }
        __syncthreads();
        if (fail) break;  // uniform: every thread read it after the barrier
        for (int i = j + 1 + threadIdx.x; i < D; i += blockDim.x) {
            double t = m[(size_t)i * D + j];
            for (int k = 0; k < j; k++) t -= m[(size_t)i * D + k] * m[(size_t)j * D + k];
            m[(size_t)i * D + j] = t / ljj;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && fail) atomicMin(bad, (int)blockIdx.x);
}

// W[g][i][c] = (L^-1)[i][c] for i >= c, one thread per column (forward substitution).
__global__ void triangular_inverse_kernel(double *W, const double *A, int D, int G) {
    const int64_t total = (int64_t)G * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        const int g = (int)(i / D), c = (int)(i % D);
        const double *l = A + (size_t)g * D * D;
        double *w = W + (size_t)g * D * D;
        w[(size_t)c * D + c] = 1.0 / l[(size_t)c * D + c];
        for (int r = c + 1; r < D; r++) {
            double s = 0.0;
            for (int k = c; k < r; k++) s += l[(size_t)r * D + k] * w[(size_t)k * D + c];
            w[(size_t)r * D + c] = -s / l[(size_t)r * D + r];
        }
    }
}

__global__ void precision_kernel(float *prec, const double *W, int D, int G) {
    const int64_t total = (int64_t)G * D * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        const int g = (int)(i / ((int64_t)D * D));
        const int d = (int)(i / D % D), e = (int)(i % D);
        const double *w = W + (size_t)g * D * D;
        double s = 0.0;
        for (int k = d > e ? d : e; k < D; k++) s += w[(size_t)k * D + d] * w[(size_t)k * D + e];
        prec[i] = (float)s;
    }
}

// prod[(b*G + g)*D + d] = diff_d * (P_g diff)_d with diff = Z - mean (Z image-major)
__global__ void centre_kernel(double *Z, const float *mean, int64_t n, int D, int G) {
    AF_GRID_STRIDE(int64_t, i, n) {
        const int d = (int)(i % D), g = (int)(i / D % G);
        Z[i] -= mean[(size_t)g * D + d];
    }
}

__global__ void quad_terms_kernel(double *prod, const double *diff, const float *prec,
                                  int64_t n, int D, int G) {
    AF_GRID_STRIDE(int64_t, i, n) {
        const int d = (int)(i % D), g = (int)(i / D % G);
        const double *x = diff + (i - d);
        const float *p = prec + ((size_t)g * D + d) * D;
        double v = 0.0;
        for (int e = 0; e < D; e++) v += (double)p[e] * x[e];
        prod[i] = x[d] * v;
    }
}

__global__ void quad_sum_kernel(float *map, const double *prod, int64_t n, int D) {
    AF_GRID_STRIDE(int64_t, t, n) {
        double q = 0.0;
        for (int d = 0; d < D; d++) q += prod[t * D + d];
        map[t] = (float)q;
    }
}

// ---- per-position nearest neighbours -----------------------------------------------------

__global__ void knn_kernel(float *map, const float *tokens, const float *ref, int B, int N,
                           int T, int D, int k) {
    const int L = T - 1;
    const int64_t n_tok = (int64_t)B * L;
    AF_GRID_STRIDE(int64_t, t, n_tok) {
        const int b = (int)(t / L), j = (int)(t % L);
        map[t] = af_knn_token_mean(tokens + ((size_t)b * T + 1 + j) * D, ref, N, T, D, j, k);
    }
}

unsigned grid(int64_t n) { return af_grid_1d(n, THREADS); }

// Stream-ordered device doubles, freed by the destructor (also on the error paths).
struct Scratch {
    cudaStream_t stream;
    double *p = nullptr;
    explicit Scratch(cudaStream_t s) : stream(s) {}
    ~Scratch() {
        if (p) cudaFreeAsync(p, stream);
    }
};

}  // namespace

extern "C" af_status af_cuda_anomaly_token_error(af_cuda_context *ctx, float *err, const float *y,
                                                 const float *x, const uint8_t *mask, int B,
                                                 int L, int Q) {
    AF_CUDA_CHECK(err && y && x, "token_error: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0 && Q > 0, "token_error: B=%d, L=%d, Q=%d must be > 0", B, L, Q);
    const int64_t n = (int64_t)B * L;
    token_error_kernel<<<grid(n), THREADS, 0, ctx->stream>>>(err, y, x, mask, n, Q);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_anomaly_position_stats(af_cuda_context *ctx, float *mean, float *std,
                                                    const float *num, const float *den, int N,
                                                    int L, float eps) {
    AF_CUDA_CHECK(mean && std && num, "position_stats: NULL buffer");
    AF_CUDA_CHECK(N >= 2 && L > 0, "position_stats: need N >= 2 reference maps and L > 0, got "
                  "N=%d, L=%d", N, L);
    AF_CUDA_CHECK(isfinite(eps) && eps > 0.0f, "position_stats: eps must be finite and > 0, got "
                  "%g", (double)eps);
    position_stats_kernel<<<grid(L), THREADS, 0, ctx->stream>>>(mean, std, num, den, N, L, eps);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_anomaly_position_zscore(af_cuda_context *ctx, double *score,
                                                     float *map, const float *num,
                                                     const float *den, const float *mean,
                                                     const float *std, int B, int L, float eps) {
    AF_CUDA_CHECK(score && map && num && mean && std, "position_zscore: NULL buffer");
    AF_CUDA_CHECK(B > 0 && L > 0, "position_zscore: B=%d, L=%d must be > 0", B, L);
    AF_CUDA_CHECK(isfinite(eps) && eps > 0.0f, "position_zscore: eps must be finite and > 0, got "
                  "%g", (double)eps);
    const int64_t n = (int64_t)B * L;
    zscore_kernel<<<grid(n), THREADS, 0, ctx->stream>>>(map, num, den, mean, std, n, L, eps);
    AF_CUDA_LAUNCHED();
    row_mean_kernel<<<grid(B), THREADS, 0, ctx->stream>>>(score, map, B, L);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_anomaly_gauss_fit(af_cuda_context *ctx, float *mean, float *prec,
                                               const float *tokens, int N, int T, int D,
                                               int pooled, float shrinkage) {
    AF_CUDA_CHECK(mean && prec && tokens, "gauss_fit: NULL buffer");
    AF_CUDA_CHECK(N >= 2 && T >= 2 && D > 0, "gauss_fit: need N >= 2 reference images, T >= 2 "
                  "tokens and D > 0, got N=%d, T=%d, D=%d", N, T, D);
    AF_CUDA_CHECK(shrinkage >= 0.0f && shrinkage <= 1.0f, "gauss_fit: shrinkage must be in "
                  "[0, 1], got %g", (double)shrinkage);
    const int G = pooled ? 1 : T - 1;
    const size_t dd = (size_t)G * D * D;
    Scratch s(ctx->stream);
    AF_CUDA_TRY(cudaMallocAsync((void **)&s.p, sizeof(double) * (2 * dd + (size_t)G * (N + 1) * D)
                                + sizeof(int), ctx->stream));
    double *A = s.p, *W = A + dd, *Z = W + dd, *mu = Z + (size_t)G * N * D;
    int *bad = (int *)(mu + (size_t)G * D);
    const int none = G;
    AF_CUDA_TRY(cudaMemcpyAsync(bad, &none, sizeof none, cudaMemcpyHostToDevice, ctx->stream));
    token_vector_kernel<<<grid((int64_t)G * N * D), THREADS, 0, ctx->stream>>>(Z, tokens, N, T, D,
                                                                              G, pooled, 0);
    AF_CUDA_LAUNCHED();
    mean_kernel<<<grid((int64_t)G * D), THREADS, 0, ctx->stream>>>(mu, mean, Z, N, D, G);
    AF_CUDA_LAUNCHED();
    covariance_kernel<<<grid((int64_t)dd), THREADS, 0, ctx->stream>>>(A, Z, mu, N, D, G);
    AF_CUDA_LAUNCHED();
    shrink_cholesky_kernel<<<G, THREADS, 0, ctx->stream>>>(A, D, shrinkage, bad);
    AF_CUDA_LAUNCHED();
    triangular_inverse_kernel<<<grid((int64_t)G * D), THREADS, 0, ctx->stream>>>(W, A, D, G);
    AF_CUDA_LAUNCHED();
    precision_kernel<<<grid((int64_t)dd), THREADS, 0, ctx->stream>>>(prec, W, D, G);
    AF_CUDA_LAUNCHED();
    int first_bad = G;
    AF_CUDA_TRY(cudaMemcpyAsync(&first_bad, bad, sizeof first_bad, cudaMemcpyDeviceToHost,
                                ctx->stream));
    AF_CUDA_TRY(cudaStreamSynchronize(ctx->stream));
    if (first_bad < G)
        return af_error(AF_EINVAL, "gauss_fit: the covariance of Gaussian %d is not positive "
                        "definite (%d reference images for width %d): use shrinkage > 0",
                        first_bad, N, D);
    return AF_OK;
}

extern "C" af_status af_cuda_anomaly_gauss_score(af_cuda_context *ctx, double *score, float *map,
                                                 const float *tokens, const float *mean,
                                                 const float *prec, int B, int T, int D,
                                                 int pooled) {
    AF_CUDA_CHECK(score && map && tokens && mean && prec, "gauss_score: NULL buffer");
    AF_CUDA_CHECK(B > 0 && T >= 2 && D > 0, "gauss_score: B=%d, T=%d, D=%d: need B > 0, T >= 2, "
                  "D > 0", B, T, D);
    const int G = pooled ? 1 : T - 1;
    const int64_t n = (int64_t)B * G * D;
    Scratch s(ctx->stream);
    AF_CUDA_TRY(cudaMallocAsync((void **)&s.p, sizeof(double) * 2 * (size_t)n, ctx->stream));
    double *diff = s.p, *prod = s.p + n;
    token_vector_kernel<<<grid(n), THREADS, 0, ctx->stream>>>(diff, tokens, B, T, D, G, pooled,
                                                              1);
    AF_CUDA_LAUNCHED();
    centre_kernel<<<grid(n), THREADS, 0, ctx->stream>>>(diff, mean, n, D, G);
    AF_CUDA_LAUNCHED();
    quad_terms_kernel<<<grid(n), THREADS, 0, ctx->stream>>>(prod, diff, prec, n, D, G);
    AF_CUDA_LAUNCHED();
    quad_sum_kernel<<<grid((int64_t)B * G), THREADS, 0, ctx->stream>>>(map, prod, (int64_t)B * G,
                                                                       D);
    AF_CUDA_LAUNCHED();
    row_mean_kernel<<<grid(B), THREADS, 0, ctx->stream>>>(score, map, B, G);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_anomaly_knn_score(af_cuda_context *ctx, double *score, float *map,
                                               const float *tokens, const float *ref, int B,
                                               int N, int T, int D, int k) {
    AF_CUDA_CHECK(score && map && tokens && ref, "knn_score: NULL buffer");
    AF_CUDA_CHECK(B > 0 && N > 0 && T >= 2 && D > 0, "knn_score: B=%d, N=%d, T=%d, D=%d: need B, "
                  "N, D > 0 and T >= 2", B, N, T, D);
    AF_CUDA_CHECK(k >= 1 && k <= N && k <= AF_ANOMALY_MAX_K, "knn_score: k must be in [1, min(N, "
                  "%d)] (N=%d reference images), got %d", AF_ANOMALY_MAX_K, N, k);
    const int64_t n = (int64_t)B * (T - 1);
    knn_kernel<<<grid(n), THREADS, 0, ctx->stream>>>(map, tokens, ref, B, N, T, D, k);
    AF_CUDA_LAUNCHED();
    row_mean_kernel<<<grid(B), THREADS, 0, ctx->stream>>>(score, map, B, T - 1);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
