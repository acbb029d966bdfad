/* CPU layer kernels: each forward next to its backward, llm.c style, fp32.
 *
 * Dimension letters as csrc/core/afire.h (here D and H are the width and heads of whichever
 * attention is called, N the rows of a flattened [N, IC] matrix).
 *
 * Conventions:
 *   - all tensors are C-contiguous float32; weights use PyTorch's layout (out x in);
 *   - argument order: outputs, saved activations, inputs, weights, sizes;
 *   - gradients (llm.c's convention): a backward WRITES (=) the gradient of its activation
 *     inputs (dinp, dqkv, dimg) and ACCUMULATES (+=) into parameter gradients (dweight,
 *     dbias, dv), which sum over calls until zeroed. Where two paths meet on one activation
 *     (the residual stream, the encoder tokens fed to the head and the decoder) the caller
 *     adds the second path explicitly; af_residual_backward, the add of a residual, is the one
 *     op whose input gradients accumulate. A NULL gradient means "not needed" (skipped);
 *   - these functions never fail: sizes are validated by the caller (binding or model).
 */
#ifndef AFIRE_OPS_H
#define AFIRE_OPS_H

#include <stddef.h>
#include <stdint.h>

/* GEMM for the whole C core (gemm.c), in BLAS names: row-major
 * C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C, trans flags 0/1. Split over OpenMP threads
 * along the longer side of C: afire's packed AVX-512 kernel where it applies (op(A) = A, alpha
 * 1, beta 0 or 1; op(B) packed once for all threads), else one single-threaded OpenBLAS call
 * per thread: all parallelism is OpenMP, so call this rather than scipy_cblas_sgemm for any
 * large product (afire's OpenBLAS copy is pinned to one thread). Deterministic whatever the
 * thread count: the K reduction is never split. */
void af_sgemm(int transA, int transB, int M, int N, int K, float alpha, const float *A,
              int lda, const float *B, int ldb, float beta, float *C, int ldc);

/* 1 when af_sgemm and the row-tile kernels run products whose B is reused on afire's own
 * AVX-512 kernel with B packed once (gemm_packed.c), 0 when OpenBLAS runs them all (no
 * AVX-512, or AFIRE_SGEMM=openblas in the environment at the first GEMM). */
int af_packed_gemm_available(void);

/* The bf16 GEMM (gemm_bf16.c): af_sgemm's arguments with A and B rounded to bfloat16
 * (nearest even) and the products summed in fp32. ws: af_gemm_bf16_workspace(M, N, K, t)
 * bytes for up to t threads (fewer threads run when it holds fewer). Threads own 32-row blocks
 * of C (none inside a parallel region): deterministic whatever the thread count. Backends:
 * AMX tiles when the CPU has amx_bf16 and Linux grants the tile state, else portable loops
 * with the same input rounding (a different, fixed, summation order). */
enum { AF_BF16_PORTABLE = 0, AF_BF16_AMX = 2 };
int af_bf16_backend(void);
size_t af_gemm_bf16_workspace(int M, int N, int K, int threads);
void af_gemm_bf16(int transA, int transB, int M, int N, int K, float alpha, const float *A,
                  int lda, const float *B, int ldb, float beta, float *C, int ldc, void *ws,
                  size_t ws_bytes);

/* linear: out[N,OC] = inp[N,IC] @ weight[OC,IC]^T + bias[OC] (bias may be NULL). */
void af_linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                    int N, int IC, int OC);
/* dinp[N,IC] = dout @ weight; dweight[OC,IC] += dout^T @ inp; dbias[OC] += colsum(dout). */
void af_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, int N, int IC, int OC);

/* Parameter gradients of n independent linear layers (dweight += dout^T @ inp, dbias +=
 * colsum(dout); either may be NULL): with at least as many layers as threads, one layer per
 * thread, so no operand is packed by two threads; otherwise af_linear_backward each. Either
 * way the sums are af_linear_backward's: the result does not depend on the thread count. */
typedef struct {
    float *dweight, *dbias;
    const float *dout, *inp;
    int N, IC, OC;
} af_linear_grad;
void af_linear_backward_params(const af_linear_grad *g, int n);

/* The same with the GEMMs in bf16 (af_gemm_bf16; biases and sums fp32). ws holds
 * af_gemm_bf16_workspace bytes for each GEMM: forward (N, OC, IC), input gradient
 * (N, IC, OC), weight gradient (OC, IC, N). */
