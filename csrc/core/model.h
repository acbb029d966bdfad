/* The three AFiRe networks on the CPU: ViT encoder, projection head, restoration decoder
 * (METHOD.md §2), their parameter layouts, forward/backward, AdamW, clipping and EMA (§5).
 *
 * Dimension letters as afire.h.
 *
 * State, llm.c style: each network owns ONE contiguous float buffer carved by a struct of
 * pointers (shapes in the comments). Gradients and the AdamW moments m, v mirror that
 * layout, and the teacher (encoder + head) is a second buffer of the same layout, so the
 * optimiser and the EMA are flat loops over named ranges. Transformer-block tensors are
 * stacked over blocks ([NL, ...]); the named-parameter table gives every timm/MAE-named
 * tensor (e.g. "blocks.3.attn.qkv.weight") its offset inside its network's buffer.
 */
#ifndef AFIRE_MODEL_H
#define AFIRE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "afire.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ configuration */

typedef struct {
    int S, P, C;                  /* image side, patch side, in_chans (1 or 3)           */
    int D, depth, H;              /* encoder width, blocks, heads                        */
    int mlp_ratio;                /* MLP hidden = mlp_ratio * width (4)                  */
    int Dd, depth_d, Hd;          /* decoder width, blocks, heads                        */
    int K;                        /* prototype classes (head output), default 256        */
    int head_hidden;              /* head MLP hidden width, default 1024                 */
    int head_bottleneck;          /* head bottleneck before L2 norm, default 256         */
    int shared_last_layer;        /* 0: one weight-normalised layer per position (L)     */
    int shared_mask_token;        /* 0: one mask token per position (L), 1: MAE's single */
    int learned_pos;              /* 0: fixed 2-D sin-cos (MAE), 1: learned, sincos init */
    uint64_t seed;                /* initialisation seed (rng.h, AF_RNG_INIT streams)    */
} af_config;

/* Fill `cfg` with a named preset (METHOD §7): "vit_base", "vit_small", "vit_tiny", "test". */
af_status af_config_preset(af_config *cfg, const char *name);
/* AF_EINVAL naming the first bad field. */
af_status af_config_validate(const af_config *cfg);

/* ------------------------------------------------------------------ parameter layouts */

typedef enum { AF_NET_ENCODER = 0, AF_NET_HEAD = 1, AF_NET_DECODER = 2, AF_NET_COUNT = 3 } af_net;
typedef enum { AF_STUDENT = 0, AF_TEACHER = 1 } af_branch;

/* NL stacked pre-norm transformer blocks of width W (timm Block, qkv bias). */
typedef struct {
    float *ln1_w, *ln1_b; /* [NL, W]      */
    float *qkv_w;         /* [NL, 3W, W]  */
    float *qkv_b;         /* [NL, 3W]     */
    float *proj_w;        /* [NL, W, W]   */
    float *proj_b;        /* [NL, W]      */
    float *ln2_w, *ln2_b; /* [NL, W]      */
    float *fc1_w;         /* [NL, 4W, W]  (4 = mlp_ratio) */
    float *fc1_b;         /* [NL, 4W]     */
    float *fc2_w;         /* [NL, W, 4W]  */
    float *fc2_b;         /* [NL, W]      */
} af_blocks_params;

typedef struct {
    float *patch_w;          /* [D, Q]  conv weight [D,C,P,P] flattened (c, p, q)     */
    float *patch_b;          /* [D]                                                  */
    float *cls;              /* [D]                                                  */
    float *pos;              /* [T, D]  row 0 (cls) zero for sincos                  */
    af_blocks_params blocks; /* NL = depth, W = D                                    */
    float *norm_w, *norm_b;  /* [D]                                                  */
} af_encoder_params;

