// The bf16 fast path of linear and attention (cuda/bf16.cuh): the same GEMMs as linear.cu and
// attention.cu, with the same operand layouts and comments' notation, but cuBLAS GemmEx with
// bf16 A/B, fp32 C and CUBLAS_COMPUTE_32F. The fp32 operands are rounded into bf16 scratch
// first (one elementwise kernel each); outputs and gradients stay fp32, so accumulating into
// a parameter gradient (beta = 1) keeps fp32 sums across calls. The softmax and its backward run in
// fp32 on att / scratch exactly as the fp32 path.
#include <cuda_bf16.h>
#include <math.h>

#include "bf16.cuh"
#include "common.cuh"
#include "fast.cuh"
#include "ops_internal.cuh"

__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n) {
    AF_GRID_STRIDE(size_t, i, n)
        dst[i] = __float2bfloat16_rn(src[i]);
}

// out[n, oc] = bias[oc] (the GEMM adds its product with beta = 1), as linear.cu
__global__ void bias_rows_kernel(float *out, const float *bias, int64_t N, int OC) {
    int64_t total = N * OC;
    AF_GRID_STRIDE(int64_t, i, total)
        out[i] = bias[i % OC];
}

__global__ void to_f32_kernel(float *dst, const __nv_bfloat16 *src, size_t n) {
    AF_GRID_STRIDE(size_t, i, n)
        dst[i] = __bfloat162float(src[i]);
}

// dst[b*(T-1) + j, d] = bf16(src[(b*T + 1 + j)*D + d])
__global__ void gather_tokens_kernel(__nv_bfloat16 *dst, const float *src, int64_t B, int T,
                                     int D) {
    int L = T - 1;
    int64_t total = B * L * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        int64_t r = i / D, b = r / L;
        int j = (int)(r % L), d = (int)(i % D);
        dst[i] = __float2bfloat16_rn(src[(b * T + 1 + j) * D + d]);
    }
}

