// The fast bf16 path of the CUDA backend (C++ only, not part of the C API).
//
// Switched on per model by AFIRE_CUDA_FAST=1 when the trainer is created with precision
// "bf16" (params.cu, af_cuda_model_set_bf16); off by default until a GPU run has checked it
// (docs/PERFORMANCE.md). The bf16 reference path of bf16.cuh stays as it was.
//
// What it changes, relative to the bf16 reference path:
//   - activations between kernels are bf16 ([B*T, W] row-major, as the fp32 ones); the
//     residual stream, LayerNorm statistics, softmax statistics, the head's L2 norm and
//     weight-normalised last layer, the objective, every parameter gradient, the master
//     weights and the optimiser stay fp32;
//   - GEMMs go through cuBLASLt (gemm_lt.cu) with the bias folded into the epilogue and the
//     bias gradient taken from the weight-gradient GEMM (BGRADB), plans cached per shape;
//     cuBLASLt's GELU epilogues are NOT used: they compute the tanh approximation, and the
//     model's GELU is the exact erf form (timm, MAE, the CPU reference);
//   - attention is cuDNN's fused SDPA (sdpa.cu) forward and backward when a plan builds for
//     the shape, else our kernel, which recomputes the probabilities of one layer in the
//     backward; either way only the softmax statistics [B,H,T] are kept, no T x T matrix;
//   - the residual add is fused into the following LayerNorm (one kernel writes the fp32
//     stream and the bf16 normalised rows); the LayerNorm backward is one kernel (dx,
//     dgamma, dbeta), which also adds the skip path's gradient;
//   - the GELU output is not kept: the backward recomputes it from the bf16 pre-activation;
//   - the teacher and the inference calls run in one layer's worth of buffers; the saved
//     activations and backward scratch are allocated by the first training call.
// Reductions are in a fixed order (no atomics in a sum), so reruns are bit-identical.
#pragma once
#include <cuda_bf16.h>

#include "bf16.cuh"
#include "common.cuh"

typedef __nv_bfloat16 bf16;

// ------------------------------------------------------------------ context (context.cu)

// cuBLASLt handle, its workspace and aux scratch (bias gradients, column-sum and LayerNorm
// partials), the cuDNN handle. Idempotent; every fast-path op calls it, the model once at
// creation so that a step allocates nothing.
af_status af_cuda_fast_init(af_cuda_context *ctx);
void af_cuda_fast_release(af_cuda_context *ctx);
// Floats of ctx->fast_aux (16 MiB).
#define AF_FAST_AUX_FLOATS ((size_t)4 << 20)
// cuBLASLt workspace (32 MiB, NVIDIA's advice for Hopper).
#define AF_LT_WORKSPACE_BYTES ((size_t)32 << 20)
struct af_lt_cache;
struct af_sdpa_cache;
size_t af_lt_cache_bytes(void);
void af_lt_cache_free(af_lt_cache *c);
void af_sdpa_cache_free(af_sdpa_cache *c);

// ------------------------------------------------------------------ GEMMs (gemm_lt.cu)

// out[N,OC] = inp[N,IC] @ w[OC,IC]^T (+ bias[OC]): out bf16 with a bf16 bias (the weight
// shadows of params.cu), or fp32 (out_f32) with an fp32 bias; bias may be NULL.
af_status af_lt_linear_forward(af_cuda_context *ctx, void *out, int out_f32, const bf16 *inp,
                               const bf16 *w, const void *bias, int N, int IC, int OC);
// dinp[N,IC] = dout @ w, WRITTEN (bf16, or fp32 with dinp_f32); dweight[OC,IC] += dout^T @ inp
// and dbias[OC] += colsum(dout), fp32. A NULL gradient is skipped.
af_status af_lt_linear_backward(af_cuda_context *ctx, void *dinp, int dinp_f32, float *dweight,
                                float *dbias, const bf16 *dout, const bf16 *inp, const bf16 *w,
                                int N, int IC, int OC);
// What the GEMM plans of this process use (counts), one line.
void af_lt_status(char *buf, size_t n);

// ------------------------------------------------------------------ row ops (cuda/ops)

