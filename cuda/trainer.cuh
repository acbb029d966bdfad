/* One AFiRe training step and the inference passes on one GPU: the twin of csrc/core/trainer.h.
 *
 * The step mirrors af_trainer_step stage for stage (SLM, teacher + prototypes staged in
 * protos_next, student, losses, backward, clip, AdamW, EMA, commit) with every tensor on
 * the device. Host pointers in, host results out; inside a call the only host<->device
 * traffic is the uint8 batch (pinned staging buffer -> cudaMemcpyAsync on the context's
 * stream) and ONE synchronisation that downloads the step's scalars. Non-finite loss or
 * gradient norm: the updates are skipped on the device (a flag), the call returns
 * AF_ENONFINITE with the CPU's message, and the state is exactly as before.
 * cfg.precision AF_PRECISION_BF16 runs the networks' GEMMs on bf16 operands (cuda/bf16.cuh)
 * with fp32 master weights, optimiser state, reductions and losses; AF_PRECISION_FP32 is the
 * exact path that is checked against the CPU.
 *
 * Plain C (included by csrc/python/py_cuda_trainer.c).
 */
#ifndef AFIRE_CUDA_TRAINER_CUH
#define AFIRE_CUDA_TRAINER_CUH

#include <stdint.h>

#include "comm.cuh"
#include "cuda_api.h"
#include "model.cuh"
#include "trainer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Scalars of one step, written on the device and downloaded once (pinned host copy). */
typedef struct {
    float f_stru, f_cate, f_cst, f_recon; /* objective outputs (device scalars)          */
    double loss, grad_norm;
    long long n_abn;                      /* abnormal tokens of the batch                 */
    int ok;                               /* 1: finite loss and gradient norm -> update   */
    int nonfinite;                        /* inference: count of non-finite outputs       */
} af_cuda_step_scalars;

/* Data-parallel state (af_cuda_trainer_set_comm; all zero for one GPU): the twin of
 * trainer.h's af_trainer_dist, with NCCL on the device. Every cross-rank reduction of the
 * step is queued on the compute stream, except the gradient all-reduces: with `overlap`
 * (default; AFIRE_NCCL_OVERLAP=0 turns it off) each network's gradients are all-reduced on
 * `comm_stream` as soon as its backward has finished (decoder, then head, while the encoder
 * backward still runs, then the encoder), and the compute stream waits for them before
 * clipping. Without overlap the three all-reduces follow the backward on the compute
 * stream. The step's one host wait is af_nccl_wait (deadline, NCCL errors). */
typedef struct {
    af_nccl *nccl;
    int rank, world, overlap;
    int64_t *counts;                  /* host [world] images of each rank in this step     */
    int64_t B_global, offset;
    float *logits, *dlogits;          /* device [world*B, L, K]; dlogits also takes the
                                         padded logits gather before it is compacted      */
    uint8_t *abn, *abn_pad;           /* device [world*B, L] token labels, gathered        */
    float *obj_scratch;               /* device: the objective for world*B images          */
    double *sums;                     /* device [L*K + K + 2]: prototype sums, Sinkhorn    */
    double *share;                    /* device [1]: the restoration loss, reduced         */
    void *comm_stream;                /* cudaStream_t of the gradient all-reduces          */
    void *ev_grad[AF_NET_COUNT], *ev_done; /* cudaEvent_t                                  */
    struct {
        af_nccl *nccl;
        void *stream;
    } red;                            /* the af_reducer's context: NCCL on the compute stream */
} af_cuda_trainer_dist;

typedef struct {
    af_trainer_config cfg;
    af_cuda_context *ctx;       /* own stream + cuBLAS handle; fp32 GEMMs exact (TF32 off) */
    af_cuda_model *model;
    int B;                      /* batch capacity                                         */
    int S, C, L, T, Q, K, D;
    int64_t step;
    int protos_set;
    float *protos, *protos_next;          /* device [L,K]                                 */
    uint8_t *images, *x_prime, *mask, *abn; /* device [B,S,S] x3, [B,L]                   */
    uint8_t *staging;                     /* pinned host [B*S*S] (+ [B*L] token mask)     */
    float *img, *img_prime, *target, *q_teacher, *dlogits, *dpred, *dtokens, *obj_scratch;
    double *anomaly;                      /* device [B] score, [B] log score, [B*L] err   */
    af_cuda_step_scalars *dev;            /* device                                       */
    af_cuda_step_scalars *host;           /* pinned                                       */
    af_cuda_trainer_dist dist;            /* several ranks (af_cuda_trainer_set_comm)     */
    int busy;
} af_cuda_trainer;

/* Creates the trainer on `device` (its own context). */
af_status af_cuda_trainer_create(af_cuda_trainer **out, const af_trainer_config *cfg, int batch,
                                 int device);
void af_cuda_trainer_free(af_cuda_trainer *t);

/* As af_trainer_set_comm, over an NCCL communicator on this trainer's device (NULL: back to
 * one GPU). Collective (a host exchange checks that every rank has the same setup). */
af_status af_cuda_trainer_set_comm(af_cuda_trainer *t, af_nccl *nccl);

/* Same contracts as af_trainer_step / _grads / _encode / _restore / _anomaly, with HOST
 * images and outputs. */
af_status af_cuda_trainer_step(af_cuda_trainer *t, const uint8_t *images, int B,
                               af_step_stats *stats);
af_status af_cuda_trainer_grads(af_cuda_trainer *t, const uint8_t *images, int B,
                                af_step_stats *stats);
af_status af_cuda_trainer_encode(af_cuda_trainer *t, float *tokens, const uint8_t *images, int B,
                                 af_branch branch);
af_status af_cuda_trainer_restore(af_cuda_trainer *t, float *pred, float *target,
                                  const uint8_t *images, const uint8_t *token_mask, int B);
af_status af_cuda_trainer_anomaly(af_cuda_trainer *t, double *score, double *log_score,
                                  double *err, const uint8_t *images, int B);
/* As af_cuda_trainer_encode, but the tokens [B,T,D] stay on the GPU: copied into `dst`, a
 * DEVICE buffer of B*T*D floats on this trainer's device (af_cuda_trainer_device) that the
 * caller owns. Returns after the copy has finished (one stream synchronisation), so `dst` is
 * ready on every stream and the trainer's scratch may be reused at once. */
af_status af_cuda_trainer_encode_device(af_cuda_trainer *t, float *dst, const uint8_t *images,
                                        int B, af_branch branch);
/* The CUDA device index the trainer runs on. */
int af_cuda_trainer_device(const af_cuda_trainer *t);

/* Device buffer of the state: prefix "student" | "teacher" | "adam_m" | "adam_v" | "grad"
 * and network, or "prototypes" (net ignored). NULL when there is none (teacher.decoder). */
float *af_cuda_trainer_buffer(af_cuda_trainer *t, const char *prefix, int net, size_t *count);
/* Copy a whole state buffer to / from the host (synchronous). */
af_status af_cuda_trainer_download(af_cuda_trainer *t, float *host, const float *dev, size_t n);
af_status af_cuda_trainer_upload(af_cuda_trainer *t, float *dev, const float *host, size_t n);

af_status af_cuda_trainer_acquire(af_cuda_trainer *t);
void af_cuda_trainer_release(af_cuda_trainer *t);

#ifdef __cplusplus
}
#endif
#endif
