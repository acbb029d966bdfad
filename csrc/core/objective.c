/* The AFiRe objective on token logits, one function per equation of the paper: Sinkhorn-
 * Knopp, the prototype EMA (Eq. 7), structure consistency (Eq. 12), category consistency
 * (Eq. 14-16), their sum L_cst (Eq. 17), restoration (Eq. 20), the released objective and
 * the anomaly score (Eq. 51). cuda/objective.cu is the twin, with the same function names.
 * See objective.h for the contract and METHOD.md §3-§4, §6.
 *
 * Dimension letters as afire.h.
 * A token t = (i, j) of image i at position j is stored at row t = i*L + j.
 *
 * Gradients of the contrastive terms are collected as dL/dz with z = s / tau_s (the
 * softmax input) and scaled by 1/tau_s at the end. Two Jacobians appear:
 *   q = softmax(z):      dL/dz = q * (g - <q, g>)        for g = dL/dq
 *   log q = logsoftmax:  dL/dz = g - q * sum(g)          for g = dL/dlog q
 * f(p, r) = exp(sum_k p_k log r_k / tau) uses its first argument as q and its second as
 * log q, so a term f(q_a, q_b) sends the first Jacobian to token a and the second to b.
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>

#include "common.h"
#include "objective.h"
#include "ops/ops.h"

/* Running log-sum-exp in double: add values one at a time, in a fixed order. */
typedef struct {
    double m, s;
} lse_acc;

static inline void lse_init(lse_acc *a) {
    a->m = -INFINITY;
    a->s = 0.0;
}

static inline void lse_add(lse_acc *a, double v) {
    if (v <= a->m) {
        a->s += exp(v - a->m);
    } else {
        a->s = a->s * exp(a->m - v) + 1.0;
        a->m = v;
    }
}

static inline double lse_value(const lse_acc *a) {
    return a->s > 0.0 ? a->m + log(a->s) : -INFINITY;
}

static int positive_finite(float v) { return isfinite(v) && v > 0.0f; }

/* ---------------------------------------------------------------------------------- */
/* Sinkhorn-Knopp (SwAV), METHOD §3 (the paper gives it no equation number)            */

/* colsum[k] = the sum of column k over the N rows, in row order. Threads own blocks of 64
 * columns and walk the rows contiguously (a column at a time strode K floats per row). */
static void column_sums(double *colsum, const float *q, int N, int K) {
    enum { CB = 64 };
    int blocks = (K + CB - 1) / CB;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        int k0 = b * CB, k1 = k0 + CB < K ? k0 + CB : K;
        double acc[CB] = {0};
        for (int r = 0; r < N; r++) {
            const float *row = q + (size_t)r * K;
            for (int k = k0; k < k1; k++) acc[k - k0] += row[k];
        }
        for (int k = k0; k < k1; k++) colsum[k] = acc[k - k0];
    }
}

/* One Sinkhorn iteration after the column sums: column k times 1 / (colsum[k] K) where its
 * sum is > 0 (colsum then holds those factors), then each row times 1 / (its sum * rows), in
 * one pass over the rows. */
static void scale_columns_rows(float *q, double *colsum, int N, int K, double rows) {
    for (int k = 0; k < K; k++) colsum[k] = colsum[k] > 0.0 ? 1.0 / (colsum[k] * K) : 0.0;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        float *qr = q + (size_t)r * K;
        double rs = 0.0;
        for (int k = 0; k < K; k++) {
            if (colsum[k] > 0.0) qr[k] = (float)(qr[k] * colsum[k]);
            rs += qr[k];
        }
        if (rs > 0.0) {
            double sc = 1.0 / (rs * rows);
            for (int k = 0; k < K; k++) qr[k] = (float)(qr[k] * sc);
        }
    }
}

/* The one implementation of both entry points. With `red` every column sum is reduced
 * across the ranks before the columns are scaled, in the same per-rank order, so one rank
 * gives the very same numbers. colsum: K doubles (NULL without `red`: allocated here). */
