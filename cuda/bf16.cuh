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

#ifdef __cplusplus
}
#endif
#endif
