/* Anomaly scores beside Eq. 51 (anomaly.h states the contracts and which are in the paper:
 * none of these; Eq. 51 itself is af_anomaly_score in objective.c). cuda/anomaly.cu is the
 * twin and sums in the same orders. */
#include "anomaly.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "anomaly_knn.h"

#define STD_FLOOR 1e-6
#define SCALE_FLOOR 1e-12

/* ---- in-painting masks (not in the paper) ------------------------------------------ */

af_status af_anomaly_inpaint_masks(uint8_t *masks, int G, int stride, int block) {
    AF_CHECK(masks, AF_EINVAL, "inpaint_masks: NULL buffer");
    AF_CHECK(G > 0 && stride > 0 && block > 0, AF_EINVAL,
             "inpaint_masks: G=%d, stride=%d, block=%d must be > 0", G, stride, block);
    AF_CHECK(stride <= G, AF_EINVAL, "inpaint_masks: stride=%d is larger than the grid side %d "
             "(some masks would hide nothing)", stride, G);
    const int L = G * G, k = stride * stride;
    memset(masks, 0, (size_t)k * L);
    for (int r = 0; r < G; r++)
        for (int c = 0; c < G; c++) {
            int m = ((r / block) % stride) * stride + (c / block) % stride;
            masks[(size_t)m * L + r * G + c] = 1;
        }
    return AF_OK;
}

/* ---- per-token restoration error (not in the paper) --------------------------------- */

af_status af_anomaly_token_error(float *err, const float *y, const float *x, const uint8_t *mask,
                                 int B, int L, int Q) {
    AF_CHECK(err && y && x, AF_EINVAL, "token_error: NULL buffer");
    AF_CHECK(B > 0 && L > 0 && Q > 0, AF_EINVAL, "token_error: B=%d, L=%d, Q=%d must be > 0", B,
             L, Q);
    const int64_t n = (int64_t)B * L;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n; t++) {
        if (mask && !mask[t]) continue;
        const float *yt = y + t * Q, *xt = x + t * Q;
        double e = 0.0;
        for (int p = 0; p < Q; p++) {
            double d = (double)yt[p] - xt[p];
            e += d * d;
        }
        err[t] = (float)(e / Q);
    }
    return AF_OK;
}

/* ---- per-position z-scores of log errors (not in the paper) ------------------------- */

static inline double log_value(const float *num, const float *den, int64_t t, double eps) {
    double v = log((double)num[t] + eps);
    return den ? v - log((double)den[t] + eps) : v;
}

static af_status check_log_inputs(const float *num, const float *den, int64_t n, float eps,
                                  const char *fn) {
    AF_CHECK(isfinite(eps) && eps > 0.0f, AF_EINVAL, "%s: eps must be finite and > 0, got %g",
             fn, (double)eps);
    for (int64_t t = 0; t < n; t++) {
        AF_CHECK(num[t] >= 0.0f && isfinite(num[t]), AF_EINVAL, "%s: num must be finite and "
                 ">= 0 (an error), got %g at flat index %lld", fn, (double)num[t], (long long)t);
        AF_CHECK(!den || (den[t] >= 0.0f && isfinite(den[t])), AF_EINVAL, "%s: den must be "
                 "finite and >= 0 (an error), got %g at flat index %lld", fn, (double)den[t],
                 (long long)t);
    }
    return AF_OK;
}

af_status af_anomaly_position_stats(float *mean, float *std, const float *num, const float *den,
                                    int N, int L, float eps) {
    AF_CHECK(mean && std && num, AF_EINVAL, "position_stats: NULL buffer");
    AF_CHECK(N >= 2 && L > 0, AF_EINVAL, "position_stats: need N >= 2 reference maps and L > 0, "
             "got N=%d, L=%d", N, L);
    AF_TRY(check_log_inputs(num, den, (int64_t)N * L, eps, "position_stats"));
#pragma omp parallel for schedule(static)
    for (int j = 0; j < L; j++) {
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
    return AF_OK;
}

/* score[b] = mean_j map[b, j], in token order (the GPU twin sums the same way). */
static void row_means(double *score, const float *map, int B, int L) {
    for (int b = 0; b < B; b++) {
        double s = 0.0;
        for (int j = 0; j < L; j++) s += map[(size_t)b * L + j];
        score[b] = s / L;
    }
}

af_status af_anomaly_position_zscore(double *score, float *map, const float *num,
                                     const float *den, const float *mean, const float *std,
                                     int B, int L, float eps) {
    AF_CHECK(score && map && num && mean && std, AF_EINVAL, "position_zscore: NULL buffer");
    AF_CHECK(B > 0 && L > 0, AF_EINVAL, "position_zscore: B=%d, L=%d must be > 0", B, L);
    AF_TRY(check_log_inputs(num, den, (int64_t)B * L, eps, "position_zscore"));
    for (int j = 0; j < L; j++)
        AF_CHECK(isfinite(mean[j]) && std[j] > 0.0f && isfinite(std[j]), AF_EINVAL,
                 "position_zscore: mean must be finite and std finite and > 0, got %g, %g at "
                 "position %d", (double)mean[j], (double)std[j], j);
    const int64_t n = (int64_t)B * L;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n; t++) {
        int j = (int)(t % L);
        map[t] = (float)((log_value(num, den, t, eps) - mean[j]) / std[j]);
    }
    row_means(score, map, B, L);
    return AF_OK;
}

