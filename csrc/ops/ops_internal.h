/* Private helpers shared by the files of csrc/ops (not part of the kernel contract). */
#ifndef AFIRE_OPS_INTERNAL_H
#define AFIRE_OPS_INTERNAL_H

/* Applies to every function defined after this header is included (the csrc/ops files): GCC does
 * not turn float compare-selects (af_expf's clamps, max) into vector blends under the
 * default -ftrapping-math, which leaves such loops scalar. afire never relies on FP traps.
 * (A pragma, not a per-function attribute: GCC will not inline across differing options.) */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
/* a * b + c as one fused multiply-add where the target has one (the AVX2 / AVX-512 clones
 * below): the polynomials of af_expf and af_normcdf are chains of them (GELU 2x faster). The
 * C11 build (-std=c11) contracts nothing by default. Deterministic: one rounding per FMA,
 * whatever the thread count; a CPU without FMA (the baseline clone) rounds twice. */
#pragma GCC optimize("fp-contract=fast")
#endif

#include <stddef.h>
#include <math.h>
#include <stdint.h>

#include "ops.h"

/* exp(x) in float without a libm call, so loops of it vectorise (libm's expf does not,
 * and softmax was half of attention's time). x = n ln2 + r with |r| <= ln2/2 (n rounded
 * with the 1.5*2^23 trick, valid for plain SSE2), exp(r) by its degree-6 Taylor
 * polynomial (truncation < 1.3e-7 relative), 2^n written into the exponent bits. x is
 * clamped to [-87.33, 88.37]: tiny inputs give ~1.2e-38 instead of 0, a relative change
 * that no sum of exps can see. */
