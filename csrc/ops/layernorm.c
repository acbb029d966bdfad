/* LayerNorm over the last dimension (biased variance, as PyTorch). The row loops are
 * multi-versioned (AVX2 / AVX-512, ops_internal.h) with vectorised reductions: their partial
 * sums run in a fixed order per build target, whatever the thread count. */
#include <math.h>

#include "ops.h"
#include "ops_internal.h"

AF_TARGET_CLONES void af_layernorm_row(float *y, float *mean, float *rstd, const float *x,
                                       const float *weight, const float *bias, int IC,
                                       float eps) {
    /* two passes (mean, then centred squares): no cancellation for large offsets */
    float m = 0.0f;
    #pragma omp simd reduction(+ : m)
    for (int c = 0; c < IC; c++) m += x[c];
    m /= (float)IC;
    float var = 0.0f;
    #pragma omp simd reduction(+ : var)
    for (int c = 0; c < IC; c++) {
        float d = x[c] - m;
        var += d * d;
    }
    var /= (float)IC;
    float s = 1.0f / sqrtf(var + eps);
    #pragma omp simd
    for (int c = 0; c < IC; c++) y[c] = (x[c] - m) * s * weight[c] + bias[c];
    *mean = m;
    *rstd = s;
}

/* dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight; written (=). */
AF_TARGET_CLONES void af_layernorm_row_backward(float *dx, const float *dy, const float *x,
                                                const float *weight, float m, float s, int IC) {
    float gsum = 0.0f, gxsum = 0.0f;
    #pragma omp simd reduction(+ : gsum, gxsum)
    for (int c = 0; c < IC; c++) {
        float g = dy[c] * weight[c];
        gsum += g;
        gxsum += g * (x[c] - m) * s;
    }
    gsum /= (float)IC;
    gxsum /= (float)IC;
    #pragma omp simd
    for (int c = 0; c < IC; c++) {
        float xhat = (x[c] - m) * s;
        dx[c] = s * (dy[c] * weight[c] - gsum - xhat * gxsum);
    }
}

/* dweight[c0:c1] += sum_n dy * xhat, dbias[c0:c1] += sum_n dy over rows [n0, n1), rows in
 * order (the caller fixes the row blocks, so the sums do not depend on the thread count). */
AF_TARGET_CLONES void af_layernorm_params_backward(float *dweight, float *dbias,
                                                   const float *dout, const float *inp,
                                                   const float *mean, const float *rstd,
                                                   int n0, int n1, int c0, int c1, int IC) {
    enum { CB = 64 };
    float aw[CB], ab[CB];
    for (int c = c0; c < c1; c++) aw[c - c0] = ab[c - c0] = 0.0f;
    for (int n = n0; n < n1; n++) {
        const float *x = inp + (size_t)n * IC, *dy = dout + (size_t)n * IC;
        float m = mean[n], s = rstd[n];
        #pragma omp simd
        for (int c = c0; c < c1; c++) {
            aw[c - c0] += dy[c] * (x[c] - m) * s;
            ab[c - c0] += dy[c];
        }
    }
    for (int c = c0; c < c1; c++) {
        if (dweight != NULL) dweight[c] += aw[c - c0];
        if (dbias != NULL) dbias[c] += ab[c - c0];
    }
}

void af_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int IC, float eps) {
    #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
    for (int n = 0; n < N; n++)
        af_layernorm_row(out + (size_t)n * IC, mean + n, rstd + n, inp + (size_t)n * IC, weight,
                         bias, IC, eps);
}

void af_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const float *mean,
                        const float *rstd, int N, int IC) {
    if (dinp != NULL) {
        #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
        for (int n = 0; n < N; n++)
            af_layernorm_row_backward(dinp + (size_t)n * IC, dout + (size_t)n * IC,
                                      inp + (size_t)n * IC, weight, mean[n], rstd[n], IC);
    }
    if (dweight != NULL || dbias != NULL) {
        /* Sums over rows in a fixed order; threads own disjoint column blocks. */
        enum { CB = 64 };
        int nblocks = (IC + CB - 1) / CB;
        #pragma omp parallel for if ((size_t)N * IC >= AF_OMP_MIN_SUM_ELEMS)
        for (int blk = 0; blk < nblocks; blk++) {
            int c0 = blk * CB, c1 = c0 + CB < IC ? c0 + CB : IC;
            af_layernorm_params_backward(dweight, dbias, dout, inp, mean, rstd, 0, N, c0, c1, IC);
        }
    }
}
