/* GPU twins of the synthetic lesion masks (csrc/core/slm.h) and of the objective
 * (csrc/core/objective.h): the same contracts, with these differences (as cuda_api.h):
 *   - every pointer is a DEVICE pointer; work is queued on ctx's stream and the call returns
 *     before it finishes (af_cuda_synchronize waits);
 *   - loss scalars are written to DEVICE memory (one float / double each), so a training
 *     step never waits for the host;
 *   - gradients ACCUMULATE (+=) like the CPU (the objective's terms meet there); a NULL
 *     gradient is skipped;
 *   - deterministic: every reduction runs in a fixed order, no float atomics;
 *   - sizes and hyper-parameters are checked on the host (AF_EINVAL). Checks that need the
 *     data (finite logits, protos >= 0 with positive row sums) are NOT made on the device: the
 *     caller owns them (the CPU twins report them).
 * SLM results are bit-identical to af_slm_generate; the objective matches objective.c to float
 * rounding (double accumulation where the CPU uses double).
 *
 * Plain C declarations: included by the .cu files and by the C bindings (csrc/python/py_op_table.c).
 */
#ifndef AFIRE_CUDA_OBJECTIVE_CUH
#define AFIRE_CUDA_OBJECTIVE_CUH

#include <stddef.h>
#include <stdint.h>

#include "afire.h"
#include "comm.h" /* af_reducer */
#include "cuda_api.h"
#include "slm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* af_slm_generate on the device: x[B,S,S] -> x_prime[B,S,S], mask[B,S,S], token_labels[B,L]
 * (uint8, device). Bit-identical to the CPU for every config (csrc/core/fp_exact.h). Allocates
 * nothing for AF_SLM_REGION_RANDOM (the default); AF_SLM_REGION_LARGEST (released code) takes
 * a stream-ordered workspace of 2*S*S ints per image (cudaMallocAsync) for its flood fill. */
af_status af_cuda_slm_generate(af_cuda_context *ctx, uint8_t *x_prime, uint8_t *mask,
                               uint8_t *token_labels, const uint8_t *x, int B, int S, int P,
                               const af_slm_config *cfg, uint64_t seed, uint64_t step,
                               uint64_t first_image_index);

/* af_sinkhorn_knopp: q[N,K] from logits[N,K] (q == logits is allowed). One block: the column
 * sums are fixed-order reductions without scratch. */
af_status af_cuda_sinkhorn_knopp(af_cuda_context *ctx, float *q, const float *logits, int N,
                                 int K, float eps, int iters);

/* af_sinkhorn_knopp_dist: this rank's N of N_global rows; `red` reduces DEVICE buffers on
 * ctx's stream (the NCCL reducer of the GPU trainer; NULL: af_cuda_sinkhorn_knopp).
 * scratch: K + 2 device doubles. Same sums in the same order as the one-block kernel, so one
 * rank gives its very numbers. */
af_status af_cuda_sinkhorn_knopp_dist(af_cuda_context *ctx, float *q, const float *logits, int N,
                                      int K, float eps, int iters, int64_t N_global,
                                      double *scratch, const af_reducer *red);

/* af_prototypes_update: protos[L,K] from src[B,L,K]. */
af_status af_cuda_prototypes_update(af_cuda_context *ctx, float *protos, const float *src, int B,
                                    int L, int K, float m, int overwrite);
/* af_prototypes_update_dist: B of B_global images here, sums reduced with `red` (device
 * buffers on ctx's stream; NULL: af_cuda_prototypes_update). sums: L*K device doubles. */
af_status af_cuda_prototypes_update_dist(af_cuda_context *ctx, float *protos, const float *src,
                                         int B, int64_t B_global, int L, int K, float m,
                                         int overwrite, double *sums, const af_reducer *red);

/* af_paper_loss: l_stru, l_cate are device floats; ds_stru/ds_cate [B,L,K] may be NULL or the
 * same buffer. scratch: af_cuda_paper_loss_scratch_floats(B, L, K) device floats, 8-byte
 * aligned (0 when the sizes are invalid or too large). */
size_t af_cuda_paper_loss_scratch_floats(int B, int L, int K);
af_status af_cuda_paper_loss(af_cuda_context *ctx, float *l_stru, float *l_cate, float *ds_stru,
                             float *ds_cate, const float *s, const float *protos,
                             const uint8_t *abn, int B, int L, int K, float tau_s, float tau,
                             float w_stru, float w_cate, float *scratch);

/* af_recon_loss: loss is a device float; dy [B,L,Q] may be NULL; abn may be NULL (all 1). */
af_status af_cuda_recon_loss(af_cuda_context *ctx, float *loss, float *dy, const float *y,
                             const float *x, const uint8_t *abn, int B, int L, int Q,
                             float w_abn, float weight);

/* af_released_loss: l_cst, l_recon are device floats; ds, dy may be NULL. scratch:
 * af_cuda_released_loss_scratch_floats(L, K) device floats (the Sinkhorn target is left in its
 * first L*K). */
size_t af_cuda_released_loss_scratch_floats(int L, int K);
/* af_released_cst_loss: the L_cst part of af_cuda_released_loss alone (same scratch). */
af_status af_cuda_released_cst_loss(af_cuda_context *ctx, float *l_cst, float *ds, const float *s,
                                    const float *protos, const uint8_t *abn, int B, int L, int K,
                                    float tau_s, float eps, int iters, float w_cst,
                                    float *scratch);
af_status af_cuda_released_loss(af_cuda_context *ctx, float *l_cst, float *l_recon, float *ds,
                                float *dy, const float *s, const float *protos, const uint8_t *abn,
                                const float *y, const float *x, int B, int L, int K, int Q,
                                float tau_s, float eps, int iters, float w_cst, float w_recon,
                                float *scratch);

/* af_anomaly_score: score[B], log_score[B], err[B,L] are device doubles; each may be NULL. */
af_status af_cuda_anomaly_score(af_cuda_context *ctx, double *score, double *log_score,
                                double *err, const float *y, const float *x, int B, int L,
                                int Q);

#ifdef __cplusplus
}
#endif
#endif
