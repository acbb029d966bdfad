/* One AFiRe training step in one C call, and the inference passes (ARCHITECTURE.md).
 *
 *   x (uint8 NORMAL images) -> SLM -> x', token labels A            slm.c
 *   teacher E_T(x) -> head_T -> Sinkhorn -> prototypes C            model + objective
 *   student E_S(x') -> head_S -> logits;  decoder(E_S(x'), A) -> y  model
 *   L = w_stru L_stru + w_cate L_cate + w_recon L_recon (or the released objective)
 *   backward -> clip -> AdamW -> EMA teacher -> schedules advance
 *
 * Dimension letters as afire.h.
 */
#ifndef AFIRE_TRAINER_H
#define AFIRE_TRAINER_H

#include <math.h>
#include <stdint.h>

#include "comm.h"
#include "model.h"
#include "rng.h" /* AF_HOSTDEV */
#include "schedule.h"
#include "slm.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { AF_OBJECTIVE_PAPER = 0, AF_OBJECTIVE_RELEASED = 1 };
/* Target of the paper objective's structure term: the prototypes (Eq. 12, the paper) or the
 * teacher's own tokens at the same position in every image of the batch (not in the paper:
 * af_stru_token_loss, docs/RESULTS.md structure consistency §5). */
enum { AF_STRU_PROTOTYPE = 0, AF_STRU_TEACHER_TOKEN = 1 };
/* GEMM precision. The CPU trainer takes it from the binding (AFiRe(precision=...), fp32 by
 * default whatever Config.precision says), the CUDA trainer from Config.precision. */
enum { AF_PRECISION_FP32 = 0, AF_PRECISION_BF16 = 1 };

typedef struct {
    af_config net;
    af_slm_config slm;
    int objective;             /* AF_OBJECTIVE_*                                         */
    int stru_target;           /* AF_STRU_*; paper objective only (Config.stru_target)   */
    float tau_s, tau;          /* student temperature, f(.) temperature (0.1, 0.1)       */
    float sinkhorn_eps;        /* released objective's Sinkhorn epsilon (0.05)           */
    int sinkhorn_iters;        /* 3                                                       */
    float proto_m;             /* prototype EMA momentum (0.75)                           */
    float w_stru, w_cate, w_recon, w_abn; /* released: w_stru weighs L_cst              */
    float clip;                /* max norm (3.0); 0 disables clipping                    */
    int clip_global;           /* 0 per tensor (released), 1 global norm                 */
    float beta1, beta2, adam_eps;
    af_schedule sched;         /* lr, wd, EMA, teacher temperature, last-layer freeze    */
    uint64_t seed;             /* SLM draws (init uses net.seed)                          */
    int precision;             /* AF_PRECISION_*: GEMMs in bf16 or fp32 (see above)       */
    int inference;             /* CPU: made for encode / restore / anomaly only: no head,
                                * gradients, moments or training buffers (af_model_create_mode) */
} af_trainer_config;

typedef struct {
    int64_t step;              /* the step these numbers belong to (0-based)             */
    double loss, l_stru, l_cate, l_cst, l_recon;
    double lr, wd, ema, teacher_temp, grad_norm, abnormal_fraction;
    int last_layer_frozen;
} af_step_stats;

/* The step statistics are filled by the CPU and the GPU trainer alike, through these. */

/* The weighted loss from the objective's unweighted terms, in double: paper
 * w_stru l_stru + w_cate l_cate + w_recon l_recon; released w_stru l_cst + w_recon l_recon.
 * The GPU trainer also evaluates it on the device (the flag that gates its update). */
AF_HOSTDEV double af_step_loss(int objective, float w_stru, float w_cate, float w_recon,
                               float l_stru, float l_cate, float l_cst, float l_recon) {
    if (objective == AF_OBJECTIVE_PAPER)
        return w_stru * (double)l_stru + w_cate * (double)l_cate + w_recon * (double)l_recon;
    return w_stru * (double)l_cst + w_recon * (double)l_recon;
}

/* Loss and schedule fields of `s` (s->step set) from the objective's outputs (paper:
 * l_stru, l_cate, l_recon, and l_cst = l_stru + l_cate; released: l_cst, l_recon) and the
 * schedule values of the step. AF_ENONFINITE when the total loss is not finite. */
