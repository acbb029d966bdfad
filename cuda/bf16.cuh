/* The bf16 fast path of the CUDA backend (cuda/ops/bf16.cu): the GEMM-based ops with bf16
 * operands, fp32 accumulation and fp32 results (cuBLAS GemmEx, CUBLAS_COMPUTE_32F, tensor
 * cores). Weights arrive as bf16 shadow copies of the fp32 master weights (params.cu refreshes
 * them from the fp32 parameters); fp32 activations and output gradients are rounded to bf16
 * (round to nearest even) into caller-provided scratch right before each GEMM. Everything
 * that is not a GEMM operand stays fp32: outputs, every gradient (weight gradients accumulate
 * in fp32 with beta = 1), biases, the softmax and its backward.
 *
 * Same contracts, argument order and dimension letters as the fp32 ops of cuda_api.h
 * (backward WRITES dinp / dqkv, ACCUMULATES into dweight / dbias, skips a NULL gradient); extra
 * trailing arguments are the bf16 scratch buffers, sized as stated, which the call
 * overwrites. bf16 values are held as their 16-bit patterns (af_bf16) so this header stays
 * plain C.
 */
#ifndef AFIRE_CUDA_BF16_CUH
#define AFIRE_CUDA_BF16_CUH

#include <stddef.h>
#include <stdint.h>

#include "cuda_api.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t af_bf16; /* the bit pattern of a __nv_bfloat16 */

/* dst[i] = bf16(src[i]), round to nearest even. */
af_status af_cuda_to_bf16(af_cuda_context *ctx, af_bf16 *dst, const float *src, size_t n);

/* out[N,OC] = bf16(inp)[N,IC] @ weight_h[OC,IC]^T + bias[OC] (bias may be NULL).
 * scratch: N*IC values. */
af_status af_cuda_linear_forward_bf16(af_cuda_context *ctx, float *out, const float *inp,
                                      const af_bf16 *weight_h, const float *bias, int N, int IC,
                                      int OC, af_bf16 *scratch);
/* dinp = bf16(dout) @ weight_h; dweight += bf16(dout)^T @ bf16(inp); dbias += colsum(dout)
 * in fp32. scratch_a: N*IC values (inp), scratch_b: N*OC values (dout). */
af_status af_cuda_linear_backward_bf16(af_cuda_context *ctx, float *dinp, float *dweight,
                                       float *dbias, const float *dout, const float *inp,
                                       const af_bf16 *weight_h, int N, int IC, int OC,
                                       af_bf16 *scratch_a, af_bf16 *scratch_b);

/* qkv[B,T,3D] -> out[B,T,D], att[B,H,T,T] (fp32 softmax probabilities): S = QK^T and O = PV
 * with bf16 operands. scratch_a: B*T*3D values (qkv), scratch_b: B*H*T*T values (P). */
af_status af_cuda_attention_forward_bf16(af_cuda_context *ctx, float *out, float *att,
                                         const float *qkv, int B, int T, int D, int H,
                                         af_bf16 *scratch_a, af_bf16 *scratch_b);
/* The backward; `scratch` is the fp32 B*H*T*T buffer of af_cuda_attention_backward.
 * scratch_a: B*T*3D (qkv), scratch_b: B*H*T*T (P, then dS), scratch_c: B*T*D (dout). */
af_status af_cuda_attention_backward_bf16(af_cuda_context *ctx, float *dqkv, float *scratch,
                                          const float *dout, const float *qkv, const float *att,
                                          int B, int T, int D, int H, af_bf16 *scratch_a,
                                          af_bf16 *scratch_b, af_bf16 *scratch_c);

/* ---- test entry points of the fast path's kernels (cuda/ops/fast_checks.cu, fast.cuh):
 * fp32 DEVICE arrays in and out; the kernel's bf16 operands are rounded from them, its bf16
 * outputs widened back. They allocate temporaries per call (tests only). */
/* out = linear through cuBLASLt: bf16 out with a bf16 bias, or fp32 (out_f32); epilogue 0
 * forces our bias kernel instead of the fused epilogue. */
af_status af_cuda_check_linear_forward(af_cuda_context *ctx, float *out, const float *inp,
                                       const float *weight, const float *bias, int N, int IC,
                                       int OC, int out_f32, int epilogue);
/* dinp (bf16, or fp32 with dinp_f32), dweight and dbias ACCUMULATE as the kernel does
 * (bias gradient by the BGRADB epilogue, or our column sum with epilogue 0). */
af_status af_cuda_check_linear_backward(af_cuda_context *ctx, float *dinp, float *dweight,
                                        float *dbias, const float *dout, const float *inp,
                                        const float *weight, int N, int IC, int OC,
                                        int dinp_f32, int epilogue);
/* res = a + bf16(b) (a when b is NULL), out = LayerNorm(res) as bf16 (or fp32), mean, rstd. */
af_status af_cuda_check_residual_layernorm(af_cuda_context *ctx, float *res, float *out,
                                           float *mean, float *rstd, const float *a,
                                           const float *b, const float *weight,
                                           const float *bias, int N, int W, float eps,
                                           int out_f32);
/* dinp = dres + LayerNorm backward of bf16(dout) (fp32 dout with dout_f32; dres may be NULL),
 * dweight, dbias accumulate; dinp_h = the bf16 copy the kernel writes. */
af_status af_cuda_check_layernorm_backward(af_cuda_context *ctx, float *dinp, float *dweight,
                                           float *dbias, float *dinp_h, const float *dout,
                                           const float *inp, const float *weight,
                                           const float *mean, const float *rstd,
                                           const float *dres, int N, int W, int dout_f32);
af_status af_cuda_check_gelu_forward(af_cuda_context *ctx, float *out, const float *inp,
                                     size_t n);
af_status af_cuda_check_gelu_backward(af_cuda_context *ctx, float *dinp, const float *dout,
                                      const float *inp, size_t n);
/* backend 0: cuDNN when a plan builds, else ours; 1: cuDNN only (AF_ENOTSUP with the reason);
 * 2: ours. lse[B,H,T] (natural log of the row sums of exp(scale q.k)). */
af_status af_cuda_check_sdpa_forward(af_cuda_context *ctx, float *out, float *lse,
                                     const float *qkv, int B, int T, int D, int H, int backend);
af_status af_cuda_check_sdpa_backward(af_cuda_context *ctx, float *dqkv, const float *dout,
                                      const float *qkv, const float *out, const float *lse,
                                      int B, int T, int D, int H, int backend);

#ifdef __cplusplus
}
#endif
#endif