typedef struct {
    float *fc1_w; /* [Hh, D]  */
    float *fc1_b; /* [Hh]     */
    float *fc2_w; /* [Hh, Hh] */
    float *fc2_b; /* [Hh]     */
    float *fc3_w; /* [Bn, Hh] */
    float *fc3_b; /* [Bn]     */
    float *last_v; /* [L, K, Bn] per position, or [K, Bn] shared; gain g fixed at 1 */
} af_head_params;

typedef struct {
    float *embed_w;          /* [Dd, D]                                  */
    float *embed_b;          /* [Dd]                                     */
    float *mask_token;       /* [L, Dd] per position, or [1, Dd] shared  */
    float *pos;              /* [T, Dd] fixed sincos, row 0 zero         */
    af_blocks_params blocks; /* NL = depth_d, W = Dd                     */
    float *norm_w, *norm_b;  /* [Dd]                                     */
    float *pred_w;           /* [Q, Dd]                                  */
    float *pred_b;           /* [Q]                                      */
} af_decoder_params;

/* One named tensor of a network buffer, in timm/MAE naming and torch shapes
 * (cls_token [1,1,D], pos_embed [1,T,D], mask_token [1,L,Dd]). */
typedef struct {
    char name[64];
    size_t offset;     /* in floats, from the start of the network's buffer         */
    size_t numel;
    int ndim;
    int64_t shape[4];
    int decay;         /* 1: weight decay applies (not a bias, not 1-D)              */
    int trainable;     /* 0: fixed buffer (sincos pos_embed), never updated          */
    int last_layer;    /* 1: head last layer (frozen during the first epoch)         */
    int init;          /* how it is initialised: see AF_INIT_* in params.c           */
    float init_scale;  /* bound (uniform) or std (normal) used by the init           */
} af_param_info;

/* Number of floats of a network's buffer and its named-tensor table (allocated; free with
 * af_free). The table is in timm state_dict order; ranges do not overlap and cover the
 * buffer exactly. */
af_status af_param_table(const af_config *cfg, af_net net, af_param_info **table, int *count,
                         size_t *total);

/* Carve a network buffer into its struct of pointers. */
void af_encoder_carve(af_encoder_params *p, float *base, const af_config *cfg);
void af_head_carve(af_head_params *p, float *base, const af_config *cfg);
void af_decoder_carve(af_decoder_params *p, float *base, const af_config *cfg);

/* Initialise a network buffer (METHOD §2; see params.c for the head). Deterministic in
 * cfg->seed, identical on every backend. */
af_status af_init_params(const af_config *cfg, af_net net, float *buffer);

/* uint8 grayscale img[B,S,S] -> normalised float out[B,C,S,S] (C=1: mean 0.449 std 0.226;
 * C=3: gray replicated, ImageNet per-channel mean/std). */
af_status af_normalize_images(float *out, const uint8_t *img, int B, int C, int S);

/* ------------------------------------------------------------------ activations */

/* Saved activations of NL blocks, T tokens of width W (each [NL, cap, ...]: the layer stride
 * uses the reserved capacity, so a smaller batch B never moves other layers' data). The
 * layout (af_acts_layout) may keep less: with `shared` every layer uses slot 0 (a forward
 * that nothing differentiates, e.g. the teacher), with `gelu_shared` only fch_gelu does (the
 * backward recomputes it from fch); att and att_stats are NULL when not kept. */
typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd; /* [NL,B,T,W], [NL,B,T] x2 */
    float *qkv;                       /* [NL,B,T,3W]             */
    float *att;                       /* [NL,B,H,T,T] softmax (GPU) or NULL                 */
    float *att_stats;                 /* [NL,B,H,T,2] softmax row max, 1/sum (CPU) or NULL  */
    float *atty;                      /* [NL,B,T,W]              */
    float *res2;                      /* [NL,B,T,W]  x + attn    */
    float *ln2, *ln2_mean, *ln2_rstd; /* [NL,B,T,W], [NL,B,T] x2 */
    float *fch, *fch_gelu;            /* [NL,B,T,4W]             */
    float *res3;                      /* [NL,B,T,W]  block out   */
    int cap;                          /* B of the layer stride (the capacity) */
    int shared;                       /* 1: all layers in slot 0 (forward only)              */
    int gelu_shared;                  /* 1: fch_gelu in slot 0 for every layer               */
} af_blocks_acts;

