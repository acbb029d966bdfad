// Host-level test entry points of the fast path's kernels (bf16.cuh, af_cuda_check_*): fp32
// device arrays in and out, as every op-table row; the bf16 operands are rounded from them
// (round to nearest even) into temporaries, the kernel under test runs, and its bf16 outputs
// come back widened to fp32. So tests/gpu/test_cuda_fast.py can compare each kernel with its
// CPU twin (the fp32 reference) and with a NumPy emulation of the same rounding. These are
// for tests: they allocate their temporaries per call.
#include <string.h>

#include "bf16.cuh"
#include "fast.cuh"

namespace {

// Device temporaries of one call, freed (after the stream drains) when it goes out of scope.
struct temps {
    af_cuda_context *ctx;
    void *p[8];
    int n;
    explicit temps(af_cuda_context *c) : ctx(c), n(0) { memset(p, 0, sizeof p); }
    ~temps() {
        cudaStreamSynchronize(ctx->stream);
        for (int i = 0; i < n; i++) cudaFree(p[i]);
    }
    af_status bf(bf16 **out, size_t count) {
        *out = nullptr;
        AF_CUDA_CHECK(n < 8, "fast checks: too many temporaries");
        cudaError_t e = cudaMalloc(&p[n], (count ? count : 1) * sizeof(bf16));
        if (e != cudaSuccess) {
            cudaGetLastError();
            p[n] = nullptr;
            return af_error(AF_ENOMEM, "fast checks: cudaMalloc: %s", cudaGetErrorString(e));
        }
        *out = (bf16 *)p[n++];
        return AF_OK;
    }
    // a bf16 copy of fp32 src (NULL stays NULL)
    af_status round(bf16 **out, const float *src, size_t count) {
        *out = nullptr;
        if (src == nullptr) return AF_OK;
        AF_TRY(bf(out, count));
        return af_cuda_to_bf16(ctx, (af_bf16 *)*out, src, count);
    }
};

// Run with the context's epilogue switch set to `epilogue`, then put it back.
struct epilogue_switch {
    af_cuda_context *ctx;
    int saved;
    epilogue_switch(af_cuda_context *c, int on) : ctx(c), saved(c->lt_epilogues) {
        c->lt_epilogues = on ? 1 : 0;
    }
    ~epilogue_switch() { ctx->lt_epilogues = saved; }
};

}  // namespace

extern "C" af_status af_cuda_check_linear_forward(af_cuda_context *ctx, float *out,
                                                  const float *inp, const float *weight,
                                                  const float *bias, int N, int IC, int OC,
                                                  int out_f32, int epilogue) {
    AF_TRY(af_cuda_fast_init(ctx));
    epilogue_switch sw(ctx, epilogue);
    temps t(ctx);
    bf16 *x, *w, *b = nullptr, *o = nullptr;
    AF_TRY(t.round(&x, inp, (size_t)N * IC));
    AF_TRY(t.round(&w, weight, (size_t)OC * IC));
    if (out_f32)
        return af_lt_linear_forward(ctx, out, 1, x, w, bias, N, IC, OC);
    AF_TRY(t.round(&b, bias, (size_t)OC));
    AF_TRY(t.bf(&o, (size_t)N * OC));
    AF_TRY(af_lt_linear_forward(ctx, o, 0, x, w, b, N, IC, OC));
    return af_fast_to_f32(ctx, out, o, (size_t)N * OC);
}

extern "C" af_status af_cuda_check_linear_backward(af_cuda_context *ctx, float *dinp,
                                                   float *dweight, float *dbias,
                                                   const float *dout, const float *inp,
                                                   const float *weight, int N, int IC, int OC,
                                                   int dinp_f32, int epilogue) {
    AF_TRY(af_cuda_fast_init(ctx));
    epilogue_switch sw(ctx, epilogue);
    temps t(ctx);
    bf16 *g, *x, *w, *dx = nullptr;
    AF_TRY(t.round(&g, dout, (size_t)N * OC));
    AF_TRY(t.round(&x, inp, (size_t)N * IC));
    AF_TRY(t.round(&w, weight, (size_t)OC * IC));
    if (dinp_f32 || dinp == nullptr)
        return af_lt_linear_backward(ctx, dinp, 1, dweight, dbias, g, x, w, N, IC, OC);
    AF_TRY(t.bf(&dx, (size_t)N * IC));
    AF_TRY(af_lt_linear_backward(ctx, dx, 0, dweight, dbias, g, x, w, N, IC, OC));
    return af_fast_to_f32(ctx, dinp, dx, (size_t)N * IC);
}

