// GELU, exact erf form: the twin of csrc/ops/gelu.c.
#include "common.cuh"

#define AF_INV_SQRT2 0.70710678118654752f
#define AF_INV_SQRT_2PI 0.39894228040143268f

__global__ void gelu_forward_kernel(float *out, const float *inp, size_t n) {
    AF_GRID_STRIDE(size_t, i, n) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + erff(x * AF_INV_SQRT2));
    }
}

// d/dx [x Phi(x)] = Phi(x) + x phi(x).
__global__ void gelu_backward_kernel(float *dinp, const float *dout, const float *inp, size_t n) {
    AF_GRID_STRIDE(size_t, i, n) {
        float x = inp[i];
        float cdf = 0.5f * (1.0f + erff(x * AF_INV_SQRT2));
        float pdf = AF_INV_SQRT_2PI * expf(-0.5f * x * x);
        dinp[i] = dout[i] * (cdf + x * pdf);
    }
}

extern "C" af_status af_cuda_gelu_forward(af_cuda_context *ctx, float *out, const float *inp,
                                          size_t n) {
    if (n == 0) return AF_OK;
    AF_CUDA_CHECK(out && inp, "gelu_forward: NULL pointer");
    gelu_forward_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(out, inp, n);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_gelu_backward(af_cuda_context *ctx, float *dinp, const float *dout,
                                           const float *inp, size_t n) {
    if (n == 0 || dinp == nullptr) return AF_OK;
    AF_CUDA_CHECK(dout && inp, "gelu_backward: NULL pointer");
    gelu_backward_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(dinp, dout, inp, n);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