static af_status sinkhorn(float *q, const float *logits, int N, int K, float eps, int iters,
                          int64_t N_global, double *colsum, const af_reducer *red) {
    AF_CHECK(q != NULL && logits != NULL, AF_EINVAL, "sinkhorn_knopp: NULL buffer");
    AF_CHECK(N > 0 && K > 0, AF_EINVAL, "sinkhorn_knopp: N=%d and K=%d must be > 0", N, K);
    AF_CHECK(positive_finite(eps), AF_EINVAL, "sinkhorn_knopp: eps must be > 0, got %g",
             (double)eps);
    AF_CHECK(iters >= 0, AF_EINVAL, "sinkhorn_knopp: iters must be >= 0, got %d", iters);
    AF_CHECK(red == NULL || (colsum != NULL && N_global >= N), AF_EINVAL,
             "sinkhorn_knopp: %lld rows in all for %d on this rank", (long long)N_global, N);
    size_t n = (size_t)N * (size_t)K;

    float mx = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        AF_CHECK(isfinite(logits[i]), AF_EINVAL,
                 "sinkhorn_knopp: logits has a non-finite value at flat index %zu", i);
        if (logits[i] > mx) mx = logits[i];
    }
    if (red != NULL) { /* the max of floats is a float: every rank gets this very value */
        double v = mx;
        AF_TRY(red->allreduce(red->ctx, &v, 1, AF_COMM_F64, AF_COMM_MAX, "Sinkhorn max"));
        mx = (float)v;
    }
    /* The global max (not per row) keeps the result identical to exp(logits/eps). */
    double total = 0.0;
    for (size_t i = 0; i < n; i++) {
        q[i] = (float)exp(((double)logits[i] - mx) / eps);
        total += q[i];
    }
    if (red != NULL)
        AF_TRY(red->allreduce(red->ctx, &total, 1, AF_COMM_F64, AF_COMM_SUM, "Sinkhorn total"));
    /* total >= 1 (the max entry is exp(0)). */
    for (size_t i = 0; i < n; i++) q[i] = (float)(q[i] / total);
    const double rows = red != NULL ? (double)N_global : (double)N;

    double *cs = colsum;
    if (cs == NULL && iters > 0) {
        cs = malloc((size_t)K * sizeof(double));
        AF_CHECK(cs != NULL, AF_ENOMEM, "sinkhorn_knopp: out of memory for %d column sums", K);
    }
    for (int it = 0; it < iters; it++) {
        /* each class (column over the N rows of every rank) gets mass 1/K */
        column_sums(cs, q, N, K);
        if (red != NULL) {
            af_status st = red->allreduce(red->ctx, cs, (size_t)K, AF_COMM_F64, AF_COMM_SUM,
                                          "Sinkhorn column sums");
            if (st != AF_OK) return st; /* cs is the caller's here */
        }
        /* then each row gets mass 1/N (N of the global batch): local */
        scale_columns_rows(q, cs, N, K, rows);
    }
    if (cs != colsum) free(cs);
    /* rows become distributions (SwAV multiplies by N; this is the same after an
     * iteration and also right for iters == 0) */
    for (int r = 0; r < N; r++) {
        float *qr = q + (size_t)r * K;
        double rs = 0.0;
        for (int k = 0; k < K; k++) rs += qr[k];
        if (rs > 0.0) {
            for (int k = 0; k < K; k++) qr[k] = (float)(qr[k] / rs);
        } else {
            for (int k = 0; k < K; k++) qr[k] = 1.0f / K;
        }
    }
    return AF_OK;
}

af_status af_sinkhorn_knopp(float *q, const float *logits, int N, int K, float eps, int iters) {
    return sinkhorn(q, logits, N, K, eps, iters, N, NULL, NULL);
}

af_status af_sinkhorn_knopp_dist(float *q, const float *logits, int N, int K, float eps,
                                 int iters, int64_t N_global, double *colsum,
                                 const af_reducer *red) {
    AF_CHECK(red != NULL || N_global == N, AF_EINVAL, "sinkhorn_knopp: %lld rows in all for "
             "%d on the only rank", (long long)N_global, N);
    return sinkhorn(q, logits, N, K, eps, iters, N_global, colsum, red);
}

/* ---------------------------------------------------------------------------------- */
/* Eq. 7: the spatial prototypes protos[L,K], an EMA of the batch means, METHOD §3     */

static af_status prototypes_checks(const float *protos, const float *src, int B, int L, int K,
                                   float m) {
    AF_CHECK(protos != NULL && src != NULL, AF_EINVAL, "prototypes_update: NULL buffer");
    AF_CHECK(B > 0 && L > 0 && K > 0, AF_EINVAL,
             "prototypes_update: B=%d, L=%d, K=%d must be > 0", B, L, K);
    AF_CHECK(isfinite(m) && m >= 0.0f && m <= 1.0f, AF_EINVAL,
             "prototypes_update: m must be in [0, 1], got %g", (double)m);
    return AF_OK;
}

static inline float prototype_ema(float old, double qbar, float m, int overwrite) {
    return overwrite ? (float)qbar : (float)(m * (double)old + (1.0 - m) * qbar);
}

af_status af_prototypes_update(float *protos, const float *src, int B, int L, int K, float m,
                            int overwrite) {
    AF_TRY(prototypes_checks(protos, src, B, L, K, m));
    size_t LK = (size_t)L * K;
#pragma omp parallel for schedule(static)
    for (size_t e = 0; e < LK; e++) {
        double acc = 0.0;
        for (int b = 0; b < B; b++) acc += src[(size_t)b * LK + e];
        protos[e] = prototype_ema(protos[e], acc / B, m, overwrite);
    }
    return AF_OK;
}