extern "C" af_status af_cuda_check_residual_layernorm(af_cuda_context *ctx, float *res,
                                                      float *out, float *mean, float *rstd,
                                                      const float *a, const float *b,
                                                      const float *weight, const float *bias,
                                                      int N, int W, float eps, int out_f32) {
    temps t(ctx);
    bf16 *bh, *o = nullptr;
    AF_TRY(t.round(&bh, b, (size_t)N * W));
    if (bh == nullptr)  // no branch: res is a itself
        AF_CUDA_TRY(cudaMemcpyAsync(res, a, (size_t)N * W * sizeof(float),
                                    cudaMemcpyDeviceToDevice, ctx->stream));
    if (out_f32)
        return af_fast_residual_layernorm(ctx, res, out, 1, mean, rstd, a, bh, weight, bias, N, W,
                                          eps);
    AF_TRY(t.bf(&o, (size_t)N * W));
    AF_TRY(af_fast_residual_layernorm(ctx, res, o, 0, mean, rstd, a, bh, weight, bias, N, W, eps));
    return af_fast_to_f32(ctx, out, o, (size_t)N * W);
}

extern "C" af_status af_cuda_check_layernorm_backward(af_cuda_context *ctx, float *dinp,
                                                      float *dweight, float *dbias,
                                                      float *dinp_h, const float *dout,
                                                      const float *inp, const float *weight,
                                                      const float *mean, const float *rstd,
                                                      const float *dres, int N, int W,
                                                      int dout_f32) {
    temps t(ctx);
    bf16 *g = nullptr, *dh;
    if (!dout_f32) AF_TRY(t.round(&g, dout, (size_t)N * W));
    AF_TRY(t.bf(&dh, (size_t)N * W));
    if (dres != nullptr)  // the skip path's gradient, which the kernel adds to
        AF_CUDA_TRY(cudaMemcpyAsync(dinp, dres, (size_t)N * W * sizeof(float),
                                    cudaMemcpyDeviceToDevice, ctx->stream));
    AF_TRY(af_fast_layernorm_backward(ctx, dinp, dh, dres != nullptr, dweight, dbias,
                                      dout_f32 ? (const void *)dout : (const void *)g, dout_f32,
                                      inp, weight, mean, rstd, N, W));
    return af_fast_to_f32(ctx, dinp_h, dh, (size_t)N * W);  // the bf16 copy it wrote
}

extern "C" af_status af_cuda_check_gelu_forward(af_cuda_context *ctx, float *out,
                                                const float *inp, size_t n) {
    temps t(ctx);
    bf16 *x, *o;
    AF_TRY(t.round(&x, inp, n));
    AF_TRY(t.bf(&o, n));
    AF_TRY(af_fast_gelu_forward(ctx, o, x, n));
    return af_fast_to_f32(ctx, out, o, n);
}

extern "C" af_status af_cuda_check_gelu_backward(af_cuda_context *ctx, float *dinp,
                                                 const float *dout, const float *inp, size_t n) {
    temps t(ctx);
    bf16 *g, *x, *o;
    AF_TRY(t.round(&g, dout, n));
    AF_TRY(t.round(&x, inp, n));
    AF_TRY(t.bf(&o, n));
    AF_TRY(af_fast_gelu_backward(ctx, o, g, x, n));
    return af_fast_to_f32(ctx, dinp, o, n);
}

extern "C" af_status af_cuda_check_sdpa_forward(af_cuda_context *ctx, float *out, float *lse,
                                                const float *qkv, int B, int T, int D, int H,
                                                int backend) {
    AF_CUDA_CHECK(backend >= 0 && backend <= 2, "backend must be 0 (auto), 1 (cuDNN) or 2 (ours)");
    AF_TRY(af_cuda_fast_init(ctx));
    af_sdpa_scratch ws;
    memset(&ws, 0, sizeof ws);
    temps t(ctx);
    bf16 *q, *o;
    AF_TRY(t.round(&q, qkv, (size_t)B * T * 3 * D));
    AF_TRY(t.bf(&o, (size_t)B * T * D));
    af_status st = af_sdpa_forward(ctx, backend, &ws, o, lse, q, B, T, D, H);
    if (st == AF_OK) st = af_fast_to_f32(ctx, out, o, (size_t)B * T * D);
    cudaStreamSynchronize(ctx->stream);
    af_sdpa_scratch_free(&ws);
    return st;
}

extern "C" af_status af_cuda_check_sdpa_backward(af_cuda_context *ctx, float *dqkv,
                                                 const float *dout, const float *qkv,
                                                 const float *out, const float *lse, int B,
                                                 int T, int D, int H, int backend) {
    AF_CUDA_CHECK(backend >= 0 && backend <= 2, "backend must be 0 (auto), 1 (cuDNN) or 2 (ours)");
    AF_TRY(af_cuda_fast_init(ctx));
    af_sdpa_scratch ws;
    memset(&ws, 0, sizeof ws);
    temps t(ctx);
    bf16 *g, *q, *o, *dq;
    AF_TRY(t.round(&g, dout, (size_t)B * T * D));
    AF_TRY(t.round(&q, qkv, (size_t)B * T * 3 * D));
    AF_TRY(t.round(&o, out, (size_t)B * T * D));
    AF_TRY(t.bf(&dq, (size_t)B * T * 3 * D));
    af_status st = af_sdpa_backward(ctx, backend, &ws, dq, g, q, o, lse, B, T, D, H);
    if (st == AF_OK) st = af_fast_to_f32(ctx, dqkv, dq, (size_t)B * T * 3 * D);
    cudaStreamSynchronize(ctx->stream);
    af_sdpa_scratch_free(&ws);
    return st;
}
