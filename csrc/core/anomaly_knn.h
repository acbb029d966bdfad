/* The per-token body of the kNN anomaly score (not in the paper), header-only so that
 * csrc/core/anomaly.c and cuda/anomaly.cu compute it with the very same code. */
#ifndef AFIRE_ANOMALY_KNN_H
#define AFIRE_ANOMALY_KNN_H

#include "anomaly.h" /* AF_ANOMALY_MAX_K */
#include "rng.h"     /* AF_HOSTDEV */

/* Mean squared distance (double sums) of token z[D] to its k nearest among the tokens at the
 * same position j of the N reference images ref[N, T, D] (cls at index 0); 1 <= k <=
 * AF_ANOMALY_MAX_K, k <= N. */
AF_HOSTDEV float af_knn_token_mean(const float *z, const float *ref, int N, int T, int D,
                                   int j, int k) {
    double best[AF_ANOMALY_MAX_K]; /* ascending */
    int have = 0;
    for (int r = 0; r < N; r++) {
        const float *w = ref + ((size_t)r * T + 1 + j) * D;
        double s = 0.0;
        for (int d = 0; d < D; d++) {
            double u = (double)z[d] - w[d];
            s += u * u;
        }
        if (have == k && s >= best[k - 1]) continue;
        int i = have < k ? have++ : k - 1;
        while (i > 0 && best[i - 1] > s) {
            best[i] = best[i - 1];
            i--;
        }
        best[i] = s;
    }
    double m = 0.0;
    for (int i = 0; i < k; i++) m += best[i];
    return (float)(m / k);
}

#endif
