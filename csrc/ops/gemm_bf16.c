/* bf16 GEMM for the CPU's precision="bf16": C = alpha op(A) op(B) + beta C with A and B
 * rounded to bfloat16 (round to nearest even) and the products summed in fp32, the
 * arithmetic of the GPU's bf16 path. Inputs and outputs stay fp32 arrays: operands are
 * converted while they are packed, so nothing keeps bf16 copies between calls.
 *
 * Packing: B once per call, shared by all threads, into 32-column panels in the pair-
 * interleaved ("VNNI") layout Bp[panel][K/2][32][2]; A 32 rows at a time per thread, row-major
 * bf16 with K padded to a multiple of 32 (zeros). A 32 x 32 block of C is then one loop over K:
 *   - AMX (amx_bf16, when the OS grants the tile state): 2 x 2 tiles of 16 x 16 fp32, each K
 *     step two A tiles (16 x 32 bf16), two B tiles (16 pairs x 16 columns), four TDPBF16PS;
 *   - otherwise portable loops (multi-versioned for AVX2 / AVX-512) over the same packing,
 *     for CPUs without bf16 dot products: the same rounding of the inputs, a different (but
 *     fixed) order of the fp32 sums.
 * Threads own 32-row blocks of C (in a fixed assignment to a thread-independent result: every
 * element of C is summed by one thread in one order), so results do not depend on the thread
 * count; a call from inside a parallel region runs on its thread. */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define AF_HAVE_AMX_CODE 1
#include <immintrin.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "ops.h"
#include "ops_internal.h"

#define PB 32 /* rows of an A panel, columns of a B panel, K per tile step */

static size_t pad32(size_t n) { return (n + PB - 1) / PB * PB; }

size_t af_gemm_bf16_workspace(int M, int N, int K, int threads) {
    (void)M;
    size_t Kp = pad32((size_t)K), Np = pad32((size_t)N);
    return (Kp * Np + (size_t)(threads < 1 ? 1 : threads) * PB * Kp) * sizeof(uint16_t);
}

/* ------------------------------------------------------------------ bf16 rounding */

static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* A rows [m0, m0 + 32) of op(A) (rows >= M zero) -> ap[32][Kp] */
AF_TARGET_CLONES static void pack_a(uint16_t *ap, const float *A, int lda, int m0, int M, int K,
                                    size_t Kp) {
    for (int r = 0; r < PB; r++) {
        uint16_t *d = ap + (size_t)r * Kp;
        int m = m0 + r;
        if (m >= M) {
            memset(d, 0, Kp * sizeof(uint16_t));
            continue;
        }
        const float *s = A + (size_t)m * lda;
        #pragma omp simd
        for (int k = 0; k < K; k++) d[k] = to_bf16(s[k]);
        for (size_t k = (size_t)K; k < Kp; k++) d[k] = 0;
    }
}

/* A^T case, faster: rows of A are contiguous in m, so convert a 32-wide strip per k. */
AF_TARGET_CLONES static void pack_a_trans(uint16_t *ap, const float *A, int lda, int m0, int M,
                                          int K, size_t Kp) {
    int w = M - m0 < PB ? M - m0 : PB;
    for (int k = 0; k < K; k++) {
        const float *s = A + (size_t)k * lda + m0;
        for (int r = 0; r < w; r++) ap[(size_t)r * Kp + k] = to_bf16(s[r]);
    }
    for (int r = 0; r < PB; r++)
        for (size_t k = r < w ? (size_t)K : 0; k < Kp; k++) ap[(size_t)r * Kp + k] = 0;
}

/* B columns [n0, n0 + 32) of op(B) -> bp[Kp/2][32][2] (columns >= N and rows >= K zero) */
AF_TARGET_CLONES static void pack_b(uint16_t *bp, const float *B, int ldb, int transB, int n0,
                                    int N, int K, size_t Kp) {
    int w = N - n0 < PB ? N - n0 : PB;
    for (size_t kp = 0; kp < Kp / 2; kp++) {
        uint16_t *d = bp + kp * 2 * PB;
        for (int j = 0; j < 2; j++) {
            int k = (int)(2 * kp) + j;
            if (k >= K) {
                for (int c = 0; c < PB; c++) d[2 * c + j] = 0;
                continue;
            }
            if (!transB) {
                const float *s = B + (size_t)k * ldb + n0;
                for (int c = 0; c < w; c++) d[2 * c + j] = to_bf16(s[c]);
            } else {
                for (int c = 0; c < w; c++) d[2 * c + j] = to_bf16(B[(size_t)(n0 + c) * ldb + k]);
            }
            for (int c = w; c < PB; c++) d[2 * c + j] = 0;
        }
    }
}

