/* What the classifier and the segmenter share (af_ft_net): an encoder-only af_model, the
 * flat head buffers, input loading and augmentation, the encoder backward, AdamW, and
 * access to the last block's output. */
#include <math.h>
#include <string.h>

#include "blocks.h"
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
    m->branches = 1;     /* the teacher never runs here: no activations for it */
    af_status st = af_model_reserve(m, batch);
    if (st != AF_OK) {
        af_model_free(m);
        return st;
    }
    *out = m;
    return AF_OK;
}

af_status af_ft_net_init(af_ft_net *n, const char *what, const af_config *cfg, int batch,
                         uint64_t seed, int freeze_encoder, size_t head_numel, int with_mask) {
    n->what = what;
    af_config ec = *cfg;
    ec.seed = seed;
    AF_TRY(af_downstream_model(&n->model, &ec, batch));
    n->B = batch, n->S = cfg->S, n->C = cfg->C, n->P = cfg->P, n->G = cfg->S / cfg->P;
    n->L = n->G * n->G, n->T = n->L + 1, n->D = cfg->D;
    n->freeze_encoder = freeze_encoder != 0;
    n->seed = seed;
    n->aug = af_augment_default();
    size_t B = (size_t)batch, SS = (size_t)n->S * n->S;
    n->head_numel = head_numel;
    n->head = af_calloc(head_numel, sizeof(float));
    n->head_grad = af_calloc(head_numel, sizeof(float));
    n->head_m = af_calloc(head_numel, sizeof(float));
    n->head_v = af_calloc(head_numel, sizeof(float));
    n->aug_img = af_calloc(B * SS, 1);
    if (with_mask) n->aug_mask = af_calloc(B * SS, 1);
    n->img = af_calloc(B * n->C * SS, sizeof(float));
    n->dtokens = af_calloc(B * n->T * n->D, sizeof(float));
    if (!n->head || !n->head_grad || !n->head_m || !n->head_v || !n->aug_img ||
        (with_mask && !n->aug_mask) || !n->img || !n->dtokens)
        return AF_ENOMEM;
    return AF_OK;
}

void af_ft_net_free(af_ft_net *n) {
    af_model_free(n->model);
    af_free(n->head);
    af_free(n->head_grad);
    af_free(n->head_m);
    af_free(n->head_v);
    af_free(n->aug_img);
    af_free(n->aug_mask);
    af_free(n->img);
    af_free(n->dtokens);
}

af_status af_ft_acquire(af_ft_net *n) {
    if (__atomic_exchange_n(&n->busy, 1, __ATOMIC_ACQUIRE))
        return af_error(AF_EBUSY, "this %s is being used by another thread", n->what);
    return AF_OK;
}

void af_ft_release(af_ft_net *n) { __atomic_store_n(&n->busy, 0, __ATOMIC_RELEASE); }

af_status af_ft_check_batch(const af_ft_net *n, int B) {
    AF_CHECK(B >= 1 && B <= n->B, AF_EINVAL, "batch of %d images: must be between 1 and the "
             "batch capacity %d", B, n->B);
    return AF_OK;
}

af_status af_ft_load(af_ft_net *n, const uint8_t **used_masks, const uint8_t *images,
                     const uint8_t *masks, int B, int augment, int64_t step) {
    const uint8_t *src = images;
    if (augment) {
        AF_TRY(af_augment(n->aug_img, masks ? n->aug_mask : NULL, images, masks, B, n->S, n->seed,
                          step, &n->aug));
        src = n->aug_img, masks = masks ? n->aug_mask : NULL;
    }
    if (used_masks) *used_masks = masks;
    return af_normalize_images(n->img, src, B, n->C, n->S);
}

af_status af_ft_load_chunk(af_ft_net *n, int *B, const uint8_t *images, int N, int first) {
    *B = N - first < n->B ? N - first : n->B;
    return af_normalize_images(n->img, images + (size_t)first * n->S * n->S, *B, n->C, n->S);
}

af_status af_ft_encoder_backward(af_ft_net *n) {
    if (n->freeze_encoder) return AF_OK;
    af_model *m = n->model;
    memset(m->grads[AF_NET_ENCODER], 0, m->numel[AF_NET_ENCODER] * sizeof(float));
    return af_encoder_backward(m, n->dtokens);
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

void af_ft_adamw(af_ft_net *n, const af_ft_step_args *a, int nseg, const size_t *numel,
                 const int *decay) {
    int t = (int)a->step + 1;
    size_t o = 0;
    for (int i = 0; i < nseg; o += numel[i], i++)
        af_adamw_update(n->head + o, n->head_grad + o, n->head_m + o, n->head_v + o, numel[i], a->lr,
                     a->beta1, a->beta2, a->eps, decay[i] ? a->weight_decay : 0.0f, t);
    if (n->freeze_encoder) return;
    af_model *m = n->model;
    for (int i = 0; i < m->ntable[AF_NET_ENCODER]; i++) {
        const af_param_info *e = &m->table[AF_NET_ENCODER][i];
        if (!e->trainable) continue; /* fixed sin-cos pos_embed */
        o = e->offset;
        af_adamw_update(m->params[AF_NET_ENCODER] + o, m->grads[AF_NET_ENCODER] + o,
                     m->adam_m[AF_NET_ENCODER] + o, m->adam_v[AF_NET_ENCODER] + o, e->numel, a->lr,
                     a->beta1, a->beta2, a->eps, e->decay ? a->weight_decay : 0.0f, t);
    }
}

const float *af_ft_last_block(const af_model *m) {
    const af_config *c = &m->cfg;
    return af_blocks_output(&m->enc_acts[AF_STUDENT].blocks, c->depth, m->T, c->D, c->mlp_ratio,
                            c->H);
}
