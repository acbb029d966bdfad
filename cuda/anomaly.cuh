/* GPU twins of the anomaly scores beside Eq. 51 (csrc/core/anomaly.h): the same contracts
 * and names with an af_cuda_ prefix, except (as cuda_api.h) that every pointer is a DEVICE
 * pointer and work is queued on ctx's stream; sizes are checked on the host (AF_EINVAL), the
 * data checks (finite tokens, errors >= 0) are the caller's (the op table's check hooks make
 * them for both twins). Every sum runs in the CPU's order, in one thread: the results match
 * csrc/core/anomaly.c to floating-point contraction (nvcc fuses multiply-adds).
 *
 * af_anomaly_inpaint_masks has no twin (a host table of K x L bytes).
 *
 * Plain C declarations: included by the .cu file and by csrc/python/py_op_table.c.
 */
#ifndef AFIRE_CUDA_ANOMALY_CUH
#define AFIRE_CUDA_ANOMALY_CUH

#include <stdint.h>

#include "afire.h"
#include "cuda_api.h"

#ifdef __cplusplus
extern "C" {
#endif

af_status af_cuda_anomaly_token_error(af_cuda_context *ctx, float *err, const float *y,
                                      const float *x, const uint8_t *mask, int B, int L, int Q);
af_status af_cuda_anomaly_position_stats(af_cuda_context *ctx, float *mean, float *std,
                                         const float *num, const float *den, int N, int L,
                                         float eps);
af_status af_cuda_anomaly_position_zscore(af_cuda_context *ctx, double *score, float *map,
                                          const float *num, const float *den, const float *mean,
                                          const float *std, int B, int L, float eps);
/* Takes 2 G D^2 + G (N + 1) D doubles of stream-ordered device memory (cudaMallocAsync) and
 * waits for the stream (it reports a covariance that is not positive definite). */
af_status af_cuda_anomaly_gauss_fit(af_cuda_context *ctx, float *mean, float *prec,
                                    const float *tokens, int N, int T, int D, int pooled,
                                    float shrinkage);
/* Takes 2 B G D doubles of stream-ordered device memory. */
af_status af_cuda_anomaly_gauss_score(af_cuda_context *ctx, double *score, float *map,
                                      const float *tokens, const float *mean, const float *prec,
                                      int B, int T, int D, int pooled);
af_status af_cuda_anomaly_knn_score(af_cuda_context *ctx, double *score, float *map,
                                    const float *tokens, const float *ref, int B, int N, int T,
                                    int D, int k);

#ifdef __cplusplus
}
#endif
#endif