/* c[32][32] = ap[32][Kp] @ bp (VNNI), portable: bf16 products are exact in fp32. */
AF_TARGET_CLONES static void block_portable(float *c, const uint16_t *ap, const uint16_t *bp,
                                            size_t Kp) {
    for (int r = 0; r < PB; r++) {
        float acc[PB];
        for (int n = 0; n < PB; n++) acc[n] = 0.0f;
        const uint16_t *a = ap + (size_t)r * Kp;
        for (size_t kp = 0; kp < Kp / 2; kp++) {
            float a0 = from_bf16(a[2 * kp]), a1 = from_bf16(a[2 * kp + 1]);
            const uint16_t *b = bp + kp * 2 * PB;
            #pragma omp simd
            for (int n = 0; n < PB; n++)
                acc[n] += a0 * from_bf16(b[2 * n]) + a1 * from_bf16(b[2 * n + 1]);
        }
        for (int n = 0; n < PB; n++) c[r * PB + n] = acc[n];
    }
}

/* ------------------------------------------------------------------ AMX */

#ifdef AF_HAVE_AMX_CODE
/* The packers of the AMX path, with the AVX512-BF16 conversion (round to nearest even, as
 * to_bf16; it also flushes fp32 denormals, below 1.2e-38, to zero). */
#define AF_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

AF_AVX512BF16 static inline __m512i cvt32(const float *s, int n) {
    __mmask16 lo = (__mmask16)(n >= 16 ? 0xffff : (1u << (n < 0 ? 0 : n)) - 1);
    __mmask16 hi = (__mmask16)(n >= 32 ? 0xffff : n <= 16 ? 0 : (1u << (n - 16)) - 1);
    __m512 a = _mm512_maskz_loadu_ps(lo, s), b = _mm512_maskz_loadu_ps(hi, s + 16);
    return (__m512i)_mm512_cvtne2ps_pbh(b, a); /* [a0..a15, b0..b15] */
}

AF_AVX512BF16 static void pack_a_avx(uint16_t *ap, const float *A, int lda, int m0, int M, int K,
                                     size_t Kp) {
    for (int r = 0; r < PB; r++) {
        uint16_t *d = ap + (size_t)r * Kp;
        if (m0 + r >= M) {
            memset(d, 0, Kp * sizeof(uint16_t));
            continue;
        }
        const float *src = A + (size_t)(m0 + r) * lda;
        for (size_t k = 0; k < Kp; k += 32)
            _mm512_storeu_si512((void *)(d + k), cvt32(src + k, K - (int)k));
    }
}

/* In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] = row i). */
AF_AVX512BF16 static void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* r[4q + j] now holds, in each 128-bit lane L, row (4L' ...): gather lanes across groups */
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
        t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
        r[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd);
    }
}

/* A^T: op(A) rows m0..m0+31 are columns of A [K,M] row-major. Per 32 k: 16 pair-rows
 * (rows k, k+1 interleaved, as pack_b_avx) hold (A[k][m], A[k+1][m]) for 32 m; two 16 x 16
 * transposes of those 32-bit pairs give 16 pairs (32 bf16) of each panel row. */
AF_AVX512BF16 static void pack_a_trans_avx(uint16_t *ap, const float *A, int lda, int m0, int M,
                                           int K, size_t Kp) {
    int w = M - m0 < PB ? M - m0 : PB;
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                            40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                            1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    for (size_t kb = 0; kb < Kp; kb += PB) {
        __m512i lo[16], hi[16];
        for (int j = 0; j < 16; j++) {
            int k = (int)kb + 2 * j;
            __m512i r0 = k < K ? cvt32(A + (size_t)k * lda + m0, w) : _mm512_setzero_si512();
            __m512i r1 = k + 1 < K ? cvt32(A + (size_t)(k + 1) * lda + m0, w)
                                   : _mm512_setzero_si512();
            lo[j] = _mm512_permutex2var_epi16(r0, lo_idx, r1); /* m = 0..15  */
            hi[j] = _mm512_permutex2var_epi16(r0, hi_idx, r1); /* m = 16..31 */
        }
        transpose16(lo);
        transpose16(hi);
        for (int r = 0; r < 16; r++) {
            _mm512_storeu_si512((void *)(ap + (size_t)r * Kp + kb), lo[r]);
            _mm512_storeu_si512((void *)(ap + (size_t)(16 + r) * Kp + kb), hi[r]);
        }
    }
}

/* B = W^T with W [N,K] row-major: column n of a panel is row n0 + n of W, its k-pairs are
 * consecutive floats there; 16 pairs (one 32-float load) go to 16 pair-rows. */