static inline af_status af_step_stats_fill(af_step_stats *s, const af_trainer_config *c,
                                           const af_schedule_values *sv, float l_stru,
                                           float l_cate, float l_cst, float l_recon) {
    if (c->objective == AF_OBJECTIVE_PAPER) {
        s->l_stru = l_stru;
        s->l_cate = l_cate;
        s->l_cst = (double)l_stru + l_cate;
    } else {
        s->l_cst = l_cst;
    }
    s->l_recon = l_recon;
    s->loss = af_step_loss(c->objective, c->w_stru, c->w_cate, c->w_recon, l_stru, l_cate, l_cst,
                           l_recon);
    s->lr = sv->lr;
    s->wd = sv->wd;
    s->ema = sv->ema;
    s->teacher_temp = sv->teacher_temp;
    s->last_layer_frozen = sv->freeze_last_layer;
    if (!isfinite(s->loss))
        return af_error(AF_ENONFINITE, "non-finite loss at step %lld (stru %g, cate %g, cst %g, "
                        "recon %g); the model was not updated", (long long)s->step, s->l_stru,
                        s->l_cate, s->l_cst, s->l_recon);
    return AF_OK;
}

/* s->grad_norm = the pre-clip norm; AF_ENONFINITE when it is not finite or !ok (the GPU's
 * device flag refused the update). */
static inline af_status af_step_stats_grad_norm(af_step_stats *s, double norm, int ok) {
    s->grad_norm = norm;
    if (!ok || !isfinite(norm))
        return af_error(AF_ENONFINITE, "non-finite gradient norm at step %lld; the model was "
                        "not updated", (long long)s->step);
    return AF_OK;
}

/* A data-parallel step's image counts (counts[r]: rank r's images, gathered from every rank)
 * -> *B_global and *offset (the global index of this rank's image 0); each rank must bring
 * 1 to `capacity` images. Shared by the CPU and CUDA trainers. */
static inline af_status af_dist_batch_offsets(const int64_t *counts, int world, int rank,
                                              int capacity, int64_t *B_global,
                                              int64_t *offset) {
    *B_global = *offset = 0;
    for (int r = 0; r < world; r++) {
        if (counts[r] < 1 || counts[r] > capacity)
            return af_error(AF_EINVAL, "rank %d has %lld images in this step: every rank "
                            "needs 1 to %d", r, (long long)counts[r], capacity);
        if (r < rank) *offset += counts[r];
        *B_global += counts[r];
    }
    return AF_OK;
}

/* Data-parallel state of a trainer (af_trainer_set_comm; all zero for one process). The
 * global batch of a step is the concatenation of every rank's images in rank order, so the
 * step equals one process's step on that batch (to float rounding):
 *   - SLM draws keyed by the global image index (rank offset + b);
 *   - Sinkhorn over all B_global*L teacher tokens, prototype means over B_global images
 *     (af_sinkhorn_knopp_dist, af_prototypes_update_dist);
 *   - the cross-image terms (L_stru, L_cate of Eq. 12, 14-16; the released L_cst) on the
 *     student logits and token labels of the whole global batch, gathered on every rank:
 *     every rank computes the same loss and keeps the gradient rows of its own images
 *     (AF_STRU_TEACHER_TOKEN also gathers the teacher's Sinkhorn rows, its targets);
 *   - restoration (Eq. 20) local, weighted B/B_global and summed;
 *   - gradients summed over the ranks in buckets (each rank holds its images' share of the
 *     gradient of the global mean loss: the sum is the gradient of the global batch, i.e.
 *     the average of per-rank means when every rank has B images), then clipped, applied
 *     and EMA'd identically on every rank. */
typedef struct {
    af_comm *comm;
    int rank, world;
    int64_t *counts;           /* [world] images of each rank in this step                  */
    int64_t B_global, offset;  /* this step: images in all, global index of image 0 here   */
    float *logits;             /* [world*B, L, K] gathered student logits (global batch)   */
    float *q_teacher;          /* [world*B, L, K] gathered teacher Sinkhorn rows (only for
                                  AF_STRU_TEACHER_TOKEN, whose targets are other images')  */
    float *dlogits;            /* [world*B, L, K] gradient of the cross-image terms        */
    uint8_t *abn;              /* [world*B, L] gathered token labels                        */
    float *obj_scratch;        /* the objective's scratch for world*B images               */
    double *sums;              /* [L*K] prototype sums, [K] Sinkhorn column sums            */
} af_trainer_dist;

