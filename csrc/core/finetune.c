/* Fine-tuning classifier (METHOD §6): encoder -> global average pool over the PATCH tokens
 * (cls excluded) -> LayerNorm -> Linear(D -> NC), BCE-with-logits over valid targets;
 * AdamW over encoder + head; Grad-CAM on the last block's output tokens (paper Fig. 7). */
#include <math.h>

#include "common.h"
#include "downstream.h"
#include "ops/ops.h"
#include "rng.h"

#define HEAD_EPS 1e-6f       /* timm's fc_norm LayerNorm eps                             */
#define HEAD_INIT_STD 0.02f  /* timm trunc_normal_(std=.02) on the classifier weight      */
#define HEAD_INIT_ITEM (3u << 16) /* AF_RNG_INIT item: networks 0-2 are pre-training's    */

void af_classifier_free(af_classifier *c) {
    if (c == NULL) return;
    af_ft_net_free(&c->net);
    af_free(c->pooled);
    af_free(c->normed);
    af_free(c->ln_mean);
    af_free(c->ln_rstd);
    af_free(c->logits);
    af_free(c->dlogits);
    af_free(c->dnormed);
    af_free(c->dpooled);
    af_free(c->dlast);
    af_free(c);
}

/* head layout: norm_w [D], norm_b [D], fc_w [NC,D], fc_b [NC] */
typedef struct {
    float *norm_w, *norm_b, *fc_w, *fc_b;
} head_view;

static head_view carve_head(float *base, int D, int NC) {
    head_view h = {base, base + D, base + 2 * (size_t)D, base + 2 * (size_t)D + (size_t)NC * D};
    return h;
}

af_status af_classifier_create(af_classifier **out, const af_config *cfg, int NC, int batch,
                               uint64_t seed, int freeze_encoder) {
    AF_CHECK(out != NULL && cfg != NULL, AF_EINVAL, "classifier: NULL argument");
    *out = NULL;
    AF_CHECK(NC >= 1 && NC <= 65536, AF_EINVAL, "num_classes must be in [1, 65536], got %d", NC);
    AF_CHECK(batch >= 1, AF_EINVAL, "batch must be >= 1, got %d", batch);
    af_classifier *c = af_calloc(1, sizeof *c);
    if (c == NULL) return AF_ENOMEM;
    size_t B = (size_t)batch, D = (size_t)cfg->D;
    af_status st = af_ft_net_init(&c->net, "Classifier", cfg, batch, seed, freeze_encoder,
                                  2 * D + (size_t)NC * D + (size_t)NC, 0);
    if (st != AF_OK) {
        af_classifier_free(c);
        return st;
    }
    c->NC = NC;
    size_t T = (size_t)c->net.T;
    c->pooled = af_calloc(B * D, sizeof(float));
    c->normed = af_calloc(B * D, sizeof(float));
    c->ln_mean = af_calloc(B, sizeof(float));
    c->ln_rstd = af_calloc(B, sizeof(float));
    c->logits = af_calloc(B * NC, sizeof(float));
    c->dlogits = af_calloc(B * NC, sizeof(float));
    c->dnormed = af_calloc(B * D, sizeof(float));
    c->dpooled = af_calloc(B * D, sizeof(float));
    c->dlast = af_calloc(B * T * D, sizeof(float));
    if (!c->pooled || !c->normed || !c->ln_mean || !c->ln_rstd || !c->logits || !c->dlogits ||
        !c->dnormed || !c->dpooled || !c->dlast) {
        af_classifier_free(c);
        return AF_ENOMEM;
    }
    head_view h = carve_head(c->net.head, (int)D, NC);
    c->norm_w = h.norm_w, c->norm_b = h.norm_b, c->fc_w = h.fc_w, c->fc_b = h.fc_b;
    for (size_t d = 0; d < D; d++) c->norm_w[d] = 1.0f;
    uint64_t stream = af_stream(AF_RNG_INIT, 0, HEAD_INIT_ITEM);
    for (size_t k = 0; k < (size_t)NC * D; k++)
        c->fc_w[k] = HEAD_INIT_STD * af_rand_normal(seed, stream, k);
    *out = c;
    return AF_OK;
}

