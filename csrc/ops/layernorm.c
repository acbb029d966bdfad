/* LayerNorm over the last dimension (biased variance, as PyTorch). */
#include <math.h>

#include "ops.h"
#include "ops_internal.h"

void af_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int IC, float eps) {
    #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * IC;
        float *y = out + (size_t)n * IC;
        /* two passes (mean, then centred squares): no cancellation for large offsets */
        float m = 0.0f;
        for (int c = 0; c < IC; c++) m += x[c];
        m /= (float)IC;
        float var = 0.0f;
        for (int c = 0; c < IC; c++) {
            float d = x[c] - m;
            var += d * d;
        }
        var /= (float)IC;
        float s = 1.0f / sqrtf(var + eps);
        #pragma omp simd
        for (int c = 0; c < IC; c++) y[c] = (x[c] - m) * s * weight[c] + bias[c];
        mean[n] = m;
        rstd[n] = s;
    }
}

void af_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const float *mean,
                        const float *rstd, int N, int IC) {
    if (dinp != NULL) {
        /* dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight */
        #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * IC, *dy = dout + (size_t)n * IC;
            float *dx = dinp + (size_t)n * IC;
            float m = mean[n], s = rstd[n];
            float gsum = 0.0f, gxsum = 0.0f;
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
    }
    if (dweight != NULL || dbias != NULL) {
        /* Sums over rows in a fixed order; threads own disjoint column blocks. */
        enum { CB = 64 };
        int nblocks = (IC + CB - 1) / CB;
        #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
        for (int blk = 0; blk < nblocks; blk++) {
            int c0 = blk * CB, c1 = c0 + CB < IC ? c0 + CB : IC;
            float aw[CB], ab[CB];
            for (int c = c0; c < c1; c++) aw[c - c0] = ab[c - c0] = 0.0f;
            for (int n = 0; n < N; n++) {
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
    }
}
