/* GELU, exact erf form (timm / PyTorch default, not the tanh approximation). */
#include <math.h>

#include "ops.h"
#include "ops_internal.h"

#define AF_INV_SQRT2 0.70710678118654752440f
#define AF_INV_SQRT_2PI 0.39894228040143267794f

void gelu_forward(float *out, const float *inp, size_t n) {
    #pragma omp parallel for simd if (n >= AF_OMP_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + erff(x * AF_INV_SQRT2));
    }
}

void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    /* d/dx [x Phi(x)] = Phi(x) + x phi(x) */
    #pragma omp parallel for simd if (n >= AF_OMP_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float cdf = 0.5f * (1.0f + erff(x * AF_INV_SQRT2));
        float pdf = AF_INV_SQRT_2PI * af_expf(-0.5f * x * x);
        dinp[i] += dout[i] * (cdf + x * pdf);
    }
}