// layernorm.cu. res[N,W] = a + b (b bf16; b NULL: res is not written and a itself is
// normalised); out = (res - mean) * rstd * w + bias as bf16, or fp32 with out_f32.
af_status af_fast_residual_layernorm(af_cuda_context *ctx, float *res, void *out, int out_f32,
                                     float *mean, float *rstd, const float *a, const bf16 *b,
                                     const float *w, const float *bias, int N, int W,
                                     float eps);
// One kernel: dx = LayerNorm backward of dout (bf16, or fp32 with dout_f32) at inp; dres = dx
// (accumulate = 0) or dres += dx (the skip path's gradient already there); dres_h = bf16(dres)
// when not NULL; dweight += sum_r dout * xhat, dbias += sum_r dout (fp32, fixed order: per-block
// partials summed in block order by the last block).
af_status af_fast_layernorm_backward(af_cuda_context *ctx, float *dres, bf16 *dres_h,
                                     int accumulate, float *dweight, float *dbias,
                                     const void *dout, int dout_f32, const float *inp,
                                     const float *w, const float *mean, const float *rstd,
                                     int N, int W);
// gelu.cu: exact erf GELU on bf16, math in fp32. dinp may equal dout.
af_status af_fast_gelu_forward(af_cuda_context *ctx, bf16 *out, const bf16 *inp, size_t n);
af_status af_fast_gelu_backward(af_cuda_context *ctx, bf16 *dinp, const bf16 *dout,
                                const bf16 *inp, size_t n);
// reduce.cu: out[c] (+)= sum_r x[r,c] for bf16 x[N,C] (fp32 sums, rows in chunks, chunks in
// order: deterministic).
af_status af_fast_colsum_bf16(af_cuda_context *ctx, float *out, int accumulate, const bf16 *x,
                              int N, int C);
// bf16.cu
af_status af_fast_to_f32(af_cuda_context *ctx, float *dst, const bf16 *src, size_t n);
// dst[b*(T-1) + j, :] = bf16(src[b*T + 1 + j, :]): the patch tokens of every image.
af_status af_fast_gather_tokens(af_cuda_context *ctx, bf16 *dst, const float *src, int B, int T,
                                int D);

// ------------------------------------------------------------------ attention (sdpa.cu)

enum { AF_SDPA_AUTO = 0, AF_SDPA_CUDNN = 1, AF_SDPA_OURS = 2 };

// Our kernel's scratch for one layer: s, dp fp32 and p bf16, n = B*H*T*T values each; grown
// (cudaMalloc) the first time a larger layer falls back to it.
struct af_sdpa_scratch {
    float *s, *dp;
    bf16 *p;
    size_t n;
};
void af_sdpa_scratch_free(af_sdpa_scratch *ws);

// Non-causal multi-head attention on qkv[B,T,3D] (q | k | v, heads contiguous), hd = D/H:
// out[B,T,D] = softmax(scale Q K^T) V, lse[B,H,T] = log sum_j exp(scale q.k_j) (natural log,
// the statistics cuDNN calls Stats). backend AF_SDPA_AUTO: cuDNN when its plan builds for the
// shape (cached, per direction), else ours; AF_SDPA_CUDNN: cuDNN or AF_ENOTSUP with the reason;
// AF_SDPA_OURS: ours. ws: our kernel's scratch (may be NULL with AF_SDPA_CUDNN).
af_status af_sdpa_forward(af_cuda_context *ctx, int backend, af_sdpa_scratch *ws, bf16 *out,
                          float *lse, const bf16 *qkv, int B, int T, int D, int H);
// dqkv[B,T,3D] (written) from dout[B,T,D] and the forward's qkv, out, lse.
af_status af_sdpa_backward(af_cuda_context *ctx, int backend, af_sdpa_scratch *ws, bf16 *dqkv,
                           const bf16 *dout, const bf16 *qkv, const bf16 *out,
                           const float *lse, int B, int T, int D, int H);
// What the attention dispatch decided so far in this process, one line per direction.
void af_sdpa_status(char *buf, size_t n);

// ------------------------------------------------------------------ the model's buffers

