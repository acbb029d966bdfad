/* BCE-with-logits over valid targets and the linear probe (paper Table 1, METHOD §6):
 * logistic regression per class on standardised frozen features, trained by AdamW. */
#include <math.h>

#include "common.h"
#include "downstream.h"
#include "ops/ops.h"
#include "rng.h"

#define PROBE_SHUFFLE_ITEM 0x50u /* item of the AF_RNG_SHUFFLE stream used for the order */

/* log(1 + e^z) - z y, stable for any z: max(z,0) - z y + log1p(e^-|z|). */
static double bce_term(double z, double y) {
    return (z > 0 ? z : 0) - z * y + log1p(exp(-fabs(z)));
}

static double sigmoid(double z) {
    if (z >= 0) return 1.0 / (1.0 + exp(-z));
    double e = exp(z);
    return e / (1.0 + e);
}

af_status af_bce_logits(double *loss, float *dlogits, int64_t *count, const float *logits,
                        const float *targets, int N, int NC) {
    AF_CHECK(loss != NULL && logits != NULL && targets != NULL, AF_EINVAL, "bce: NULL argument");
    AF_CHECK(N >= 0 && NC >= 1, AF_EINVAL, "bce: bad sizes N=%d C=%d", N, NC);
    size_t n = (size_t)N * NC;
    int64_t cnt = 0;
    for (size_t i = 0; i < n; i++) {
        float y = targets[i];
        if (isnan(y)) continue;
        AF_CHECK(y >= 0.0f && y <= 1.0f, AF_EINVAL, "targets must be in [0, 1] or NaN (missing), "
                 "got %g at flat index %zu", (double)y, i);
        cnt++;
    }
    double sum = 0.0, inv = cnt ? 1.0 / (double)cnt : 0.0;
    for (size_t i = 0; i < n; i++) {
        float y = targets[i];
        if (isnan(y)) {
            if (dlogits) dlogits[i] = 0.0f;
            continue;
        }
        double z = logits[i];
        sum += bce_term(z, y);
        if (dlogits) dlogits[i] = (float)((sigmoid(z) - y) * inv);
    }
    *loss = sum * inv;
    if (count) *count = cnt;
    return isfinite(*loss) ? AF_OK : af_error(AF_ENONFINITE, "bce: the loss is not finite");
}

/* ------------------------------------------------------------------ standardisation */

af_status af_probe_standardize_stats(float *mean, float *std, const float *X, int N, int D) {
    AF_CHECK(mean && std && X, AF_EINVAL, "standardize: NULL argument");
    AF_CHECK(N >= 1 && D >= 1, AF_EINVAL, "standardize: need N >= 1 and D >= 1");
    for (int d = 0; d < D; d++) {
        double s = 0.0, ss = 0.0;
        for (int n = 0; n < N; n++) s += X[(size_t)n * D + d];
        double mu = s / N;
        for (int n = 0; n < N; n++) {
            double e = X[(size_t)n * D + d] - mu;
            ss += e * e;
        }
        double sd = sqrt(ss / N);
        mean[d] = (float)mu;
        std[d] = sd < 1e-6 ? 1.0f : (float)sd; /* constant feature: leave it at 0 */
    }
    return AF_OK;
}

static void standardize(float *out, const float *X, const float *mean, const float *std, int N,
                        int D) {
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++)
            out[(size_t)n * D + d] = (X[(size_t)n * D + d] - mean[d]) / std[d];
}

static af_status check_sizes(int N, int D, int NC) {
    AF_CHECK(N >= 0 && D >= 1 && NC >= 1, AF_EINVAL, "probe: bad sizes N=%d D=%d C=%d", N, D, NC);
    AF_CHECK((double)N * D < 2147483647.0 && (double)N * NC < 2147483647.0 &&
             (double)NC * D < 2147483647.0, AF_EINVAL, "probe: sizes too large");
    return AF_OK;
}

/* ------------------------------------------------------------------ loss, fit, predict */

/* Loss and gradients on already standardised rows Xs[N,D]; logits/dlogits [N,NC]. */
static af_status probe_loss_std(double *loss, float *dW, float *db, float *logits, float *dlogits,
                                const float *Xs, const float *Y, const float *W, const float *b,
                                int N, int D, int NC) {
    af_linear_forward(logits, Xs, W, b, N, D, NC);
    AF_TRY(af_bce_logits(loss, dlogits, NULL, logits, Y, N, NC));
    if (dW) memset(dW, 0, (size_t)NC * D * sizeof(float));
    if (db) memset(db, 0, (size_t)NC * sizeof(float));
    if (dW || db) af_linear_backward(NULL, dW, db, dlogits, Xs, W, N, D, NC);
    return AF_OK;
}

af_status af_probe_loss(double *loss, float *dW, float *db, const float *X, const float *Y,
                        const float *W, const float *b, const float *mean, const float *std,
                        int N, int D, int NC, float *scratch) {
    AF_TRY(check_sizes(N, D, NC));
    AF_CHECK(loss && X && Y && W && b && mean && std && scratch, AF_EINVAL,
             "probe_loss: NULL argument");
    float *Xs = scratch, *logits = Xs + (size_t)N * D, *dlogits = logits + (size_t)N * NC;
    standardize(Xs, X, mean, std, N, D);
    return probe_loss_std(loss, dW, db, logits, dlogits, Xs, Y, W, b, N, D, NC);
}

