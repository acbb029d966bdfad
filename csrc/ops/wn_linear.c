/* Weight-normalised linear, no bias, gain g fixed at 1 (the DINO-style last layer):
 * w_eff_k = v_k / ||v_k||, out = inp @ w_eff^T. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>

#include "ops.h"
#include "ops_internal.h"

void af_wn_linear_forward(float *out, float *w_eff, float *vnorm, const float *inp,
                       const float *v, int N, int C, int K) {
    #pragma omp parallel for if (AF_OMP_ROWS(K, C))
    for (int k = 0; k < K; k++) {
        const float *vk = v + (size_t)k * C;
        float *wk = w_eff + (size_t)k * C;
        float ss = 0.0f;
        for (int c = 0; c < C; c++) ss += vk[c] * vk[c];
        float nrm = sqrtf(ss), inv = 1.0f / nrm;
        #pragma omp simd
        for (int c = 0; c < C; c++) wk[c] = vk[c] * inv;
        vnorm[k] = nrm;
    }
    af_sgemm(0, 1, N, K, C, 1.0f, inp, C, w_eff, C, 0.0f, out, K);
}

static float dot(const float *a, const float *b, int C) {
    float s = 0.0f;
    for (int c = 0; c < C; c++) s += a[c] * b[c];
    return s;
}

/* dv part of the backward without scratch: each G_k is built inside dv_k itself.
 * dv_k' = n dv_k + G_k, so <w, G_k> = <w, dv_k'> - n a with a = <w, dv_k>; then
 * dv_k = dv_k'/n - w <w, G_k>/n. One sgemv per row: slower than the sgemm path. */
void af_wn_linear_backward_dv_lowmem(float *dv, const float *dout, const float *inp,
                                  const float *w_eff, const float *vnorm, int N, int C, int K) {
    af_blas_single_thread();
    for (int k = 0; k < K; k++) {
        const float *wk = w_eff + (size_t)k * C;
        float *dvk = dv + (size_t)k * C;
        float n = vnorm[k], a = dot(wk, dvk, C);
        scipy_cblas_sgemv(CblasRowMajor, CblasTrans, N, C, 1.0f, inp, C, dout + k, K, n, dvk, 1);
        float wg = dot(wk, dvk, C) - n * a;
        for (int c = 0; c < C; c++) dvk[c] = (dvk[c] - wk[c] * wg) / n;
    }
}

void af_wn_linear_backward(float *dinp, float *dv, const float *dout, const float *inp,
                        const float *w_eff, const float *vnorm, int N, int C, int K) {
    if (dinp != NULL) /* dinp[N,C] += dout[N,K] @ w_eff[K,C] */
        af_sgemm(0, 0, N, C, K, 1.0f, dout, K, w_eff, C, 1.0f, dinp, C);
    if (dv == NULL) return;
    /* With G = dout^T @ inp (the gradient w.r.t. w_eff):
     *   dv_k += (G_k - w_k <w_k, G_k>) / ||v_k||   (projection off the unit direction). */
    float *G = malloc((size_t)K * C * sizeof(float));
    if (G == NULL) { /* keeps the "never fails" contract */
        af_wn_linear_backward_dv_lowmem(dv, dout, inp, w_eff, vnorm, N, C, K);
        return;
    }
    {
        af_sgemm(1, 0, K, C, N, 1.0f, dout, K, inp, C, 0.0f, G, C);
        #pragma omp parallel for if (AF_OMP_ROWS(K, C))
        for (int k = 0; k < K; k++) {
            const float *wk = w_eff + (size_t)k * C, *gk = G + (size_t)k * C;
            float *dvk = dv + (size_t)k * C;
            float wg = dot(wk, gk, C), inv = 1.0f / vnorm[k];
            #pragma omp simd
            for (int c = 0; c < C; c++) dvk[c] += (gk[c] - wk[c] * wg) * inv;
        }
        free(G);
    }
}