// Saved activations of NL blocks: layer l at offset l * (layer size), or everything in layer 0
// when nothing is kept for a backward (the teacher, inference).
struct af_fast_blocks {
    bf16 *ln1, *qkv, *atty, *ln2, *fch;               // [NL, cap*T, W | 3W | W | W | RW]
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd; // [NL, cap*T]
    float *lse;                                       // [NL, cap, NH, T]
    float *res2, *res3;                               // [NL, cap*T, W] the fp32 stream
    size_t sW, sRW, sN, sH;                           // layer strides: cap*T*W, cap*T*R*W,
                                                      // cap*T, cap*NH*T (0 for one layer)
};

struct af_fast_block_view {
    bf16 *ln1, *qkv, *atty, *ln2, *fch;
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd, *lse, *res2, *res3;
};

static inline af_fast_block_view af_fast_block_at(const af_fast_blocks *a, int l) {
    size_t L_ = (size_t)l;
    af_fast_block_view v = {a->ln1 + L_ * a->sW,      a->qkv + L_ * 3 * a->sW,
                            a->atty + L_ * a->sW,     a->ln2 + L_ * a->sW,
                            a->fch + L_ * a->sRW,     a->ln1_mean + L_ * a->sN,
                            a->ln1_rstd + L_ * a->sN, a->ln2_mean + L_ * a->sN,
                            a->ln2_rstd + L_ * a->sN, a->lse + L_ * a->sH,
                            a->res2 + L_ * a->sW,     a->res3 + L_ * a->sW};
    return v;
}

// Dimension letters as afire.h; Wm = max(D, Dd), NHm = max(H, Hd), N = cap*T, NL = cap*L.
struct af_cuda_fast {
    int train;  // student forwards keep their activations (set around the trainer's step)
    int sdpa;   // AF_SDPA_* from AFIRE_CUDA_SDPA (auto | cudnn | ours)
    int cap;    // images the buffers hold (0: not reserved)
    void *mem, *train_mem;
    // ---- reserved with the model (inference and the teacher need these)
    af_fast_blocks slot;     // one layer of the widest stack
    bf16 *branch, *gelu;     // [N, Wm] a branch output before its residual add, [N, R*Wm]
    float *patches32;        // [NL, Q] fp32 patchify, then
    bf16 *patches;           // [NL, Q] the patch GEMM operand (kept for the student's dW)
    float *enc_x0;           // [N, D] block input (kept for the student's first LN backward)
    float *enc_out[2], *enc_mean[2], *enc_rstd[2];  // per branch: [N, D] tokens, [N] x2
    bf16 *dec_tokens;        // [N, D]  the decoder's input tokens (embed GEMM operand)
    float *dec_x0;           // [N, Dd]
    bf16 *dec_lnf;           // [N, Dd] final norm
    float *dec_mean, *dec_rstd;          // [N]
    float *dec_pred_full, *dec_pred;     // [N, Q], [NL, Q]
    bf16 *head_x, *head_h1, *head_h2, *head_g;  // [NL, D], [NL, Hh] x3
    float *head_z[2], *head_znorm[2], *head_zn_t[2], *head_w_eff[2], *head_vnorm[2],
        *head_logits_t[2], *head_logits[2];  // per branch, as af_head_acts
    float *head_fa, *head_fb, *head_dz_t;    // fp32 head scratch (m->scratch.dh_a, dh_b, dz_t)
    // ---- training: allocated by the first af_cuda_model_set_training(ctx, m, 1)
    af_fast_blocks enc, dec;             // saved, NL = depth and depth_d
    float *dres;                         // [N, Wm] the fp32 gradient of the stream
    bf16 *dres_h, *dln, *datty, *dqkv, *dfch;  // [N, Wm] x3, [N, 3Wm], [N, R*Wm]
    float *dfull;                        // [N, Q]
    bf16 *dfull_h;                       // [N, Q]
    bf16 *head_dz, *head_da, *head_db;   // [NL, Bn], [NL, Hh] x2
    af_sdpa_scratch sdpa_ws;             // our attention's scratch (only if it is used)
};
