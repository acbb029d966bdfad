/* Multi-head non-causal self-attention on the fused qkv layout of timm:
 * qkv[b, t, s*D + h*hd + i] with s = 0 (q), 1 (k), 2 (v). Each (b, h) slice is a strided
 * [T, hd] matrix with leading dimension 3D, so sgemm reads it in place (no gather).
 *
 * Threading: the (b, h) slices are independent and small (T x T with T ~ 200), so they are
 * spread over OpenMP threads, each calling the single-threaded OpenBLAS (see gemm.c). */
#include <cblas.h>
#include <math.h>

#include "ops.h"
#include "ops_internal.h"

void af_attention_forward(float *out, float *att, const float *qkv, int B, int T, int D, int H) {
    int hd = D / H, ld = 3 * D;
    float scale = 1.0f / sqrtf((float)hd);
    af_blas_single_thread();
    #pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *q = qkv + (size_t)b * T * ld + (size_t)h * hd;
        const float *k = q + D, *v = q + 2 * D;
        float *a = att + (size_t)bh * T * T;
        /* scores[T,T] = scale * q @ k^T */
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, scale, q, ld, k, ld,
                          0.0f, a, T);
        for (int t = 0; t < T; t++) af_softmax_row(a + (size_t)t * T, a + (size_t)t * T, T);
        /* out[T,hd] (row stride D) = att @ v */
        float *o = out + (size_t)b * T * D + (size_t)h * hd;
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, a, T, v, ld,
                          0.0f, o, D);
    }
}

void af_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *att, int B, int T, int D, int H) {
    int hd = D / H, ld = 3 * D;
    float scale = 1.0f / sqrtf((float)hd);
    af_blas_single_thread();
    /* each (b, h) writes its own columns of dqkv: no races, fixed order */
    #pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        size_t off = (size_t)b * T * ld + (size_t)h * hd;
        const float *q = qkv + off, *k = q + D, *v = q + 2 * D;
        float *dq = dqkv + off, *dk = dq + D, *dv = dq + 2 * D;
        const float *a = att + (size_t)bh * T * T;
        const float *dy = dout + (size_t)b * T * D + (size_t)h * hd;
        float *ds = scratch + (size_t)bh * T * T;
        /* datt[T,T] = dout @ v^T ; dv = att^T @ dout */
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, 1.0f, dy, D, v, ld,
                          0.0f, ds, T);
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1.0f, a, T, dy, D,
                          0.0f, dv, ld);
        /* softmax backward in place: dscores = att * (datt - <datt, att>_row) */
        for (int t = 0; t < T; t++) {
            size_t o = (size_t)t * T;
            af_softmax_row_backward(ds + o, ds + o, a + o, T);
        }
        /* scores = scale q k^T: dq = scale ds @ k ; dk = scale ds^T @ q */
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, scale, ds, T, k,
                          ld, 0.0f, dq, ld);
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, scale, ds, T, q, ld,
                          0.0f, dk, ld);
    }
}

/* ------------------------------------------------------------------ fused (no T x T saved)
 *
 * The model's attention: the forward saves two floats per query row, the softmax row max m and
 * 1/sum (stats[b,h,t] = {m, 1/sum}), instead of the T x T probabilities; the backward recomputes
 * S = scale q k^T and P = exp(S - m) / sum from them, bit for bit the forward's P (the same
 * GEMM call, the same operations: af_softmax_row_replay). Work is cut into (b, h, query block)
 * tasks, so a batch of one still feeds every thread. The backward runs on groups of G (b, h)
 * slices: phase A (per query block) recomputes P, forms dS = P * (dP - <dP, P>) with
 * dP = dout v^T and writes dq; P and dS go to the group scratch [G, 2, T, T]; phase B (per key
 * block) reads their columns for dv = P^T dout and dk = scale dS^T q. Every output element is
 * one GEMM's sum in a fixed order: deterministic whatever the thread count. With a bf16
 * workspace the six GEMMs take bf16 operands (af_gemm_bf16 on the thread's slot of it); the
 * softmax, its statistics and backward stay fp32. */

#ifdef _OPENMP
#include <omp.h>
#endif

#define ATT_QB 64                           /* query / key rows per task                     */
#define ATT_GROUP_BUDGET ((size_t)1 << 21)  /* floats of backward scratch aimed at (8 MiB)   */
/* below this many multiply-adds per parallel region the work stays on one thread */
#define ATT_MIN_PAR_MACS ((double)(1 << 21))

static int att_blocks(int T) { return (T + ATT_QB - 1) / ATT_QB; }