void af_linear_forward_bf16(float *out, const float *inp, const float *weight, const float *bias,
                            int N, int IC, int OC, void *ws, size_t ws_bytes);
void af_linear_backward_bf16(float *dinp, float *dweight, float *dbias, const float *dout,
                             const float *inp, const float *weight, int N, int IC, int OC,
                             void *ws, size_t ws_bytes);

/* LayerNorm over the IC features of each row: saves mean[N], rstd[N] for the backward. */
void af_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int IC, float eps);
void af_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const float *mean,
                        const float *rstd, int N, int IC);

/* GELU with the exact erf form: 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x) (not the tanh
 * approximation). Phi comes from a vectorisable erfc fit (gelu.c): relative error below
 * 3e-6 wherever |gelu| > 1e-3, absolute error below 1e-6 everywhere. */
void af_gelu_forward(float *out, const float *inp, size_t n);
void af_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n);

/* Row softmax of inp[N,IC]. The backward needs the forward output. */
void af_softmax_forward(float *out, const float *inp, int N, int IC);
void af_softmax_backward(float *dinp, const float *dout, const float *out, int N, int IC);

/* Multi-head non-causal self-attention on fused qkv[B,T,3D] (q | k | v, heads contiguous
 * inside each, as timm). out[B,T,D]; att[B,H,T,T] saves the softmax probabilities.
 * Scores are scaled by 1/sqrt(hd). The backward needs scratch of B*H*T*T floats. */
void af_attention_forward(float *out, float *att, const float *qkv, int B, int T, int D, int H);
void af_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *att, int B, int T, int D, int H);

/* The same attention without the T x T probabilities (the CPU model's): the forward saves
 * stats[B,H,T,2] = (row max, 1 / row sum) of each softmax row (stats may be NULL: inference),
 * the backward recomputes the probabilities from them, bit for bit the forward's. Both need
 * scratch of af_attention_fused_scratch_floats(B, T, H, threads) floats (any H' <= H and
 * B' <= B fit too); the forward uses at most scratch_floats / (64 T) threads, the backward
 * needs scratch_floats >= 2 T^2. Results do not depend on the thread count. */
size_t af_attention_fused_scratch_floats(int B, int T, int H, int threads);
/* Enough for the forward alone (with `threads` threads). */
size_t af_attention_fused_forward_scratch_floats(int T, int threads);
/* bf16_ws (NULL: fp32 GEMMs) makes the GEMMs bf16 (af_gemm_bf16); it needs
 * af_attention_bf16_workspace(T, D, H, threads) bytes for `threads` threads. */
size_t af_attention_bf16_workspace(int T, int D, int H, int threads);
void af_attention_fused_forward(float *out, float *stats, float *scratch, size_t scratch_floats,
                                const float *qkv, int B, int T, int D, int H, void *bf16_ws,
                                size_t bf16_ws_bytes);
void af_attention_fused_backward(float *dqkv, float *scratch, size_t scratch_floats,
                                 const float *dout, const float *qkv, const float *stats, int B,
                                 int T, int D, int H, void *bf16_ws, size_t bf16_ws_bytes);

/* Fused row-tile kernels of the transformer block (fused.c): each runs its steps on tiles of
 * 64-256 rows (set by N alone), one tile per thread at a time, so intermediates stay in
 * cache; the results equal the ops composed (up to the order of a few additions), whatever
 * the thread count.
 *   af_layernorm_linear_forward: y = LN(x) (mean, rstd saved), out = y @ w^T + b
 *   af_linear_residual_layernorm_forward: r = x @ w^T + b + res, y = LN(r)
 *   af_mlp_forward: h = x @ w1^T + b1, g = gelu(h), out = g @ w2^T + b2 + res (res may be NULL)
 *   af_mlp_backward_data: dh = (dout @ w2) * gelu'(h), and g = gelu(h) again (for dw2)
 *   af_linear_layernorm_backward_data: dy = dout @ w, dx = LN backward of dy (+ skip when
 *     not NULL): the input gradients; the parameter gradients stay with af_linear_backward
 *     and af_layernorm_backward (dinp NULL). x [N,IC] is the LayerNorm's input. */
void af_layernorm_linear_forward(float *y, float *mean, float *rstd, float *out, const float *x,
                                 const float *ln_w, const float *ln_b, float eps, const float *w,
                                 const float *b, int N, int IC, int OC);