/* ------------------------------------------------------------------ forward / backward */

/* c->net.img[B,C,S,S] -> c->logits[B,NC] (encoder activations saved for the backward). */
static af_status classifier_forward(af_classifier *c, int B) {
    af_model *m = c->net.model;
    AF_TRY(af_encoder_forward(m, AF_STUDENT, c->net.img, B));
    const float *tok = m->enc_acts[AF_STUDENT].out;
    int T = c->net.T, L = c->net.L, D = c->net.D;
    float inv = 1.0f / (float)L;
    for (int b = 0; b < B; b++) {
        float *p = c->pooled + (size_t)b * D;
        memset(p, 0, (size_t)D * sizeof(float));
        for (int j = 1; j <= L; j++) { /* row 0 is cls: not pooled */
            const float *x = tok + ((size_t)b * T + j) * D;
            for (int d = 0; d < D; d++) p[d] += x[d];
        }
        for (int d = 0; d < D; d++) p[d] *= inv;
    }
    af_layernorm_forward(c->normed, c->ln_mean, c->ln_rstd, c->pooled, c->norm_w, c->norm_b, B, D,
                      HEAD_EPS);
    af_linear_forward(c->logits, c->normed, c->fc_w, c->fc_b, B, D, c->NC);
    return AF_OK;
}

/* c->dlogits -> c->net.dtokens[B,T,D] (overwritten; cls row 0); head grads (+=) when `hg`. */
static void classifier_head_backward(af_classifier *c, float *hg, int B) {
    int D = c->net.D, T = c->net.T, L = c->net.L, NC = c->NC;
    head_view g = {NULL, NULL, NULL, NULL};
    if (hg) g = carve_head(hg, D, NC);
    af_linear_backward(c->dnormed, g.fc_w, g.fc_b, c->dlogits, c->normed, c->fc_w, B, D, NC);
    af_layernorm_backward(c->dpooled, g.norm_w, g.norm_b, c->dnormed, c->pooled, c->norm_w,
                       c->ln_mean, c->ln_rstd, B, D);
    float inv = 1.0f / (float)L; /* d mean / d token_j */
    for (int b = 0; b < B; b++) {
        float *dt = c->net.dtokens + (size_t)b * T * D;
        const float *dp = c->dpooled + (size_t)b * D;
        memset(dt, 0, (size_t)D * sizeof(float));
        for (int j = 1; j <= L; j++)
            for (int d = 0; d < D; d++) dt[(size_t)j * D + d] = dp[d] * inv;
    }
}

af_status af_classifier_grads(af_classifier *c, double *loss, const uint8_t *images,
                              const float *targets, int B, int augment, int64_t step) {
    AF_CHECK(c && loss && images && targets, AF_EINVAL, "classifier: NULL argument");
    AF_TRY(af_ft_check_batch(&c->net, B));
    AF_CHECK(step >= 0, AF_EINVAL, "step must be >= 0");
    AF_TRY(af_ft_load(&c->net, NULL, images, NULL, B, augment, step));
    AF_TRY(classifier_forward(c, B));
    AF_TRY(af_bce_logits(loss, c->dlogits, NULL, c->logits, targets, B, c->NC));
    memset(c->net.head_grad, 0, c->net.head_numel * sizeof(float));
    classifier_head_backward(c, c->net.head_grad, B);
    return af_ft_encoder_backward(&c->net);
}

