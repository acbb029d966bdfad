/* Downstream compute (METHOD.md §6): augmentation, the linear probe, the fine-tuning
 * classifier (encoder + GAP + LayerNorm + Linear, Grad-CAM) and the segmenter (encoder +
 * per-token linear mask head), all on the CPU in fp32.
 *
 * Dimension letters as afire.h (NC is called C in the Python API; here C is the encoder's
 * input channel count).
 *
 * Files: augment.c (af_augment), probe.c (BCE, the probe), finetune.c (af_classifier),
 * segment.c (af_segmenter, the BCE + Dice loss). Both networks reuse af_model's student
 * encoder: its flat buffer and named table are the ones of pre-training, so a teacher
 * encoder is copied in by name.
 */
#ifndef AFIRE_DOWNSTREAM_H
#define AFIRE_DOWNSTREAM_H

#include <stdint.h>

#include "model.h"

/* ------------------------------------------------------------------ augmentation */

typedef struct {
    float scale_lo, scale_hi;  /* crop area as a fraction of the image, (0, 1]     */
    float ratio_lo, ratio_hi;  /* crop width / height, > 0 (log-uniform draw)      */
    int flip;                  /* 1: horizontal flip with probability 1/2          */
    float max_rotation;        /* degrees, angle uniform in [-max, max], [0, 180)  */
} af_augment_config;

/* Defaults of METHOD §6 fine-tuning: crop (0.8, 1), ratio (3/4, 4/3), flip, +-10 deg. */
af_augment_config af_augment_default(void);
af_status af_augment_check(const af_augment_config *a);

/* Random resized crop -> horizontal flip -> rotation about the centre, one geometry per
 * image drawn from (seed, step, image index b) on the AF_RNG_AUGMENT streams. Images are
 * resampled bilinearly, masks (nullable) by nearest neighbour with the same geometry;
 * pixels that fall outside the source image (rotated corners) are 0. out/out_mask
 * [B,S,S] must not alias the inputs. With scale (1,1), no flip and no rotation the
 * output equals the input exactly. */
af_status af_augment(uint8_t *out, uint8_t *out_mask, const uint8_t *img, const uint8_t *mask,
                     int B, int S, uint64_t seed, int64_t step, const af_augment_config *a);

/* ------------------------------------------------------------------ losses */

/* Mean BCE-with-logits over the VALID entries of targets[N,NC] (NaN = missing): writes
 * dlogits[N,NC] (nullable) = (sigmoid(z) - y) / count (0 on missing entries) and *count.
 * Targets must be NaN or in [0, 1]. With no valid entry the loss is 0 and so are the
 * gradients. */
af_status af_bce_logits(double *loss, float *dlogits, int64_t *count, const float *logits,
                        const float *targets, int N, int NC);

/* Segmentation loss on logits[B,S2] (S2 = S*S pixels per image), masks[B,S2] in {0,1}:
 * bce = mean over all pixels; dice_loss = 1 - mean_b (2 sum p y + smooth) /
 * (sum p + sum y + smooth), p = sigmoid(logits); loss = bce + dice_loss. dlogits[B,S2]
 * (nullable) = d loss / d logits. */
af_status af_seg_loss(double *loss, double *bce, double *dice_loss, float *dlogits,
                      const float *logits, const uint8_t *masks, int B, int S2, float smooth);

/* ------------------------------------------------------------------ linear probe */

typedef struct {
    int epochs, batch;
    float lr, weight_decay;
    float beta1, beta2, eps;   /* AdamW: 0.9, 0.999, 1e-8 */
    uint64_t seed;             /* minibatch order          */
} af_probe_config;

/* Standardisation of features[N,D]: mean[D], std[D] (population std; 1 where a feature
 * is constant, std < 1e-6). */
af_status af_probe_standardize_stats(float *mean, float *std, const float *X, int N, int D);

