/* The three AFiRe networks on one GPU: the device twin of af_model (csrc/core/model.h).
 *
 * Same af_config, same named-parameter tables (params.c) and therefore the same flat layout
 * per network: params/grads/adam m, v and the teacher are DEVICE buffers carved by the same
 * af_*_params structs, so a checkpoint is a plain download of each buffer. Initialisation
 * runs on the host (af_init_params, identical on every backend) and is uploaded once.
 * Activations are carved from one device block sized for `capacity` images, with the same
 * af_*_acts structs as the CPU (device pointers). Work is queued on ctx's stream; nothing
 * here synchronises. Dimension letters as afire.h. Defined in params.cu, vit.cu,
 * head.cu and optim.cu, the twins of params.c, vit.c, head.c and optim.c.
 *
 * This header is plain C (the binding, a .c file, reads the struct).
 */
#ifndef AFIRE_CUDA_MODEL_CUH
#define AFIRE_CUDA_MODEL_CUH

#include <stddef.h>
#include <stdint.h>

#include "bf16.cuh"
#include "cuda_api.h"
#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One trainable tensor for the multi-tensor optimiser kernels (optim.cu). */
typedef struct {
    float *p, *g, *m, *v; /* device ranges of the tensor in params, grads, adam m, v */
    float *t;             /* teacher range (encoder, head), NULL for the decoder       */
    size_t n;
    int decay, last_layer;
} af_cuda_tensor;

typedef struct {
    af_config cfg;
    int L, T, Q;
    size_t numel[AF_NET_COUNT];
    af_param_info *table[AF_NET_COUNT]; /* host */
    int ntable[AF_NET_COUNT];
    float *params[AF_NET_COUNT], *grads[AF_NET_COUNT]; /* device */
    float *adam_m[AF_NET_COUNT], *adam_v[AF_NET_COUNT];
    float *teacher[2];
    af_encoder_params enc[2], enc_grad;
    af_head_params head[2], head_grad;
    af_decoder_params dec, dec_grad;
    /* trainable tensors in table order (encoder, head, decoder): the optimiser's view */
    int ntrain;
    af_cuda_tensor *tensors;   /* device copy [ntrain]                                  */
    double *sumsq;             /* device [ntrain] per-tensor sum of squares (clipping)  */
    float *coef;               /* device [ntrain] clip factors                          */
    /* activations (device), sized for `capacity` images */
    int capacity;
    float *act_mem;
    size_t act_floats;
    af_encoder_acts enc_acts[2];
    af_head_acts head_acts[2];
    af_decoder_acts dec_acts;  /* dec_acts.mask: device uint8 [cap, L] */
    af_scratch scratch;
    float *wn_grad;            /* [L|1, K, Bn] gradient w.r.t. w_eff (wn_linear backward) */
    int enc_B[2], head_B[2], dec_B;
    /* bf16 fast path (af_cuda_model_set_bf16): every GEMM of the networks except the
     * weight-normalised last layer takes bf16 operands. The fp32 buffers above stay the
     * master copy; the shadows are rewritten from them by af_cuda_model_refresh_bf16. */
    int bf16;
    af_bf16 *params_h[AF_NET_COUNT], *teacher_h[2]; /* device bf16 shadows, same layout   */
    af_bf16 *hscratch[3];      /* device GEMM-operand scratch, hscratch_n values each       */
    size_t hscratch_n;
    /* the fast bf16 path (AFIRE_CUDA_FAST=1 at af_cuda_model_set_bf16; cuda/fast.cuh): bf16
     * activations in its own buffers; the af_*_acts above then point only at the fp32
     * outputs others read (tokens, logits, pred). NULL: the reference paths. */
    struct af_cuda_fast *fast;
} af_cuda_model;

/* Create on ctx's device: tables, device buffers, host init + upload, teacher = student. */
af_status af_cuda_model_create(af_cuda_context *ctx, af_cuda_model **out, const af_config *cfg);
void af_cuda_model_free(af_cuda_model *m);
/* Size the activations for up to B images (allocation only here). */
af_status af_cuda_model_reserve(af_cuda_context *ctx, af_cuda_model *m, int B);

/* Twins of af_encoder_forward ... af_decoder_backward (vit.c, head.c): device pointers. */
af_status af_cuda_encoder_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                                  const float *images, int B);
af_status af_cuda_encoder_backward(af_cuda_context *ctx, af_cuda_model *m, const float *dtokens);
af_status af_cuda_head_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                               const float *tokens, int B);
af_status af_cuda_head_backward(af_cuda_context *ctx, af_cuda_model *m, const float *dlogits,
                                float *dtokens);
af_status af_cuda_decoder_forward(af_cuda_context *ctx, af_cuda_model *m, const float *tokens,
                                  const uint8_t *token_mask, int B);
af_status af_cuda_decoder_backward(af_cuda_context *ctx, af_cuda_model *m, const float *dpred,
                                   float *dtokens);
af_status af_cuda_model_zero_grad(af_cuda_context *ctx, af_cuda_model *m);

/* Switch the model to the bf16 fast path (allocates the weight shadows, and the operand
 * scratch when activations are already reserved). Call once, before the first forward. */
af_status af_cuda_model_set_bf16(af_cuda_context *ctx, af_cuda_model *m);
/* bf16 path: shadows <- bf16(student and teacher parameters). Queued; a no-op in fp32.
 * Must run after any change to the fp32 parameters and before the next forward. */
af_status af_cuda_model_refresh_bf16(af_cuda_context *ctx, af_cuda_model *m);
af_status af_cuda_model_sync_teacher(af_cuda_context *ctx, af_cuda_model *m);
/* Fast path: on = 1 makes the student's forwards keep what their backward needs (the first
 * call allocates those buffers, once); on = 0 after the backward, so the inference calls and
 * the teacher touch no training state. A no-op on the other paths. */
af_status af_cuda_model_set_training(af_cuda_context *ctx, af_cuda_model *m, int on);

/* Twin of af_normalize_images: uint8 img[B,S,S] (device) -> out[B,C,S,S] (device). */
af_status af_cuda_normalize_images(af_cuda_context *ctx, float *out, const uint8_t *img, int B,
                                   int C, int S);

/* ---- optim.cu: twins of optim.c over the trainable tensors. `ok` (device int, may be
 * NULL = always) gates every update so a refused step leaves the state bit-exact. ---- */

/* Clip (max_norm > 0: per tensor, or global when `global`; max_norm == 0: no clipping)
 * and write the pre-clip global norm to *norm (device double). Per-tensor norms stay in
 * m->sumsq (squared). */
af_status af_cuda_clip_grad(af_cuda_context *ctx, af_cuda_model *m, float max_norm, int global,
                            double *norm);
af_status af_cuda_adamw_step(af_cuda_context *ctx, af_cuda_model *m, const af_adamw_args *a,
                             const int *ok);
af_status af_cuda_ema_update(af_cuda_context *ctx, af_cuda_model *m, float momentum,
                             const int *ok);

#ifdef __cplusplus
}
#endif
#endif
