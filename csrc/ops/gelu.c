/* GELU, exact erf form (timm / PyTorch default, not the tanh approximation):
 * gelu(x) = x Phi(x), Phi the standard normal CDF (af_normcdf, vectorisable). */
#include <math.h>

#include "ops.h"
#include "ops_internal.h"

#define AF_INV_SQRT_2PI 0.39894228040143267794f

void gelu_forward(float *out, const float *inp, size_t n) {
    #pragma omp parallel for simd if (n >= AF_OMP_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = x * af_normcdf(x);
    }
}

void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    /* d/dx [x Phi(x)] = Phi(x) + x phi(x) */
    #pragma omp parallel for simd if (n >= AF_OMP_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float cdf = af_normcdf(x);
        float pdf = AF_INV_SQRT_2PI * af_expf(-0.5f * x * x);
        dinp[i] += dout[i] * (cdf + x * pdf);
    }
}