AF_AVX512BF16 static void pack_b_trans_avx(uint16_t *bp, const float *B, int ldb, int n0, int N,
                                           int K, size_t Kp) {
    int w = N - n0 < PB ? N - n0 : PB;
    uint32_t *d = (uint32_t *)bp; /* [Kp/2][32] pairs */
    for (int c = 0; c < PB; c++) {
        if (c >= w) {
            for (size_t kp = 0; kp < Kp / 2; kp++) d[kp * PB + c] = 0;
            continue;
        }
        const float *src = B + (size_t)(n0 + c) * ldb;
        for (size_t k = 0; k < Kp; k += 32) {
            uint32_t pairs[16];
            _mm512_storeu_si512((void *)pairs, cvt32(src + k, K - (int)k));
            for (int i = 0; i < 16; i++) d[(k / 2 + i) * PB + c] = pairs[i];
        }
    }
}

/* B [K,N] row-major: a pair-row interleaves rows k and k + 1 of the panel's 32 columns. */
AF_AVX512BF16 static void pack_b_avx(uint16_t *bp, const float *B, int ldb, int n0, int N, int K,
                                     size_t Kp) {
    int w = N - n0 < PB ? N - n0 : PB;
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                            40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                            1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    for (size_t kp = 0; kp < Kp / 2; kp++) {
        int k = (int)(2 * kp);
        __m512i r0 = k < K ? cvt32(B + (size_t)k * ldb + n0, w) : _mm512_setzero_si512();
        __m512i r1 = k + 1 < K ? cvt32(B + (size_t)(k + 1) * ldb + n0, w)
                               : _mm512_setzero_si512();
        /* r0 = row k's 32 columns, r1 = row k+1's: interleave column by column */
        _mm512_storeu_si512((void *)(bp + kp * 2 * PB), _mm512_permutex2var_epi16(r0, lo_idx, r1));
        _mm512_storeu_si512((void *)(bp + kp * 2 * PB + 32),
                            _mm512_permutex2var_epi16(r0, hi_idx, r1));
    }
}

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_ok = -1;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void amx_probe(void) {
    amx_ok = 0;
    const char *force = getenv("AFIRE_BF16_BACKEND"); /* "portable": tests of the fallback */
    if (force != NULL && strcmp(force, "portable") == 0) return;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512bw"))
        return;
    /* Linux keeps the 8 KiB tile state off until the process asks for it */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return;
    amx_ok = 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Eight 16 x 64-byte tiles. A constant in memory: GCC 12's _tile_loadconfig tells the compiler
 * it reads only 8 bytes, so a config built on the stack loses its stores. */
static const amx_config amx_cfg = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64},
                                   {16, 16, 16, 16, 16, 16, 16, 16}};

__attribute__((target("amx-tile,amx-bf16"))) static void amx_begin(void) {
    _tile_loadconfig(&amx_cfg);
}

__attribute__((target("amx-tile,amx-bf16"))) static void amx_end(void) { _tile_release(); }

/* c[32][32] (row stride ldc floats) = (accumulate ? c : 0) + ap[32][Kp] @ bp: tiles 0-3 C,
 * 4-5 A (rows 0-15, 16-31), 6-7 B (cols 0-15, 16-31). A rows are Kp bf16 apart; a B
 * pair-row holds 32 columns (128 bytes). */
