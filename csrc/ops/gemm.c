/* GEMM on OpenMP threads with a single-threaded OpenBLAS.
 *
 * Why: OpenBLAS (pthreads) and our OpenMP loops own separate thread pools. After an OpenMP
 * region libgomp's workers keep spinning for a while, and a threaded sgemm issued right
 * after it fights them for the cores: on a 2-core machine layernorm -> linear took 50%
 * longer than the two ops timed apart. So every thread in afire's C core is an OpenMP
 * thread: a big GEMM is cut into row (or column) blocks of C, one single-threaded sgemm
 * per OpenMP thread. The split never cuts the K reduction, so each output element is
 * summed in the same order whatever the thread count. This copy of OpenBLAS is private to
 * afire (NumPy links its own), so pinning it to one thread affects nobody else. */
#include <cblas.h>

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

void af_sgemm(int transA, int transB, int M, int N, int K, float alpha, const float *A,
              int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    enum CBLAS_TRANSPOSE ta = transA ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE tb = transB ? CblasTrans : CblasNoTrans;
    af_blas_single_thread();
    int nt = 1;
#ifdef _OPENMP
    if ((double)M * N * K >= AF_GEMM_MIN_PAR_MACS) nt = omp_get_max_threads();
#endif
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
