/* GELU, exact erf form (timm / PyTorch default, not the tanh approximation):
 * gelu(x) = x Phi(x), Phi the standard normal CDF (af_normcdf, vectorisable). */
#include "ops.h"
#include "ops_internal.h"

#define AF_INV_SQRT_2PI 0.39894228040143267794f

/* Work is cut into fixed chunks; each chunk runs a multi-versioned (AVX2/AVX-512) loop. */
#define GELU_CHUNK ((size_t)1 << 14)

AF_TARGET_CLONES static void gelu_forward_range(float *out, const float *inp, size_t lo,
                                                size_t hi) {
    #pragma omp simd
    for (size_t i = lo; i < hi; i++) out[i] = inp[i] * af_normcdf(inp[i]);
}

AF_TARGET_CLONES static void gelu_backward_range(float *dinp, const float *dout,
                                                 const float *inp, size_t lo, size_t hi) {
    /* d/dx [x Phi(x)] = Phi(x) + x phi(x) */
    #pragma omp simd
    for (size_t i = lo; i < hi; i++) {
        float x = inp[i];
        float pdf = AF_INV_SQRT_2PI * af_expf(-0.5f * x * x);
        dinp[i] = dout[i] * (af_normcdf(x) + x * pdf);
    }
}

void af_gelu_forward(float *out, const float *inp, size_t n) {
    size_t chunks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
    #pragma omp parallel for if (n >= AF_OMP_MIN_ELEMS)
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = c * GELU_CHUNK, hi = lo + GELU_CHUNK < n ? lo + GELU_CHUNK : n;
        gelu_forward_range(out, inp, lo, hi);
    }
}

void af_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    size_t chunks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
    #pragma omp parallel for if (n >= AF_OMP_MIN_ELEMS)
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = c * GELU_CHUNK, hi = lo + GELU_CHUNK < n ? lo + GELU_CHUNK : n;
        gelu_backward_range(dinp, dout, inp, lo, hi);
    }
}
