/* afire's own fp32 GEMM kernels (AVX-512), for the products of the linear layers:
 *   forward / input gradient  C[M,N] = bias + A[M,K] @ B[K,N] (+ R), B packed once per call;
 *   weight gradient           C[M,N] (+)= A^T B, A [K][M] and B [K][N] read as they are.
 *
 * Why: OpenBLAS packs both operands on every call, and the row-tile kernels (fused.c) call it
 * once per tile of 64-256 rows, so the weight was repacked ~25 times per layer and step: its
 * packing copies were 14% of a vit_tiny 224 px training step, and OpenBLAS has no pre-packed
 * sgemm. Here the caller packs B once (af_pack_b) into panels of NR = 32 columns, [K][32]
 * each, zero-padded, and every tile and thread reads that one copy; A is not packed (the
 * kernel broadcasts its elements straight from the row-major rows, 12 rows kept in L1).
 *
 * The micro-kernels keep an MR x 32 block of C in 24 registers and take the K products in
 * order, one FMA each: every element of C is summed in the same order whatever M, the tiling
 * or the thread count (deterministic); the bits differ from OpenBLAS's (another order).
 * CPUs without AVX-512, other compilers and AFIRE_SGEMM=openblas (tests of the fallback)
 * keep OpenBLAS: af_packed_gemm_available(). Measured in docs/PERFORMANCE.md (CPU). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifdef __x86_64__
#include <immintrin.h>
#endif

#include "ops.h"
#include "ops_internal.h"

enum { NR = AF_PACK_NR, MR = 12 };

static int packed_ok = 0;
static pthread_once_t packed_once = PTHREAD_ONCE_INIT;

static void packed_probe(void) {
    const char *force = getenv("AFIRE_SGEMM");
    if (force != NULL && strcmp(force, "openblas") == 0) return;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    packed_ok = __builtin_cpu_supports("avx512f");
#endif
}

int af_packed_gemm_available(void) {
    pthread_once(&packed_once, packed_probe);
    return packed_ok;
}

size_t af_packed_b_floats(int K, int N) {
    if (K <= 0 || N <= 0) return 0;
    return (size_t)((N + NR - 1) / NR) * NR * (size_t)K;
}

/* Bp panel p, row k, lane j = B[k][p*NR + j] (0 past N). transB: B is stored [N][K] (a linear
 * layer's weight [out, in] for its forward), else [K][N] (the weight for the input gradient). */