af_status af_fast_to_f32(af_cuda_context *ctx, float *dst, const bf16 *src, size_t n) {
    if (n == 0) return AF_OK;
    AF_CUDA_CHECK(dst && src, "to_f32: NULL pointer");
    to_f32_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(dst, src, n);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

af_status af_fast_gather_tokens(af_cuda_context *ctx, bf16 *dst, const float *src, int B, int T,
                                int D) {
    AF_CUDA_CHECK(B > 0 && T > 1 && D > 0, "gather_tokens: bad sizes B=%d T=%d D=%d", B, T, D);
    AF_CUDA_CHECK(dst && src, "gather_tokens: NULL pointer");
    gather_tokens_kernel<<<af_grid_1d((int64_t)B * (T - 1) * D, 256), 256, 0, ctx->stream>>>(
        dst, src, B, T, D);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_to_bf16(af_cuda_context *ctx, af_bf16 *dst, const float *src,
                                     size_t n) {
    if (n == 0) return AF_OK;
    AF_CUDA_CHECK(dst && src, "to_bf16: NULL pointer");
    to_bf16_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>((__nv_bfloat16 *)dst,
                                                                          src, n);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// C = alpha op(A) op(B) + beta C, column-major as cuBLAS: A, B bf16, C fp32, fp32 compute.
static af_status gemm(af_cuda_context *ctx, cublasOperation_t ta, cublasOperation_t tb, int m,
                      int n, int k, float alpha, const af_bf16 *A, int lda, const af_bf16 *B,
                      int ldb, float beta, float *C, int ldc) {
    AF_CUBLAS_TRY(cublasGemmEx(ctx->cublas, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B,
                               CUDA_R_16BF, ldb, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT));
    return AF_OK;
}

// The strided-batched form (one head of every image per call, as attention.cu).
static af_status gemm_batched(af_cuda_context *ctx, cublasOperation_t ta, cublasOperation_t tb,
                              int m, int n, int k, float alpha, const af_bf16 *A, int lda,
                              long long sA, const af_bf16 *B, int ldb, long long sB, float beta,
                              float *C, int ldc, long long sC, int count) {
    AF_CUBLAS_TRY(cublasGemmStridedBatchedEx(ctx->cublas, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF,
                                             lda, sA, B, CUDA_R_16BF, ldb, sB, &beta, C,
                                             CUDA_R_32F, ldc, sC, count, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT));
    return AF_OK;
}

// ------------------------------------------------------------------ linear (see linear.cu)
//   out[N,OC]     : gemm(T, N) m=OC n=N  k=IC  A=weight(ld IC) B=inp(ld IC)  C=out(ld OC)
//   dinp[N,IC]    = gemm(N, N) m=IC n=N  k=OC  A=weight(ld IC) B=dout(ld OC) C=dinp(ld IC)
//   dweight[OC,IC]+= gemm(N, T) m=IC n=OC k=N   A=inp(ld IC)    B=dout(ld OC) C=dweight(ld IC)

extern "C" af_status af_cuda_linear_forward_bf16(af_cuda_context *ctx, float *out,
                                                 const float *inp, const af_bf16 *weight_h,
                                                 const float *bias, int N, int IC, int OC,
                                                 af_bf16 *scratch) {
    AF_CUDA_CHECK(N > 0 && IC > 0 && OC > 0, "linear_forward_bf16: bad sizes N=%d IC=%d OC=%d", N,
                  IC, OC);
    AF_CUDA_CHECK(out && inp && weight_h && scratch, "linear_forward_bf16: NULL pointer");
    if (bias != nullptr) {
        bias_rows_kernel<<<af_grid_1d((int64_t)N * OC, 256), 256, 0, ctx->stream>>>(out, bias, N,
                                                                                    OC);
        AF_CUDA_LAUNCHED();
    }
    AF_TRY(af_cuda_to_bf16(ctx, scratch, inp, (size_t)N * IC));
    return gemm(ctx, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, 1.0f, weight_h, IC, scratch, IC,
                bias != nullptr ? 1.0f : 0.0f, out, OC);
}

extern "C" af_status af_cuda_linear_backward_bf16(af_cuda_context *ctx, float *dinp,
                                                  float *dweight, float *dbias, const float *dout,
                                                  const float *inp, const af_bf16 *weight_h,
                                                  int N, int IC, int OC, af_bf16 *scratch_a,
                                                  af_bf16 *scratch_b) {
    AF_CUDA_CHECK(N > 0 && IC > 0 && OC > 0, "linear_backward_bf16: bad sizes N=%d IC=%d OC=%d", N,
                  IC, OC);
    AF_CUDA_CHECK(dout != nullptr, "linear_backward_bf16: NULL dout");
    if (dinp != nullptr || dweight != nullptr) {
        AF_CUDA_CHECK(scratch_b != nullptr, "linear_backward_bf16: NULL scratch");
        AF_TRY(af_cuda_to_bf16(ctx, scratch_b, dout, (size_t)N * OC));
    }
    if (dinp != nullptr) {
        AF_CUDA_CHECK(weight_h != nullptr, "linear_backward_bf16: dinp needs weight");
        AF_TRY(gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, 1.0f, weight_h, IC, scratch_b, OC,
                    0.0f, dinp, IC));
    }
    if (dweight != nullptr) {
        AF_CUDA_CHECK(inp != nullptr && scratch_a != nullptr,
                      "linear_backward_bf16: dweight needs inp and scratch");
        AF_TRY(af_cuda_to_bf16(ctx, scratch_a, inp, (size_t)N * IC));
        AF_TRY(gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, 1.0f, scratch_a, IC, scratch_b, OC,
                    1.0f, dweight, IC));
    }
    if (dbias != nullptr) AF_TRY(af_cuda_colsum_accumulate(ctx, dbias, dout, N, OC));
    return AF_OK;
}

// ------------------------------------------------------------------ attention (see attention.cu)
// Row-major per (b, h), hd = D/H, Q,K,V rows at stride 3D in qkv, dO and out at stride D:
//   S = scale Q K^T   : gemm(T,N) m=T  n=T k=hd  A=K  B=Q   -> att (fp32), softmax in place
//   O = P V           : gemm(N,N) m=hd n=T k=T   A=V  B=P   -> out
//   dP = dO V^T       : gemm(T,N) m=T  n=T k=hd  A=V  B=dO  -> scratch (fp32)
//   dV = P^T dO       : gemm(N,T) m=hd n=T k=T   A=dO B=P
//   dS = P (dP - rowsum(dP P))   (fp32, in place on scratch), then rounded to bf16
//   dQ = scale dS K   : gemm(N,N) m=hd n=T k=T   A=K  B=dS
//   dK = scale dS^T Q : gemm(N,T) m=hd n=T k=T   A=Q  B=dS
// dQ, dK, dV are written (beta 0): each element of dqkv has exactly one writer.

static af_status check_attention(const char *what, int B, int T, int D, int H) {
    AF_CUDA_CHECK(B > 0 && T > 0 && D > 0 && H > 0, "%s: bad sizes B=%d T=%d D=%d H=%d", what, B,
                  T, D, H);
    AF_CUDA_CHECK(D % H == 0, "%s: D=%d is not divisible by H=%d", what, D, H);
    return AF_OK;
}

extern "C" af_status af_cuda_attention_forward_bf16(af_cuda_context *ctx, float *out, float *att,
                                                    const float *qkv, int B, int T, int D, int H,
                                                    af_bf16 *scratch_a, af_bf16 *scratch_b) {
    AF_TRY(check_attention("attention_forward_bf16", B, T, D, H));
    AF_CUDA_CHECK(out && att && qkv && scratch_a && scratch_b,
                  "attention_forward_bf16: NULL pointer");
    const int hd = D / H;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long s_qkv = (long long)T * 3 * D, s_att = (long long)H * T * T,
                    s_out = (long long)T * D;
    af_bf16 *qkv_h = scratch_a, *p_h = scratch_b;
    AF_TRY(af_cuda_to_bf16(ctx, qkv_h, qkv, (size_t)B * T * 3 * D));
    for (int h = 0; h < H; h++) {
        const af_bf16 *q = qkv_h + h * hd, *k = qkv_h + D + h * hd;
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, scale, k, 3 * D, s_qkv, q,
                            3 * D, s_qkv, 0.0f, att + (size_t)h * T * T, T, s_att, B));
    }
    AF_TRY(af_softmax_rows(ctx, att, att, (int64_t)B * H * T, T, 1.0f));
    AF_TRY(af_cuda_to_bf16(ctx, p_h, att, (size_t)B * H * T * T));
    for (int h = 0; h < H; h++) {
        const af_bf16 *v = qkv_h + 2 * D + h * hd;
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, 1.0f, v, 3 * D, s_qkv,
                            p_h + (size_t)h * T * T, T, s_att, 0.0f, out + h * hd, D, s_out, B));
    }
    return AF_OK;
}

