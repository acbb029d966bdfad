/* Fused row-tile kernels for the transformer block (vit.c): LayerNorm -> linear, linear ->
 * residual -> LayerNorm, and the MLP (linear -> GELU -> linear -> residual), forwards and the
 * backward through the data path. Each cuts the N rows into tiles (64 to 256 rows) and runs every
 * step of a tile on one thread (single-threaded OpenBLAS, as gemm.c), so a tile's
 * intermediates are still in that core's cache when the next step reads them, and a block
 * forks its threads three times instead of once per op. Tiles depend only on N, never on the
 * thread count, and a row's result does not depend on its tile: deterministic whatever the
 * thread count, so tiles are handed out dynamically (a thread the OS preempts on a shared
 * machine does not hold up the others). The parameter gradients (sums over all rows) stay with af_linear_backward /
 * af_layernorm_backward. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"
#include "ops_internal.h"

/* Tiles of N rows: about 8 (enough to balance 2-8 threads), of 64 to 256 rows. Each call packs
 * its weights once for all tiles (gemm_packed.c); where that is unavailable OpenBLAS packs the
 * weight again for every tile, as much work per row of weight as 64 multiply-adds per row of
 * tile. 256 rows of the widest intermediate (4W = 768 floats at vit_tiny) fit a core's L2. */
static int row_tiles(int N) {
    if (N <= 0) return 0;
    int rows = (N + 7) / 8;
    rows = rows < 64 ? 64 : rows > 256 ? 256 : rows;
    return (N + rows - 1) / rows;
}

/* Whether `macs` multiply-adds are worth forking for. */
static int par(double macs) { return macs >= 2.0 * AF_GEMM_MIN_PAR_MACS; }

/* out[n0:n1] = bias + (res ? res : 0), the seed of a beta = 1 OpenBLAS GEMM. */
static void seed_rows(float *out, const float *bias, const float *res, int n0, int n1, int OC) {
    for (int n = n0; n < n1; n++) {
        float *o = out + (size_t)n * OC;
        const float *r = res ? res + (size_t)n * OC : NULL;
        if (bias && r) {
            #pragma omp simd
            for (int c = 0; c < OC; c++) o[c] = r[c] + bias[c];
        } else if (bias) {
            memcpy(o, bias, (size_t)OC * sizeof(float));
        } else if (r) {
            memcpy(o, r, (size_t)OC * sizeof(float));
        } else {
            memset(o, 0, (size_t)OC * sizeof(float));
        }
    }
}

/* out[n0:n1, OC] = bias + inp[n0:n1, IC] @ w[OC, IC]^T + res (bias, res may be NULL); wp: w
 * packed by af_pack_b_alloc (the weight packed once per call for every tile, the bias and
 * residual added in the kernel), or NULL for OpenBLAS on rows seeded with bias + res. */
static void tile_linear(float *out, const float *inp, const float *w, const float *wp,
                        const float *bias, const float *res, int n0, int n1, int IC, int OC) {
    if (wp != NULL) {
        af_gemm_packed(n1 - n0, OC, IC, inp + (size_t)n0 * IC, IC, wp, out + (size_t)n0 * OC, OC,
                       bias, res ? res + (size_t)n0 * OC : NULL, OC);
        return;
    }
    seed_rows(out, bias, res, n0, n1, OC);
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n1 - n0, OC, IC, 1.0f,
                      inp + (size_t)n0 * IC, IC, w, IC, 1.0f, out + (size_t)n0 * OC, OC);
}

/* out[n0:n1, OC] = dout[n0:n1, IC'] @ w[IC', OC]: a linear's input gradient (w is [out, in]) */
static void tile_linear_dinp(float *dinp, const float *dout, const float *w, const float *wp,
                             int n0, int n1, int IN, int OUT) {
    if (wp != NULL) {
        af_gemm_packed(n1 - n0, IN, OUT, dout + (size_t)n0 * OUT, OUT, wp, dinp + (size_t)n0 * IN,
                       IN, NULL, NULL, 0);
        return;
    }
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n1 - n0, IN, OUT, 1.0f,
                      dout + (size_t)n0 * OUT, OUT, w, IN, 0.0f, dinp + (size_t)n0 * IN, IN);
}

/* The weight packed for tile_linear (forward) or tile_linear_dinp, or NULL (OpenBLAS). */
static float *pack_forward(const float *w, int IC, int OC) { return af_pack_b_alloc(w, IC, 1, IC, OC); }
static float *pack_dinp(const float *w, int IN, int OUT) { return af_pack_b_alloc(w, IN, 0, OUT, IN); }

AF_TARGET_CLONES static void gelu_rows(float *g, const float *h, size_t lo, size_t hi) {
    #pragma omp simd
    for (size_t i = lo; i < hi; i++) g[i] = h[i] * af_normcdf(h[i]);
}

/* g = gelu(h) and dh = dg * gelu'(h) in one pass (they share Phi); dh == dg allowed. */
AF_TARGET_CLONES static void gelu_fwd_bwd_rows(float *g, float *dh, const float *dg,
                                               const float *h, size_t lo, size_t hi) {
    #pragma omp simd
    for (size_t i = lo; i < hi; i++) {
        float x = h[i], phi = af_normcdf(x);
        float pdf = 0.39894228040143267794f * af_expf(-0.5f * x * x);
        g[i] = x * phi;
        dh[i] = dg[i] * (phi + x * pdf);
    }
}