void af_pack_b(float *Bp, const float *B, int ldb, int transB, int K, int N) {
    int panels = (N + NR - 1) / NR;
    #pragma omp parallel for if ((size_t)K * N >= AF_OMP_MIN_ELEMS * 4)
    for (int p = 0; p < panels; p++) {
        float *dst = Bp + (size_t)p * K * NR;
        int n0 = p * NR, nr = N - n0 < NR ? N - n0 : NR;
        if (nr < NR) memset(dst, 0, (size_t)K * NR * sizeof(float));
        if (transB) {
            for (int j = 0; j < nr; j++) {
                const float *src = B + (size_t)(n0 + j) * ldb;
                for (int k = 0; k < K; k++) dst[(size_t)k * NR + j] = src[k];
            }
        } else {
            for (int k = 0; k < K; k++)
                memcpy(dst + (size_t)k * NR, B + (size_t)k * ldb + n0, (size_t)nr * sizeof(float));
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define AF_AVX512 __attribute__((target("avx512f,fma")))

/* Lane masks of a panel's two 16-column halves when only nr < 32 of its columns exist. */
static inline void panel_masks(int nr, __mmask16 *m0, __mmask16 *m1) {
    *m0 = nr >= 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    *m1 = nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1);
}

/* C[mr][32, masked] = c + R (R NULL: c; R == C accumulates). */
static inline __attribute__((always_inline)) AF_AVX512 void
store_block(const int mr, __m512 *c0, __m512 *c1, float *C, int ldc, __mmask16 m0, __mmask16 m1,
            const float *R, int ldr) {
    #pragma GCC unroll 12
    for (int i = 0; i < mr; i++) {
        float *ci = C + (size_t)i * ldc;
        if (R != NULL) {
            const float *ri = R + (size_t)i * ldr;
            c0[i] = _mm512_add_ps(c0[i], _mm512_maskz_loadu_ps(m0, ri));
            c1[i] = _mm512_add_ps(c1[i], _mm512_maskz_loadu_ps(m1, ri + 16));
        }
        _mm512_mask_storeu_ps(ci, m0, c0[i]);
        _mm512_mask_storeu_ps(ci + 16, m1, c1[i]);
    }
}

/* switch (rows) { case 1 ... MR: CALL(rows) }: one inlined copy of a micro-kernel per row count */
#define EACH_MR(rows, CALL)                                                                  \
    switch (rows) {                                                                          \
        case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break;              \
        case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break;              \
        case 7: CALL(7); break; case 8: CALL(8); break; case 9: CALL(9); break;              \
        case 10: CALL(10); break; case 11: CALL(11); break; case 12: CALL(12); break;        \
    }

/* C[mr rows][32 columns, masked by m0|m1] = bias + A[mr][K] @ bp[K][32] (+ R): mr <= MR is a
 * constant in each inlined copy (the switch below), so the accumulators stay in registers.
 * The sum starts from the bias (NULL: 0), takes the K products in order, then adds R (NULL:
 * nothing; R == C accumulates into C). */
static inline __attribute__((always_inline)) AF_AVX512 void
micro_kernel(const int mr, int K, const float *A, int lda, const float *bp, float *C, int ldc,
             __mmask16 m0, __mmask16 m1, const float *bias, const float *R, int ldr) {
    __m512 c0[MR], c1[MR];
    __m512 z0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    __m512 z1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    #pragma GCC unroll 12
    for (int i = 0; i < mr; i++) {
        c0[i] = z0;
        c1[i] = z1;
    }
    for (int k = 0; k < K; k++) {
        __m512 b0 = _mm512_load_ps(bp + (size_t)k * NR), b1 = _mm512_load_ps(bp + (size_t)k * NR + 16);
        #pragma GCC unroll 12
        for (int i = 0; i < mr; i++) {
            __m512 a = _mm512_set1_ps(A[(size_t)i * lda + k]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    store_block(mr, c0, c1, C, ldc, m0, m1, R, ldr);
}

#define MICRO(n) micro_kernel(n, K, a, lda, bp, c, ldc, m0, m1, bb, r, ldr)

/* Rows [0, M) x panels [p0, p1) of C. */
static AF_AVX512 void gemm_panels(int M, int N, int K, const float *A, int lda, const float *Bp,
                                  float *C, int ldc, const float *bias, const float *R, int ldr,
                                  int p0, int p1) {
    /* the 12 rows of A stay in L1 while the packed panels of B stream from L2 (contiguous, so
     * prefetched); the other order re-read A's rows, lda apart, from L2 for every panel */
    for (int i = 0; i < M; i += MR) {
        const float *a = A + (size_t)i * lda;
        for (int p = p0; p < p1; p++) {
            __mmask16 m0, m1;
            panel_masks(N - p * NR, &m0, &m1);
            const float *bp = Bp + (size_t)p * K * NR;
            float *c = C + (size_t)i * ldc + (size_t)p * NR;
            const float *bb = bias ? bias + (size_t)p * NR : NULL;
            const float *r = R ? R + (size_t)i * ldr + (size_t)p * NR : NULL;
            EACH_MR(M - i < MR ? M - i : MR, MICRO)
        }
    }
}
#undef MICRO

/* The weight-gradient shape, C[M,N] (+)= A^T B with A stored [K][M] and B [K][N] (dW = dout^T
 * inp, K = the rows of a batch). Nothing is packed: for one k, a 12-row block of A^T is 12
 * consecutive floats of A's row k and a 32-column panel of B is 32 of B's row k. Those rows
 * are lda and ldb floats apart, often past the 2 KiB stride the L1 prefetcher follows, so the
 * kernel prefetches PF rows ahead (without it, 25% slower than OpenBLAS; with it 5-20%
 * faster). K is cut into blocks of KB rows; the 12 rows of A^T stay in L1 while the panels of
 * B pass; each block's sum is added to C in k order (deterministic, any thread count). */
enum { KB = 128, PF = 32 };

static inline __attribute__((always_inline)) AF_AVX512 void
micro_kernel_tn(const int mr, int K, const float *A, int lda, const float *B, int ldb, float *C,
                int ldc, __mmask16 m0, __mmask16 m1, int accumulate) {
    __m512 c0[MR], c1[MR];
    #pragma GCC unroll 12
    for (int i = 0; i < mr; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const float *b = B + (size_t)k * ldb, *a = A + (size_t)k * lda;
        _mm_prefetch((const char *)(b + (size_t)PF * ldb), _MM_HINT_T0);
        _mm_prefetch((const char *)(b + (size_t)PF * ldb + 16), _MM_HINT_T0);
        _mm_prefetch((const char *)(a + (size_t)PF * lda), _MM_HINT_T0);
        _mm_prefetch((const char *)(a + (size_t)PF * lda + 11), _MM_HINT_T0);
        __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
        #pragma GCC unroll 12
        for (int i = 0; i < mr; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
        }
    }
    store_block(mr, c0, c1, C, ldc, m0, m1, accumulate ? C : NULL, ldc);
}

#define MICRO_TN(n) micro_kernel_tn(n, kb, a, lda, b, ldb, c, ldc, m0, m1, acc)

/* Rows [r0, r1) x panels [p0, p1) of C. */
static AF_AVX512 void gemm_tn_block(int N, int K, const float *A, int lda, const float *B,
                                    int ldb, float *C, int ldc, int accumulate, int r0, int r1,
                                    int p0, int p1) {
    for (int k0 = 0; k0 < K; k0 += KB) {
        int kb = K - k0 < KB ? K - k0 : KB, acc = accumulate || k0 > 0;
        for (int i = r0; i < r1; i += MR) {
            const float *a = A + (size_t)k0 * lda + i;
            for (int p = p0; p < p1; p++) {
                __mmask16 m0, m1;
                panel_masks(N - p * NR, &m0, &m1);
                const float *b = B + (size_t)k0 * ldb + (size_t)p * NR;
                float *c = C + (size_t)i * ldc + (size_t)p * NR;
                EACH_MR(r1 - i < MR ? r1 - i : MR, MICRO_TN)
            }
        }
    }
}
#undef MICRO_TN
#undef EACH_MR
#endif

void af_gemm_tn_block(int N, int K, const float *A, int lda, const float *B, int ldb, float *C,
                      int ldc, int accumulate, int r0, int r1, int p0, int p1) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (r1 > r0 && p1 > p0 && K > 0)
        gemm_tn_block(N, K, A, lda, B, ldb, C, ldc, accumulate, r0, r1, p0, p1);
#else
    (void)N; (void)K; (void)A; (void)lda; (void)B; (void)ldb; (void)C; (void)ldc;
    (void)accumulate; (void)r0; (void)r1; (void)p0; (void)p1;
#endif
}

void af_gemm_packed_cols(int M, int N, int K, const float *A, int lda, const float *Bp, float *C,
                         int ldc, const float *bias, const float *R, int ldr, int p0, int p1) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (M > 0 && p1 > p0) gemm_panels(M, N, K, A, lda, Bp, C, ldc, bias, R, ldr, p0, p1);
#else
    (void)M; (void)N; (void)K; (void)A; (void)lda; (void)Bp; (void)C; (void)ldc;
    (void)bias; (void)R; (void)ldr; (void)p0; (void)p1;
#endif
}

void af_gemm_packed(int M, int N, int K, const float *A, int lda, const float *Bp, float *C,
                    int ldc, const float *bias, const float *R, int ldr) {
    af_gemm_packed_cols(M, N, K, A, lda, Bp, C, ldc, bias, R, ldr, 0, (N + NR - 1) / NR);
}

float *af_pack_b_alloc(const float *B, int ldb, int transB, int K, int N) {
    if (!af_packed_gemm_available()) return NULL;
    size_t n = af_packed_b_floats(K, N);
    if (n == 0) return NULL;
    float *Bp = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    if (Bp != NULL) af_pack_b(Bp, B, ldb, transB, K, N);
    return Bp;
}