typedef struct {
    float *patches;          /* [B,L,Q]  (c, p, q) order                */
    float *x0;               /* [B,T,D]  embedding + pos, block input  */
    af_blocks_acts blocks;
    float *out, *lnf_mean, *lnf_rstd; /* [B,T,D], [B,T] x2 final norm */
} af_encoder_acts;

typedef struct {
    float *x;                /* [B*L, D]   tokens 1..L                 */
    float *h1, *g1;          /* [B*L, Hh]  fc1, gelu                   */
    float *h2, *g2;          /* [B*L, Hh]                              */
    float *z;                /* [B*L, Bn]  fc3                         */
    float *zn_t;             /* [L, B, Bn] normalised, position-major  */
    float *znorm;            /* [B*L]                                  */
    float *w_eff;            /* [L|1, K, Bn]                           */
    float *vnorm;            /* [L|1, K]                               */
    float *logits_t;         /* [L, B, K]                              */
    float *logits;           /* [B, L, K]                              */
} af_head_acts;

typedef struct {
    float *tokens;           /* [B,T,D]   copy of the input tokens     */
    uint8_t *mask;           /* [B,L]                                  */
    float *x0;               /* [B,T,Dd]  embed, masked, + pos         */
    af_blocks_acts blocks;
    float *lnf, *lnf_mean, *lnf_rstd; /* [B,T,Dd], [B,T] x2           */
    float *pred_full;        /* [B,T,Q]                                */
    float *pred;             /* [B,L,Q]   cls dropped                  */
} af_decoder_acts;

/* Backward scratch shared by the three networks, sized for the widest: Wmax = max(D, Dd),
 * Hmax = max(H, Hd). */
typedef struct {
    float *dres;             /* [B,T,Wmax]  residual-stream gradient   */
    float *dres2;            /* [B,T,Wmax]                             */
    float *dln;              /* [B,T,Wmax]                             */
    float *datty;            /* [B,T,Wmax]                             */
    float *dqkv;             /* [B,T,3Wmax]                            */
    float *dfch;             /* [B,T,4Wmax]                            */
    float *dfch_gelu;        /* [B,T,4Wmax]                            */
    float *datt;             /* [B,Hmax,T,T] attention scratch (GPU layout), or the
                              * af_attention_fused_* scratch of datt_floats (CPU)  */
    size_t datt_floats;
    float *dh_a, *dh_b;      /* [B*L, max(Hh,Q,Bn,...)] head / decoder */
    float *dz_t;             /* [L, B, Bn]                             */
    float *wn_ws;            /* [wn_slots, K, Bn] the head's last-layer backward, one per
                              * thread (CPU; NULL on the GPU)           */
    int wn_slots;
} af_scratch;

/* One activation block for `cap` images, shared by the CPU and GPU models: carve it (from
 * base; NULL only counts) into `branches` encoder and head branches (2: student and teacher;
 * 1: the student only, the teacher's structs are zeroed), the decoder and the backward
 * scratch, every array starting at a multiple of `align` floats (a power of two). Returns
 * the floats used. The decoder mask is separate (uint8). */
enum { AF_ACTS_ALIGN_CPU = 16 /* 64 bytes */, AF_ACTS_ALIGN_CUDA = 64 /* 256 bytes */ };
size_t af_acts_carve(const af_config *cfg, int cap, int branches, float *base, size_t align,
                     af_encoder_acts enc[2], af_head_acts head[2], af_decoder_acts *dec,
                     af_scratch *scratch);
/* Floats of that block; AF_EINVAL when cap images are too many for the int-indexed kernels. */
af_status af_acts_size(const af_config *cfg, int cap, int branches, size_t align,
                       size_t *floats);