af_status af_prototypes_update_dist(float *protos, const float *src, int B, int64_t B_global,
                                    int L, int K, float m, int overwrite, double *sums,
                                    const af_reducer *red) {
    AF_TRY(prototypes_checks(protos, src, B, L, K, m));
    if (red == NULL) {
        AF_CHECK(B_global == B, AF_EINVAL, "prototypes_update: %lld images in all for %d on "
                 "the only rank", (long long)B_global, B);
        return af_prototypes_update(protos, src, B, L, K, m, overwrite);
    }
    AF_CHECK(sums != NULL && B_global >= B, AF_EINVAL, "prototypes_update: %lld images in all "
             "for %d on this rank (or no scratch)", (long long)B_global, B);
    size_t LK = (size_t)L * K;
#pragma omp parallel for schedule(static)
    for (size_t e = 0; e < LK; e++) {
        double acc = 0.0;
        for (int b = 0; b < B; b++) acc += src[(size_t)b * LK + e];
        sums[e] = acc;
    }
    /* qbar_j = the mean over the global batch (METHOD §3: all-reduced over GPUs) */
    AF_TRY(red->allreduce(red->ctx, sums, LK, AF_COMM_F64, AF_COMM_SUM, "prototype sums"));
#pragma omp parallel for schedule(static)
    for (size_t e = 0; e < LK; e++) protos[e] = prototype_ema(protos[e], sums[e] / (double)B_global, m, overwrite);
    return AF_OK;
}

/* ---------------------------------------------------------------------------------- */
/* The student side that Eq. 12 and Eq. 14-16 share                                    */

/* Per token: logq = log_softmax(s / tau_s), q = exp(logq). */
static void student_probs(float *q, float *logq, const float *s, size_t NT, int K,
                          float tau_s) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < NT; t++) {
        const float *st = s + t * K;
        double mx = -INFINITY;
        for (int k = 0; k < K; k++) mx = fmax(mx, (double)st[k] / tau_s);
        double se = 0.0;
        for (int k = 0; k < K; k++) se += exp((double)st[k] / tau_s - mx);
        double lse = mx + log(se);
        for (int k = 0; k < K; k++) {
            double lq = (double)st[k] / tau_s - lse;
            logq[t * K + k] = (float)lq;
            q[t * K + k] = (float)exp(lq);
        }
    }
}

/* out[N,K] = log(max(r_n, AF_LOGC_FLOOR)), r_n = rows_n / sum(rows_n); rows must be >= 0
 * with sums > 0 (`what` names them in the error). */
static af_status row_logs(float *out, const float *rows, int N, int K, const char *what) {
    for (int n = 0; n < N; n++) {
        const float *cl = rows + (size_t)n * K;
        double rs = 0.0;
        for (int k = 0; k < K; k++) {
            AF_CHECK(isfinite(cl[k]) && cl[k] >= 0.0f, AF_EINVAL,
                     "%s must be finite and >= 0 (probabilities), got %g at [%d, %d]", what,
                     (double)cl[k], n, k);
            rs += cl[k];
        }
        AF_CHECK(rs > 0.0 && isfinite(rs), AF_EINVAL,
                 "%s: row %d must have a positive finite sum, got %g", what, n, rs);
        for (int k = 0; k < K; k++)
            out[(size_t)n * K + k] = (float)log(fmax(cl[k] / rs, (double)AF_LOGC_FLOOR));
    }
    return AF_OK;
}

/* logc[L,K] = log(max(c_l, AF_LOGC_FLOOR)), c_l = protos_l / sum(protos_l); protos must be
 * >= 0 with rows > 0. */
static af_status prototype_logs(float *logc, const float *protos, int L, int K) {
    return row_logs(logc, protos, L, K, "prototypes C");
}

/* (1/tau) <p, v> in double: log f(p, r) when v = log r. */
static inline double logf_dot(const float *p, const float *v, int K, double inv_tau) {
    double acc = 0.0;
    for (int k = 0; k < K; k++) acc += (double)p[k] * v[k];
    return acc * inv_tau;
}

/* A[t,l] = log f(q_t, c_l) for every token t and position l: Eq. 12 normalises it over l,
 * Eq. 15 reads it at l = j (the f(q_bj, c_j) term). One GEMM, A = q logc^T, then 1/tau: a
 * float sum of K terms (was a double loop per pair, 3% of a vit_tiny step). */
static void prototype_affinity(float *A, const float *q, const float *logc, size_t NT, int L,
                               int K, double inv_tau) {
    af_sgemm(0, 1, (int)NT, L, K, 1.0f, q, K, logc, K, 0.0f, A, L);
    const float s = (float)inv_tau;
    size_t n = NT * (size_t)L;
#pragma omp parallel for schedule(static) if (n >= ((size_t)1 << 16))
    for (size_t i = 0; i < n; i++) A[i] *= s;
}

/* dz += q * (g - <q, g>): the softmax Jacobian applied to g = dL/dq. */
static inline void softmax_jac_add(float *dz, const float *q, const float *g, int K) {
    double qg = 0.0;
    for (int k = 0; k < K; k++) qg += (double)q[k] * g[k];
    for (int k = 0; k < K; k++) dz[k] += (float)(q[k] * (g[k] - qg));
}

