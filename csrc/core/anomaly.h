/* Anomaly scores of the anomaly-detection protocol (METHOD §6) beside the paper's Eq. 51
 * (af_anomaly_score, objective.h). cuda/anomaly.cu is the twin, with the same names
 * (af_cuda_ prefix) and contracts.
 *
 * Every score is a per-token map [B, L] (L = T - 1 patch tokens, the cls token is never
 * scored) and an image score [B] = the mean of the map over its tokens (double, summed in
 * token order), higher = more abnormal. Reference statistics are fitted from the NORMAL
 * images the protocol adapts on ("the adaptation normals"), never from test images.
 *
 *   score              in the paper?  what it measures
 *   Eq. 51             yes            log-mean-exp of the restoration errors (objective.c)
 *   in-painting        no             each token's error when the decoder predicts it from a
 *                                     mask token (af_anomaly_inpaint_masks hides every token
 *                                     exactly once, as the restoration task trains it)
 *   position z-score   no             a per-token error (or error ratio), in log space,
 *                                     standardised by its position's mean / std over the
 *                                     adaptation normals
 *   token Gaussian     no             Mahalanobis distance of a teacher token to the Gaussian
 *                                     of the adaptation normals' tokens at its position;
 *                                     pooled: of the image's GAP feature (one Gaussian)
 *   token kNN          no             squared distance of a teacher token to its nearest
 *                                     adaptation-normal tokens at the same position
 *
 * Dimension letters as afire.h; N reference images, B scored images, T tokens (cls first),
 * D width, L = T - 1, Q values per patch, G Gaussians (1 pooled, L per position).
 */
#ifndef AFIRE_ANOMALY_H
#define AFIRE_ANOMALY_H

#include <stddef.h>
#include <stdint.h>

#include "afire.h"

#ifdef __cplusplus
extern "C" {
#endif

#define AF_ANOMALY_MAX_K 64 /* neighbours of the kNN score */

/* Complementary in-painting masks (not in the paper): masks[k, G*G] uint8 with
 * k = stride^2. Token (r, c) of the G x G grid is hidden (1) in mask number
 * ((r / block) % stride) * stride + (c / block) % stride, so every token is hidden in
 * exactly one mask, with its neighbours visible (block = 1: interleaved single tokens;
 * block = b: b x b squares). */
af_status af_anomaly_inpaint_masks(uint8_t *masks, int G, int stride, int block);

/* Per-token mean squared error (not in the paper): err[b, j] = (1/Q) sum_p (y - x)^2 over
 * the Q values of token j, summed in double, for the tokens with mask[b*L + j] != 0 (every
 * token when mask is NULL); the other entries of err are left as they are. Restorations
 * y[B,L,Q] with different masks thus fill one map: each token from the pass that hid it. */
af_status af_anomaly_token_error(float *err, const float *y, const float *x, const uint8_t *mask,
                                 int B, int L, int Q);

/* Per-position statistics over N reference maps (not in the paper) of
 * v[n, j] = log(num[n, j] + eps) - log(den[n, j] + eps)   (den NULL: log(num + eps)):
 * mean[L] and std[L] (sample standard deviation, N - 1; floored at 1e-6). N >= 2. */
af_status af_anomaly_position_stats(float *mean, float *std, const float *num, const float *den,
                                    int N, int L, float eps);

/* The z-score (not in the paper): map[b, j] = (v[b, j] - mean[j]) / std[j] with v as in
 * af_anomaly_position_stats; score[b] = mean_j map[b, j]. */
af_status af_anomaly_position_zscore(double *score, float *map, const float *num,
                                     const float *den, const float *mean, const float *std,
                                     int B, int L, float eps);

/* Gaussian reference of encoder tokens [N, T, D] (not in the paper). pooled = 1: one
 * Gaussian (G = 1) of the GAP features (mean of tokens 1..T-1); pooled = 0: one per
 * position (G = L, of token 1 + g). mean[G, D]; prec[G, D, D] the inverse of
 * (1 - a) S + a (tr(S) / D) I, S the sample covariance (N - 1), a = shrinkage in [0, 1]
 * (tr(S) / D floored at 1e-12); computed in double by Cholesky. N >= 2. AF_EINVAL when a
 * covariance is not positive definite (shrinkage 0 with N - 1 < D). */
af_status af_anomaly_gauss_fit(float *mean, float *prec, const float *tokens, int N, int T,
                               int D, int pooled, float shrinkage);

/* Squared Mahalanobis distances (not in the paper): map[b, g] = (z - mean_g)^T prec_g
 * (z - mean_g), z the GAP feature of image b (pooled, G = 1) or its token 1 + g; score[b]
 * = mean_g map[b, g]. */
af_status af_anomaly_gauss_score(double *score, float *map, const float *tokens,
                                 const float *mean, const float *prec, int B, int T, int D,
                                 int pooled);

/* Per-position nearest neighbours (not in the paper): map[b, j] = the mean of the k smallest
 * ||tokens[b, 1+j] - ref[n, 1+j]||^2 over the N reference images (1 <= k <= min(N,
 * AF_ANOMALY_MAX_K)); score[b] = mean_j map[b, j]. */
af_status af_anomaly_knn_score(double *score, float *map, const float *tokens, const float *ref,
                               int B, int N, int T, int D, int k);

#ifdef __cplusplus
}
#endif
#endif
