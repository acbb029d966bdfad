/* Row L2 normalisation with F.normalize semantics: y = x / max(||x||, eps). */
#include <math.h>

#include "ops.h"
#include "ops_internal.h"

void af_l2norm_forward(float *out, float *norm, const float *inp, int N, int IC, float eps) {
    #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * IC;
        float *y = out + (size_t)n * IC;
        float ss = 0.0f;
        for (int c = 0; c < IC; c++) ss += x[c] * x[c];
        float nrm = sqrtf(ss);
        float inv = 1.0f / (nrm > eps ? nrm : eps);
        #pragma omp simd
        for (int c = 0; c < IC; c++) y[c] = x[c] * inv;
        norm[n] = nrm;
    }
}

void af_l2norm_backward(float *dinp, const float *dout, const float *inp, const float *norm,
                     int N, int IC, float eps) {
    #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * IC, *dy = dout + (size_t)n * IC;
        float *dx = dinp + (size_t)n * IC;
        float nrm = norm[n];
        if (nrm > eps) {
            /* dx = (dy - x <x, dy> / ||x||^2) / ||x|| */
            float dot = 0.0f;
            for (int c = 0; c < IC; c++) dot += x[c] * dy[c];
            float inv = 1.0f / nrm, k = dot * inv * inv;
            #pragma omp simd
            for (int c = 0; c < IC; c++) dx[c] = (dy[c] - x[c] * k) * inv;
        } else {
            /* clamped denominator is the constant eps */
            float inv = 1.0f / eps;
            #pragma omp simd
            for (int c = 0; c < IC; c++) dx[c] = dy[c] * inv;
        }
    }
}