/* What an activation block keeps. af_acts_carve is the GPU model's layout (all zero: every
 * block activation of both branches, the T x T attention probabilities). The CPU model keeps
 * less (af_acts_layout_cpu): attention row statistics instead of probabilities
 * (af_attention_fused_*), nothing of the teacher's forward but its outputs, gelu(fc1)
 * recomputed in the backward; and for inference only one slot per stack and no head, no
 * backward scratch. */
typedef struct {
    int fused_attention;   /* att_stats + fused scratch instead of att + [B,H,T,T] scratch  */
    int teacher_transient; /* the teacher's blocks share one slot, its head reuses h1/g1    */
    int gelu_recompute;    /* student and decoder blocks: fch_gelu is one shared slot       */
    int inference;         /* forward only: one slot per stack, both encoder branches share
                            * one block, no head, scratch only for the forwards             */
    int threads;           /* the fused attention scratch is sized for this many threads    */
    size_t att_scratch_floats; /* scratch.datt of the fused attention (af_attention_fused_*) */
} af_acts_layout;
/* The CPU model's layout for `cap` images (model_cpu.c). */
af_acts_layout af_acts_layout_cpu(const af_config *cfg, int cap, int inference);
size_t af_acts_carve_layout(const af_config *cfg, int cap, int branches, float *base,
                            size_t align, const af_acts_layout *lay, af_encoder_acts enc[2],
                            af_head_acts head[2], af_decoder_acts *dec, af_scratch *scratch);
af_status af_acts_size_layout(const af_config *cfg, int cap, int branches, size_t align,
                              const af_acts_layout *lay, size_t *floats);

/* ------------------------------------------------------------------ the model */

typedef struct {
    af_config cfg;
    int L, T, Q;
    /* per network: buffer size, named table, and the mirrored buffers */
    size_t numel[AF_NET_COUNT];
    af_param_info *table[AF_NET_COUNT];
    int ntable[AF_NET_COUNT];
    float *params[AF_NET_COUNT], *grads[AF_NET_COUNT];
    float *adam_m[AF_NET_COUNT], *adam_v[AF_NET_COUNT];
    float *teacher[2]; /* encoder, head: same layouts as params[0], params[1] */
    af_encoder_params enc[2], enc_grad; /* [branch] */
    af_head_params head[2], head_grad;
    af_decoder_params dec, dec_grad;
    /* activations, sized for `capacity` images, carved for the current B; `branches` = 2
     * (student and teacher, the trainer) or 1 (student only: the downstream networks,
     * which never run the teacher, need half the memory) */
    int capacity, branches;
    af_acts_layout layout;  /* what the activations keep (af_acts_layout_cpu)              */
    int inference;          /* 1: made for inference: no gradients, moments or head         */
    int bf16;               /* 1: linear layers' GEMMs in bf16 (af_gemm_bf16), fp32 sums     */
    void *bf16_ws;          /* their workspace, sized by af_model_reserve                    */
    size_t bf16_ws_bytes;
    float *act_mem;
    size_t act_floats;
    af_encoder_acts enc_acts[2];
    af_head_acts head_acts[2];
    af_decoder_acts dec_acts;
    af_scratch scratch;
    int enc_B[2], head_B[2], dec_B; /* batch of the last forward (0: none yet) */
} af_model;

/* Allocate and initialise (teacher = student). *out is NULL on failure. */
af_status af_model_create(af_model **out, const af_config *cfg);
/* The same for inference only (inference = 1): parameters of the student and teacher
 * encoders and of the decoder, no head, no gradients or AdamW moments, activations for the
 * forwards only (af_acts_layout_cpu(1)); the backward, head and optimiser functions refuse
 * such a model. inference = 0 is af_model_create. bf16 = 1: the GEMMs of the linear layers
 * take bf16 operands (af_gemm_bf16), everything else stays fp32. */
