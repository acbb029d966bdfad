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
    af_ft_net_free(&s->net);
    af_free(s->tok);
    af_free(s->plogits);
    af_free(s->dplogits);
    af_free(s->logits);
    af_free(s->dlogits);
    af_free(s->dtok);
    af_free(s);
}

af_status af_segmenter_create(af_segmenter **out, const af_config *cfg, int batch, uint64_t seed,
                              int freeze_encoder) {
    AF_CHECK(out != NULL && cfg != NULL, AF_EINVAL, "segmenter: NULL argument");
    *out = NULL;
    AF_CHECK(batch >= 1, AF_EINVAL, "batch must be >= 1, got %d", batch);
    af_segmenter *s = af_calloc(1, sizeof *s);
    if (s == NULL) return AF_ENOMEM;
    size_t D = (size_t)cfg->D, PP = (size_t)cfg->P * cfg->P;
    af_status st = af_ft_net_init(&s->net, "Segmenter", cfg, batch, seed, freeze_encoder,
                                  PP * D + PP, 1);
    if (st != AF_OK) {
        af_segmenter_free(s);
        return st;
    }
    s->PP = (int)PP;
    s->smooth = SEG_SMOOTH;
    size_t B = (size_t)batch, SS = (size_t)s->net.S * s->net.S, BL = B * s->net.L;
    s->tok = af_calloc(BL * D, sizeof(float));
    s->plogits = af_calloc(BL * PP, sizeof(float));
    s->dplogits = af_calloc(BL * PP, sizeof(float));
    s->logits = af_calloc(B * SS, sizeof(float));
    s->dlogits = af_calloc(B * SS, sizeof(float));
    s->dtok = af_calloc(BL * D, sizeof(float));
    if (!s->tok || !s->plogits || !s->dplogits || !s->logits || !s->dlogits || !s->dtok) {
        af_segmenter_free(s);
        return AF_ENOMEM;
    }
    s->w = s->net.head, s->b = s->net.head + PP * D;
    /* nn.Linear-style xavier uniform on the [PP, D] weight, zero bias */
    float a = (float)sqrt(6.0 / (double)(PP + D));
    uint64_t stream = af_stream(AF_RNG_INIT, 0, SEG_INIT_ITEM);
    for (size_t k = 0; k < PP * D; k++)
        s->w[k] = (2.0f * af_rand_uniform(seed, stream, k) - 1.0f) * a;
    *out = s;
    return AF_OK;
}

/* s->net.img -> s->logits[B,S,S] (mask logits). */
static af_status segmenter_forward(af_segmenter *s, int B) {
    af_model *m = s->net.model;
    AF_TRY(af_encoder_forward(m, AF_STUDENT, s->net.img, B));
    const float *tokens = m->enc_acts[AF_STUDENT].out;
    size_t D = (size_t)s->net.D, L = (size_t)s->net.L, T = (size_t)s->net.T;
    for (int b = 0; b < B; b++) /* patch tokens only; cls has no patch */
        memcpy(s->tok + b * L * D, tokens + (b * T + 1) * D, L * D * sizeof(float));
    af_linear_forward(s->plogits, s->tok, s->w, s->b, B * s->net.L, s->net.D, s->PP);
    /* token j predicts the P x P pixels of patch j (MAE order == (p, q) for one channel) */
    af_unpatchify(s->logits, s->plogits, B, 1, s->net.S, s->net.P, AF_PATCH_PQC);
    return AF_OK;
}

af_status af_segmenter_grads(af_segmenter *s, double *loss, double *bce, double *dice_loss,
                             const uint8_t *images, const uint8_t *masks, int B, int augment,
                             int64_t step) {
    AF_CHECK(s && loss && images && masks, AF_EINVAL, "segmenter: NULL argument");
    AF_TRY(af_ft_check_batch(&s->net, B));
    AF_CHECK(step >= 0, AF_EINVAL, "step must be >= 0");
    const uint8_t *msk;
    AF_TRY(af_ft_load(&s->net, &msk, images, masks, B, augment, step));
    AF_TRY(segmenter_forward(s, B));
    int S2 = s->net.S * s->net.S;
    AF_TRY(af_seg_loss(loss, bce, dice_loss, s->dlogits, s->logits, msk, B, S2, s->smooth));
    /* af_unpatchify is a permutation: its adjoint is patchify */
    af_patchify_forward(s->dplogits, s->dlogits, B, 1, s->net.S, s->net.P, AF_PATCH_PQC);
    memset(s->net.head_grad, 0, s->net.head_numel * sizeof(float));
    float *gw = s->net.head_grad, *gb = s->net.head_grad + (size_t)s->PP * s->net.D;
    size_t D = (size_t)s->net.D, L = (size_t)s->net.L, T = (size_t)s->net.T;
    if (s->net.freeze_encoder) {
        af_linear_backward(NULL, gw, gb, s->dplogits, s->tok, s->w, B * s->net.L, s->net.D, s->PP);
        return AF_OK;
    }
    af_linear_backward(s->dtok, gw, gb, s->dplogits, s->tok, s->w, B * s->net.L, s->net.D, s->PP);
    for (int b = 0; b < B; b++) {
        float *dt = s->net.dtokens + (size_t)b * T * D;
        memset(dt, 0, D * sizeof(float)); /* cls row */
        memcpy(dt + D, s->dtok + (size_t)b * L * D, L * D * sizeof(float));
    }
    return af_ft_encoder_backward(&s->net);
}

af_status af_segmenter_step(af_segmenter *s, double *loss, double *bce, double *dice_loss,
                            const uint8_t *images, const uint8_t *masks, int B, int augment,
                            const af_ft_step_args *a) {
    AF_TRY(af_ft_check_step_args(a));
    AF_TRY(af_segmenter_grads(s, loss, bce, dice_loss, images, masks, B, augment, a->step));
    /* head layout: weight [PP, D] (decayed), bias [PP] */
    const size_t numel[2] = {(size_t)s->PP * s->net.D, (size_t)s->PP};
    const int decay[2] = {1, 0};
    af_ft_adamw(&s->net, a, 2, numel, decay);
    return AF_OK;
}

af_status af_segmenter_predict(af_segmenter *s, float *prob, const uint8_t *images, int N) {
    AF_CHECK(s && prob && images, AF_EINVAL, "segmenter predict: NULL argument");
    AF_CHECK(N >= 0, AF_EINVAL, "segmenter predict: N must be >= 0");
    size_t SS = (size_t)s->net.S * s->net.S;
    for (int i = 0, B; i < N; i += B) {
        AF_TRY(af_ft_load_chunk(&s->net, &B, images, N, i));
        AF_TRY(segmenter_forward(s, B));
        float *o = prob + (size_t)i * SS;
        for (size_t k = 0; k < (size_t)B * SS; k++) {
            float z = s->logits[k];
            o[k] = z >= 0 ? 1.0f / (1.0f + expf(-z)) : expf(z) / (1.0f + expf(z));
        }
    }
    return AF_OK;
}
