/* The AFiRe objective on token logits (METHOD.md §3, §4, §6): Sinkhorn-Knopp, the
 * spatial prototypes (the paper's C, `protos` here, Eq. 7), the paper losses (Eq. 12,
 * 14-16, 17, 20), the released objective and the anomaly score (Eq. 51). Pure functions on
 * arrays; the networks live elsewhere. objective.c writes each equation as a function of its
 * own; cuda/objective.cuh declares the GPU twins. Dimension letters as afire.h.
 *
 * Conventions:
 *   - fp32 storage, double accumulation for every long sum, fixed reduction order;
 *   - gradients ACCUMULATE (+=) into the buffers given, because the terms of the objective
 *     meet there (the trainer sums all of them into one dlogits and one dpred); a NULL
 *     gradient is skipped;
 *   - loss values are returned UNweighted; the weights (w_*) only scale the gradients;
 *   - abn[B,L] is uint8, 1 = abnormal (inside the synthetic lesion), 0 = normal;
 *   - functions that need scratch take caller-owned memory whose size is given by the
 *     matching *_scratch_floats() so a training step allocates nothing.
 */
#ifndef AFIRE_OBJECTIVE_H
#define AFIRE_OBJECTIVE_H

#include <stddef.h>
#include <stdint.h>

#include "afire.h"
#include "comm.h" /* af_reducer */

