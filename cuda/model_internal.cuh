// What vit.cu, head.cu and params.cu share (not part of the C API): launch and copy helpers
// and the precision dispatch of the GEMM-based ops.
//
// fp32 path: exact fp32 GEMMs when the context has TF32 off. bf16 path (m->bf16): the GEMMs
// of linear layers and attention take bf16 operands (weights from the shadow copies that
// params.cu keeps, activations rounded just before the GEMM) with fp32 accumulation and fp32
// results; the residual stream, LayerNorm, GELU, softmax, the weight-normalised last layer
// and every gradient stay fp32.
#pragma once
#include <string.h>

#include "common.cuh"
#include "fast.cuh"
#include "model.cuh"
#include "ops_internal.cuh"
#include "ops/ops.h"

#define TPB 256

#define LAUNCH_1D(kernel, n, ...)                                                             \
    do {                                                                                      \
        kernel<<<af_grid_1d((int64_t)(n), TPB), TPB, 0, ctx->stream>>>(__VA_ARGS__);         \
        AF_CUDA_LAUNCHED();                                                                   \
    } while (0)

// The coordinates of flat index i = (b*T + t)*D + d of a [B,T,D] array.
struct btd {
    int64_t b;
    int t, d;
};
static __device__ __forceinline__ btd split_btd(int64_t i, int T, int D) {
    int64_t bt = i / D;
    btd r = {bt / T, (int)(bt % T), (int)(i % D)};
    return r;
}

static inline af_status dzero(af_cuda_context *ctx, void *p, size_t bytes) {
    if (bytes) AF_CUDA_TRY(cudaMemsetAsync(p, 0, bytes, ctx->stream));
    return AF_OK;
}

static inline af_status dcopy(af_cuda_context *ctx, void *dst, const void *src, size_t bytes) {
    if (bytes) AF_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx->stream));
    return AF_OK;
}

// B blocks of n floats: dst + b*dst_stride <- src + b*src_stride
static inline af_status copy_blocks(af_cuda_context *ctx, float *dst, size_t dst_stride,
                                    const float *src, size_t src_stride, size_t n, int B) {
    AF_CUDA_TRY(cudaMemcpy2DAsync(dst, dst_stride * sizeof(float), src, src_stride * sizeof(float),
                                  n * sizeof(float), (size_t)B, cudaMemcpyDeviceToDevice,
                                  ctx->stream));
    return AF_OK;
}

static inline af_status check_batch(const af_cuda_model *m, int B, const char *what) {
    AF_CUDA_CHECK(m != nullptr, "%s: model is NULL", what);
    AF_CUDA_CHECK(B >= 1 && B <= m->capacity, "%s: batch %d not in [1, capacity %d]", what, B,
                  m->capacity);
    return AF_OK;
}

// ------------------------------------------------------------------ precision dispatch

// The bf16 shadow of a weight inside the student or teacher flat buffers (same offset).
static inline const af_bf16 *shadow(const af_cuda_model *m, const float *w) {
    uintptr_t x = (uintptr_t)w;
    for (int n = 0; n < AF_NET_COUNT; n++) {
        uintptr_t p = (uintptr_t)m->params[n];
        if (m->params_h[n] && x >= p && x < p + m->numel[n] * sizeof(float))
            return m->params_h[n] + (w - m->params[n]);
        if (n < 2 && m->teacher_h[n]) {
            uintptr_t t = (uintptr_t)m->teacher[n];
            if (x >= t && x < t + m->numel[n] * sizeof(float))
                return m->teacher_h[n] + (w - m->teacher[n]);
        }
    }
    return nullptr;
}

static inline af_status linear_fwd(af_cuda_context *ctx, const af_cuda_model *m, float *out,
                                   const float *inp, const float *w, const float *b, int N,
                                   int IC, int OC) {
    if (!m->bf16) return af_cuda_linear_forward(ctx, out, inp, w, b, N, IC, OC);
    const af_bf16 *wh = shadow(m, w);
    AF_CUDA_CHECK(wh != nullptr, "linear_forward: the weight has no bf16 shadow");
    return af_cuda_linear_forward_bf16(ctx, out, inp, wh, b, N, IC, OC, m->hscratch[0]);
}

static inline af_status linear_bwd(af_cuda_context *ctx, const af_cuda_model *m, float *dinp,
                                   float *dw, float *db, const float *dout, const float *inp,
                                   const float *w, int N, int IC, int OC) {
    if (!m->bf16) return af_cuda_linear_backward(ctx, dinp, dw, db, dout, inp, w, N, IC, OC);
    const af_bf16 *wh = shadow(m, w);
    AF_CUDA_CHECK(wh != nullptr, "linear_backward: the weight has no bf16 shadow");
    return af_cuda_linear_backward_bf16(ctx, dinp, dw, db, dout, inp, wh, N, IC, OC,
                                        m->hscratch[0], m->hscratch[1]);
}

static inline af_status attention_fwd(af_cuda_context *ctx, const af_cuda_model *m,
                                      float *out, float *att, const float *qkv, int B, int T,
                                      int D, int H) {
    if (!m->bf16) return af_cuda_attention_forward(ctx, out, att, qkv, B, T, D, H);
    return af_cuda_attention_forward_bf16(ctx, out, att, qkv, B, T, D, H, m->hscratch[0],
                                          m->hscratch[1]);
}

static inline af_status attention_bwd(af_cuda_context *ctx, const af_cuda_model *m,
                                      float *dqkv, float *scratch, const float *dout,
                                      const float *qkv, const float *att, int B, int T, int D,
                                      int H) {
    if (!m->bf16)
        return af_cuda_attention_backward(ctx, dqkv, scratch, dout, qkv, att, B, T, D, H);
    return af_cuda_attention_backward_bf16(ctx, dqkv, scratch, dout, qkv, att, B, T, D, H,
                                           m->hscratch[0], m->hscratch[1], m->hscratch[2]);
}

// ------------------------------------------------------------------ fast path helpers

// The bf16 shadow of a weight or bias (the fast path needs one for every GEMM operand).
static inline af_status shadow_of(const af_cuda_model *m, const float *w, const bf16 **out) {
    const af_bf16 *h = shadow(m, w);
    AF_CUDA_CHECK(h != nullptr, "fast path: a parameter has no bf16 shadow");
    *out = (const bf16 *)h;
    return AF_OK;
}

// out[N,OC] = inp @ w^T + b through cuBLASLt: bf16 out with the bf16 shadow of b, or fp32 out
// with b itself.
static inline af_status fast_linear(af_cuda_context *ctx, const af_cuda_model *m, void *out,
                                    int out_f32, const bf16 *inp, const float *w, const float *b,
                                    int N, int IC, int OC) {
    const bf16 *wh = nullptr, *bh = nullptr;
    AF_TRY(shadow_of(m, w, &wh));
    if (b != nullptr && !out_f32) AF_TRY(shadow_of(m, b, &bh));
    const void *bias = b == nullptr ? nullptr : out_f32 ? (const void *)b : (const void *)bh;
    return af_lt_linear_forward(ctx, out, out_f32, inp, wh, bias, N, IC, OC);
}

static inline af_status fast_linear_bwd(af_cuda_context *ctx, const af_cuda_model *m, void *dinp,
                                        int dinp_f32, float *dw, float *db, const bf16 *dout,
                                        const bf16 *inp, const float *w, int N, int IC, int OC) {
    const bf16 *wh = nullptr;
    if (dinp != nullptr) AF_TRY(shadow_of(m, w, &wh));
    return af_lt_linear_backward(ctx, dinp, dinp_f32, dw, db, dout, inp, wh, N, IC, OC);
}