/* The paper objective's working set, carved from its scratch in this order (floats):
 *   q, logq, g  [B*L*K]  student probabilities, their logs, dL/dz accumulator
 *   logc        [L*K]    log c_l
 *   A           [B*L*L]  A[t,l] = log f(q_t, c_l); at normal tokens, then Eq. 12 coefficients
 *   F           [L*B*B]  F[j,i,b] = log f(q_ij, q_bj)
 *   tmp         [L*K]    one K-vector per position
 *   tl, wG      [B*L]    per-token loss; coefficient of log f(q_bj, c_j) (abnormal b) */
typedef struct {
    const uint8_t *abn;
    int B, L, K;
    float tau_s;
    double inv_tau;
    float *q, *logq, *g, *logc, *A, *F, *tmp, *tl, *wG;
} paper_terms;

size_t af_paper_loss_scratch_floats(int B, int L, int K) {
    if (B <= 0 || L <= 0 || K <= 0) return 0;
    double b = B, l = L, k = K;
    double n = 3 * b * l * k + l * k + b * l * l + l * b * b + l * k + 2 * b * l;
    if (n * sizeof(float) > (double)(SIZE_MAX / 2)) return 0;
    return (size_t)n;
}

/* ---------------------------------------------------------------------------------- */
/* Eq. 12: structure consistency, METHOD §4                                            */

/* Over the normal tokens t = (i, j):
 *   L_stru = -(1/|N|) sum_t log[ f(q_t, c_j) / sum_l f(q_t, c_l) ]
 *          = mean_t (log-sum-exp_l A[t,l] - A[t,j]).
 * *l_stru = L_stru (0 without a normal token); ds += w * dL_stru/ds when ds is not NULL.
 * The gradient flows into q^S only (c is a buffer); rows of p->g serve as temporaries. */
static void structure_consistency(float *l_stru, float *ds, const paper_terms *p, float w) {
    const uint8_t *abn = p->abn;
    const int L = p->L, K = p->K;
    const size_t NT = (size_t)p->B * L;
    const double inv_tau = p->inv_tau;
    float *A = p->A;
    const float *logc = p->logc, *q = p->q;
    size_t n_normal = 0;
    for (size_t t = 0; t < NT; t++) n_normal += abn[t] == 0;
    const double c_stru = n_normal ? (double)w / n_normal : 0.0;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < NT; t++) {
        if (abn[t]) continue;
        const int j = (int)(t % L);
        float *a = A + t * L;
        double mx = -INFINITY;
        for (int l = 0; l < L; l++) mx = fmax(mx, a[l]);
        double se = 0.0;
        for (int l = 0; l < L; l++) se += exp(a[l] - mx);
        double lse = mx + log(se);
        p->tl[t] = (float)(lse - a[j]);
        if (ds == NULL) continue;
        /* dL/dq_k = (1/tau) sum_l (softmax(a)_l - [l == j]) log c_lk: the row of A becomes
         * its coefficients (category_consistency reads A only at abnormal tokens) */
        for (int l = 0; l < L; l++) a[l] = (float)((exp(a[l] - lse) - (l == j)) * inv_tau * c_stru);
    }
    if (ds != NULL) {
        /* g[t] = sum_l coef[t,l] log c_l for every token in one GEMM (abnormal rows unused) */
        af_sgemm(0, 0, (int)NT, K, L, 1.0f, A, L, logc, K, 0.0f, p->g, K);
#pragma omp parallel for schedule(static)
        for (size_t t = 0; t < NT; t++) {
            if (abn[t]) continue;
            const float *gt = p->g + t * K, *qt = q + t * K;
            float *dst = ds + t * K;
            double qg = 0.0;
            for (int k = 0; k < K; k++) qg += (double)qt[k] * gt[k];
            for (int k = 0; k < K; k++) dst[k] += (float)(qt[k] * (gt[k] - qg) / p->tau_s);
        }
    }
    double sum = 0.0;
    for (size_t t = 0; t < NT; t++)
        if (!abn[t]) sum += p->tl[t];
    *l_stru = n_normal ? (float)(sum / n_normal) : 0.0f;
}

/* ---------------------------------------------------------------------------------- */
/* Eq. 14-16: category consistency, METHOD §4                                          */

/* Per position j, for each anchor: a normal token (i, j) whose position holds another
 * normal token in the batch (pos > 0). Abnormal tokens are never pulled together
 * (Appendix E).
 *   pos = sum_{b != i, (b,j) normal} f(q_ij, q_bj)                              (Eq. 14)
 *   neg = sum_{(b,j) abnormal} f(q_ij, q_bj) + f(q_bj, c_j)                     (Eq. 15)
 *   L_cate = -(1/|N'|) sum_anchors log[ pos / (pos + neg) ]                     (Eq. 16)
 * *l_cate = L_cate (0 without an anchor); ds += w * dL_cate/ds when ds is not NULL. */