typedef struct {
    af_trainer_config cfg;
    af_model *model;
    int B;                     /* batch capacity                                          */
    int S, C, L, T, Q, K, D;
    int64_t step;              /* completed steps                                         */
    int protos_set;            /* protos holds prototypes                                 */
    float *protos;             /* [L,K] the paper's prototypes C                          */
    float *protos_next;        /* protos with the current batch, committed on success     */
    uint8_t *x_prime, *mask, *abn;   /* [B,S,S], [B,S,S], [B,L]                           */
    float *img, *img_prime;    /* [B,C,S,S] normalised x and x'                           */
    float *target;             /* [B,L,Q] patchified normalised x (MAE order)            */
    float *q_teacher;          /* [B*L,K] Sinkhorn output                                 */
    float *dlogits;            /* [B,L,K]                                                 */
    float *dpred;              /* [B,L,Q]                                                 */
    float *dtokens;            /* [B,T,D]                                                 */
    float *obj_scratch;
    af_trainer_dist dist;      /* several ranks (af_trainer_set_comm)                     */
    int busy;                  /* guards against use from two threads at once             */
} af_trainer;

af_status af_trainer_create(af_trainer **out, const af_trainer_config *cfg, int batch);
/* The checks of af_trainer_create on its arguments (trainer_config.c; the GPU trainer makes
 * them too). AF_EINVAL naming the first bad one. */
af_status af_trainer_config_check(const af_trainer_config *cfg, int batch);
void af_trainer_free(af_trainer *t);

/* Makes the trainer one rank of a data-parallel run over `comm` (NULL: back to one process;
 * the communicator must outlive the trainer). Allocates the buffers of the global batch
 * (world x capacity images); from then on every step is collective: all ranks must call
 * af_trainer_step / af_trainer_grads together, each with its own images (B >= 1, any B up
 * to the capacity). Every rank must start from the same state (same seed, or the same
 * checkpoint). */
af_status af_trainer_set_comm(af_trainer *t, af_comm *comm);

/* One step on images[B,S,S] (uint8 normal images, B <= capacity). On AF_ENONFINITE the
 * parameters, moments, teacher and prototypes are left exactly as before the call (on every
 * rank: the decision is made on global values). */
af_status af_trainer_step(af_trainer *t, const uint8_t *images, int B, af_step_stats *stats);

/* Steps 1-6 of a training step without any update: fills the student/decoder gradients,
 * the staged prototypes and *stats; the trainer's state (step, prototypes, parameters,
 * moments, teacher) is unchanged. Used by af_trainer_step and by gradient checks. */
af_status af_trainer_grads(af_trainer *t, const uint8_t *images, int B, af_step_stats *stats);

/* tokens[B,T,D] of the teacher (branch AF_TEACHER) or student encoder. */
af_status af_trainer_encode(af_trainer *t, float *tokens, const uint8_t *images, int B,
                            af_branch branch);
/* Restoration through the student encoder and decoder: pred[B,L,Q] (normalised pixels).
 * token_mask[B,L] (nullable) selects tokens replaced by mask tokens. target[B,L,Q]
 * (nullable) receives the patchified normalised input. */
af_status af_trainer_restore(af_trainer *t, float *pred, float *target, const uint8_t *images,
                             const uint8_t *token_mask, int B);
/* Eq. 51: score[B] = 1/A (higher = more abnormal), log_score[B], err[B,L] (nullable). */
af_status af_trainer_anomaly(af_trainer *t, double *score, double *log_score, double *err,
                             const uint8_t *images, int B);

/* Claim / release the trainer for one call (AF_EBUSY when another thread holds it). */
af_status af_trainer_acquire(af_trainer *t);
void af_trainer_release(af_trainer *t);

#ifdef __cplusplus
}
#endif
#endif
