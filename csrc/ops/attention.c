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