void af_layernorm_linear_forward(float *y, float *mean, float *rstd, float *out, const float *x,
                                 const float *ln_w, const float *ln_b, float eps, const float *w,
                                 const float *b, int N, int IC, int OC) {
    int tiles = row_tiles(N);
    float *wp = pack_forward(w, IC, OC);
    af_blas_single_thread();
    #pragma omp parallel for schedule(dynamic) if (par((double)N * IC * OC))
    for (int t = 0; t < tiles; t++) {
        int n0, n1;
        af_chunk(N, tiles, t, 8, &n0, &n1);
        for (int n = n0; n < n1; n++)
            af_layernorm_row(y + (size_t)n * IC, mean + n, rstd + n, x + (size_t)n * IC, ln_w,
                             ln_b, IC, eps);
        tile_linear(out, y, w, wp, b, NULL, n0, n1, IC, OC);
    }
    free(wp);
}

void af_linear_residual_layernorm_forward(float *r, float *y, float *mean, float *rstd,
                                          const float *x, const float *w, const float *b,
                                          const float *res, const float *ln_w,
                                          const float *ln_b, float eps, int N, int IC, int OC) {
    int tiles = row_tiles(N);
    float *wp = pack_forward(w, IC, OC);
    af_blas_single_thread();
    #pragma omp parallel for schedule(dynamic) if (par((double)N * IC * OC))
    for (int t = 0; t < tiles; t++) {
        int n0, n1;
        af_chunk(N, tiles, t, 8, &n0, &n1);
        tile_linear(r, x, w, wp, b, res, n0, n1, IC, OC);
        for (int n = n0; n < n1; n++)
            af_layernorm_row(y + (size_t)n * OC, mean + n, rstd + n, r + (size_t)n * OC, ln_w,
                             ln_b, OC, eps);
    }
    free(wp);
}

void af_mlp_forward(float *h, float *g, float *out, const float *x, const float *w1,
                    const float *b1, const float *w2, const float *b2, const float *res, int N,
                    int IC, int HC) {
    int tiles = row_tiles(N);
    float *w1p = pack_forward(w1, IC, HC), *w2p = w1p ? pack_forward(w2, HC, IC) : NULL;
    af_blas_single_thread();
    #pragma omp parallel for schedule(dynamic) if (par(2.0 * N * IC * HC))
    for (int t = 0; t < tiles; t++) {
        int n0, n1;
        af_chunk(N, tiles, t, 8, &n0, &n1);
        tile_linear(h, x, w1, w1p, b1, NULL, n0, n1, IC, HC);
        gelu_rows(g, h, (size_t)n0 * HC, (size_t)n1 * HC);
        tile_linear(out, g, w2, w2p, b2, res, n0, n1, HC, IC);
    }
    free(w1p);
    free(w2p);
}

void af_mlp_backward_data(float *dh, float *g, const float *dout, const float *h,
                          const float *w2, int N, int IC, int HC) {
    int tiles = row_tiles(N);
    float *w2p = pack_dinp(w2, HC, IC);
    af_blas_single_thread();
    #pragma omp parallel for schedule(dynamic) if (par((double)N * IC * HC))
    for (int t = 0; t < tiles; t++) {
        int n0, n1;
        af_chunk(N, tiles, t, 8, &n0, &n1);
        tile_linear_dinp(dh, dout, w2, w2p, n0, n1, HC, IC); /* dg = dout @ w2, into dh */
        gelu_fwd_bwd_rows(g, dh, dh, h, (size_t)n0 * HC, (size_t)n1 * HC);
    }
    free(w2p);
}

void af_linear_layernorm_backward_data(float *dx, float *dy, const float *dout, const float *w,
                                       const float *x, const float *ln_w, const float *mean,
                                       const float *rstd, const float *skip, int N, int IC,
                                       int OC) {
    int tiles = row_tiles(N);
    float *wp = pack_dinp(w, IC, OC);
    af_blas_single_thread();
    #pragma omp parallel for schedule(dynamic) if (par((double)N * IC * OC))
    for (int t = 0; t < tiles; t++) {
        int n0, n1;
        af_chunk(N, tiles, t, 8, &n0, &n1);
        tile_linear_dinp(dy, dout, w, wp, n0, n1, IC, OC);
        for (int n = n0; n < n1; n++) {
            size_t o = (size_t)n * IC;
            af_layernorm_row_backward(dx + o, dy + o, x + o, ln_w, mean[n], rstd[n], IC);
            if (skip != NULL) {
                #pragma omp simd
                for (int c = 0; c < IC; c++) dx[o + c] += skip[o + c];
            }
        }
    }
    free(wp);
}

void af_gelu_recompute_backward(float *g, float *dh, const float *dg, const float *h, size_t n) {
    enum { CHUNK = 1 << 14 };
    size_t chunks = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel for if (n >= AF_OMP_MIN_ELEMS)
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = c * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;
        gelu_fwd_bwd_rows(g, dh, dg, h, lo, hi);
    }
}