/* ---- Gaussian of encoder tokens (not in the paper) ----------------------------------- */

/* z[d] of image n for Gaussian g: its GAP feature (pooled) or its token 1 + g. */
static void token_vector(double *z, const float *tokens, int64_t n, int g, int T, int D,
                         int pooled) {
    const float *base = tokens + (size_t)n * T * D;
    if (!pooled) {
        for (int d = 0; d < D; d++) z[d] = base[(size_t)(1 + g) * D + d];
        return;
    }
    for (int d = 0; d < D; d++) z[d] = 0.0;
    for (int t = 1; t < T; t++)
        for (int d = 0; d < D; d++) z[d] += base[(size_t)t * D + d];
    for (int d = 0; d < D; d++) z[d] /= (T - 1);
}

/* The shrunk covariance of Gaussian g into A[D*D] (double) and its mean into mu[D];
 * Z[N*D] holds the vectors. */
static void shrunk_covariance(double *A, double *mu, const double *Z, int N, int D, double a) {
    for (int d = 0; d < D; d++) {
        double s = 0.0;
        for (int n = 0; n < N; n++) s += Z[(size_t)n * D + d];
        mu[d] = s / N;
    }
    for (int d = 0; d < D; d++)
        for (int e = 0; e <= d; e++) {
            double s = 0.0;
            for (int n = 0; n < N; n++)
                s += (Z[(size_t)n * D + d] - mu[d]) * (Z[(size_t)n * D + e] - mu[e]);
            A[(size_t)d * D + e] = A[(size_t)e * D + d] = s / (N - 1);
        }
    double tr = 0.0;
    for (int d = 0; d < D; d++) tr += A[(size_t)d * D + d];
    const double scale = fmax(tr / D, SCALE_FLOOR);
    for (int d = 0; d < D; d++)
        for (int e = 0; e < D; e++)
            A[(size_t)d * D + e] = (1.0 - a) * A[(size_t)d * D + e] + (d == e ? a * scale : 0.0);
}

/* In place: the lower triangle of A becomes its Cholesky factor. 0, or 1 when A is not
 * positive definite. */
static int cholesky(double *A, int D) {
    for (int j = 0; j < D; j++) {
        double s = A[(size_t)j * D + j];
        for (int k = 0; k < j; k++) s -= A[(size_t)j * D + k] * A[(size_t)j * D + k];
        if (!(s > 0.0)) return 1;
        const double ljj = sqrt(s);
        A[(size_t)j * D + j] = ljj;
        for (int i = j + 1; i < D; i++) {
            double t = A[(size_t)i * D + j];
            for (int k = 0; k < j; k++) t -= A[(size_t)i * D + k] * A[(size_t)j * D + k];
            A[(size_t)i * D + j] = t / ljj;
        }
    }
    return 0;
}

/* prec = (L L^T)^-1 = Linv^T Linv from the factor in the lower triangle of A; W[D*D]. */
static void cholesky_inverse(float *prec, const double *A, double *W, int D) {
    for (int c = 0; c < D; c++) { /* W[i*D + c] = (L^-1)[i][c], i >= c */
        W[(size_t)c * D + c] = 1.0 / A[(size_t)c * D + c];
        for (int i = c + 1; i < D; i++) {
            double s = 0.0;
            for (int k = c; k < i; k++) s += A[(size_t)i * D + k] * W[(size_t)k * D + c];
            W[(size_t)i * D + c] = -s / A[(size_t)i * D + i];
        }
    }
    for (int d = 0; d < D; d++)
        for (int e = 0; e < D; e++) {
            double s = 0.0;
            for (int k = d > e ? d : e; k < D; k++) s += W[(size_t)k * D + d] * W[(size_t)k * D + e];
            prec[(size_t)d * D + e] = (float)s;
        }
}

