/* Projection head (METHOD.md §2): per patch token (cls excluded)
 *   z = fc3(gelu(fc2(gelu(fc1(x)))));  zn = z / max(||z||, 1e-12);
 *   logits_j = zn @ (v_j / ||v_j||)^T   (weight norm, gain fixed at 1: cosine similarities)
 * with one last layer per position j (released code, default) or one shared.
 * N = B*L rows; the last layer runs position-major ([L, B, .]) so each position's B rows
 * are one contiguous matrix. */
#include "common.h"
#include "model.h"
#include "ops/ops.h"

#define L2_EPS 1e-12f /* F.normalize */

#ifdef _OPENMP
#include <omp.h>
#endif

/* Whether L per-position layers (B rows, kb = K x Bn weights each) are worth a fork. */
static int par_positions(int L, int B, size_t kb) {
    return (double)L * (B + 1) * (double)kb >= (double)(1 << 21);
}

/* dst[L,B,IC] <- src[B,L,IC] (and the inverse with swapped sizes). */
static void transpose_bl(float *dst, const float *src, int B, int L, int IC) {
    for (int b = 0; b < B; b++)
        for (int j = 0; j < L; j++)
            memcpy(dst + ((size_t)j * B + b) * IC, src + ((size_t)b * L + j) * IC,
                   (size_t)IC * sizeof(float));
}

af_status af_head_forward(af_model *m, af_branch br, const float *tokens, int B) {
    AF_CHECK(m != NULL && tokens != NULL, AF_EINVAL, "head_forward: NULL argument");
    AF_CHECK(br == AF_STUDENT || br == AF_TEACHER, AF_EINVAL, "head_forward: bad branch %d", br);
    AF_CHECK((int)br < m->branches, AF_EINVAL, "head_forward: this model has no teacher activations");
    AF_CHECK(!m->inference, AF_EINVAL, "head_forward: this model was made for inference (no head)");
    AF_CHECK(B >= 1 && B <= m->capacity, AF_EINVAL, "head_forward: batch %d not in [1, %d]", B,
             m->capacity);
    const af_config *c = &m->cfg;
    const af_head_params *p = &m->head[br];
    af_head_acts *a = &m->head_acts[br];
    int L = m->L, T = m->T, D = c->D, Hh = c->head_hidden, Bn = c->head_bottleneck, K = c->K;
    int N = B * L;
    for (int b = 0; b < B; b++)
        memcpy(a->x + (size_t)b * L * D, tokens + ((size_t)b * T + 1) * D,
               (size_t)L * D * sizeof(float));
    af_model_linear_forward(m, a->h1, a->x, p->fc1_w, p->fc1_b, N, D, Hh);
    af_gelu_forward(a->g1, a->h1, (size_t)N * Hh);
    af_model_linear_forward(m, a->h2, a->g1, p->fc2_w, p->fc2_b, N, Hh, Hh);
    af_gelu_forward(a->g2, a->h2, (size_t)N * Hh);
    af_model_linear_forward(m, a->z, a->g2, p->fc3_w, p->fc3_b, N, Hh, Bn);
    float *zn = m->scratch.dh_a; /* [B*L, Bn] temporary, kept position-major in zn_t */
    af_l2norm_forward(zn, a->znorm, a->z, N, Bn, L2_EPS);
    transpose_bl(a->zn_t, zn, B, L, Bn);
    if (c->shared_last_layer) {
        af_wn_linear_forward(a->logits_t, a->w_eff, a->vnorm, a->zn_t, p->last_v, N, Bn, K);
    } else {
        /* one position per thread: each is small (B x Bn x K), and its ops then run inside
         * this region on one thread instead of forking twice per position */
        size_t kb = (size_t)K * Bn;
        #pragma omp parallel for schedule(dynamic) if (par_positions(L, B, kb))
        for (int j = 0; j < L; j++)
            af_wn_linear_forward(a->logits_t + (size_t)j * B * K, a->w_eff + j * kb,
                                 a->vnorm + (size_t)j * K, a->zn_t + (size_t)j * B * Bn,
                                 p->last_v + j * kb, B, Bn, K);
    }
    transpose_bl(a->logits, a->logits_t, L, B, K);
    m->head_B[br] = B;
    return AF_OK;
}