__attribute__((target("amx-tile,amx-bf16"))) static void block_amx(float *c, size_t ldc,
                                                                  int accumulate,
                                                                  const uint16_t *ap,
                                                                  const uint16_t *bp,
                                                                  size_t Kp) {
    size_t sc = ldc * sizeof(float);
    if (accumulate) {
        _tile_loadd(0, c, sc);
        _tile_loadd(1, c + 16, sc);
        _tile_loadd(2, c + 16 * ldc, sc);
        _tile_loadd(3, c + 16 * ldc + 16, sc);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    size_t sa = Kp * sizeof(uint16_t);
    for (size_t k = 0; k < Kp; k += PB) {
        _tile_loadd(4, ap + k, sa);
        _tile_loadd(5, ap + 16 * Kp + k, sa);
        _tile_loadd(6, bp + k * PB, 2 * PB * sizeof(uint16_t));
        _tile_loadd(7, bp + k * PB + 32, 2 * PB * sizeof(uint16_t));
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, sc);
    _tile_stored(1, c + 16, sc);
    _tile_stored(2, c + 16 * ldc, sc);
    _tile_stored(3, c + 16 * ldc + 16, sc);
}
#endif

int af_bf16_backend(void) {
#ifdef AF_HAVE_AMX_CODE
    pthread_once(&amx_once, amx_probe);
    if (amx_ok == 1) return AF_BF16_AMX;
#endif
    return AF_BF16_PORTABLE;
}

/* C = alpha c + beta C on a rows x cols corner (edge blocks and alpha != 1). */
AF_TARGET_CLONES static void combine(float *C, int ldc, const float *c, int rows, int cols,
                                     float alpha, float beta) {
    for (int r = 0; r < rows; r++) {
        float *o = C + (size_t)r * ldc;
        const float *s = c + r * PB;
        if (beta == 0.0f) {
            #pragma omp simd
            for (int j = 0; j < cols; j++) o[j] = alpha * s[j];
        } else {
            #pragma omp simd
            for (int j = 0; j < cols; j++) o[j] = alpha * s[j] + beta * o[j];
        }
    }
}

/* C[m0:m0+32, :] from the packed B (all panels) and this thread's A panel. */
static void row_block(int backend, float *C, int ldc, float alpha, float beta, const float *A,
                      int lda, int transA, int m0, int M, int N, int K, size_t Kp,
                      const uint16_t *bpack, uint16_t *apanel) {
#ifdef AF_HAVE_AMX_CODE
    if (backend == AF_BF16_AMX) {
        if (transA) pack_a_trans_avx(apanel, A, lda, m0, M, K, Kp);
        else pack_a_avx(apanel, A, lda, m0, M, K, Kp);
    } else
#endif
    if (transA) pack_a_trans(apanel, A, lda, m0, M, K, Kp);
    else pack_a(apanel, A, lda, m0, M, K, Kp);
    float c[PB * PB];
    int rows = M - m0 < PB ? M - m0 : PB;
    for (int n0 = 0; n0 < N; n0 += PB) {
        const uint16_t *bp = bpack + (size_t)(n0 / PB) * Kp * PB;
        int cols = N - n0 < PB ? N - n0 : PB;
        float *o = C + (size_t)m0 * ldc + n0;
#ifdef AF_HAVE_AMX_CODE
        if (backend == AF_BF16_AMX) {
            /* a whole block with alpha 1 and beta 0 or 1 goes straight between C and tiles */
            if (rows == PB && cols == PB && alpha == 1.0f && (beta == 0.0f || beta == 1.0f)) {
                block_amx(o, (size_t)ldc, beta == 1.0f, apanel, bp, Kp);
                continue;
            }
            block_amx(c, PB, 0, apanel, bp, Kp);
        } else
#endif
            block_portable(c, apanel, bp, Kp);
        combine(o, ldc, c, rows, cols, alpha, beta);
    }
}

void af_gemm_bf16(int transA, int transB, int M, int N, int K, float alpha, const float *A,
                  int lda, const float *B, int ldb, float beta, float *C, int ldc, void *ws,
                  size_t ws_bytes) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* C = beta C (0 when beta is 0, as BLAS) */
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++)
                C[(size_t)m * ldc + n] = beta == 0.0f ? 0.0f : beta * C[(size_t)m * ldc + n];
        return;
    }
    int backend = af_bf16_backend();
    size_t Kp = pad32((size_t)K), Np = pad32((size_t)N);
    size_t bfloats = Kp * Np, panel = PB * Kp;
    uint16_t *bpack = (uint16_t *)ws, *apanels = bpack + bfloats;
    size_t have = ws_bytes / sizeof(uint16_t);
    int slots = have > bfloats ? (int)((have - bfloats) / panel) : 0; /* >= 1: the caller's
                                                                        * af_gemm_bf16_workspace */
    int nt = 1;
#ifdef _OPENMP
    if (!omp_in_parallel() && (double)M * N * K >= 4.0 * AF_GEMM_MIN_PAR_MACS)
        nt = omp_get_max_threads();
#endif
    if (nt > slots) nt = slots;
    if (nt < 1) nt = 1;
    int npanels = (int)(Np / PB), mblocks = (M + PB - 1) / PB;
    #pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        #pragma omp for schedule(static)
        for (int p = 0; p < npanels; p++) {
            uint16_t *bp = bpack + (size_t)p * Kp * PB;
#ifdef AF_HAVE_AMX_CODE
            if (backend == AF_BF16_AMX) {
                if (transB) pack_b_trans_avx(bp, B, ldb, p * PB, N, K, Kp);
                else pack_b_avx(bp, B, ldb, p * PB, N, K, Kp);
                continue;
            }
#endif
            pack_b(bp, B, ldb, transB, p * PB, N, K, Kp);
        }
#ifdef AF_HAVE_AMX_CODE
        if (backend == AF_BF16_AMX) amx_begin();
#endif
        #pragma omp for schedule(dynamic)
        for (int mb = 0; mb < mblocks; mb++)
            row_block(backend, C, ldc, alpha, beta, A, lda, transA, mb * PB, M, N, K, Kp, bpack,
                      apanels + (size_t)tid * panel);
#ifdef AF_HAVE_AMX_CODE
        if (backend == AF_BF16_AMX) amx_end();
#endif
    }
}