af_status af_classifier_step(af_classifier *c, double *loss, const uint8_t *images,
                             const float *targets, int B, int augment, const af_ft_step_args *a) {
    AF_TRY(af_ft_check_step_args(a));
    /* a non-finite loss returns here, before anything is updated */
    AF_TRY(af_classifier_grads(c, loss, images, targets, B, augment, a->step));
    size_t D = (size_t)c->net.D, NC = (size_t)c->NC;
    /* head layout of carve_head; only the classifier weight is decayed: LayerNorm and
     * biases are 1-D */
    const size_t numel[4] = {D, D, NC * D, NC};
    const int decay[4] = {0, 0, 1, 0};
    af_ft_adamw(&c->net, a, 4, numel, decay);
    return AF_OK;
}

/* ------------------------------------------------------------------ inference */

af_status af_classifier_predict(af_classifier *c, float *logits, const uint8_t *images, int N) {
    AF_CHECK(c && logits && images, AF_EINVAL, "classifier predict: NULL argument");
    AF_CHECK(N >= 0, AF_EINVAL, "classifier predict: N must be >= 0");
    for (int s = 0, B; s < N; s += B) {
        AF_TRY(af_ft_load_chunk(&c->net, &B, images, N, s));
        AF_TRY(classifier_forward(c, B));
        memcpy(logits + (size_t)s * c->NC, c->logits, (size_t)B * c->NC * sizeof(float));
    }
    return AF_OK;
}

/* Grad-CAM (Selvaraju et al. 2017) on tokens: A = the last block's output tokens (before
 * the encoder's final norm, as the last conv map of a CNN); weights w_d = mean over patch
 * tokens of d logit_k / d A_jd; cam_j = ReLU(sum_d w_d A_jd), divided by its maximum. */
af_status af_classifier_gradcam(af_classifier *c, float *cam, const uint8_t *images, int N,
                                int k) {
    AF_CHECK(c && cam && images, AF_EINVAL, "gradcam: NULL argument");
    AF_CHECK(N >= 0, AF_EINVAL, "gradcam: N must be >= 0");
    AF_CHECK(k >= 0 && k < c->NC, AF_EINVAL, "class_index must be in [0, %d), got %d", c->NC, k);
    af_model *m = c->net.model;
    const af_encoder_params *ep = &m->enc[AF_STUDENT];
    const af_encoder_acts *ea = &m->enc_acts[AF_STUDENT];
    int T = c->net.T, L = c->net.L, D = c->net.D, NC = c->NC;
    for (int s = 0, B; s < N; s += B) {
        AF_TRY(af_ft_load_chunk(&c->net, &B, images, N, s));
        AF_TRY(classifier_forward(c, B));
        memset(c->dlogits, 0, (size_t)B * NC * sizeof(float));
        for (int b = 0; b < B; b++) c->dlogits[(size_t)b * NC + k] = 1.0f;
        classifier_head_backward(c, NULL, B); /* d logit_k / d tokens, no param grads */
        const float *last = af_ft_last_block(m);
        af_layernorm_backward(c->dlast, NULL, NULL, c->net.dtokens, last, ep->norm_w, ea->lnf_mean,
                           ea->lnf_rstd, B * T, D);
        float *w = c->dnormed; /* [D] scratch, free after the head backward */
        for (int b = 0; b < B; b++) {
            const float *A = last + (size_t)b * T * D, *dA = c->dlast + (size_t)b * T * D;
            float *out = cam + (size_t)(s + b) * L;
            memset(w, 0, (size_t)D * sizeof(float));
            for (int j = 1; j <= L; j++)
                for (int d = 0; d < D; d++) w[d] += dA[(size_t)j * D + d];
            for (int d = 0; d < D; d++) w[d] /= (float)L;
            float mx = 0.0f;
            for (int j = 1; j <= L; j++) {
                double v = 0.0;
                for (int d = 0; d < D; d++) v += (double)w[d] * A[(size_t)j * D + d];
                out[j - 1] = v > 0 ? (float)v : 0.0f;
                if (out[j - 1] > mx) mx = out[j - 1];
            }
            if (mx > 0.0f)
                for (int j = 0; j < L; j++) out[j] /= mx;
        }
    }
    return AF_OK;
}
