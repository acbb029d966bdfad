/* Residual connection: elementwise sum. Its backward is where two gradient paths meet, so it
 * is the one op whose input gradients accumulate (ops.h). */
#include "ops.h"
#include "ops_internal.h"

void af_residual_forward(float *out, const float *a, const float *b, size_t n) {
    #pragma omp parallel for simd if (n >= AF_OMP_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void af_residual_backward(float *da, float *db, const float *dout, size_t n) {
    if (da != NULL) {
        #pragma omp parallel for simd if (n >= AF_OMP_MIN_ELEMS)
        for (size_t i = 0; i < n; i++) da[i] += dout[i];
    }
    if (db != NULL) {
        #pragma omp parallel for simd if (n >= AF_OMP_MIN_ELEMS)
        for (size_t i = 0; i < n; i++) db[i] += dout[i];
    }
}
