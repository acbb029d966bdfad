// GELU, exact erf form: the twin of csrc/ops/gelu.c (and its bf16 twin for the fast path).
#include "common.cuh"
#include "fast.cuh"

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

// ------------------------------------------------------------------ fast path (fast.cuh)
// bf16 in and out, the math in fp32 as above; two values per thread (bf16x2 loads) when the
// pointers allow it.

static __device__ __forceinline__ float gelu_f(float x) {
    return 0.5f * x * (1.0f + erff(x * AF_INV_SQRT2));
}
static __device__ __forceinline__ float dgelu_f(float x) {
    float cdf = 0.5f * (1.0f + erff(x * AF_INV_SQRT2));
    return cdf + x * AF_INV_SQRT_2PI * expf(-0.5f * x * x);
}

__global__ void gelu_forward_bf16x2_kernel(__nv_bfloat162 *out, const __nv_bfloat162 *inp,
                                           size_t n2) {
    AF_GRID_STRIDE(size_t, i, n2) {
        float2 x = __bfloat1622float2(inp[i]);
        out[i] = __floats2bfloat162_rn(gelu_f(x.x), gelu_f(x.y));
    }
}

__global__ void gelu_forward_bf16_kernel(bf16 *out, const bf16 *inp, size_t n) {
    AF_GRID_STRIDE(size_t, i, n) out[i] = __float2bfloat16_rn(gelu_f(__bfloat162float(inp[i])));
}

__global__ void gelu_backward_bf16x2_kernel(__nv_bfloat162 *dinp, const __nv_bfloat162 *dout,
                                            const __nv_bfloat162 *inp, size_t n2) {
    AF_GRID_STRIDE(size_t, i, n2) {
        float2 x = __bfloat1622float2(inp[i]), g = __bfloat1622float2(dout[i]);
        dinp[i] = __floats2bfloat162_rn(g.x * dgelu_f(x.x), g.y * dgelu_f(x.y));
    }
}

__global__ void gelu_backward_bf16_kernel(bf16 *dinp, const bf16 *dout, const bf16 *inp,
                                          size_t n) {
    AF_GRID_STRIDE(size_t, i, n) {
        float g = __bfloat162float(dout[i]);
        dinp[i] = __float2bfloat16_rn(g * dgelu_f(__bfloat162float(inp[i])));
    }
}

static bool pairs_ok(size_t n, const void *a, const void *b, const void *c) {
    return n % 2 == 0 && (uintptr_t)a % 4 == 0 && (uintptr_t)b % 4 == 0 && (uintptr_t)c % 4 == 0;
}

af_status af_fast_gelu_forward(af_cuda_context *ctx, bf16 *out, const bf16 *inp, size_t n) {
    if (n == 0) return AF_OK;
    AF_CUDA_CHECK(out && inp, "gelu_forward (bf16): NULL pointer");
    if (pairs_ok(n, out, inp, inp))
        gelu_forward_bf16x2_kernel<<<af_grid_1d((int64_t)(n / 2), 256), 256, 0, ctx->stream>>>(
            (__nv_bfloat162 *)out, (const __nv_bfloat162 *)inp, n / 2);
    else
        gelu_forward_bf16_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(out, inp, n);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

af_status af_fast_gelu_backward(af_cuda_context *ctx, bf16 *dinp, const bf16 *dout,
                                const bf16 *inp, size_t n) {
    if (n == 0 || dinp == nullptr) return AF_OK;
    AF_CUDA_CHECK(dout && inp, "gelu_backward (bf16): NULL pointer");
    if (pairs_ok(n, dinp, dout, inp))
        gelu_backward_bf16x2_kernel<<<af_grid_1d((int64_t)(n / 2), 256), 256, 0, ctx->stream>>>(
            (__nv_bfloat162 *)dinp, (const __nv_bfloat162 *)dout, (const __nv_bfloat162 *)inp,
            n / 2);
    else
        gelu_backward_bf16_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(
            dinp, dout, inp, n);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
