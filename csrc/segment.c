/* Segmentation (METHOD §6, SIIM-ACR): encoder -> per-token linear head D -> P*P mask
 * logits, unpatchified to S x S; loss = BCE + soft Dice.
 *
 * Why a per-token linear head: each patch token already describes its own P x P patch, so
 * one shared linear map per token (the "per-token head" of METHOD §6, SETR-naive style)
 * reads the mask straight out of the encoder at D*P*P weights, with no upsampling decoder
 * whose capacity would blur what the pre-trained encoder contributes. */
#include <math.h>

#include "common.h"
#include "downstream.h"
#include "ops/ops.h"
#include "rng.h"

#define SEG_SMOOTH 1.0f              /* Dice smoothing: (2 I + 1) / (|p| + |y| + 1)   */
#define SEG_INIT_ITEM (4u << 16)     /* AF_RNG_INIT item of the mask head            */

/* ------------------------------------------------------------------ loss */

af_status af_seg_loss(double *loss, double *bce, double *dice_loss, float *dlogits,
                      const float *logits, const uint8_t *masks, int B, int S2, float smooth) {
    AF_CHECK(loss && logits && masks, AF_EINVAL, "seg_loss: NULL argument");
    AF_CHECK(B >= 1 && S2 >= 1, AF_EINVAL, "seg_loss: bad sizes B=%d pixels=%d", B, S2);
    AF_CHECK(smooth > 0.0f && isfinite(smooth), AF_EINVAL, "smooth must be finite and > 0");
    size_t n = (size_t)B * S2;
    for (size_t i = 0; i < n; i++)
        AF_CHECK(masks[i] <= 1, AF_EINVAL, "masks must be 0/1, got %d at flat index %zu",
                 masks[i], i);
    double bsum = 0.0, dsum = 0.0, inv_n = 1.0 / (double)n, inv_b = 1.0 / B;
    for (int b = 0; b < B; b++) {
        const float *z = logits + (size_t)b * S2;
        const uint8_t *y = masks + (size_t)b * S2;
        double I = 0.0, Ps = 0.0, Ys = 0.0;
        for (int i = 0; i < S2; i++) {
            double zi = z[i], p = zi >= 0 ? 1.0 / (1.0 + exp(-zi)) : exp(zi) / (1.0 + exp(zi));
            bsum += (zi > 0 ? zi : 0) - zi * y[i] + log1p(exp(-fabs(zi)));
            I += p * y[i], Ps += p, Ys += y[i];
        }
        double den = Ps + Ys + smooth, num = 2.0 * I + smooth;
        dsum += num / den;
        if (dlogits == NULL) continue;
        /* d(1 - mean_b num/den)/dp_i = -(1/B) (2 y_i den - num) / den^2; dp/dz = p (1-p) */
        float *g = dlogits + (size_t)b * S2;
        for (int i = 0; i < S2; i++) {
            double zi = z[i], p = zi >= 0 ? 1.0 / (1.0 + exp(-zi)) : exp(zi) / (1.0 + exp(zi));
            double dd = -inv_b * (2.0 * y[i] * den - num) / (den * den);
            g[i] = (float)((p - y[i]) * inv_n + dd * p * (1.0 - p));
        }
    }
    double lb = bsum * inv_n, ld = 1.0 - dsum * inv_b;
    if (bce) *bce = lb;
    if (dice_loss) *dice_loss = ld;
    *loss = lb + ld;
    return isfinite(*loss) ? AF_OK : af_error(AF_ENONFINITE, "segmentation loss is not finite");
}

/* ------------------------------------------------------------------ the segmenter */

void af_segmenter_free(af_segmenter *s) {
    if (s == NULL) return;
    af_model_free(s->model);
    af_free(s->head);
    af_free(s->head_grad);
    af_free(s->head_m);
    af_free(s->head_v);
    af_free(s->aug_img);
    af_free(s->aug_mask);
    af_free(s->img);
    af_free(s->tok);
    af_free(s->plogits);
    af_free(s->dplogits);
    af_free(s->logits);
    af_free(s->dlogits);
    af_free(s->dtok);
    af_free(s->dtokens);
    af_free(s);
}

af_status af_segmenter_acquire(af_segmenter *s) {
    if (__atomic_exchange_n(&s->busy, 1, __ATOMIC_ACQUIRE))
        return af_error(AF_EBUSY, "this Segmenter is being used by another thread");
    return AF_OK;
}

