/* The C-callable surface of the CUDA backend (the .cu files under cuda/). Only declared when
 * the build has CUDA; callers go through py_cuda.c, which raises a clear error without it.
 *
 * The op functions mirror csrc/ops/ops.h (same names with an af_cuda_ prefix, same argument
 * order and dimension letters, same semantics, the gradient convention included: a backward
 * WRITES (=) its activation-input gradients and ACCUMULATES (+=) into parameter gradients,
 * af_cuda_residual_backward accumulates into both inputs, a NULL gradient is skipped).
 * Differences: every pointer is a DEVICE pointer, work is queued on the context's stream and
 * returns before it finishes (af_cuda_synchronize waits), and the functions return an
 * af_status (AF_EINVAL on bad sizes, AF_ECUDA on a CUDA/cuBLAS failure) instead of trusting
 * the caller. These ops are fp32; the bf16 twins of linear and attention used by the
 * trainer's bf16 fast path are declared in cuda/bf16.cuh.
 */
#ifndef AFIRE_CUDA_API_H
#define AFIRE_CUDA_API_H
#include <stddef.h>
#include <stdint.h>

#include "afire.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of visible CUDA devices (0 when the driver or a GPU is missing: not an error). */
af_status af_cuda_device_count(int *count);
/* Versions of the linked libraries (cudart runtime, cuBLAS(Lt), cuDNN, NCCL). */
af_status af_cuda_versions(int *cudart, size_t *cublaslt, size_t *cudnn, int *nccl);
/* Free and total bytes of device memory (cudaMemGetInfo on `device`). */
af_status af_cuda_mem_info(int device, size_t *free_bytes, size_t *total_bytes);
/* What the fast bf16 path (cuda/fast.cuh, AFIRE_CUDA_FAST=1) decided in this process so far:
 * its cuBLASLt plans and epilogues, cuDNN's fused SDPA or our attention kernel, and why. */
void af_cuda_fast_status(char *buf, size_t n);
/* Fills host `out[n]` with af_rand_uniform(seed, stream, offset + i), drawn on the GPU:
 * the CPU/GPU twin check of the counter-based generator. */
af_status af_cuda_rand_uniform(float *out, int64_t n, uint64_t seed, uint64_t stream,
                               uint64_t offset);

/* ---- context: one device, one stream, one cuBLAS handle ---------------------------- */
typedef struct af_cuda_context af_cuda_context;
/* allow_tf32 = 0 gives exact fp32 GEMMs (used by the CPU-twin checks). */
af_status af_cuda_context_create(af_cuda_context **out, int device, int allow_tf32);
void af_cuda_context_destroy(af_cuda_context *ctx);
af_status af_cuda_context_set_tf32(af_cuda_context *ctx, int allow_tf32);
af_status af_cuda_synchronize(af_cuda_context *ctx);

/* ---- device memory helpers (for the host-level test entry points and benchmarks) ---- */
af_status af_cuda_malloc(af_cuda_context *ctx, float **out, size_t count);
void af_cuda_free(float *p);
af_status af_cuda_upload(af_cuda_context *ctx, float *dst, const float *host, size_t count);
af_status af_cuda_download(af_cuda_context *ctx, float *host, const float *src, size_t count);
af_status af_cuda_zero(af_cuda_context *ctx, float *dst, size_t count);
/* dst[i] = af_rand_uniform(seed, 0, i) * 2 - 1: benchmark inputs without a host copy. */
af_status af_cuda_fill_uniform(af_cuda_context *ctx, float *dst, size_t count, uint64_t seed);

/* Runs fn(ctx, dev, user) on device copies of nargs host buffers, then copies back:
 * role AF_CUDA_IN (uploaded), AF_CUDA_OUT (zero-filled on the device, downloaded),
 * AF_CUDA_INOUT (uploaded and downloaded) or AF_CUDA_SCRATCH (zero-filled on the device only;
 * host unused). bytes == 0, or host == NULL for the other roles, passes NULL. Device memory is
 * freed on every path. At most AF_CUDA_MAX_ARGS buffers. The host-level test entry points
 * (csrc/python/py_op.c) run every GPU op through it. */
enum { AF_CUDA_IN = 0, AF_CUDA_OUT = 1, AF_CUDA_INOUT = 2, AF_CUDA_SCRATCH = 3 };
#define AF_CUDA_MAX_ARGS 12
typedef struct {
    void *host;
    size_t bytes;
    int role;
} af_cuda_buf;
typedef af_status (*af_cuda_fn)(af_cuda_context *ctx, void *const *dev, const void *user);
af_status af_cuda_run_host(af_cuda_context *ctx, int nargs, const af_cuda_buf *bufs,
                           af_cuda_fn fn, const void *user);