void af_linear_residual_layernorm_forward(float *r, float *y, float *mean, float *rstd,
                                          const float *x, const float *w, const float *b,
                                          const float *res, const float *ln_w,
                                          const float *ln_b, float eps, int N, int IC, int OC);
void af_mlp_forward(float *h, float *g, float *out, const float *x, const float *w1,
                    const float *b1, const float *w2, const float *b2, const float *res, int N,
                    int IC, int HC);
void af_mlp_backward_data(float *dh, float *g, const float *dout, const float *h,
                          const float *w2, int N, int IC, int HC);
/* g = gelu(h) and dh = dg * gelu'(h) in one pass over n values (dh == dg allowed). */
void af_gelu_recompute_backward(float *g, float *dh, const float *dg, const float *h, size_t n);
void af_linear_layernorm_backward_data(float *dx, float *dy, const float *dout, const float *w,
                                       const float *x, const float *ln_w, const float *mean,
                                       const float *rstd, const float *skip, int N, int IC,
                                       int OC);

/* out[n] = a[n] + b[n]; backward: da += dout, db += dout (accumulated: see the top). */
void af_residual_forward(float *out, const float *a, const float *b, size_t n);
void af_residual_backward(float *da, float *db, const float *dout, size_t n);

/* Patchify images img[B,C,S,S] into patches[B,L,Q], L = (S/P)^2, patches in row-major
 * grid order. order AF_PATCH_PQC: inside a patch (row p, col q, channel c) — MAE's
 * patchify, used for restoration targets; AF_PATCH_CPQ: (c, p, q) — the flattening of a
 * conv weight [D,C,P,P], used by the patch embedding. Identical when C == 1.
 * af_unpatchify is the inverse; af_patchify_backward writes dimg from dpatches (the same
 * permutation as af_unpatchify, patches do not overlap). */
enum { AF_PATCH_PQC = 0, AF_PATCH_CPQ = 1 };
void af_patchify_forward(float *patches, const float *img, int B, int C, int S, int P, int order);
void af_patchify_backward(float *dimg, const float *dpatches, int B, int C, int S, int P, int order);
void af_unpatchify(float *img, const float *patches, int B, int C, int S, int P, int order);

/* Fixed 2-D sin-cos position embedding, MAE's get_2d_sincos_pos_embed: out[(cls?1:0) + G*G, D]
 * for a GxG grid, grid point (row i, column j) at row (cls?1:0) + i*G + j. MAE builds
 * meshgrid(w, h), so the first D/2 channels come from grid[0] = the column index j and the
 * last D/2 from the row index i; each half is [sin(pos*omega), cos(pos*omega)] with
 * omega_k = 1 / 10000^(k / (D/4)), k < D/4. Computed in double, rounded to float once; with
 * cls, row 0 is zero. D must be divisible by 4. */
void af_sincos_2d_embed(float *out, int D, int G, int cls);

/* Row L2-normalise inp[N,IC]: out = inp / max(||inp||, eps) (F.normalize), norm[N] saved. */
void af_l2norm_forward(float *out, float *norm, const float *inp, int N, int IC, float eps);
void af_l2norm_backward(float *dinp, const float *dout, const float *inp, const float *norm,
                     int N, int IC, float eps);

/* Weight-normalised linear without bias, gain fixed at 1 (PyTorch weight_norm, dim=0):
 * w_eff[OC,IC] = v[OC,IC] / ||v_k||; out[N,OC] = inp[N,IC] @ w_eff^T. The forward writes
 * w_eff and vnorm[OC] for the backward. */
void af_wn_linear_forward(float *out, float *w_eff, float *vnorm, const float *inp,
                       const float *v, int N, int IC, int OC);
void af_wn_linear_backward(float *dinp, float *dv, const float *dout, const float *inp,
                        const float *w_eff, const float *vnorm, int N, int IC, int OC);
/* The same with the OC x IC temporary in ws (NULL: allocated, as af_wn_linear_backward). */
void af_wn_linear_backward_ws(float *dinp, float *dv, const float *dout, const float *inp,
                              const float *w_eff, const float *vnorm, int N, int IC, int OC,
                              float *ws);

/* One AdamW step (PyTorch semantics, decoupled weight decay, bias-corrected, t >= 1):
 * p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps). */
void af_adamw_update(float *params, const float *grads, float *m, float *v, size_t n, float lr,
                  float beta1, float beta2, float eps, float weight_decay, int t);

#endif
