/* Linear layer: OpenBLAS sgemm split over OpenMP threads (af_sgemm, see gemm.c); weights in
 * PyTorch's layout (out x in). */
#include <cblas.h>
#include <string.h>

#include "ops.h"
#include "ops_internal.h"

void af_linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                    int N, int IC, int OC) {
    if (af_linear_forward_packed(out, inp, weight, bias, N, IC, OC)) return;
    /* Seed out with the bias rows, then let sgemm accumulate (beta = 1): no second pass. */
    float beta = 0.0f;
    if (bias != NULL) {
        #pragma omp parallel for if (AF_OMP_ROWS(N, OC))
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * OC, bias, (size_t)OC * sizeof(float));
        beta = 1.0f;
    }
    /* out[N,OC] = inp[N,IC] @ weight[OC,IC]^T */
    af_sgemm(0, 1, N, OC, IC, 1.0f, inp, IC, weight, IC, beta, out, OC);
}

enum { BIAS_CB = 64 };

/* dbias[block] += the column sums of dout over its N rows, in row order. */
AF_TARGET_CLONES static void bias_block(float *dbias, const float *dout, int N, int OC, int blk) {
    int o0 = blk * BIAS_CB, o1 = o0 + BIAS_CB < OC ? o0 + BIAS_CB : OC;
    float acc[BIAS_CB];
    for (int o = o0; o < o1; o++) acc[o - o0] = 0.0f;
    for (int n = 0; n < N; n++) {
        const float *row = dout + (size_t)n * OC;
        #pragma omp simd
        for (int o = o0; o < o1; o++) acc[o - o0] += row[o];
    }
    for (int o = o0; o < o1; o++) dbias[o] += acc[o - o0];
}

void af_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, int N, int IC, int OC) {
    if (dinp != NULL) /* dinp[N,IC] = dout[N,OC] @ weight[OC,IC] */
        af_sgemm(0, 0, N, IC, OC, 1.0f, dout, OC, weight, IC, 0.0f, dinp, IC);
    if (dweight != NULL) /* dweight[OC,IC] += dout^T @ inp */
        af_sgemm(1, 0, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dweight, IC);
    if (dbias != NULL) {
        /* Column sums in a fixed row order; threads own disjoint column blocks. */
        int nblocks = (OC + BIAS_CB - 1) / BIAS_CB;
        #pragma omp parallel for if ((size_t)N * OC >= AF_OMP_MIN_SUM_ELEMS)
        for (int blk = 0; blk < nblocks; blk++) bias_block(dbias, dout, N, OC, blk);
    }
}

/* ------------------------------------------------------------------ bf16 GEMMs */

void af_linear_forward_bf16(float *out, const float *inp, const float *weight, const float *bias,
                            int N, int IC, int OC, void *ws, size_t ws_bytes) {
    float beta = 0.0f;
    if (bias != NULL) {
        #pragma omp parallel for if ((size_t)N * OC >= AF_OMP_MIN_SUM_ELEMS)
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * OC, bias, (size_t)OC * sizeof(float));
        beta = 1.0f;
    }
    af_gemm_bf16(0, 1, N, OC, IC, 1.0f, inp, IC, weight, IC, beta, out, OC, ws, ws_bytes);
}

void af_linear_backward_bf16(float *dinp, float *dweight, float *dbias, const float *dout,
                             const float *inp, const float *weight, int N, int IC, int OC,
                             void *ws, size_t ws_bytes) {
    if (dinp != NULL)
        af_gemm_bf16(0, 0, N, IC, OC, 1.0f, dout, OC, weight, IC, 0.0f, dinp, IC, ws, ws_bytes);
    if (dweight != NULL)
        af_gemm_bf16(1, 0, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dweight, IC, ws, ws_bytes);
    if (dbias != NULL) af_linear_backward(NULL, NULL, dbias, dout, inp, weight, N, IC, OC);
}

/* ------------------------------------------------------------------ several layers at once */

#ifdef _OPENMP
#include <omp.h>
#endif

void af_linear_backward_params(const af_linear_grad *g, int n) {
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    double macs = 0;
    for (int i = 0; i < n; i++) macs += (double)g[i].N * g[i].IC * g[i].OC;
    if (n < nt || macs < 2.0 * AF_GEMM_MIN_PAR_MACS) { /* af_sgemm splits each one */
        for (int i = 0; i < n; i++)
            af_linear_backward(NULL, g[i].dweight, g[i].dbias, g[i].dout, g[i].inp, NULL, g[i].N,
                               g[i].IC, g[i].OC);
        return;
    }
    /* one layer per thread: its operands are packed once, by that thread; each sum is one
     * single-threaded call, so the result does not depend on which thread runs it */
    af_blas_single_thread();
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        const af_linear_grad *l = &g[i];
        if (l->dweight != NULL)
            af_sgemm_serial(1, 0, l->OC, l->IC, l->N, 1.0f, l->dout, l->OC, l->inp, l->IC, 1.0f,
                            l->dweight, l->IC);
        if (l->dbias != NULL)
            for (int blk = 0; blk < (l->OC + BIAS_CB - 1) / BIAS_CB; blk++)
                bias_block(l->dbias, l->dout, l->N, l->OC, blk);
    }
}
