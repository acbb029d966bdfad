/* Weight-normalised linear, no bias, gain g fixed at 1 (the DINO-style last layer):
 * w_eff_k = v_k / ||v_k||, out = inp @ w_eff^T. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>

#include "ops.h"
#include "ops_internal.h"

void af_wn_linear_forward(float *out, float *w_eff, float *vnorm, const float *inp,
                       const float *v, int N, int IC, int OC) {
    #pragma omp parallel for if (AF_OMP_ROWS(OC, IC))
    for (int k = 0; k < OC; k++) {
        const float *vk = v + (size_t)k * IC;
        float *wk = w_eff + (size_t)k * IC;
        float ss = 0.0f;
        for (int c = 0; c < IC; c++) ss += vk[c] * vk[c];
        float nrm = sqrtf(ss), inv = 1.0f / nrm;
        #pragma omp simd
        for (int c = 0; c < IC; c++) wk[c] = vk[c] * inv;
        vnorm[k] = nrm;
    }
    af_sgemm(0, 1, N, OC, IC, 1.0f, inp, IC, w_eff, IC, 0.0f, out, OC);
}

static float dot(const float *a, const float *b, int IC) {
    float s = 0.0f;
    for (int c = 0; c < IC; c++) s += a[c] * b[c];
    return s;
}

/* dv part of the backward without scratch: each g_k (row k of dw_eff) is built inside dv_k
 * itself. dv_k' = n dv_k + g_k, so <w, g_k> = <w, dv_k'> - n a with a = <w, dv_k>; then
 * dv_k = dv_k'/n - w <w, g_k>/n. One sgemv per row: slower than the sgemm path. */
void af_wn_linear_backward_dv_lowmem(float *dv, const float *dout, const float *inp,
                                  const float *w_eff, const float *vnorm, int N, int IC, int OC) {
    af_blas_single_thread();
    for (int k = 0; k < OC; k++) {
        const float *wk = w_eff + (size_t)k * IC;
        float *dvk = dv + (size_t)k * IC;
        float n = vnorm[k], a = dot(wk, dvk, IC);
        scipy_cblas_sgemv(CblasRowMajor, CblasTrans, N, IC, 1.0f, inp, IC, dout + k, OC, n, dvk, 1);
        float wg = dot(wk, dvk, IC) - n * a;
        for (int c = 0; c < IC; c++) dvk[c] = (dvk[c] - wk[c] * wg) / n;
    }
}

void af_wn_linear_backward(float *dinp, float *dv, const float *dout, const float *inp,
                        const float *w_eff, const float *vnorm, int N, int IC, int OC) {
    af_wn_linear_backward_ws(dinp, dv, dout, inp, w_eff, vnorm, N, IC, OC, NULL);
}

void af_wn_linear_backward_ws(float *dinp, float *dv, const float *dout, const float *inp,
                              const float *w_eff, const float *vnorm, int N, int IC, int OC,
                              float *ws) {
    if (dinp != NULL) /* dinp[N,IC] = dout[N,OC] @ w_eff[OC,IC] */
        af_sgemm(0, 0, N, IC, OC, 1.0f, dout, OC, w_eff, IC, 0.0f, dinp, IC);
    if (dv == NULL) return;
    /* With dw_eff = dout^T @ inp (the gradient w.r.t. w_eff), g_k its row k:
     *   dv_k += (g_k - w_k <w_k, g_k>) / ||v_k||   (projection off the unit direction). */
    float *dw_eff = ws != NULL ? ws : malloc((size_t)OC * IC * sizeof(float));
    if (dw_eff == NULL) { /* keeps the "never fails" contract */
        af_wn_linear_backward_dv_lowmem(dv, dout, inp, w_eff, vnorm, N, IC, OC);
        return;
    }
    {
        af_sgemm(1, 0, OC, IC, N, 1.0f, dout, OC, inp, IC, 0.0f, dw_eff, IC);
        #pragma omp parallel for if (AF_OMP_ROWS(OC, IC))
        for (int k = 0; k < OC; k++) {
            const float *wk = w_eff + (size_t)k * IC, *gk = dw_eff + (size_t)k * IC;
            float *dvk = dv + (size_t)k * IC;
            float wg = dot(wk, gk, IC), inv = 1.0f / vnorm[k];
            #pragma omp simd
            for (int c = 0; c < IC; c++) dvk[c] += (gk[c] - wk[c] * wg) * inv;
        }
        if (ws == NULL) free(dw_eff);
    }
}