extern "C" af_status af_cuda_attention_backward_bf16(af_cuda_context *ctx, float *dqkv,
                                                     float *scratch, const float *dout,
                                                     const float *qkv, const float *att, int B,
                                                     int T, int D, int H, af_bf16 *scratch_a,
                                                     af_bf16 *scratch_b, af_bf16 *scratch_c) {
    AF_TRY(check_attention("attention_backward_bf16", B, T, D, H));
    if (dqkv == nullptr) return AF_OK;
    AF_CUDA_CHECK(scratch && dout && qkv && att && scratch_a && scratch_b && scratch_c,
                  "attention_backward_bf16: NULL pointer");
    const int hd = D / H;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long s_qkv = (long long)T * 3 * D, s_att = (long long)H * T * T,
                    s_out = (long long)T * D;
    af_bf16 *qkv_h = scratch_a, *p_h = scratch_b, *g_h = scratch_c;
    AF_TRY(af_cuda_to_bf16(ctx, qkv_h, qkv, (size_t)B * T * 3 * D));
    AF_TRY(af_cuda_to_bf16(ctx, g_h, dout, (size_t)B * T * D));
    AF_TRY(af_cuda_to_bf16(ctx, p_h, att, (size_t)B * H * T * T));
    for (int h = 0; h < H; h++) {
        const af_bf16 *v = qkv_h + 2 * D + h * hd, *g = g_h + h * hd,
                      *p = p_h + (size_t)h * T * T;
        float *dp = scratch + (size_t)h * T * T, *dv = dqkv + 2 * D + h * hd;
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, 1.0f, v, 3 * D, s_qkv, g, D,
                            s_out, 0.0f, dp, T, s_att, B));
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, 1.0f, g, D, s_out, p, T,
                            s_att, 0.0f, dv, 3 * D, s_qkv, B));
    }
    AF_TRY(af_softmax_rows_backward(ctx, scratch, scratch, att, (int64_t)B * H * T, T));
    AF_TRY(af_cuda_to_bf16(ctx, p_h, scratch, (size_t)B * H * T * T));  // dS replaces P
    for (int h = 0; h < H; h++) {
        const af_bf16 *q = qkv_h + h * hd, *k = qkv_h + D + h * hd, *ds = p_h + (size_t)h * T * T;
        float *dq = dqkv + h * hd, *dk = dqkv + D + h * hd;
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, scale, k, 3 * D, s_qkv, ds, T,
                            s_att, 0.0f, dq, 3 * D, s_qkv, B));
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, scale, q, 3 * D, s_qkv, ds, T,
                            s_att, 0.0f, dk, 3 * D, s_qkv, B));
    }
    return AF_OK;
}