af_status af_head_backward(af_model *m, const float *dlogits, float *dtokens) {
    AF_CHECK(m != NULL && dlogits != NULL, AF_EINVAL, "head_backward: NULL argument");
    AF_CHECK(!m->inference, AF_EINVAL, "head_backward: this model was made for inference");
    int B = m->head_B[AF_STUDENT];
    AF_CHECK(B > 0, AF_EINVAL, "head_backward: no student head forward to differentiate");
    const af_config *c = &m->cfg;
    const af_head_params *p = &m->head[AF_STUDENT];
    af_head_params *g = &m->head_grad;
    const af_head_acts *a = &m->head_acts[AF_STUDENT];
    af_scratch *s = &m->scratch;
    int L = m->L, T = m->T, D = c->D, Hh = c->head_hidden, Bn = c->head_bottleneck, K = c->K;
    int N = B * L;
    float *ga = s->dh_a, *gb = s->dh_b;
    /* last layer(s), position-major */
    transpose_bl(gb, dlogits, B, L, K); /* dlogits_t [L,B,K] */
    if (c->shared_last_layer) {
        af_wn_linear_backward(s->dz_t, g->last_v, gb, a->zn_t, a->w_eff, a->vnorm, N, Bn, K);
    } else {
        /* one position per thread, with that thread's K x Bn temporary (positions own
         * disjoint slices of every array: the result does not depend on the thread count) */
        size_t kb = (size_t)K * Bn;
        int nt = 1;
#ifdef _OPENMP
        if (par_positions(L, B, kb)) nt = omp_get_max_threads();
#endif
        if (s->wn_ws != NULL && nt > s->wn_slots) nt = s->wn_slots;
        #pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1)
        for (int j = 0; j < L; j++) {
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            af_wn_linear_backward_ws(s->dz_t + (size_t)j * B * Bn, g->last_v + j * kb,
                                     gb + (size_t)j * B * K, a->zn_t + (size_t)j * B * Bn,
                                     a->w_eff + j * kb, a->vnorm + (size_t)j * K, B, Bn, K,
                                     s->wn_ws ? s->wn_ws + (size_t)tid * kb : NULL);
        }
    }
    transpose_bl(ga, s->dz_t, L, B, Bn); /* dzn [B*L, Bn] */
    af_l2norm_backward(gb, ga, a->z, a->znorm, N, Bn, L2_EPS); /* dz */
    af_model_linear_backward(m, ga, g->fc3_w, g->fc3_b, gb, a->g2, p->fc3_w, N, Hh, Bn); /* dg2 */
    af_gelu_backward(gb, ga, a->h2, (size_t)N * Hh); /* dh2 */
    af_model_linear_backward(m, ga, g->fc2_w, g->fc2_b, gb, a->g1, p->fc2_w, N, Hh, Hh); /* dg1 */
    af_gelu_backward(gb, ga, a->h1, (size_t)N * Hh); /* dh1 */
    if (dtokens == NULL) {
        af_model_linear_backward(m, NULL, g->fc1_w, g->fc1_b, gb, a->x, p->fc1_w, N, D, Hh);
        return AF_OK;
    }
    af_model_linear_backward(m, ga, g->fc1_w, g->fc1_b, gb, a->x, p->fc1_w, N, D, Hh); /* dx */
    /* the encoder tokens also feed the decoder: its gradient is already there */
    for (int b = 0; b < B; b++) {
        float *dt = dtokens + ((size_t)b * T + 1) * D;
        const float *dx = ga + (size_t)b * L * D;
        for (size_t i = 0; i < (size_t)L * D; i++) dt[i] += dx[i];
    }
    return AF_OK;
}
