/* What the classifier and the segmenter share: an encoder-only af_model, the AdamW pass
 * over the encoder, and access to the last block's output. */
#include <math.h>

#include "common.h"
#include "downstream.h"
#include "ops/ops.h"

af_status af_downstream_model(af_model **out, const af_config *cfg, int batch) {
    AF_CHECK(out != NULL && cfg != NULL, AF_EINVAL, "downstream model: NULL argument");
    *out = NULL;
    AF_TRY(af_config_validate(cfg));
    AF_CHECK(batch >= 1, AF_EINVAL, "batch must be >= 1, got %d", batch);
    /* the encoder layout depends only on S, P, C, D, depth, H, mlp_ratio, learned_pos;
     * the projection head and decoder are never used here, so they get the smallest
     * valid sizes (a per-position last layer of a real preset alone is ~50 MB) */
    af_config c = *cfg;
    c.K = 1, c.head_hidden = 1, c.head_bottleneck = 1, c.shared_last_layer = 1;
    c.Dd = 4, c.depth_d = 1, c.Hd = 1, c.shared_mask_token = 1;
    af_model *m = NULL;
    AF_TRY(af_model_create(&m, &c));
    af_status st = af_model_reserve(m, batch);
    if (st != AF_OK) {
        af_model_free(m);
        return st;
    }
    *out = m;
    return AF_OK;
}

af_status af_ft_check_step_args(const af_ft_step_args *a) {
    AF_CHECK(a != NULL, AF_EINVAL, "step arguments are NULL");
    AF_CHECK(isfinite(a->lr) && a->lr >= 0.0f, AF_EINVAL, "lr must be finite and >= 0, got %g",
             (double)a->lr);
    AF_CHECK(isfinite(a->weight_decay) && a->weight_decay >= 0.0f, AF_EINVAL,
             "weight_decay must be finite and >= 0, got %g", (double)a->weight_decay);
    AF_CHECK(a->beta1 >= 0.0f && a->beta1 < 1.0f && a->beta2 >= 0.0f && a->beta2 < 1.0f,
             AF_EINVAL, "betas must be in [0, 1)");
    AF_CHECK(a->eps > 0.0f, AF_EINVAL, "eps must be > 0");
    AF_CHECK(a->step >= 0 && a->step < 2147483647, AF_EINVAL, "step must be in [0, 2^31 - 1), got %lld",
             (long long)a->step);
    return AF_OK;
}

void af_ft_encoder_adamw(af_model *m, const af_ft_step_args *a) {
    int t = (int)a->step + 1;
    for (int i = 0; i < m->ntable[AF_NET_ENCODER]; i++) {
        const af_param_info *e = &m->table[AF_NET_ENCODER][i];
        if (!e->trainable) continue; /* fixed sin-cos pos_embed */
        size_t o = e->offset;
        adamw_update(m->params[AF_NET_ENCODER] + o, m->grads[AF_NET_ENCODER] + o,
                     m->adam_m[AF_NET_ENCODER] + o, m->adam_v[AF_NET_ENCODER] + o, e->numel, a->lr,
                     a->beta1, a->beta2, a->eps, e->decay ? a->weight_decay : 0.0f, t);
    }
}

const float *af_ft_last_block(const af_model *m) {
    const af_blocks_acts *a = &m->enc_acts[AF_STUDENT].blocks;
    /* stacked [NL, cap, T, D]: the layer stride is the reserved capacity */
    return a->res3 + (size_t)(m->cfg.depth - 1) * a->cap * m->T * m->cfg.D;
}
