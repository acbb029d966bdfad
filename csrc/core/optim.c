/* AdamW with two weight-decay groups, gradient clipping and the EMA teacher (METHOD.md §5,
 * §3). Everything is a loop over the named tables: one range per tensor, in table order
 * (encoder, head, decoder), so the reductions have a fixed order. */
#include <math.h>

#include "common.h"
#include "model.h"
#include "ops/ops.h"

#define CLIP_EPS 1e-6 /* DINO clip_gradients and torch clip_grad_norm_ */

af_status af_adamw_step(af_model *m, const af_adamw_args *a) {
    AF_CHECK(m != NULL && a != NULL, AF_EINVAL, "adamw_step: NULL argument");
    AF_CHECK(a->t >= 1, AF_EINVAL, "adamw_step: step t must be >= 1, got %d", a->t);
    AF_CHECK(isfinite(a->lr) && a->lr >= 0.0f, AF_EINVAL, "adamw_step: lr must be finite and >= 0");
    AF_CHECK(isfinite(a->weight_decay) && a->weight_decay >= 0.0f, AF_EINVAL,
             "adamw_step: weight_decay must be finite and >= 0");
    AF_CHECK(a->beta1 >= 0.0f && a->beta1 < 1.0f && a->beta2 >= 0.0f && a->beta2 < 1.0f,
             AF_EINVAL, "adamw_step: betas must be in [0, 1)");
    AF_CHECK(a->eps > 0.0f, AF_EINVAL, "adamw_step: eps must be > 0");
    for (int n = 0; n < AF_NET_COUNT; n++)
        for (int i = 0; i < m->ntable[n]; i++) {
            const af_param_info *e = &m->table[n][i];
            if (!e->trainable || (a->freeze_last_layer && e->last_layer)) continue;
            size_t o = e->offset;
            af_adamw_update(m->params[n] + o, m->grads[n] + o, m->adam_m[n] + o, m->adam_v[n] + o,
                         e->numel, a->lr, a->beta1, a->beta2, a->eps,
                         e->decay ? a->weight_decay : 0.0f, a->t);
        }
    return AF_OK;
}

int af_model_num_trainable(const af_model *m) {
    int k = 0;
    for (int n = 0; n < AF_NET_COUNT; n++)
        for (int i = 0; i < m->ntable[n]; i++) k += m->table[n][i].trainable;
    return k;
}

/* Sum of squares in double, in 8 interleaved partial sums combined in a fixed order: one
 * running sum is a chain of dependent adds (1% of a vit_tiny step); eight vectorise. */
static double sumsq(const float *g, size_t n) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        #pragma omp simd
        for (int j = 0; j < 8; j++) acc[j] += (double)g[i + j] * g[i + j];
    double s = 0.0;
    for (; i < n; i++) s += (double)g[i] * g[i];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

static void scale(float *g, size_t n, float f) {
    #pragma omp parallel for simd if (n >= (1u << 16))
    for (size_t i = 0; i < n; i++) g[i] *= f;
}

af_status af_clip_grad_per_tensor(af_model *m, float max_norm, float *norms, double *total) {
    AF_CHECK(m != NULL, AF_EINVAL, "clip_grad: model is NULL");
    AF_CHECK(max_norm > 0.0f && isfinite(max_norm), AF_EINVAL,
             "clip_grad: max_norm must be finite and > 0");
    double tot = 0.0;
    int k = 0;
    for (int n = 0; n < AF_NET_COUNT; n++)
        for (int i = 0; i < m->ntable[n]; i++) {
            const af_param_info *e = &m->table[n][i];
            if (!e->trainable) continue;
            float *g = m->grads[n] + e->offset;
            double ss = sumsq(g, e->numel), nrm = sqrt(ss);
            tot += ss;
            if (norms) norms[k] = (float)nrm;
            k++;
            double coef = max_norm / (nrm + CLIP_EPS);
            if (coef < 1.0) scale(g, e->numel, (float)coef);
        }
    if (total) *total = sqrt(tot);
    return AF_OK;
}

af_status af_clip_grad_global(af_model *m, float max_norm, double *total) {
    AF_CHECK(m != NULL, AF_EINVAL, "clip_grad: model is NULL");
    AF_CHECK(max_norm > 0.0f && isfinite(max_norm), AF_EINVAL,
             "clip_grad: max_norm must be finite and > 0");
    double tot = 0.0;
    for (int n = 0; n < AF_NET_COUNT; n++)
        for (int i = 0; i < m->ntable[n]; i++) {
            const af_param_info *e = &m->table[n][i];
            if (e->trainable) tot += sumsq(m->grads[n] + e->offset, e->numel);
        }
    tot = sqrt(tot);
    double coef = max_norm / (tot + CLIP_EPS);
    if (coef < 1.0)
        for (int n = 0; n < AF_NET_COUNT; n++)
            for (int i = 0; i < m->ntable[n]; i++) {
                const af_param_info *e = &m->table[n][i];
                if (e->trainable) scale(m->grads[n] + e->offset, e->numel, (float)coef);
            }
    if (total) *total = tot;
    return AF_OK;
}

af_status af_ema_update(af_model *m, float momentum) {
    AF_CHECK(m != NULL, AF_EINVAL, "ema_update: model is NULL");
    AF_CHECK(momentum >= 0.0f && momentum <= 1.0f, AF_EINVAL,
             "ema_update: momentum must be in [0, 1], got %g", (double)momentum);
    float keep = momentum, take = 1.0f - momentum;
    /* fixed tensors (sin-cos pos_embed) are equal in both and are left bit-exact */
    for (int n = 0; n < 2; n++)
        for (int i = 0; i < m->ntable[n]; i++) {
            const af_param_info *e = &m->table[n][i];
            if (!e->trainable) continue;
            float *t = m->teacher[n] + e->offset;
            const float *s = m->params[n] + e->offset;
            size_t len = e->numel;
            #pragma omp parallel for simd if (len >= (1u << 16))
            for (size_t k = 0; k < len; k++) t[k] = keep * t[k] + take * s[k];
        }
    return AF_OK;
}
