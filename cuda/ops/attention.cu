// Multi-head non-causal self-attention on fused qkv[B,T,3D] (q | k | v, heads contiguous in
// each): the twin of csrc/ops/attention.c. fp32 path: cuBLAS strided-batched GEMMs read the
// heads in place (no permute), one call per head h batched over the B images (the stride
// between images is uniform, the stride between heads of one image is not), and the
// row-softmax kernel. att[B,H,T,T] keeps the probabilities for the backward.
//
// Row-major per (b, h), with Q,K,V,dO rows at stride 3D (D for dO, out), hd = D/H:
//   S = scale Q K^T   : gemm(T,N) m=T  n=T k=hd  A=K  B=Q   -> att
//   O = P V           : gemm(N,N) m=hd n=T k=T   A=V  B=P   -> out
//   dP = dO V^T       : gemm(T,N) m=T  n=T k=hd  A=V  B=dO  -> scratch
//   dV = P^T dO       : gemm(N,T) m=hd n=T k=T   A=dO B=P
//   dS = P (dP - rowsum(dP P))   (softmax backward, in place on scratch)
//   dQ = scale dS K   : gemm(N,N) m=hd n=T k=T   A=K  B=dS
//   dK = scale dS^T Q : gemm(N,T) m=hd n=T k=T   A=Q  B=dS
// dQ, dK, dV are written (beta 0): over the heads h, the three GEMMs cover every element of
// dqkv exactly once.
#include <math.h>

#include "common.cuh"
#include "ops_internal.cuh"

static af_status check_sizes(const char *what, int B, int T, int D, int H) {
    AF_CUDA_CHECK(B > 0 && T > 0 && D > 0 && H > 0, "%s: bad sizes B=%d T=%d D=%d H=%d", what, B, T,
                  D, H);
    AF_CUDA_CHECK(D % H == 0, "%s: D=%d is not divisible by H=%d", what, D, H);
    return AF_OK;
}

extern "C" af_status af_cuda_attention_forward(af_cuda_context *ctx, float *out, float *att,
                                               const float *qkv, int B, int T, int D, int H) {
    AF_TRY(check_sizes("attention_forward", B, T, D, H));
    AF_CUDA_CHECK(out && att && qkv, "attention_forward: NULL pointer");
    const int hd = D / H;
    const float scale = 1.0f / sqrtf((float)hd), one = 1.0f, zero = 0.0f;
    const long long s_qkv = (long long)T * 3 * D, s_att = (long long)H * T * T,
                    s_out = (long long)T * D;
    for (int h = 0; h < H; h++) {
        const float *q = qkv + h * hd, *k = qkv + D + h * hd;
        AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd,
                                                &scale, k, 3 * D, s_qkv, q, 3 * D, s_qkv, &zero,
                                                att + (size_t)h * T * T, T, s_att, B));
    }
    AF_TRY(af_softmax_rows(ctx, att, att, (int64_t)B * H * T, T, 1.0f));
    for (int h = 0; h < H; h++) {
        const float *v = qkv + 2 * D + h * hd;
        AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T,
                                                &one, v, 3 * D, s_qkv, att + (size_t)h * T * T, T,
                                                s_att, &zero, out + h * hd, D, s_out, B));
    }
    return AF_OK;
}

extern "C" af_status af_cuda_attention_backward(af_cuda_context *ctx, float *dqkv,
                                                float *scratch, const float *dout,
                                                const float *qkv, const float *att, int B, int T,
                                                int D, int H) {
    AF_TRY(check_sizes("attention_backward", B, T, D, H));
    if (dqkv == nullptr) return AF_OK;
    AF_CUDA_CHECK(scratch && dout && qkv && att, "attention_backward: NULL pointer");
    const int hd = D / H;
    const float scale = 1.0f / sqrtf((float)hd), one = 1.0f, zero = 0.0f;
    const long long s_qkv = (long long)T * 3 * D, s_att = (long long)H * T * T,
                    s_out = (long long)T * D;
    for (int h = 0; h < H; h++) {
        const float *v = qkv + 2 * D + h * hd, *g = dout + h * hd, *p = att + (size_t)h * T * T;
        float *dp = scratch + (size_t)h * T * T, *dv = dqkv + 2 * D + h * hd;
        AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd,
                                                &one, v, 3 * D, s_qkv, g, D, s_out, &zero, dp, T,
                                                s_att, B));
        AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T,
                                                &one, g, D, s_out, p, T, s_att, &zero, dv, 3 * D,
                                                s_qkv, B));
    }
    AF_TRY(af_softmax_rows_backward(ctx, scratch, scratch, att, (int64_t)B * H * T, T));
    for (int h = 0; h < H; h++) {
        const float *q = qkv + h * hd, *k = qkv + D + h * hd, *ds = scratch + (size_t)h * T * T;
        float *dq = dqkv + h * hd, *dk = dqkv + D + h * hd;
        AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T,
                                                &scale, k, 3 * D, s_qkv, ds, T, s_att, &zero, dq,
                                                3 * D, s_qkv, B));
        AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T,
                                                &scale, q, 3 * D, s_qkv, ds, T, s_att, &zero, dk,
                                                3 * D, s_qkv, B));
    }
    return AF_OK;
}