void af_segmenter_release(af_segmenter *s) { __atomic_store_n(&s->busy, 0, __ATOMIC_RELEASE); }

af_status af_segmenter_create(af_segmenter **out, const af_config *cfg, int batch, uint64_t seed,
                              int freeze_encoder) {
    AF_CHECK(out != NULL && cfg != NULL, AF_EINVAL, "segmenter: NULL argument");
    *out = NULL;
    AF_CHECK(batch >= 1, AF_EINVAL, "batch must be >= 1, got %d", batch);
    af_segmenter *s = af_calloc(1, sizeof *s);
    if (s == NULL) return AF_ENOMEM;
    af_config ec = *cfg;
    ec.seed = seed;
    af_status st = af_downstream_model(&s->model, &ec, batch);
    if (st != AF_OK) {
        af_segmenter_free(s);
        return st;
    }
    s->B = batch, s->S = cfg->S, s->C = cfg->C, s->P = cfg->P, s->G = cfg->S / cfg->P;
    s->L = s->G * s->G, s->T = s->L + 1, s->D = cfg->D, s->PP = cfg->P * cfg->P;
    s->freeze_encoder = freeze_encoder != 0;
    s->seed = seed;
    s->smooth = SEG_SMOOTH;
    s->aug = af_augment_default();
    size_t B = (size_t)batch, D = (size_t)s->D, SS = (size_t)s->S * s->S, BL = B * s->L;
    size_t PP = (size_t)s->PP;
    s->head_numel = PP * D + PP;
    s->head = af_calloc(s->head_numel, sizeof(float));
    s->head_grad = af_calloc(s->head_numel, sizeof(float));
    s->head_m = af_calloc(s->head_numel, sizeof(float));
    s->head_v = af_calloc(s->head_numel, sizeof(float));
    s->aug_img = af_calloc(B * SS, 1);
    s->aug_mask = af_calloc(B * SS, 1);
    s->img = af_calloc(B * s->C * SS, sizeof(float));
    s->tok = af_calloc(BL * D, sizeof(float));
    s->plogits = af_calloc(BL * PP, sizeof(float));
    s->dplogits = af_calloc(BL * PP, sizeof(float));
    s->logits = af_calloc(B * SS, sizeof(float));
    s->dlogits = af_calloc(B * SS, sizeof(float));
    s->dtok = af_calloc(BL * D, sizeof(float));
    s->dtokens = af_calloc(B * s->T * D, sizeof(float));
    if (!s->head || !s->head_grad || !s->head_m || !s->head_v || !s->aug_img || !s->aug_mask ||
        !s->img || !s->tok || !s->plogits || !s->dplogits || !s->logits || !s->dlogits ||
        !s->dtok || !s->dtokens) {
        af_segmenter_free(s);
        return AF_ENOMEM;
    }
    s->w = s->head, s->b = s->head + PP * D;
    /* nn.Linear-style xavier uniform on the [PP, D] weight, zero bias */
    float a = (float)sqrt(6.0 / (double)(PP + D));
    uint64_t stream = af_stream(AF_RNG_INIT, 0, SEG_INIT_ITEM);
    for (size_t k = 0; k < PP * D; k++)
        s->w[k] = (2.0f * af_rand_uniform(seed, stream, k) - 1.0f) * a;
    *out = s;
    return AF_OK;
}

/* s->img -> s->logits[B,S,S] (mask logits). */
static af_status segmenter_forward(af_segmenter *s, int B) {
    af_model *m = s->model;
    AF_TRY(af_encoder_forward(m, AF_STUDENT, s->img, B));
    const float *tokens = m->enc_acts[AF_STUDENT].out;
    size_t D = (size_t)s->D, L = (size_t)s->L, T = (size_t)s->T;
    for (int b = 0; b < B; b++) /* patch tokens only; cls has no patch */
        memcpy(s->tok + b * L * D, tokens + (b * T + 1) * D, L * D * sizeof(float));
    linear_forward(s->plogits, s->tok, s->w, s->b, B * s->L, s->D, s->PP);
    /* token j predicts the P x P pixels of patch j (MAE order == (p, q) for one channel) */
    unpatchify(s->logits, s->plogits, B, 1, s->S, s->P, AF_PATCH_PQC);
    return AF_OK;
}

static af_status check_batch(const af_segmenter *s, int B) {
    AF_CHECK(B >= 1 && B <= s->B, AF_EINVAL, "batch of %d images: must be between 1 and the "
             "batch capacity %d", B, s->B);
    return AF_OK;
}

