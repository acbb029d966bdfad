/* GEMM on OpenMP threads with a single-threaded OpenBLAS.
 *
 * Why: OpenBLAS (pthreads) and our OpenMP loops own separate thread pools. After an OpenMP
 * region libgomp's workers keep spinning for a while, and a threaded sgemm issued right
 * after it fights them for the cores: on a 2-core machine layernorm -> linear took 50%
 * longer than the two ops timed apart. So every thread in afire's C core is an OpenMP
 * thread: a big GEMM is cut into row (or column) blocks of C, one single-threaded sgemm
 * per OpenMP thread. The split never cuts the K reduction, so each output element is
 * summed in the same order whatever the thread count. This copy of OpenBLAS is private to
 * afire (NumPy links its own), so pinning it to one thread affects nobody else. Products
 * C = A op(B) go to afire's own kernel instead where the CPU has AVX-512 (gemm_packed.c):
 * op(B) is packed once and shared by the threads. */
#include <cblas.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops_internal.h"

void af_blas_single_thread(void) {
    if (scipy_openblas_get_num_threads() != 1) scipy_openblas_set_num_threads(1);
}

void af_chunk(int n, int parts, int idx, int align, int *lo, int *hi) {
    int blocks = (n + align - 1) / align;
    int b0 = (int)((long long)blocks * idx / parts), b1 = (int)((long long)blocks * (idx + 1) / parts);
    *lo = b0 * align < n ? b0 * align : n;
    *hi = b1 * align < n ? b1 * align : n;
}

/* Our kernels (gemm_packed.c) take alpha 1, beta 0 or 1, and either op(A) = A (op(B) packed
 * once) or A^T B (the weight gradients, nothing packed); OpenBLAS takes the rest, and CPUs
 * without AVX-512. */
static int own_kernel(int transA, int transB, int M, int N, int K, float alpha, float beta) {
    return !(transA && transB) && alpha == 1.0f && (beta == 0.0f || beta == 1.0f) && K > 0 &&
           M >= 16 && (double)M * N * K >= (1 << 18) && af_packed_gemm_available();
}

/* Threads own row blocks of C (or its 32-column panels when C is short and wide). Bp: op(B)
 * packed (transA 0), else NULL and B read as is (transA 1). */
static void own_sgemm(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                      const float *Bp, const float *bias, float beta, float *C, int ldc, int nt) {
    int panels = (N + AF_PACK_NR - 1) / AF_PACK_NR, split_rows = M >= 12 * panels;
    const float *R = beta != 0.0f ? C : NULL; /* beta 1: accumulate */
    #pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        int parts = omp_get_num_threads(), idx = omp_get_thread_num();
#else
        int parts = 1, idx = 0;
#endif
        int r0 = 0, r1 = M, p0 = 0, p1 = panels;
        if (split_rows)
            af_chunk(M, parts, idx, 12, &r0, &r1);
        else
            af_chunk(panels, parts, idx, 1, &p0, &p1);
        if (Bp == NULL)
            af_gemm_tn_block(N, K, A, lda, B, ldb, C, ldc, R != NULL, r0, r1, p0, p1);
        else if (r1 > r0)
            af_gemm_packed_cols(r1 - r0, N, K, A + (size_t)r0 * lda, lda, Bp,
                                C + (size_t)r0 * ldc, ldc, bias, R ? R + (size_t)r0 * ldc : NULL,
                                ldc, p0, p1);
    }
}

/* 1 if our kernel did it (C = bias + alpha op(A) op(B) + beta C, bias may be NULL; bias only
 * with transA 0), 0 if the caller should use OpenBLAS. nt: threads (1 inside a parallel
 * region). */
static int try_own(int transA, int transB, int M, int N, int K, float alpha, const float *A,
                   int lda, const float *B, int ldb, const float *bias, float beta, float *C,
                   int ldc, int nt) {
    if (!own_kernel(transA, transB, M, N, K, alpha, beta)) return 0;
    if (transA) {
        own_sgemm(M, N, K, A, lda, B, ldb, NULL, NULL, beta, C, ldc, nt);
        return 1;
    }
    float *Bp = af_pack_b_alloc(B, ldb, transB, K, N);
    if (Bp == NULL) return 0;
    own_sgemm(M, N, K, A, lda, B, ldb, Bp, bias, beta, C, ldc, nt);
    free(Bp);
    return 1;
}

static int gemm_threads(int M, int N, int K) {
#ifdef _OPENMP
    if ((double)M * N * K >= AF_GEMM_MIN_PAR_MACS) return omp_get_max_threads();
#endif
    (void)M; (void)N; (void)K;
    return 1;
}

void af_sgemm_serial(int transA, int transB, int M, int N, int K, float alpha, const float *A,
                     int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (try_own(transA, transB, M, N, K, alpha, A, lda, B, ldb, NULL, beta, C, ldc, 1)) return;
    scipy_cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans,
                      transB ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta,
                      C, ldc);
}

int af_linear_forward_packed(float *out, const float *inp, const float *weight,
                             const float *bias, int N, int IC, int OC) {
    return try_own(0, 1, N, OC, IC, 1.0f, inp, IC, weight, IC, bias, 0.0f, out, OC,
                   gemm_threads(N, OC, IC));
}

void af_sgemm(int transA, int transB, int M, int N, int K, float alpha, const float *A,
              int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    enum CBLAS_TRANSPOSE ta = transA ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE tb = transB ? CblasTrans : CblasNoTrans;
    af_blas_single_thread();
    int nt = gemm_threads(M, N, K);
    if (try_own(transA, transB, M, N, K, alpha, A, lda, B, ldb, NULL, beta, C, ldc, nt)) return;
    if (nt <= 1) {
        scipy_cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    int split_rows = M >= N; /* cut the longer side of C */
    #pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        int parts = omp_get_num_threads(), idx = omp_get_thread_num();
#else
        int parts = 1, idx = 0;
#endif
        int lo, hi;
        if (split_rows) {
            /* rows [lo, hi) of C and of op(A) */
            af_chunk(M, parts, idx, 16, &lo, &hi);
            if (hi > lo) {
                const float *a = transA ? A + lo : A + (size_t)lo * lda;
                scipy_cblas_sgemm(CblasRowMajor, ta, tb, hi - lo, N, K, alpha, a, lda, B, ldb,
                                  beta, C + (size_t)lo * ldc, ldc);
            }
        } else {
            /* columns [lo, hi) of C and of op(B) */
            af_chunk(N, parts, idx, 16, &lo, &hi);
            if (hi > lo) {
                const float *b = transB ? B + (size_t)lo * ldb : B + lo;
                scipy_cblas_sgemm(CblasRowMajor, ta, tb, M, hi - lo, K, alpha, A, lda, b, ldb,
                                  beta, C + lo, ldc);
            }
        }
    }
}