/* Loss and gradients of logistic regression on standardised features: logits =
 * ((X - mean) / std) W^T + b, mean BCE over valid targets (af_bce_logits).
 * dweight[NC,D], dbias[NC] are overwritten (nullable). scratch: N*(D+2*NC) floats. */
af_status af_probe_loss(double *loss, float *dweight, float *dbias, const float *X,
                        const float *Y, const float *W, const float *bias, const float *mean,
                        const float *std, int N, int D, int NC, float *scratch);

/* Fit weight[NC,D], bias[NC] from zero by AdamW on minibatches (a fresh order per epoch
 * from the seed); weight decay on the weight only. loss[epochs] = training-set loss after
 * each epoch. mean/std are computed here. Allocates its working memory once per call. */
af_status af_probe_fit(float *W, float *bias, float *mean, float *std, float *loss,
                       const float *X, const float *Y, int N, int D, int NC,
                       const af_probe_config *cfg);

/* logits[N,NC] of standardised features. */
af_status af_probe_predict(float *logits, const float *X, const float *W, const float *bias,
                           const float *mean, const float *std, int N, int D, int NC);

/* ------------------------------------------------------------------ shared encoder */

/* An af_model used only for its student encoder: the head and decoder are shrunk to the
 * smallest valid sizes so that they cost (almost) no memory. Reserves `batch` images. */
af_status af_downstream_model(af_model **out, const af_config *cfg, int batch);

typedef struct {
    float lr, weight_decay;    /* weight decay of matrices; biases and 1-D: none */
    float beta1, beta2, eps;
    int64_t step;              /* 0-based; Adam's t = step + 1, augmentation key */
} af_ft_step_args;

/* What the classifier and the segmenter both hold: the encoder, the sizes, one flat head
 * buffer with its gradient and AdamW moments, the input buffers and the busy flag. It is
 * the first member of both, so either converts to an af_ft_net pointer. */
typedef struct {
    af_model *model;           /* student encoder                                 */
    const char *what;          /* "Classifier" / "Segmenter", for messages        */
    int B, S, C, P, G, L, T, D;
    int freeze_encoder;
    uint64_t seed;             /* augmentation                                     */
    af_augment_config aug;
    size_t head_numel;
    float *head, *head_grad, *head_m, *head_v;
    uint8_t *aug_img, *aug_mask; /* [B,S,S]; aug_mask only when masks are augmented */
    float *img;                /* [B,C,S,S] normalised                            */
    float *dtokens;            /* [B,T,D]  d loss / d encoder output              */
    int busy;
} af_ft_net;

/* Internal to downstream.c / finetune.c / segment.c. */
/* Encoder (seed = the network seed), sizes and the buffers above (zeroed); on failure
 * everything allocated is freed by af_ft_net_free. */
af_status af_ft_net_init(af_ft_net *n, const char *what, const af_config *cfg, int batch,
                         uint64_t seed, int freeze_encoder, size_t head_numel, int with_mask);
void af_ft_net_free(af_ft_net *n);
af_status af_ft_acquire(af_ft_net *n);
void af_ft_release(af_ft_net *n);
af_status af_ft_check_batch(const af_ft_net *n, int B);
af_status af_ft_check_step_args(const af_ft_step_args *a);
/* images (and masks, nullable) [B,S,S] -> n->img, augmented when `augment`; *used_masks =
 * the masks that go with the images (the augmented ones or `masks`). */
af_status af_ft_load(af_ft_net *n, const uint8_t **used_masks, const uint8_t *images,
                     const uint8_t *masks, int B, int augment, int64_t step);
/* Inference in chunks of the batch capacity: *B = min(capacity, N - first) images from
 * `first` of images[N,S,S] -> n->img, not augmented. */
af_status af_ft_load_chunk(af_ft_net *n, int *B, const uint8_t *images, int N, int first);
/* Encoder gradients (overwritten) from n->dtokens, unless the encoder is frozen. */
af_status af_ft_encoder_backward(af_ft_net *n);
/* AdamW over head segments of numel[i] floats laid out in order (decayed where decay[i]),
 * then over the encoder's trainable tensors (table order, decay per table) unless frozen. */