/* Mean GPU milliseconds per call of fn(ctx, dev, user) over `iters` calls after `warmup`
 * calls, timed with CUDA events on the context's stream (dev: device buffers). */
af_status af_cuda_time(af_cuda_context *ctx, af_cuda_fn fn, void *const *dev,
                       const void *user, int warmup, int iters, float *ms);

/* ---- ops (cuda/ops/), device pointers --------------------------------------------- */
/* out[N,OC] = inp[N,IC] @ weight[OC,IC]^T + bias[OC] (bias may be NULL). */
af_status af_cuda_linear_forward(af_cuda_context *ctx, float *out, const float *inp,
                                 const float *weight, const float *bias, int N, int IC, int OC);
af_status af_cuda_linear_backward(af_cuda_context *ctx, float *dinp, float *dweight,
                                  float *dbias, const float *dout, const float *inp,
                                  const float *weight, int N, int IC, int OC);

af_status af_cuda_layernorm_forward(af_cuda_context *ctx, float *out, float *mean, float *rstd,
                                    const float *inp, const float *weight, const float *bias,
                                    int N, int IC, float eps);
af_status af_cuda_layernorm_backward(af_cuda_context *ctx, float *dinp, float *dweight,
                                     float *dbias, const float *dout, const float *inp,
                                     const float *weight, const float *mean, const float *rstd,
                                     int N, int IC);

af_status af_cuda_gelu_forward(af_cuda_context *ctx, float *out, const float *inp, size_t n);
af_status af_cuda_gelu_backward(af_cuda_context *ctx, float *dinp, const float *dout,
                                const float *inp, size_t n);

af_status af_cuda_softmax_forward(af_cuda_context *ctx, float *out, const float *inp, int N,
                                  int IC);
af_status af_cuda_softmax_backward(af_cuda_context *ctx, float *dinp, const float *dout,
                                   const float *out, int N, int IC);

/* qkv[B,T,3D] -> out[B,T,D], att[B,H,T,T] (softmax probabilities). The backward needs
 * scratch[B*H*T*T] (overwritten). */
af_status af_cuda_attention_forward(af_cuda_context *ctx, float *out, float *att,
                                    const float *qkv, int B, int T, int D, int H);
af_status af_cuda_attention_backward(af_cuda_context *ctx, float *dqkv, float *scratch,
                                     const float *dout, const float *qkv, const float *att,
                                     int B, int T, int D, int H);

af_status af_cuda_residual_forward(af_cuda_context *ctx, float *out, const float *a,
                                   const float *b, size_t n);
af_status af_cuda_residual_backward(af_cuda_context *ctx, float *da, float *db,
                                    const float *dout, size_t n);

/* order: AF_PATCH_PQC (0) or AF_PATCH_CPQ (1), as csrc/ops/ops.h. */
af_status af_cuda_patchify_forward(af_cuda_context *ctx, float *patches, const float *img,
                                   int B, int C, int S, int P, int order);
af_status af_cuda_patchify_backward(af_cuda_context *ctx, float *dimg, const float *dpatches,
                                    int B, int C, int S, int P, int order);
af_status af_cuda_unpatchify(af_cuda_context *ctx, float *img, const float *patches, int B,
                             int C, int S, int P, int order);

af_status af_cuda_l2norm_forward(af_cuda_context *ctx, float *out, float *norm,
                                 const float *inp, int N, int IC, float eps);
af_status af_cuda_l2norm_backward(af_cuda_context *ctx, float *dinp, const float *dout,
                                  const float *inp, const float *norm, int N, int IC, float eps);

/* The backward needs scratch[OC*IC] (overwritten) for the gradient w.r.t. w_eff. */
af_status af_cuda_wn_linear_forward(af_cuda_context *ctx, float *out, float *w_eff,
                                    float *vnorm, const float *inp, const float *v, int N,
                                    int IC, int OC);
af_status af_cuda_wn_linear_backward(af_cuda_context *ctx, float *dinp, float *dv,
                                     float *scratch, const float *dout, const float *inp,
                                     const float *w_eff, const float *vnorm, int N, int IC,
                                     int OC);

af_status af_cuda_adamw_update(af_cuda_context *ctx, float *params, const float *grads,
                               float *m, float *v, size_t n, float lr, float beta1,
                               float beta2, float eps, float weight_decay, int t);

#ifdef __cplusplus
}
#endif
#endif