size_t af_attention_fused_scratch_floats(int B, int T, int H, int threads) {
    size_t tt = 2 * (size_t)T * T, slices = (size_t)B * H;
    size_t G = (ATT_GROUP_BUDGET + tt - 1) / tt;
    G = G < 1 ? 1 : G > slices ? slices : G;
    size_t fwd = (size_t)(threads < 1 ? 1 : threads) * ATT_QB * T;
    return G * tt > fwd ? G * tt : fwd;
}

size_t af_attention_fused_forward_scratch_floats(int T, int threads) {
    return (size_t)(threads < 1 ? 1 : threads) * ATT_QB * T;
}

/* One thread's af_gemm_bf16 workspace for every GEMM of a task (K and N are T or hd). */
static size_t bf16_slot_bytes(int T, int hd) {
    size_t a = af_gemm_bf16_workspace(ATT_QB, T, hd, 1), b = af_gemm_bf16_workspace(ATT_QB, hd, T, 1);
    return ((a > b ? a : b) + 63) / 64 * 64;
}

size_t af_attention_bf16_workspace(int T, int D, int H, int threads) {
    return (size_t)(threads < 1 ? 1 : threads) * bf16_slot_bytes(T, D / H);
}

/* A task's GEMM: fp32 sgemm, or bf16 on this thread's workspace slot when ws != NULL. */
typedef struct {
    void *ws;
    size_t bytes;
} att_gemm_ctx;

static void att_gemm(att_gemm_ctx g, int transA, int transB, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float *C, int ldc) {
    if (g.ws != NULL) {
        af_gemm_bf16(transA, transB, M, N, K, alpha, A, lda, B, ldb, 0.0f, C, ldc, g.ws, g.bytes);
        return;
    }
    scipy_cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans,
                      transB ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, 0.0f, C,
                      ldc);
}

/* This thread's context; *nt is capped to the slots the workspace holds. */
static att_gemm_ctx att_ctx(void *ws, size_t ws_bytes, int T, int hd, int tid) {
    att_gemm_ctx g = {NULL, 0};
    if (ws == NULL) return g;
    g.bytes = bf16_slot_bytes(T, hd);
    g.ws = (char *)ws + (size_t)tid * g.bytes;
    return g;
}

static int cap_threads(int nt, void *ws, size_t ws_bytes, int T, int hd) {
    if (ws == NULL) return nt;
    int slots = (int)(ws_bytes / bf16_slot_bytes(T, hd));
    return nt > slots ? slots : nt; /* >= 1: the caller's af_attention_bf16_workspace */
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* One query block [t0, t1) of slice bh: S = scale q k^T into s[(t1-t0), T] (row stride T). */
static void att_scores(att_gemm_ctx g, float *s, const float *qkv, int bh, int t0, int t1, int T,
                       int D, int H, float scale) {
    int hd = D / H, ld = 3 * D, b = bh / H, h = bh % H;
    const float *q = qkv + (size_t)b * T * ld + (size_t)h * hd;
    att_gemm(g, 0, 1, t1 - t0, T, hd, scale, q + (size_t)t0 * ld, ld, q + D, ld, s, T);
}

void af_attention_fused_forward(float *out, float *stats, float *scratch, size_t scratch_floats,
                                const float *qkv, int B, int T, int D, int H, void *bf16_ws,
                                size_t bf16_ws_bytes) {
    int hd = D / H, ld = 3 * D, nq = att_blocks(T);
    int tasks = B * H * nq;
    float scale = 1.0f / sqrtf((float)hd);
    size_t slot = (size_t)ATT_QB * T;
    int nt = 1;
#ifdef _OPENMP
    if (4.0 * B * H * (double)T * T * hd >= ATT_MIN_PAR_MACS) nt = omp_get_max_threads();
#endif
    if ((size_t)nt * slot > scratch_floats) nt = (int)(scratch_floats / slot);
    nt = cap_threads(nt, bf16_ws, bf16_ws_bytes, T, hd);
    if (nt < 1) nt = 1;
    af_blas_single_thread();
    #pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = thread_id();
        float *s = scratch + (size_t)tid * slot;
        att_gemm_ctx g = att_ctx(bf16_ws, bf16_ws_bytes, T, hd, tid);
        #pragma omp for schedule(dynamic)
        for (int task = 0; task < tasks; task++) {
            int bh = task / nq, blk = task % nq, t0, t1;
            af_chunk(T, nq, blk, 8, &t0, &t1);
            if (t1 <= t0) continue;
            int b = bh / H, h = bh % H;
            att_scores(g, s, qkv, bh, t0, t1, T, D, H, scale);
            float *st = stats ? stats + ((size_t)bh * T + t0) * 2 : NULL;
            for (int t = 0; t < t1 - t0; t++) {
                float *row = s + (size_t)t * T;
                if (st) af_softmax_row_stats(row, row, T, st + 2 * t, st + 2 * t + 1);
                else af_softmax_row(row, row, T);
            }
            /* out rows [t0, t1) (row stride D) = P @ v */
            const float *v = qkv + (size_t)b * T * ld + (size_t)h * hd + 2 * D;
            float *o = out + ((size_t)b * T + t0) * D + (size_t)h * hd;
            att_gemm(g, 0, 0, t1 - t0, hd, T, 1.0f, s, T, v, ld, o, D);
        }
    }
}