af_status af_segmenter_grads(af_segmenter *s, double *loss, double *bce, double *dice_loss,
                             const uint8_t *images, const uint8_t *masks, int B, int augment,
                             int64_t step) {
    AF_CHECK(s && loss && images && masks, AF_EINVAL, "segmenter: NULL argument");
    AF_TRY(check_batch(s, B));
    AF_CHECK(step >= 0, AF_EINVAL, "step must be >= 0");
    const uint8_t *src = images, *msk = masks;
    if (augment) {
        AF_TRY(af_augment(s->aug_img, s->aug_mask, images, masks, B, s->S, s->seed, step, &s->aug));
        src = s->aug_img, msk = s->aug_mask;
    }
    AF_TRY(af_normalize_images(s->img, src, B, s->C, s->S));
    AF_TRY(segmenter_forward(s, B));
    int S2 = s->S * s->S;
    AF_TRY(af_seg_loss(loss, bce, dice_loss, s->dlogits, s->logits, msk, B, S2, s->smooth));
    /* unpatchify is a permutation: its adjoint is patchify */
    patchify_forward(s->dplogits, s->dlogits, B, 1, s->S, s->P, AF_PATCH_PQC);
    memset(s->head_grad, 0, s->head_numel * sizeof(float));
    float *gw = s->head_grad, *gb = s->head_grad + (size_t)s->PP * s->D;
    size_t D = (size_t)s->D, L = (size_t)s->L, T = (size_t)s->T;
    if (s->freeze_encoder) {
        linear_backward(NULL, gw, gb, s->dplogits, s->tok, s->w, B * s->L, s->D, s->PP);
        return AF_OK;
    }
    memset(s->dtok, 0, (size_t)B * L * D * sizeof(float));
    linear_backward(s->dtok, gw, gb, s->dplogits, s->tok, s->w, B * s->L, s->D, s->PP);
    for (int b = 0; b < B; b++) {
        float *dt = s->dtokens + (size_t)b * T * D;
        memset(dt, 0, D * sizeof(float)); /* cls row */
        memcpy(dt + D, s->dtok + (size_t)b * L * D, L * D * sizeof(float));
    }
    af_model *m = s->model;
    memset(m->grads[AF_NET_ENCODER], 0, m->numel[AF_NET_ENCODER] * sizeof(float));
    return af_encoder_backward(m, s->dtokens);
}

af_status af_segmenter_step(af_segmenter *s, double *loss, double *bce, double *dice_loss,
                            const uint8_t *images, const uint8_t *masks, int B, int augment,
                            const af_ft_step_args *a) {
    AF_TRY(af_ft_check_step_args(a));
    AF_TRY(af_segmenter_grads(s, loss, bce, dice_loss, images, masks, B, augment, a->step));
    int t = (int)a->step + 1;
    size_t nw = (size_t)s->PP * s->D;
    adamw_update(s->w, s->head_grad, s->head_m, s->head_v, nw, a->lr, a->beta1, a->beta2, a->eps,
                 a->weight_decay, t);
    adamw_update(s->b, s->head_grad + nw, s->head_m + nw, s->head_v + nw, (size_t)s->PP, a->lr,
                 a->beta1, a->beta2, a->eps, 0.0f, t);
    if (!s->freeze_encoder) af_ft_encoder_adamw(s->model, a);
    return AF_OK;
}

af_status af_segmenter_predict(af_segmenter *s, float *prob, const uint8_t *images, int N) {
    AF_CHECK(s && prob && images, AF_EINVAL, "segmenter predict: NULL argument");
    AF_CHECK(N >= 0, AF_EINVAL, "segmenter predict: N must be >= 0");
    size_t SS = (size_t)s->S * s->S;
    for (int i = 0; i < N; i += s->B) {
        int B = N - i < s->B ? N - i : s->B;
        AF_TRY(af_normalize_images(s->img, images + (size_t)i * SS, B, s->C, s->S));
        AF_TRY(segmenter_forward(s, B));
        float *o = prob + (size_t)i * SS;
        for (size_t k = 0; k < (size_t)B * SS; k++) {
            float z = s->logits[k];
            o[k] = z >= 0 ? 1.0f / (1.0f + expf(-z)) : expf(z) / (1.0f + expf(z));
        }
    }
    return AF_OK;
}