af_status af_model_create_mode(af_model **out, const af_config *cfg, int inference,
                               int bf16);

/* A linear layer of the CPU model (ops.h's af_linear_*) in the model's precision: fp32, or
 * bf16 GEMMs on m->bf16_ws (vit.c). */
void af_model_linear_forward(const af_model *m, float *out, const float *inp, const float *w,
                             const float *b, int N, int IC, int OC);
void af_model_linear_backward(const af_model *m, float *dinp, float *dw, float *db,
                              const float *dout, const float *inp, const float *w, int N, int IC,
                              int OC);
void af_model_free(af_model *m);
/* Size activations for up to B images (allocation happens here, never in a step). */
af_status af_model_reserve(af_model *m, int B);

/* Encoder: images[B,C,S,S] (normalised) -> tokens [B,T,D] = m->enc_acts[br].out. */
af_status af_encoder_forward(af_model *m, af_branch br, const float *images, int B);
/* dtokens[B,T,D] -> parameter gradients (+=) of the student encoder (last student forward). */
af_status af_encoder_backward(af_model *m, const float *dtokens);

/* Head on tokens[B,T,D] (rows 1..L) -> logits [B,L,K] = m->head_acts[br].logits. */
af_status af_head_forward(af_model *m, af_branch br, const float *tokens, int B);
/* dlogits[B,L,K] -> head grads (+=) and dtokens[B,T,D] += the head's part, rows 1..L (may
 * be NULL). The tokens also feed the decoder: af_decoder_backward, called first, writes
 * dtokens and this adds to it (ops.h: where two paths meet). */
af_status af_head_backward(af_model *m, const float *dlogits, float *dtokens);

/* Decoder (student only): tokens[B,T,D], token_mask[B,L] (nonzero = replace by the mask
 * token) -> pred [B,L,Q] = m->dec_acts.pred. */
af_status af_decoder_forward(af_model *m, const float *tokens, const uint8_t *token_mask, int B);
/* dpred[B,L,Q] -> decoder grads (+=) and dtokens[B,T,D] written (=, all T rows; may be
 * NULL). */
af_status af_decoder_backward(af_model *m, const float *dpred, float *dtokens);

void af_model_zero_grad(af_model *m);
/* teacher <- student for encoder and head. */
void af_model_sync_teacher(af_model *m);

/* ------------------------------------------------------------------ optimisation (optim.c) */

typedef struct {
    float lr, weight_decay;       /* weight decay of the decayed group                */
    float beta1, beta2, eps;      /* 0.9, 0.999, 1e-8                                 */
    int t;                        /* step number, >= 1 (bias correction)              */
    int freeze_last_layer;        /* 1: the head last layer(s) are not updated at all */
} af_adamw_args;

/* AdamW over the trainable tensors of the student encoder, head and decoder; no decay for
 * biases and 1-D tensors; untouched: fixed tensors and, when frozen, the last layer(s). */
af_status af_adamw_step(af_model *m, const af_adamw_args *a);

/* Per-tensor clipping as the released code (DINO): for every trainable tensor,
 * g *= max_norm / (||g|| + 1e-6) when that factor is < 1. norms[i] (optional, length
 * af_model_num_trainable) receives the pre-clip norms in table order (encoder, head,
 * decoder). Returns the pre-clip global norm in *total (optional). */
af_status af_clip_grad_per_tensor(af_model *m, float max_norm, float *norms, double *total);
/* Global-norm clipping (torch clip_grad_norm_): g *= min(1, max_norm / (total + 1e-6)). */
af_status af_clip_grad_global(af_model *m, float max_norm, double *total);
int af_model_num_trainable(const af_model *m);

/* Eq. 1: teacher = momentum * teacher + (1 - momentum) * student over encoder + head. */
af_status af_ema_update(af_model *m, float momentum);

#ifdef __cplusplus
}
#endif
#endif