static void category_consistency(float *l_cate, float *ds, const paper_terms *p, float w) {
    const uint8_t *abn = p->abn;
    const int B = p->B, L = p->L, K = p->K;
    const size_t NT = (size_t)B * L, BLK = NT * K;
    const double inv_tau = p->inv_tau;
    const float *A = p->A, *logc = p->logc, *q = p->q, *logq = p->logq;
    float *g = p->g, *tl = p->tl, *wG = p->wG;
    size_t n_anchor = 0;
    for (int j = 0; j < L; j++) {
        size_t nn = 0;
        for (int b = 0; b < B; b++) nn += abn[(size_t)b * L + j] == 0;
        if (nn >= 2) n_anchor += nn;
    }
    const double c_cate = n_anchor ? (double)w / n_anchor : 0.0;
    const int want_grad = ds != NULL && n_anchor > 0;
    if (want_grad) {
        for (size_t e = 0; e < BLK; e++) g[e] = 0.0f;
        for (size_t t = 0; t < NT; t++) wG[t] = 0.0f;
    }
#pragma omp parallel for schedule(dynamic)
    for (int j = 0; j < L; j++) {
        int nn = 0;
        for (int b = 0; b < B; b++) nn += abn[(size_t)b * L + j] == 0;
        if (nn < 2) continue;
        float *Fj = p->F + (size_t)j * B * B, *gi = p->tmp + (size_t)j * K;
        for (int i = 0; i < B; i++) {
            if (abn[(size_t)i * L + j]) continue;
            const float *qi = q + ((size_t)i * L + j) * K;
            for (int b = 0; b < B; b++)
                if (b != i) Fj[i * B + b] = (float)logf_dot(qi, logq + ((size_t)b * L + j) * K, K, inv_tau);
        }
        for (int i = 0; i < B; i++) {
            const size_t ti = (size_t)i * L + j;
            if (abn[ti]) continue;
            const float *Fi = Fj + (size_t)i * B;
            lse_acc pos, all;
            lse_init(&pos);
            for (int b = 0; b < B; b++)
                if (b != i && !abn[(size_t)b * L + j]) lse_add(&pos, Fi[b]);
            all = pos;
            /* neg: f(q_ij, q_bj) and f(q_bj, c_j) = A[(b,j), j] over abnormal b; the
             * second sum does not depend on the anchor i (METHOD §4) */
            for (int b = 0; b < B; b++) {
                const size_t tb = (size_t)b * L + j;
                if (!abn[tb]) continue;
                lse_add(&all, Fi[b]);
                lse_add(&all, A[tb * L + j]);
            }
            const double lpos = lse_value(&pos), lall = lse_value(&all);
            tl[ti] = (float)(lall - lpos);
            if (!want_grad) continue;
            /* d(lall - lpos)/dterm = softmax_all(term) - [term in pos] softmax_pos(term) */
            const float *qi = q + ti * K;
            for (int k = 0; k < K; k++) gi[k] = 0.0f;
            for (int b = 0; b < B; b++) {
                if (b == i) continue;
                const size_t tb = (size_t)b * L + j;
                double coef = exp(Fi[b] - lall);
                if (!abn[tb]) coef -= exp(Fi[b] - lpos);
                coef *= c_cate * inv_tau;
                /* first argument q_ij: gather dL/dq_ij, Jacobian applied once below */
                const float *lqb = logq + tb * K;
                for (int k = 0; k < K; k++) gi[k] += (float)(coef * lqb[k]);
                /* second argument log q_bj: dz_b += coef * (q_ij - q_bj), sum(q_ij) = 1 */
                float *gb = g + tb * K;
                const float *qb = q + tb * K;
                for (int k = 0; k < K; k++) gb[k] += (float)(coef * ((double)qi[k] - qb[k]));
                if (abn[tb]) wG[tb] += (float)(exp(A[tb * L + j] - lall) * c_cate * inv_tau);
            }
            softmax_jac_add(g + ti * K, qi, gi, K);
        }
        if (!want_grad) continue;
        /* f(q_bj, c_j) for abnormal b: first argument q_bj, dL/dq_bj = wG_b * log c_j */
        const float *lcj = logc + (size_t)j * K;
        for (int b = 0; b < B; b++) {
            const size_t tb = (size_t)b * L + j;
            if (!abn[tb] || wG[tb] == 0.0f) continue;
            for (int k = 0; k < K; k++) gi[k] = wG[tb] * lcj[k];
            softmax_jac_add(g + tb * K, q + tb * K, gi, K);
        }
    }
    if (want_grad) {
        const float inv_tau_s = 1.0f / p->tau_s;
        for (size_t e = 0; e < BLK; e++) ds[e] += g[e] * inv_tau_s;
    }
    double sum = 0.0;
    for (int j = 0; j < L; j++) {
        int nn = 0;
        for (int b = 0; b < B; b++) nn += abn[(size_t)b * L + j] == 0;
        if (nn < 2) continue;
        for (int i = 0; i < B; i++)
            if (!abn[(size_t)i * L + j]) sum += tl[(size_t)i * L + j];
    }
    *l_cate = n_anchor ? (float)(sum / n_anchor) : 0.0f;
}