void af_attention_fused_backward(float *dqkv, float *scratch, size_t scratch_floats,
                                 const float *dout, const float *qkv, const float *stats, int B,
                                 int T, int D, int H, void *bf16_ws, size_t bf16_ws_bytes) {
    int hd = D / H, ld = 3 * D, nq = att_blocks(T), slices = B * H;
    float scale = 1.0f / sqrtf((float)hd);
    size_t tt = (size_t)T * T;
    int G = (int)(scratch_floats / (2 * tt));
    if (G > slices) G = slices;
    if (G < 1) G = 1; /* the caller gave at least 2 T^2 floats */
    int nt = 1;
#ifdef _OPENMP
    if (5.0 * G * (double)tt * hd >= ATT_MIN_PAR_MACS) nt = omp_get_max_threads();
#endif
    nt = cap_threads(nt, bf16_ws, bf16_ws_bytes, T, hd);
    if (nt < 1) nt = 1;
    af_blas_single_thread();
    #pragma omp parallel num_threads(nt) if (nt > 1)
    {
        att_gemm_ctx g = att_ctx(bf16_ws, bf16_ws_bytes, T, hd, thread_id());
        for (int g0 = 0; g0 < slices; g0 += G) {
            int gn = slices - g0 < G ? slices - g0 : G;
            /* phase A: (slice, query block) -> P, dS rows in the scratch; dq rows */
            #pragma omp for schedule(dynamic)
            for (int task = 0; task < gn * nq; task++) {
                int gi = task / nq, blk = task % nq, bh = g0 + gi, t0, t1;
                af_chunk(T, nq, blk, 8, &t0, &t1);
                if (t1 <= t0) continue;
                int b = bh / H, h = bh % H;
                size_t off = (size_t)b * T * ld + (size_t)h * hd;
                const float *k = qkv + off + D, *v = qkv + off + 2 * D;
                const float *dy = dout + ((size_t)b * T + t0) * D + (size_t)h * hd;
                float *p = scratch + (size_t)gi * 2 * tt + (size_t)t0 * T, *ds = p + tt;
                att_scores(g, p, qkv, bh, t0, t1, T, D, H, scale);
                const float *st = stats + ((size_t)bh * T + t0) * 2;
                for (int t = 0; t < t1 - t0; t++) {
                    float *row = p + (size_t)t * T;
                    af_softmax_row_replay(row, row, T, st[2 * t], st[2 * t + 1]);
                }
                /* dP = dout v^T, then dS = P * (dP - <dP, P>) in place */
                att_gemm(g, 0, 1, t1 - t0, T, hd, 1.0f, dy, D, v, ld, ds, T);
                for (int t = 0; t < t1 - t0; t++) {
                    size_t o = (size_t)t * T;
                    af_softmax_row_backward(ds + o, ds + o, p + o, T);
                }
                /* scores = scale q k^T: dq = scale dS k */
                att_gemm(g, 0, 0, t1 - t0, hd, T, scale, ds, T, k, ld, dqkv + off + (size_t)t0 * ld,
                         ld);
            }
            /* phase B: (slice, key block) -> dv = P^T dout, dk = scale dS^T q */
            #pragma omp for schedule(dynamic)
            for (int task = 0; task < gn * nq; task++) {
                int gi = task / nq, blk = task % nq, bh = g0 + gi, s0, s1;
                af_chunk(T, nq, blk, 8, &s0, &s1);
                if (s1 <= s0) continue;
                int b = bh / H, h = bh % H;
                size_t off = (size_t)b * T * ld + (size_t)h * hd;
                const float *q = qkv + off;
                const float *dy = dout + (size_t)b * T * D + (size_t)h * hd;
                const float *p = scratch + (size_t)gi * 2 * tt, *ds = p + tt;
                float *dk = dqkv + off + D + (size_t)s0 * ld;
                float *dv = dqkv + off + 2 * D + (size_t)s0 * ld;
                att_gemm(g, 1, 0, s1 - s0, hd, T, 1.0f, p + s0, T, dy, D, dv, ld);
                att_gemm(g, 1, 0, s1 - s0, hd, T, scale, ds + s0, T, q, ld, dk, ld);
            }
        }
    }
}