af_status af_probe_predict(float *logits, const float *X, const float *W, const float *b,
                           const float *mean, const float *std, int N, int D, int NC) {
    AF_TRY(check_sizes(N, D, NC));
    AF_CHECK(logits && X && W && b && mean && std, AF_EINVAL, "probe_predict: NULL argument");
    if (N == 0) return AF_OK;
    float *Xs = af_calloc((size_t)N * D, sizeof(float));
    if (Xs == NULL) return AF_ENOMEM;
    standardize(Xs, X, mean, std, N, D);
    af_linear_forward(logits, Xs, W, b, N, D, NC);
    af_free(Xs);
    return AF_OK;
}

af_status af_probe_fit(float *W, float *b, float *mean, float *std, float *loss, const float *X,
                       const float *Y, int N, int D, int NC, const af_probe_config *c) {
    AF_TRY(check_sizes(N, D, NC));
    AF_CHECK(W && b && mean && std && loss && X && Y && c, AF_EINVAL, "probe_fit: NULL argument");
    AF_CHECK(N >= 1, AF_EINVAL, "probe_fit: need at least one sample");
    AF_CHECK(c->epochs >= 1, AF_EINVAL, "epochs must be >= 1, got %d", c->epochs);
    AF_CHECK(c->batch >= 1, AF_EINVAL, "batch must be >= 1, got %d", c->batch);
    AF_CHECK(isfinite(c->lr) && c->lr > 0.0f, AF_EINVAL, "lr must be finite and > 0");
    AF_CHECK(isfinite(c->weight_decay) && c->weight_decay >= 0.0f, AF_EINVAL,
             "weight_decay must be finite and >= 0");
    int Bt = c->batch < N ? c->batch : N;
    size_t nd = (size_t)N * D, ncd = (size_t)NC * D;
    /* one allocation: Xs, full logits/dlogits, batch rows/targets/logits/dlogits, grads
     * and moments of W and b */
    size_t total = nd + 2 * (size_t)N * NC + (size_t)Bt * D + 3 * (size_t)Bt * NC + 3 * ncd + 3 * (size_t)NC;
    float *mem = af_calloc(total, sizeof(float));
    int *perm = af_calloc((size_t)N, sizeof(int));
    if (mem == NULL || perm == NULL) {
        af_free(mem);
        af_free(perm);
        return AF_ENOMEM;
    }
    float *Xs = mem, *logits = Xs + nd, *dlogits = logits + (size_t)N * NC;
    float *xb = dlogits + (size_t)N * NC, *yb = xb + (size_t)Bt * D, *lb = yb + (size_t)Bt * NC;
    float *dlb = lb + (size_t)Bt * NC, *dW = dlb + (size_t)Bt * NC, *mW = dW + ncd, *vW = mW + ncd;
    float *db = vW + ncd, *mb = db + NC, *vb = mb + NC;
    af_status st = af_probe_standardize_stats(mean, std, X, N, D);
    if (st == AF_OK) {
        standardize(Xs, X, mean, std, N, D);
        memset(W, 0, ncd * sizeof(float));
        memset(b, 0, (size_t)NC * sizeof(float));
    }
    int t = 0;
    for (int e = 0; e < c->epochs && st == AF_OK; e++) {
        /* Fisher-Yates from a fresh stream per epoch */
        uint64_t stream = af_stream(AF_RNG_SHUFFLE, (uint64_t)e, PROBE_SHUFFLE_ITEM);
        for (int i = 0; i < N; i++) perm[i] = i;
        for (int i = N - 1; i > 0; i--) {
            int j = (int)af_rand_int(c->seed, stream, (uint64_t)i, 0, i);
            int tmp = perm[i];
            perm[i] = perm[j], perm[j] = tmp;
        }
        for (int s = 0; s < N && st == AF_OK; s += Bt) {
            int nb = N - s < Bt ? N - s : Bt;
            for (int i = 0; i < nb; i++) {
                memcpy(xb + (size_t)i * D, Xs + (size_t)perm[s + i] * D, (size_t)D * sizeof(float));
                memcpy(yb + (size_t)i * NC, Y + (size_t)perm[s + i] * NC, (size_t)NC * sizeof(float));
            }
            double l;
            int64_t cnt = 0;
            for (size_t i = 0; i < (size_t)nb * NC; i++) cnt += !isnan(yb[i]);
            if (cnt == 0) continue; /* all labels missing: no step */
            st = probe_loss_std(&l, dW, db, lb, dlb, xb, yb, W, b, nb, D, NC);
            if (st != AF_OK) break;
            t++;
            af_adamw_update(W, dW, mW, vW, ncd, c->lr, c->beta1, c->beta2, c->eps, c->weight_decay, t);
            af_adamw_update(b, db, mb, vb, (size_t)NC, c->lr, c->beta1, c->beta2, c->eps, 0.0f, t);
        }
        if (st == AF_OK) {
            double l;
            st = probe_loss_std(&l, NULL, NULL, logits, dlogits, Xs, Y, W, b, N, D, NC);
            loss[e] = (float)l;
        }
    }
    af_free(mem);
    af_free(perm);
    return st;
}