/* ---------------------------------------------------------------------------------- */
/* Eq. 17: L_cst = L_stru + L_cate, the paper objective                                */

af_status af_paper_loss(float *l_stru, float *l_cate, float *ds_stru, float *ds_cate,
                     const float *s, const float *protos, const uint8_t *abn, int B, int L,
                     int K, float tau_s, float tau, float w_stru, float w_cate, float *scratch) {
    AF_CHECK(l_stru && l_cate && s && protos && abn && scratch, AF_EINVAL,
             "paper_loss: NULL buffer");
    AF_CHECK(B > 0 && L > 0 && K > 0, AF_EINVAL, "paper_loss: B=%d, L=%d, K=%d must be > 0",
             B, L, K);
    AF_CHECK(positive_finite(tau_s), AF_EINVAL, "paper_loss: tau_s must be > 0, got %g",
             (double)tau_s);
    AF_CHECK(positive_finite(tau), AF_EINVAL, "paper_loss: tau must be > 0, got %g",
             (double)tau);
    AF_CHECK(isfinite(w_stru) && isfinite(w_cate), AF_EINVAL,
             "paper_loss: w_stru and w_cate must be finite");
    AF_CHECK(af_paper_loss_scratch_floats(B, L, K) > 0, AF_ENOMEM,
             "paper_loss: B=%d, L=%d, K=%d need too much scratch", B, L, K);

    const size_t NT = (size_t)B * L, BLK = NT * K;
    paper_terms p = {abn, B, L, K, tau_s, 1.0 / tau};
    p.q = scratch, p.logq = p.q + BLK, p.g = p.logq + BLK, p.logc = p.g + BLK;
    p.A = p.logc + (size_t)L * K, p.F = p.A + NT * L, p.tmp = p.F + (size_t)L * B * B;
    p.tl = p.tmp + (size_t)L * K, p.wG = p.tl + NT;

    AF_TRY(prototype_logs(p.logc, protos, L, K));
    student_probs(p.q, p.logq, s, NT, K, tau_s);
    prototype_affinity(p.A, p.q, p.logc, NT, L, K, p.inv_tau);
    structure_consistency(l_stru, ds_stru, &p, w_stru);
    category_consistency(l_cate, ds_cate, &p, w_cate);
    return AF_OK;
}

/* ---------------------------------------------------------------------------------- */
/* NOT IN THE PAPER: structure consistency against the teacher's own tokens           */

/* Replaces Eq. 12 when Config.stru_target = "teacher_token" (docs/RESULTS.md, "Structure
 * consistency", §1 and §5). Eq. 12's targets, the prototypes c_l, are batch means of the
 * teacher's distributions: a function of the position only, so a student that outputs one
 * distribution per position (read from its position embedding) solves it. Here the
 * candidates of a normal student token (i, j) are the teacher's distributions at the SAME
 * position j in every image b of the batch, q^T_bj (the teacher sees the normal images, so
 * every b is a candidate); the positive is its own image's, q^T_ij. All candidates share the
 * position, so only the token's content can pick the right one:
 *   L_stru' = -(1/|N|) sum_{(i,j) normal} log[ f(q^S_ij, q^T_ij) / sum_b f(q^S_ij, q^T_bj) ]
 * with Eq. 12's f(p, r) = exp(-H(p, r)/tau), r = the teacher row renormalised and clamped
 * to >= AF_LOGC_FLOOR (as c_l is). An InfoNCE over the images at a fixed position. The
 * teacher side is a target: the gradient flows into q^S only. With B = 1 it is 0. */

/* Scratch, in floats: q [B*L*K] student probabilities (their logs follow: student_probs),
 * logq [B*L*K] (unused), logt [B*L*K] log teacher rows, g [B*L*K] per-token temporaries,
 * F [L*B*B] F[j,i,b] = log f(q^S_ij, q^T_bj), tl [B*L] per-token loss. */
size_t af_stru_token_loss_scratch_floats(int B, int L, int K) {
    if (B <= 0 || L <= 0 || K <= 0) return 0;
    double b = B, l = L, k = K;
    double n = 4 * b * l * k + l * b * b + b * l;
    if (n * sizeof(float) > (double)(SIZE_MAX / 2)) return 0;
    return (size_t)n;
}