static inline float af_expf(float x) {
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.37626f ? 88.37626f : x;
    const float round_magic = 12582912.0f;
    float n = (x * 1.44269504088896341f + round_magic) - round_magic;
    float r = x - n * 0.693145751953125f; /* ln2 split in a short head ... */
    r = r - n * 1.428606765330187e-6f;    /* ... and a tail: r is exact enough */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* Function multi-versioning for the elementwise and row kernels: the build targets baseline
 * x86-64 (SSE2), and these loops run 2-4x faster with AVX2 / AVX-512 (GELU: 4.6 -> 1.1
 * ns/element). GCC emits one clone per target and picks at load time. Results can then
 * differ in the last bits between CPU generations (never between runs or thread counts). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(AFIRE_NO_CLONES)
#define AF_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AF_TARGET_CLONES
#endif

/* Elementwise loops below this many elements stay on one thread: forking costs more. */
#define AF_OMP_MIN_ELEMS ((size_t)1 << 15)
/* Column sums (bias and LayerNorm parameter gradients) read ~0.1 ns per element: parallel
 * from this many elements. */
#define AF_OMP_MIN_SUM_ELEMS ((size_t)1 << 18)
/* Row loops: parallel when rows * cols reaches the same amount of work. */
#define AF_OMP_ROWS(N, IC) ((size_t)(N) * (size_t)(IC) >= AF_OMP_MIN_ELEMS)
/* Standard normal CDF Phi(x) = 0.5 (1 + erf(x / sqrt 2)) without a libm call (libm's erff
 * kept GELU scalar: 19 ms for ViT-B/16's 2.4M fc1 activations at B=4). Phi(x) = 1 - erfc(z)/2
 * for x >= 0, erfc(z)/2 for x < 0, z = |x|/sqrt 2, with erfc(z) = t exp(-z^2 + P(t)),
 * t = 1 / (1 + z/2): the Chebyshev fit of Press et al., Numerical Recipes 2nd ed. sec. 6.2,
 * fractional error < 1.2e-7 for all z. Working through erfc keeps the negative tail
 * relatively accurate, where 1 + erf(x) would cancel. */
static inline float af_normcdf(float x) {
    float z = fabsf(x) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    float half_erfc = 0.5f * t * af_expf(-z * z + p);
    return x >= 0.0f ? 1.0f - half_erfc : half_erfc;
}

/* GEMMs below this many multiply-adds (~25 us on one core) run on the calling thread: waking
 * a passive OpenMP worker costs a few microseconds, more on a loaded machine. */
#define AF_GEMM_MIN_PAR_MACS (1 << 21)

/* fp32 GEMM against a B packed once (gemm_packed.c), for callers that reuse one B across many
 * row tiles or threads. Available on CPUs with AVX-512 unless AFIRE_SGEMM=openblas
 * (af_packed_gemm_available, ops.h); callers fall back to OpenBLAS otherwise. af_pack_b packs
 * op(B) [K,N] (transB: B stored [N][K]) into af_packed_b_floats(K, N) floats, 64-byte aligned.
 * af_gemm_packed: C[M,N] = bias[N] + A[M,K] @ B + R[M,N] (bias, R may be NULL; R == C
 * accumulates), each element summed from the bias in k order, then R added: deterministic,
 * whatever the tiling; _cols does only the 32-column panels [p0, p1). */
enum { AF_PACK_NR = 32 };
size_t af_packed_b_floats(int K, int N);
void af_pack_b(float *Bp, const float *B, int ldb, int transB, int K, int N);
void af_gemm_packed(int M, int N, int K, const float *A, int lda, const float *Bp, float *C,
                    int ldc, const float *bias, const float *R, int ldr);
void af_gemm_packed_cols(int M, int N, int K, const float *A, int lda, const float *Bp, float *C,
                         int ldc, const float *bias, const float *R, int ldr, int p0, int p1);
/* C[r0:r1, panels p0:p1] = (accumulate ? C : 0) + A^T B for A stored [K][lda] (its columns
 * are C's rows) and B [K][ldb], neither packed: the weight-gradient shape (gemm_packed.c);
 * AVX-512 only, as above. */
void af_gemm_tn_block(int N, int K, const float *A, int lda, const float *B, int ldb, float *C,
                      int ldc, int accumulate, int r0, int r1, int p0, int p1);
/* af_sgemm on the calling thread only (one GEMM per thread inside a parallel region). */
void af_sgemm_serial(int transA, int transB, int M, int N, int K, float alpha, const float *A,
                     int lda, const float *B, int ldb, float beta, float *C, int ldc);
/* out[N,OC] = bias + inp @ weight^T on the packed kernel (gemm.c), the bias in the kernel: 1,
 * or 0 when it does not apply (the caller then seeds the bias rows for OpenBLAS). */
int af_linear_forward_packed(float *out, const float *inp, const float *weight,
                             const float *bias, int N, int IC, int OC);
/* A 64-byte aligned buffer holding op(B) packed, or NULL (no AVX-512, B too small to be worth
 * it, or out of memory: the caller then uses OpenBLAS); free() it. */
float *af_pack_b_alloc(const float *B, int ldb, int transB, int K, int N);

/* Pin afire's private OpenBLAS to one thread (call outside parallel regions). */
void af_blas_single_thread(void);
/* [lo, hi) = part idx of `parts` of [0, n), boundaries on multiples of `align`. */
void af_chunk(int n, int parts, int idx, int align, int *lo, int *hi);

/* One LayerNorm row (layernorm.c): forward (saves mean, rstd), input gradient (written),
 * parameter gradients of rows [n0, n1) and columns [c0, c1), c1 - c0 <= 64 (accumulated). */
void af_layernorm_row(float *y, float *mean, float *rstd, const float *x, const float *weight,
                      const float *bias, int IC, float eps);
void af_layernorm_row_backward(float *dx, const float *dy, const float *x, const float *weight,
                               float mean, float rstd, int IC);
void af_layernorm_params_backward(float *dweight, float *dbias, const float *dout,
                                  const float *inp, const float *mean, const float *rstd, int n0,
                                  int n1, int c0, int c1, int IC);

/* y[IC] = softmax(x[IC]) (y == x allowed); softmax.c, shared with attention.c. */
void af_softmax_row(float *y, const float *x, int IC);
/* af_softmax_row, also writing the row max and 1/sum; af_softmax_row_replay rebuilds the same
 * y (bit for bit) from x and those two numbers (y == x allowed in both). */
void af_softmax_row_stats(float *y, const float *x, int IC, float *mx, float *inv);
void af_softmax_row_replay(float *y, const float *x, int IC, float mx, float inv);
/* dx[IC] = y * (dy - <dy, y>), written (=); dx == dy allowed. */
void af_softmax_row_backward(float *dx, const float *dy, const float *y, int IC);

/* af_wn_linear_backward's dv without an OC x IC buffer (used when that allocation fails;
 * exposed to the binding as _wn_linear_backward_dv_lowmem so tests can reach it). */
void af_wn_linear_backward_dv_lowmem(float *dv, const float *dout, const float *inp,
                                  const float *w_eff, const float *vnorm, int N, int IC, int OC);

#endif