void af_ft_adamw(af_ft_net *n, const af_ft_step_args *a, int nseg, const size_t *numel,
                 const int *decay);
/* Pointer to the last transformer block's output (before the final norm) [B,T,D] of the
 * last student encoder forward. */
const float *af_ft_last_block(const af_model *m);

/* ------------------------------------------------------------------ classifier */

typedef struct {
    af_ft_net net;             /* head_numel = 2D + NC*D + NC                     */
    int NC;
    float *norm_w, *norm_b;    /* [D]      views into net.head                    */
    float *fc_w, *fc_b;        /* [NC, D], [NC]                                   */
    float *pooled;             /* [B,D]  mean of patch tokens                     */
    float *normed, *ln_mean, *ln_rstd; /* [B,D], [B], [B]                         */
    float *logits, *dlogits;   /* [B,NC]                                          */
    float *dnormed, *dpooled;  /* [B,D]                                           */
    float *dlast;              /* [B,T,D]  Grad-CAM: d logit / d last block out   */
} af_classifier;

af_status af_classifier_create(af_classifier **out, const af_config *cfg, int num_classes,
                               int batch, uint64_t seed, int freeze_encoder);
void af_classifier_free(af_classifier *c);

/* Forward + backward on images[B,S,S] (augmented when `augment`), targets[B,NC]: fills
 * the head gradients and (unless frozen) the encoder gradients, overwriting them; no
 * update. *loss = mean BCE over valid targets. */
af_status af_classifier_grads(af_classifier *c, double *loss, const uint8_t *images,
                              const float *targets, int B, int augment, int64_t step);
/* grads + AdamW (head; encoder unless frozen). Nothing changes on AF_ENONFINITE. */
af_status af_classifier_step(af_classifier *c, double *loss, const uint8_t *images,
                             const float *targets, int B, int augment,
                             const af_ft_step_args *a);
/* logits[N,NC] for any N (chunks of the batch capacity), no augmentation. */
af_status af_classifier_predict(af_classifier *c, float *logits, const uint8_t *images, int N);
/* cam[N,G,G] in [0,1] for class k (Grad-CAM on the last block's output tokens). */
af_status af_classifier_gradcam(af_classifier *c, float *cam, const uint8_t *images, int N,
                                int k);

/* ------------------------------------------------------------------ segmenter */

typedef struct {
    af_ft_net net;             /* head_numel = PP*D + PP; masks augmented too     */
    int PP;
    float smooth;              /* Dice smoothing constant (1.0)                   */
    float *w, *b;              /* [PP, D], [PP] views into net.head               */
    float *tok;                /* [B*L, D]  patch tokens                          */
    float *plogits, *dplogits; /* [B*L, PP]                                       */
    float *logits, *dlogits;   /* [B, S*S]                                        */
    float *dtok;               /* [B*L, D]                                        */
} af_segmenter;

af_status af_segmenter_create(af_segmenter **out, const af_config *cfg, int batch,
                              uint64_t seed, int freeze_encoder);
void af_segmenter_free(af_segmenter *s);

/* Forward + backward on images[B,S,S], masks[B,S,S] (0/1), gradients overwritten. */
af_status af_segmenter_grads(af_segmenter *s, double *loss, double *bce, double *dice_loss,
                             const uint8_t *images, const uint8_t *masks, int B, int augment,
                             int64_t step);
af_status af_segmenter_step(af_segmenter *s, double *loss, double *bce, double *dice_loss,
                            const uint8_t *images, const uint8_t *masks, int B, int augment,
                            const af_ft_step_args *a);
/* probabilities prob[N,S,S] for any N (chunks of the batch capacity). */
af_status af_segmenter_predict(af_segmenter *s, float *prob, const uint8_t *images, int N);

#endif