af_status af_stru_token_loss(float *l_stru, float *ds, const float *s, const float *qt,
                             const uint8_t *abn, int B, int L, int K, float tau_s, float tau,
                             float w, float *scratch) {
    AF_CHECK(l_stru && s && qt && abn && scratch, AF_EINVAL, "stru_token_loss: NULL buffer");
    AF_CHECK(B > 0 && L > 0 && K > 0, AF_EINVAL,
             "stru_token_loss: B=%d, L=%d, K=%d must be > 0", B, L, K);
    AF_CHECK(positive_finite(tau_s), AF_EINVAL, "stru_token_loss: tau_s must be > 0, got %g",
             (double)tau_s);
    AF_CHECK(positive_finite(tau), AF_EINVAL, "stru_token_loss: tau must be > 0, got %g",
             (double)tau);
    AF_CHECK(isfinite(w), AF_EINVAL, "stru_token_loss: w must be finite");
    AF_CHECK(af_stru_token_loss_scratch_floats(B, L, K) > 0, AF_ENOMEM,
             "stru_token_loss: B=%d, L=%d, K=%d need too much scratch", B, L, K);
    const size_t NT = (size_t)B * L, BLK = NT * K;
    float *q = scratch, *logq = q + BLK, *logt = logq + BLK, *g = logt + BLK;
    float *F = g + BLK, *tl = F + (size_t)L * B * B;
    AF_CHECK(NT <= (size_t)INT_MAX, AF_EINVAL, "stru_token_loss: B*L=%zu is too large", NT);
    AF_TRY(row_logs(logt, qt, (int)NT, K, "teacher distributions qt"));
    student_probs(q, logq, s, NT, K, tau_s);
    const double inv_tau = 1.0 / tau;
    size_t n_normal = 0;
    for (size_t t = 0; t < NT; t++) n_normal += abn[t] == 0;
    const double c = n_normal ? (double)w / n_normal : 0.0;
#pragma omp parallel for schedule(dynamic)
    for (int j = 0; j < L; j++) {
        float *Fj = F + (size_t)j * B * B;
        for (int i = 0; i < B; i++) {
            const size_t ti = (size_t)i * L + j;
            if (abn[ti]) continue;
            const float *qi = q + ti * K;
            float *Fi = Fj + (size_t)i * B;
            for (int b = 0; b < B; b++)
                Fi[b] = (float)logf_dot(qi, logt + ((size_t)b * L + j) * K, K, inv_tau);
            lse_acc all;
            lse_init(&all);
            for (int b = 0; b < B; b++) lse_add(&all, Fi[b]);
            const double lall = lse_value(&all);
            tl[ti] = (float)(lall - Fi[i]);
            if (ds == NULL) continue;
            /* dL/dq_ij = (1/tau) sum_b (softmax_b(F_i) - [b == i]) log q^T_bj */
            float *gi = g + ti * K;
            for (int k = 0; k < K; k++) gi[k] = 0.0f;
            for (int b = 0; b < B; b++) {
                const double cb = (exp(Fi[b] - lall) - (b == i)) * inv_tau * c;
                const float *lt = logt + ((size_t)b * L + j) * K;
                for (int k = 0; k < K; k++) gi[k] += (float)(cb * lt[k]);
            }
            float *dst = ds + ti * K;
            double qg = 0.0;
            for (int k = 0; k < K; k++) qg += (double)qi[k] * gi[k];
            for (int k = 0; k < K; k++) dst[k] += (float)(qi[k] * (gi[k] - qg) / tau_s);
        }
    }
    double sum = 0.0;
    for (size_t t = 0; t < NT; t++)
        if (!abn[t]) sum += tl[t];
    *l_stru = n_normal ? (float)(sum / n_normal) : 0.0f;
    return AF_OK;
}

/* ---------------------------------------------------------------------------------- */
/* Eq. 20: weighted restoration loss, METHOD §4                                        */

af_status af_recon_loss(float *loss, float *dy, const float *y, const float *x,
                     const uint8_t *abn, int B, int L, int Q, float w_abn, float weight) {
    AF_CHECK(loss && y && x, AF_EINVAL, "recon_loss: NULL buffer");
    AF_CHECK(B > 0 && L > 0 && Q > 0, AF_EINVAL,
             "recon_loss: B=%d, L=%d, Q=%d must be > 0", B, L, Q);
    AF_CHECK(isfinite(w_abn) && w_abn >= 0.0f, AF_EINVAL,
             "recon_loss: w_abn must be finite and >= 0, got %g", (double)w_abn);
    AF_CHECK(isfinite(weight), AF_EINVAL, "recon_loss: weight must be finite");
    const size_t NT = (size_t)B * L;
    const double inv_n = 1.0 / ((double)NT * Q);
    double sum = 0.0;
    for (size_t t = 0; t < NT; t++) {
        const double w = (abn && abn[t]) ? (double)w_abn : 1.0;
        const float *yt = y + t * Q, *xt = x + t * Q;
        double e = 0.0;
        for (int p = 0; p < Q; p++) {
            double d = (double)yt[p] - xt[p];
            e += d * d;
        }
        sum += w * e;
        if (dy) {
            float *dyt = dy + t * Q;
            double c = 2.0 * w * inv_n * weight;
            for (int p = 0; p < Q; p++) dyt[p] += (float)(c * ((double)yt[p] - xt[p]));
        }
    }
    *loss = (float)(sum * inv_n);
    return AF_OK;
}

/* ---------------------------------------------------------------------------------- */
/* Released objective (METHOD §4, "released")                                          */