af_status af_anomaly_gauss_fit(float *mean, float *prec, const float *tokens, int N, int T,
                               int D, int pooled, float shrinkage) {
    AF_CHECK(mean && prec && tokens, AF_EINVAL, "gauss_fit: NULL buffer");
    AF_CHECK(N >= 2 && T >= 2 && D > 0, AF_EINVAL, "gauss_fit: need N >= 2 reference images, "
             "T >= 2 tokens and D > 0, got N=%d, T=%d, D=%d", N, T, D);
    AF_CHECK(shrinkage >= 0.0f && shrinkage <= 1.0f, AF_EINVAL,
             "gauss_fit: shrinkage must be in [0, 1], got %g", (double)shrinkage);
    const int G = pooled ? 1 : T - 1;
    int bad = -1, oom = 0;
#pragma omp parallel for schedule(dynamic)
    for (int g = 0; g < G; g++) {
        double *A = malloc(sizeof(double) * ((size_t)2 * D * D + (size_t)N * D + D));
        if (A == NULL) {
#pragma omp atomic write
            oom = 1;
            continue;
        }
        double *W = A + (size_t)D * D, *Z = W + (size_t)D * D, *mu = Z + (size_t)N * D;
        for (int n = 0; n < N; n++) token_vector(Z + (size_t)n * D, tokens, n, g, T, D, pooled);
        shrunk_covariance(A, mu, Z, N, D, shrinkage);
        for (int d = 0; d < D; d++) mean[(size_t)g * D + d] = (float)mu[d];
        if (cholesky(A, D)) {
#pragma omp critical
            bad = bad < 0 || g < bad ? g : bad;
        } else {
            cholesky_inverse(prec + (size_t)g * D * D, A, W, D);
        }
        free(A);
    }
    if (oom) return AF_ENOMEM;
    AF_CHECK(bad < 0, AF_EINVAL, "gauss_fit: the covariance of Gaussian %d is not positive "
             "definite (%d reference images for width %d): use shrinkage > 0", bad, N, D);
    return AF_OK;
}

af_status af_anomaly_gauss_score(double *score, float *map, const float *tokens,
                                 const float *mean, const float *prec, int B, int T, int D,
                                 int pooled) {
    AF_CHECK(score && map && tokens && mean && prec, AF_EINVAL, "gauss_score: NULL buffer");
    AF_CHECK(B > 0 && T >= 2 && D > 0, AF_EINVAL, "gauss_score: B=%d, T=%d, D=%d: need B > 0, "
             "T >= 2, D > 0", B, T, D);
    const int G = pooled ? 1 : T - 1;
    const int64_t n = (int64_t)B * G;
    int oom = 0;
#pragma omp parallel
    {
        double *diff = malloc(sizeof(double) * (size_t)D);
        if (diff == NULL) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n; t++) {
            if (diff == NULL) continue;
            const int b = (int)(t / G), g = (int)(t % G);
            token_vector(diff, tokens, b, g, T, D, pooled);
            const float *mu = mean + (size_t)g * D, *P = prec + (size_t)g * D * D;
            for (int d = 0; d < D; d++) diff[d] -= mu[d];
            double q = 0.0;
            for (int d = 0; d < D; d++) {
                double v = 0.0;
                for (int e = 0; e < D; e++) v += (double)P[(size_t)d * D + e] * diff[e];
                q += diff[d] * v;
            }
            map[t] = (float)q;
        }
        free(diff);
    }
    if (oom) return AF_ENOMEM;
    row_means(score, map, B, G);
    return AF_OK;
}

/* ---- per-position nearest neighbours (not in the paper) ------------------------------ */

af_status af_anomaly_knn_score(double *score, float *map, const float *tokens, const float *ref,
                               int B, int N, int T, int D, int k) {
    AF_CHECK(score && map && tokens && ref, AF_EINVAL, "knn_score: NULL buffer");
    AF_CHECK(B > 0 && N > 0 && T >= 2 && D > 0, AF_EINVAL, "knn_score: B=%d, N=%d, T=%d, D=%d: "
             "need B, N, D > 0 and T >= 2", B, N, T, D);
    AF_CHECK(k >= 1 && k <= N && k <= AF_ANOMALY_MAX_K, AF_EINVAL, "knn_score: k must be in "
             "[1, min(N, %d)] (N=%d reference images), got %d", AF_ANOMALY_MAX_K, N, k);
    const int L = T - 1;
    const int64_t n_tok = (int64_t)B * L;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n_tok; t++) {
        const int b = (int)(t / L), j = (int)(t % L);
        map[t] = af_knn_token_mean(tokens + ((size_t)b * T + 1 + j) * D, ref, N, T, D, j, k);
    }
    row_means(score, map, B, L);
    return AF_OK;
}