#ifdef __cplusplus
extern "C" {
#endif

/* Default hyper-parameters (METHOD §3, §4). */
#define AF_TAU_S 0.1f          /* student softmax temperature                  */
#define AF_TAU 0.1f            /* temperature of f(p,q) = exp(-H(p,q)/tau)      */
#define AF_SINKHORN_EPS 0.05f  /* Sinkhorn epsilon                              */
#define AF_SINKHORN_ITERS 3
#define AF_PROTO_M 0.75f       /* prototype EMA momentum                        */
#define AF_W_ABN 2.0f          /* restoration weight of abnormal tokens (Eq. 20) */
#define AF_LOGC_FLOOR 1e-12f   /* c_l entries are clamped to this before the log */

/* SwAV-style Sinkhorn-Knopp. q[N,K] = exp((logits - max) / eps), normalised to total 1;
 * then `iters` times: every column sums to 1/K, every row to 1/N; finally every row is
 * scaled to sum 1. Rows or columns whose mass underflowed to zero are left at zero during
 * the iterations (no division by 0); a row still all zero at the end becomes uniform 1/K.
 * No scratch. Several ranks: af_sinkhorn_knopp_dist. */
af_status af_sinkhorn_knopp(float *q, const float *logits, int N, int K, float eps, int iters);

/* Data-parallel Sinkhorn (METHOD §3: "across GPUs the sums are all-reduced, as SwAV
 * does"): this rank holds N of the N_global rows of the global batch; the max, the total
 * and every iteration's column sums are reduced with `red` (NULL: one process, then
 * N_global must equal N); the row steps are local and use N_global. colsum: K doubles of
 * scratch. With one rank the result is bit-identical to af_sinkhorn_knopp. */
af_status af_sinkhorn_knopp_dist(float *q, const float *logits, int N, int K, float eps,
                                 int iters, int64_t N_global, double *colsum,
                                 const af_reducer *red);

/* Spatial prototypes protos[L,K] (Eq. 7, METHOD §3): qbar_j = mean over b of src[b,j,:];
 * protos_j = qbar_j when overwrite, else m*protos_j + (1-m)*qbar_j. m in [0,1]. */
af_status af_prototypes_update(float *protos, const float *src, int B, int L, int K, float m,
                            int overwrite);

/* Data-parallel af_prototypes_update: this rank holds B of the B_global images; the batch
 * sums are reduced with `red` (NULL: one process, B_global == B). sums: L*K doubles of
 * scratch. With one rank the result is bit-identical to af_prototypes_update. */
af_status af_prototypes_update_dist(float *protos, const float *src, int B, int64_t B_global,
                                    int L, int K, float m, int overwrite, double *sums,
                                    const af_reducer *red);

/* Paper objective, L_cst = L_stru + L_cate (Eq. 17): structure consistency L_stru (Eq. 12)
 * and category consistency L_cate (Eq. 14-16, sign-corrected f, METHOD §4) on student
 * logits s[B,L,K] (cosine similarities from the head), q^S = softmax(s/tau_s).
 * protos[L,K] must be >= 0 with positive, finite row sums; c_l = protos_l / sum(protos_l),
 * entries clamped to >= AF_LOGC_FLOOR before the log. Everything is evaluated in log space
 * (log f = -H/tau) with log-sum-exp, so f underflowing float32 does no harm.
 *   l_stru: mean over normal tokens (0 when there are none),
 *   l_cate: mean over anchors = normal tokens whose position holds another normal token
 *           in the batch (pos > 0); 0 when there are none.
 *   ds_stru += w_stru * dL_stru/ds, ds_cate += w_cate * dL_cate/ds (each may be NULL;
 *   they may be the same buffer to get the weighted sum).
 * scratch: af_paper_loss_scratch_floats(B, L, K) floats. */
size_t af_paper_loss_scratch_floats(int B, int L, int K);
af_status af_paper_loss(float *l_stru, float *l_cate, float *ds_stru, float *ds_cate,
                     const float *s, const float *protos, const uint8_t *abn, int B, int L,
                     int K, float tau_s, float tau, float w_stru, float w_cate, float *scratch);

/* NOT IN THE PAPER (Config.stru_target = "teacher_token"): a structure term whose target
 * depends on the image, replacing Eq. 12 (docs/RESULTS.md, structure consistency §5). For
 * each normal token (i, j), an InfoNCE over the images b of the batch at the SAME position:
 *   L_stru' = -(1/|N|) sum_{(i,j) normal} log[ f(q^S_ij, q^T_ij) / sum_b f(q^S_ij, q^T_bj) ]
 * with f as Eq. 12 (f(p, r) = exp(-H(p, r)/tau)), q^S = softmax(s/tau_s), and qt[B,L,K] the
 * teacher's distributions (Sinkhorn output on the normal images; every image b is a
 * candidate, whatever its student-side label). qt rows must be >= 0 with positive finite
 * sums; they are renormalised and clamped to >= AF_LOGC_FLOOR before the log, as c_l is.
 * A position cannot solve it (every candidate shares it). The gradient flows into q^S only.
 *   l_stru: mean over normal tokens (0 when there are none; 0 for B = 1);
 *   ds += w * dL/ds (NULL: skipped).
 * scratch: af_stru_token_loss_scratch_floats(B, L, K) floats. */
size_t af_stru_token_loss_scratch_floats(int B, int L, int K);
af_status af_stru_token_loss(float *l_stru, float *ds, const float *s, const float *qt,
                             const uint8_t *abn, int B, int L, int K, float tau_s, float tau,
                             float w, float *scratch);

/* Weighted restoration loss (Eq. 20): loss = (1/(B*L)) sum_ij w_ij ||y_ij - x_ij||^2 / Q,
 * w_ij = w_abn where abn[i,j] = 1, else 1 (abn may be NULL: all 1).
 * dy += weight * dloss/dy (dy may be NULL). No scratch. */
af_status af_recon_loss(float *loss, float *dy, const float *y, const float *x,
                     const uint8_t *abn, int B, int L, int Q, float w_abn, float weight);

/* Released objective: target = af_sinkhorn_knopp(protos as logits, eps, iters) over the L
 * rows of protos; l_cst = mean over normal tokens of -sum_k target_jk log softmax(s_ij /
 * tau_s)_k (0 when no normal token); l_recon = plain MSE over all B*L*Q values of y against x.
 * ds += w_cst * dl_cst/ds, dy += w_recon * dl_recon/dy (each may be NULL). Defaults:
 * tau_s 0.1, eps 0.05, iters 3. scratch: af_released_loss_scratch_floats(L, K) floats
 * (target is left there, rows = positions). */
size_t af_released_loss_scratch_floats(int L, int K);
/* The L_cst part of af_released_loss alone (same arguments, same scratch). */
af_status af_released_cst_loss(float *l_cst, float *ds, const float *s, const float *protos,
                               const uint8_t *abn, int B, int L, int K, float tau_s, float eps,
                               int iters, float w_cst, float *scratch);
af_status af_released_loss(float *l_cst, float *l_recon, float *ds, float *dy, const float *s,
                        const float *protos, const uint8_t *abn, const float *y,
                        const float *x, int B, int L, int K, int Q, float tau_s, float eps,
                        int iters,
                        float w_cst, float w_recon, float *scratch);

/* Anomaly score (Eq. 51). err[B,L] = ||y_ij - x_ij||^2 (sum over the Q values, in
 * normalised pixel units, double); log_score[B] = log((1/L) sum_j exp(err_ij)) computed
 * with log-sum-exp (always finite); score[B] = 1/A(x_i) = exp(log_score) (inf only where
 * it overflows double). Higher = more abnormal. Any output may be NULL. No scratch. */
af_status af_anomaly_score(double *score, double *log_score, double *err, const float *y,
                        const float *x, int B, int L, int Q);

#ifdef __cplusplus
}
#endif
#endif