size_t af_released_loss_scratch_floats(int L, int K) {
    if (L <= 0 || K <= 0) return 0;
    return (size_t)L * (size_t)K;
}

af_status af_released_cst_loss(float *l_cst, float *ds, const float *s, const float *protos,
                               const uint8_t *abn, int B, int L, int K, float tau_s, float eps,
                               int iters, float w_cst, float *scratch) {
    AF_CHECK(l_cst && s && protos && abn && scratch, AF_EINVAL, "released_loss: NULL buffer");
    AF_CHECK(B > 0 && L > 0 && K > 0, AF_EINVAL, "released_loss: B=%d, L=%d, K=%d must be > 0",
             B, L, K);
    AF_CHECK(positive_finite(tau_s), AF_EINVAL, "released_loss: tau_s must be > 0, got %g",
             (double)tau_s);
    AF_CHECK(isfinite(w_cst), AF_EINVAL, "released_loss: w_cst must be finite");
    float *target = scratch;
    AF_TRY(af_sinkhorn_knopp(target, protos, L, K, eps, iters));

    const size_t NT = (size_t)B * L;
    size_t n_normal = 0;
    for (size_t t = 0; t < NT; t++) n_normal += abn[t] == 0;
    const double c = n_normal ? (double)w_cst / n_normal : 0.0;
    double sum = 0.0;
    /* serial over tokens: the loss sum keeps one order; the work is O(B*L*K) */
    for (size_t t = 0; t < NT; t++) {
        if (abn[t]) continue;
        const float *st = s + t * K, *tj = target + (t % L) * K;
        double mx = -INFINITY;
        for (int k = 0; k < K; k++) mx = fmax(mx, (double)st[k] / tau_s);
        double se = 0.0, psum = 0.0, ce = 0.0;
        for (int k = 0; k < K; k++) se += exp((double)st[k] / tau_s - mx);
        const double lse = mx + log(se);
        for (int k = 0; k < K; k++) {
            ce -= tj[k] * ((double)st[k] / tau_s - lse);
            psum += tj[k];
        }
        sum += ce;
        if (ds == NULL) continue;
        /* d/dz of -sum_k target_k log softmax(z)_k = softmax(z) * sum(target) - target */
        float *dst = ds + t * K;
        for (int k = 0; k < K; k++) {
            double qk = exp((double)st[k] / tau_s - lse);
            dst[k] += (float)(c * (qk * psum - tj[k]) / tau_s);
        }
    }
    *l_cst = n_normal ? (float)(sum / n_normal) : 0.0f;
    return AF_OK;
}

af_status af_released_loss(float *l_cst, float *l_recon, float *ds, float *dy, const float *s,
                        const float *protos, const uint8_t *abn, const float *y,
                        const float *x, int B, int L, int K, int Q, float tau_s, float eps,
                        int iters,
                        float w_cst, float w_recon, float *scratch) {
    AF_CHECK(l_cst && l_recon && s && protos && abn && y && x && scratch, AF_EINVAL,
             "released_loss: NULL buffer");
    AF_CHECK(B > 0 && L > 0 && K > 0 && Q > 0, AF_EINVAL,
             "released_loss: B=%d, L=%d, K=%d, Q=%d must be > 0", B, L, K, Q);
    AF_TRY(af_released_cst_loss(l_cst, ds, s, protos, abn, B, L, K, tau_s, eps, iters, w_cst,
                                scratch));
    return af_recon_loss(l_recon, dy, y, x, NULL, B, L, Q, 1.0f, w_recon);
}

/* ---------------------------------------------------------------------------------- */
/* Eq. 51: anomaly score, METHOD §6                                                    */

af_status af_anomaly_score(double *score, double *log_score, double *err, const float *y,
                        const float *x, int B, int L, int Q) {
    AF_CHECK(y && x, AF_EINVAL, "anomaly_score: NULL buffer");
    AF_CHECK(B > 0 && L > 0 && Q > 0, AF_EINVAL,
             "anomaly_score: B=%d, L=%d, Q=%d must be > 0", B, L, Q);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < B; i++) {
        /* err in double: (y - x)^2 of float32 inputs cannot overflow it */
        double *e = err ? err + (size_t)i * L : NULL;
        lse_acc acc;
        lse_init(&acc);
        for (int j = 0; j < L; j++) {
            const float *yj = y + ((size_t)i * L + j) * Q, *xj = x + ((size_t)i * L + j) * Q;
            double ej = 0.0;
            for (int p = 0; p < Q; p++) {
                double d = (double)yj[p] - xj[p];
                ej += d * d;
            }
            if (e) e[j] = ej;
            lse_add(&acc, ej);
        }
        /* log( (1/L) sum_j exp(e_ij) ) = 1/A(x_i) in log form: finite for finite e */
        double ls = lse_value(&acc) - log((double)L);
        if (log_score) log_score[i] = ls;
        if (score) score[i] = exp(ls);
    }
    return AF_OK;
}
