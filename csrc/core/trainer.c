/* The training step and inference passes (trainer.h). Buffers are sized once at creation;
 * a step allocates nothing. */
#include "trainer.h"

#include <limits.h>
#include <math.h>

#include "common.h"
#include "objective.h"
#include "ops/ops.h"

static void dist_free(af_trainer_dist *d) {
    af_free(d->counts);
    af_free(d->logits);
    af_free(d->q_teacher);
    af_free(d->dlogits);
    af_free(d->abn);
    af_free(d->obj_scratch);
    af_free(d->sums);
    memset(d, 0, sizeof *d);
}

void af_trainer_free(af_trainer *t) {
    if (t == NULL) return;
    dist_free(&t->dist);
    af_model_free(t->model);
    af_free(t->protos);
    af_free(t->protos_next);
    af_free(t->x_prime);
    af_free(t->mask);
    af_free(t->abn);
    af_free(t->img);
    af_free(t->img_prime);
    af_free(t->target);
    af_free(t->q_teacher);
    af_free(t->dlogits);
    af_free(t->dpred);
    af_free(t->dtokens);
    af_free(t->obj_scratch);
    af_free(t);
}

/* Floats of the objective's scratch for B images (0: too large). The teacher-token structure
 * term runs after af_paper_loss on the same scratch. */
static size_t objective_scratch_floats(const af_trainer_config *c, int B, int L, int K) {
    if (c->objective != AF_OBJECTIVE_PAPER) return af_released_loss_scratch_floats(L, K);
    size_t n = af_paper_loss_scratch_floats(B, L, K);
    if (c->stru_target == AF_STRU_TEACHER_TOKEN) {
        size_t m = af_stru_token_loss_scratch_floats(B, L, K);
        n = n == 0 || m == 0 ? 0 : (m > n ? m : n);
    }
    return n;
}

af_status af_trainer_create(af_trainer **out, const af_trainer_config *cfg, int batch) {
    *out = NULL;
    AF_TRY(af_trainer_config_check(cfg, batch));
    af_trainer *t = af_calloc(1, sizeof *t);
    if (t == NULL) return AF_ENOMEM;
    t->cfg = *cfg;
    t->B = batch;
    af_status st = af_model_create_mode(&t->model, &cfg->net, cfg->inference,
                                        cfg->precision == AF_PRECISION_BF16);
    if (st == AF_OK) st = af_model_reserve(t->model, batch);
    if (st != AF_OK) {
        af_trainer_free(t);
        return st;
    }
    const af_config *n = &cfg->net;
    t->S = n->S;
    t->C = n->C;
    t->L = (n->S / n->P) * (n->S / n->P);
    t->T = t->L + 1;
    t->Q = n->P * n->P * n->C;
    t->K = n->K;
    t->D = n->D;
    size_t B = (size_t)batch, S2 = (size_t)n->S * n->S, BL = B * t->L;
    size_t scratch = objective_scratch_floats(cfg, batch, t->L, t->K);
    size_t tb = cfg->inference ? 0 : B; /* training-only buffers: 1 element for inference */
    t->protos = af_calloc((size_t)t->L * t->K, sizeof(float));
    t->protos_next = af_calloc((size_t)t->L * t->K, sizeof(float));
    t->x_prime = af_calloc(tb * S2 + 1, 1);
    t->mask = af_calloc(tb * S2 + 1, 1);
    t->abn = af_calloc(BL, 1);
    t->img = af_calloc(B * t->C * S2, sizeof(float));
    t->img_prime = af_calloc(tb * t->C * S2 + 1, sizeof(float));
    t->target = af_calloc(BL * t->Q, sizeof(float));
    t->q_teacher = af_calloc(tb * t->L * t->K + 1, sizeof(float));
    t->dlogits = af_calloc(tb * t->L * t->K + 1, sizeof(float));
    t->dpred = af_calloc(tb * t->L * t->Q + 1, sizeof(float));
    t->dtokens = af_calloc(tb * t->T * t->D + 1, sizeof(float));
    t->obj_scratch = af_calloc(scratch && tb ? scratch : 1, sizeof(float));
    if (!t->protos || !t->protos_next || !t->x_prime || !t->mask || !t->abn || !t->img || !t->img_prime ||
        !t->target || !t->q_teacher || !t->dlogits || !t->dpred || !t->dtokens ||
        !t->obj_scratch) {
        af_trainer_free(t);
        return AF_ENOMEM;
    }
    *out = t;
    return AF_OK;
}

af_status af_trainer_acquire(af_trainer *t) {
    if (__atomic_exchange_n(&t->busy, 1, __ATOMIC_ACQUIRE))
        return af_error(AF_EBUSY, "this AFiRe model is being used by another thread; use one "
                                  "model per thread or serialise the calls");
    return AF_OK;
}

void af_trainer_release(af_trainer *t) { __atomic_store_n(&t->busy, 0, __ATOMIC_RELEASE); }

static int all_finite(const float *p, size_t n) {
    int ok = 1;
    for (size_t i = 0; i < n; i++) ok &= isfinite(p[i]) != 0;
    return ok;
}

/* ---------------------------------------------------------------------------------- */
/* Several ranks (trainer.h: af_trainer_dist)                                          */

af_status af_trainer_set_comm(af_trainer *t, af_comm *comm) {
    dist_free(&t->dist);
    if (comm == NULL) return AF_OK;
    af_trainer_dist *d = &t->dist;
    const int W = af_comm_size(comm), L = t->L, K = t->K;
    /* every rank must gather the same block sizes and run the same objective */
    int64_t mine[7] = {t->B, L, K, t->Q, t->cfg.objective, t->cfg.net.D, t->cfg.stru_target};
    int64_t *all = af_calloc((size_t)W * 7, sizeof(int64_t));
    if (all == NULL) return AF_ENOMEM;
    af_status st = af_comm_allgather(comm, mine, all, sizeof mine, "trainer setup");
    for (int r = 0; st == AF_OK && r < W; r++)
        if (memcmp(all + 7 * r, mine, sizeof mine) != 0)
            st = af_error(AF_EINVAL, "rank %d's trainer differs from rank %d's (batch capacity "
                          "%lld vs %lld, L %lld vs %lld, K %lld vs %lld, objective %lld vs "
                          "%lld, stru_target %lld vs %lld): every rank needs the same config "
                          "and per-rank batch",
                          r, af_comm_rank(comm), (long long)all[7 * r], (long long)mine[0],
                          (long long)all[7 * r + 1], (long long)mine[1],
                          (long long)all[7 * r + 2], (long long)mine[2],
                          (long long)all[7 * r + 4], (long long)mine[4],
                          (long long)all[7 * r + 6], (long long)mine[6]);
    af_free(all);
    AF_TRY(st);
    AF_CHECK((double)W * t->B * L <= (double)INT_MAX / (K > 1 ? K : 1), AF_EINVAL,
             "%d ranks x %d images are too many for one global batch (the objective indexes "
             "it with ints)", W, t->B);
    const int BG = W * t->B;
    const size_t LK = (size_t)L * K, rows = (size_t)BG * L;
    size_t scratch = objective_scratch_floats(&t->cfg, BG, L, K);
    AF_CHECK(scratch > 0, AF_ENOMEM, "the objective's scratch for a global batch of %d images "
             "is too large", BG);
    d->counts = af_calloc((size_t)W, sizeof(int64_t));
    d->logits = af_calloc(rows * K, sizeof(float));
    if (t->cfg.stru_target == AF_STRU_TEACHER_TOKEN)
        d->q_teacher = af_calloc(rows * K, sizeof(float));
    d->dlogits = af_calloc(rows * K, sizeof(float));
    d->abn = af_calloc(rows, 1);
    d->obj_scratch = af_calloc(scratch, sizeof(float));
    d->sums = af_calloc(LK + (size_t)K, sizeof(double));
    if (!d->counts || !d->logits || !d->dlogits || !d->abn || !d->obj_scratch || !d->sums ||
        (t->cfg.stru_target == AF_STRU_TEACHER_TOKEN && !d->q_teacher)) {
        dist_free(d);
        return AF_ENOMEM;
    }
    d->comm = comm;
    d->rank = af_comm_rank(comm);
    d->world = W;
    return AF_OK;
}

/* The images of every rank in this step: B_global and this rank's global index offset. */
static af_status dist_begin(af_trainer *t, int B) {
    af_trainer_dist *d = &t->dist;
    int64_t mine = B;
    AF_TRY(af_comm_allgather(d->comm, &mine, d->counts, sizeof mine, "image counts"));
    return af_dist_batch_offsets(d->counts, d->world, d->rank, t->B, &d->B_global, &d->offset);
}

/* The same verdict on every rank: AF_ENONFINITE everywhere when `ok` is 0 on any rank. */
static af_status dist_agree_finite(af_trainer *t, int ok, const char *what) {
    int64_t v = ok != 0;
    AF_TRY(af_comm_allreduce(t->dist.comm, &v, 1, AF_COMM_I64, AF_COMM_MIN, "finite check"));
    if (v) return AF_OK;
    return af_error(AF_ENONFINITE, "the %s's outputs are NaN/Inf at step %lld on %s (diverged "
                    "weights?); the model was not updated", what, (long long)t->step,
                    ok ? "another rank" : "this rank");
}

/* dst = every rank's rows src[0..counts[r]) in rank order: gathered in blocks of the
 * capacity (src holds that many rows), then moved together. */
static af_status dist_gather_rows(af_trainer *t, void *dst, const void *src, size_t row_bytes,
                                  const char *what) {
    af_trainer_dist *d = &t->dist;
    const size_t block = (size_t)t->B * row_bytes;
    AF_TRY(af_comm_allgather(d->comm, src, dst, block, what));
    char *out = dst;
    size_t at = 0;
    for (int r = 0; r < d->world; r++) {
        size_t n = (size_t)d->counts[r] * row_bytes;
        if (at != (size_t)r * block) memmove(out + at, out + (size_t)r * block, n);
        at += n;
    }
    return AF_OK;
}

/* The paper objective's consistency terms on B images (one rank's batch, or the gathered
 * global batch): dlogits += w_stru dL_stru/ds + w_cate dL_cate/ds. With stru_target
 * "teacher_token" the structure term is af_stru_token_loss on the teacher's Sinkhorn rows
 * q_teacher[B,L,K] (not in the paper) instead of Eq. 12; L_cate is unchanged. */
static af_status paper_terms(af_trainer *t, float *ls, float *lc, float *dlogits,
                             const float *logits, const float *q_teacher, const uint8_t *abn,
                             int B, float *scratch) {
    const af_trainer_config *c = &t->cfg;
    const int L = t->L, K = t->K;
    if (c->stru_target != AF_STRU_TEACHER_TOKEN)
        return af_paper_loss(ls, lc, dlogits, dlogits, logits, t->protos_next, abn, B, L, K,
                             c->tau_s, c->tau, c->w_stru, c->w_cate, scratch);
    float eq12 = 0.0f; /* Eq. 12's value, not used: only L_cate's gradient is kept */
    AF_TRY(af_paper_loss(&eq12, lc, NULL, dlogits, logits, t->protos_next, abn, B, L, K,
                         c->tau_s, c->tau, 0.0f, c->w_cate, scratch));
    return af_stru_token_loss(ls, dlogits, logits, q_teacher, abn, B, L, K, c->tau_s, c->tau,
                              c->w_stru, scratch);
}

/* Stage 4 with several ranks: the cross-image terms on the gathered global batch (the same
 * numbers on every rank; this rank keeps its rows of the gradient), restoration on the own
 * images weighted B / B_global, its loss summed. */
static af_status dist_losses(af_trainer *t, int B, const float *logits, const float *pred,
                             float *ls, float *lc, float *lcst, float *lr, double *abn_frac) {
    af_trainer_dist *d = &t->dist;
    const af_trainer_config *c = &t->cfg;
    const int L = t->L, K = t->K, Q = t->Q, BG = (int)d->B_global;
    const size_t LK = (size_t)L * K, NG = (size_t)BG * L;
    AF_TRY(dist_gather_rows(t, d->logits, logits, LK * sizeof(float), "student logits gather"));
    AF_TRY(dist_gather_rows(t, d->abn, t->abn, (size_t)L, "token labels gather"));
    AF_TRY(dist_agree_finite(t, all_finite(d->logits, NG * K) && all_finite(pred, (size_t)B * L * Q),
                             "student"));
    size_t n_abn = 0;
    for (size_t i = 0; i < NG; i++) n_abn += d->abn[i] != 0;
    *abn_frac = (double)n_abn / (double)NG;
    const double share = (double)B / BG;
    const float w_recon = (float)(c->w_recon * share);
    memset(d->dlogits, 0, sizeof(float) * NG * K);
    if (c->objective == AF_OBJECTIVE_PAPER) {
        if (c->stru_target == AF_STRU_TEACHER_TOKEN) /* its targets: every rank's teacher rows */
            AF_TRY(dist_gather_rows(t, d->q_teacher, t->q_teacher, LK * sizeof(float),
                                    "teacher distributions gather"));
        AF_TRY(paper_terms(t, ls, lc, d->dlogits, d->logits, d->q_teacher, d->abn, BG,
                           d->obj_scratch));
        AF_TRY(af_recon_loss(lr, t->dpred, pred, t->target, t->abn, B, L, Q, c->w_abn, w_recon));
    } else {
        AF_TRY(af_released_cst_loss(lcst, d->dlogits, d->logits, t->protos_next, d->abn, BG, L,
                                    K, c->tau_s, c->sinkhorn_eps, c->sinkhorn_iters, c->w_stru,
                                    d->obj_scratch));
        AF_TRY(af_recon_loss(lr, t->dpred, pred, t->target, NULL, B, L, Q, 1.0f, w_recon));
    }
    memcpy(t->dlogits, d->dlogits + (size_t)d->offset * LK, sizeof(float) * B * LK);
    double recon = *lr * share;
    AF_TRY(af_comm_allreduce(d->comm, &recon, 1, AF_COMM_F64, AF_COMM_SUM, "restoration loss"));
    *lr = (float)recon;
    return AF_OK;
}

/* Sums every rank's gradients in buckets of at most BUCKET floats, all in flight at once. */
#define BUCKET ((size_t)1 << 22)
#define MAX_BUCKETS 256
static af_status dist_reduce_gradients(af_trainer *t) {
    af_model *m = t->model;
    void *buf[MAX_BUCKETS];
    size_t count[MAX_BUCKETS];
    int n = 0;
    for (int net = 0; net < AF_NET_COUNT; net++)
        for (size_t at = 0; at < m->numel[net]; at += BUCKET) {
            if (n == MAX_BUCKETS) {
                AF_TRY(af_comm_allreduce_many(t->dist.comm, n, buf, count, AF_COMM_F32,
                                              AF_COMM_SUM, "gradient all-reduce"));
                n = 0;
            }
            buf[n] = m->grads[net] + at;
            count[n++] = m->numel[net] - at < BUCKET ? m->numel[net] - at : BUCKET;
        }
    return af_comm_allreduce_many(t->dist.comm, n, buf, count, AF_COMM_F32, AF_COMM_SUM,
                                  "gradient all-reduce");
}

static af_status check_batch(const af_trainer *t, int B) {
    AF_CHECK(B >= 1 && B <= t->B, AF_EINVAL, "batch of %d images: must be between 1 and the "
             "model's batch capacity %d", B, t->B);
    return AF_OK;
}

/* x' (or x) -> normalised float images and the MAE-order target patches of x. */
static af_status prepare_inputs(af_trainer *t, const uint8_t *images, int B) {
    AF_TRY(af_normalize_images(t->img, images, B, t->C, t->S));
    af_patchify_forward(t->target, t->img, B, t->C, t->S, t->cfg.net.P, AF_PATCH_PQC);
    return AF_OK;
}

af_status af_trainer_grads(af_trainer *t, const uint8_t *images, int B, af_step_stats *stats) {
    AF_CHECK(!t->cfg.inference, AF_EINVAL, "this model was made for inference (encode, restore, "
             "anomaly_score): it cannot train");
    AF_TRY(check_batch(t, B));
    const af_trainer_config *c = &t->cfg;
    af_model *m = t->model;
    af_trainer_dist *d = &t->dist;
    const int L = t->L, K = t->K, Q = t->Q, dist = d->comm != NULL;
    const size_t BL = (size_t)B * L;
    af_schedule_values sv = af_schedule_at(&c->sched, t->step);
    memset(stats, 0, sizeof *stats);
    stats->step = t->step;
    af_reducer red = {0};
    if (dist) {
        AF_TRY(dist_begin(t, B));
        red = af_comm_reducer(d->comm);
    }

    /* 1. synthetic lesions, fully determined by (seed, step, global image index) */
    AF_TRY(af_slm_generate(t->x_prime, t->mask, t->abn, images, B, t->S, c->net.P, &c->slm,
                        c->seed, (uint64_t)t->step, dist ? (uint64_t)d->offset : 0));
    size_t n_abn = 0;
    for (size_t i = 0; i < BL; i++) n_abn += t->abn[i] != 0;
    stats->abnormal_fraction = (double)n_abn / (double)BL;
    AF_TRY(prepare_inputs(t, images, B));
    AF_TRY(af_normalize_images(t->img_prime, t->x_prime, B, t->C, t->S));

    /* 2. teacher on the NORMAL image -> prototypes (METHOD §3), staged in protos_next and
     * committed only by a successful update, so a failed step changes nothing. */
    AF_TRY(af_encoder_forward(m, AF_TEACHER, t->img, B));
    AF_TRY(af_head_forward(m, AF_TEACHER, m->enc_acts[AF_TEACHER].out, B));
    const float *teacher_logits = m->head_acts[AF_TEACHER].logits;
    const int teacher_ok = all_finite(teacher_logits, BL * K);
    if (dist) AF_TRY(dist_agree_finite(t, teacher_ok, "teacher"));
    else if (!teacher_ok)
        return af_error(AF_ENONFINITE, "the teacher's outputs are NaN/Inf at step %lld (diverged "
                        "weights?); the model was not updated", (long long)t->step);
    const float *proto_src = teacher_logits; /* released: raw logits are averaged */
    if (c->objective == AF_OBJECTIVE_PAPER) {
        if (dist)
            AF_TRY(af_sinkhorn_knopp_dist(t->q_teacher, teacher_logits, (int)BL, K,
                                          (float)sv.teacher_temp, c->sinkhorn_iters,
                                          d->B_global * L, d->sums + (size_t)L * K, &red));
        else
            AF_TRY(af_sinkhorn_knopp(t->q_teacher, teacher_logits, (int)BL, K,
                                     (float)sv.teacher_temp, c->sinkhorn_iters));
        proto_src = t->q_teacher;
    }
    /* the loss of this step uses C updated with this batch (overwritten in epoch 0) */
    memcpy(t->protos_next, t->protos, sizeof(float) * L * K);
    const int overwrite = sv.first_epoch || !t->protos_set;
    if (dist)
        AF_TRY(af_prototypes_update_dist(t->protos_next, proto_src, B, d->B_global, L, K,
                                         c->proto_m, overwrite, d->sums, &red));
    else
        AF_TRY(af_prototypes_update(t->protos_next, proto_src, B, L, K, c->proto_m, overwrite));

    /* 3. student on x' -> head logits and the restoration of masked tokens */
    AF_TRY(af_encoder_forward(m, AF_STUDENT, t->img_prime, B));
    const float *tokens = m->enc_acts[AF_STUDENT].out;
    AF_TRY(af_head_forward(m, AF_STUDENT, tokens, B));
    AF_TRY(af_decoder_forward(m, tokens, t->abn, B));
    const float *logits = m->head_acts[AF_STUDENT].logits;
    const float *pred = m->dec_acts.pred;
    if (!dist && (!all_finite(logits, BL * K) || !all_finite(pred, BL * Q)))
        return af_error(AF_ENONFINITE, "the student's outputs are NaN/Inf at step %lld (diverged "
                        "weights?); the model was not updated", (long long)t->step);

    /* 4. losses and their gradients (unweighted values, weighted gradients); the terms meet
     * in dlogits and dpred, so the objective accumulates into zeroed buffers */
    memset(t->dlogits, 0, sizeof(float) * BL * K);
    memset(t->dpred, 0, sizeof(float) * BL * Q);
    float ls = 0, lc = 0, lcst = 0, lr = 0;
    if (dist) {
        AF_TRY(dist_losses(t, B, logits, pred, &ls, &lc, &lcst, &lr, &stats->abnormal_fraction));
    } else if (c->objective == AF_OBJECTIVE_PAPER) {
        AF_TRY(paper_terms(t, &ls, &lc, t->dlogits, logits, t->q_teacher, t->abn, B,
                           t->obj_scratch));
        AF_TRY(af_recon_loss(&lr, t->dpred, pred, t->target, t->abn, B, L, Q, c->w_abn, c->w_recon));
    } else {
        AF_TRY(af_released_loss(&lcst, &lr, t->dlogits, t->dpred, logits, t->protos_next, t->abn,
                             pred, t->target, B, L, K, Q, c->tau_s, c->sinkhorn_eps,
                             c->sinkhorn_iters, c->w_stru, c->w_recon, t->obj_scratch));
    }
    AF_TRY(af_step_stats_fill(stats, c, &sv, ls, lc, lcst, lr));

    /* 5. backward: head and decoder gradients meet in the student encoder output (the
     * decoder writes dtokens, the head adds its part); several ranks: summed over them */
    af_model_zero_grad(m);
    AF_TRY(af_decoder_backward(m, t->dpred, t->dtokens));
    AF_TRY(af_head_backward(m, t->dlogits, t->dtokens));
    AF_TRY(af_encoder_backward(m, t->dtokens));
    if (dist) AF_TRY(dist_reduce_gradients(t));

    /* 6. clip, then refuse to update with non-finite gradients */
    double gnorm = 0.0;
    if (c->clip > 0 && c->clip_global) AF_TRY(af_clip_grad_global(m, c->clip, &gnorm));
    else if (c->clip > 0) AF_TRY(af_clip_grad_per_tensor(m, c->clip, NULL, &gnorm));
    else {
        for (int net = 0; net < AF_NET_COUNT; net++)
            for (size_t i = 0; i < m->numel[net]; i++) gnorm += (double)m->grads[net][i] * m->grads[net][i];
        gnorm = sqrt(gnorm);
    }
    return af_step_stats_grad_norm(stats, gnorm, 1);
}

af_status af_trainer_step(af_trainer *t, const uint8_t *images, int B, af_step_stats *stats) {
    AF_TRY(af_trainer_grads(t, images, B, stats));
    const af_trainer_config *c = &t->cfg;
    af_model *m = t->model;
    af_schedule_values sv = af_schedule_at(&c->sched, t->step);
    const int L = t->L, K = t->K;
    /* 7. AdamW, EMA teacher, prototypes, schedules advance */
    af_adamw_args a = {(float)sv.lr, (float)sv.wd, c->beta1, c->beta2, c->adam_eps,
                       (int)(t->step + 1), sv.freeze_last_layer};
    AF_TRY(af_adamw_step(m, &a));
    AF_TRY(af_ema_update(m, (float)sv.ema));
    memcpy(t->protos, t->protos_next, sizeof(float) * L * K);
    t->protos_set = 1;
    t->step++;
    return AF_OK;
}

af_status af_trainer_encode(af_trainer *t, float *tokens, const uint8_t *images, int B,
                            af_branch branch) {
    AF_TRY(check_batch(t, B));
    AF_TRY(af_normalize_images(t->img, images, B, t->C, t->S));
    AF_TRY(af_encoder_forward(t->model, branch, t->img, B));
    memcpy(tokens, t->model->enc_acts[branch].out, sizeof(float) * (size_t)B * t->T * t->D);
    return AF_OK;
}

af_status af_trainer_restore(af_trainer *t, float *pred, float *target, const uint8_t *images,
                             const uint8_t *token_mask, int B) {
    AF_TRY(check_batch(t, B));
    AF_TRY(prepare_inputs(t, images, B));
    if (token_mask == NULL) memset(t->abn, 0, (size_t)B * t->L);
    else memcpy(t->abn, token_mask, (size_t)B * t->L);
    AF_TRY(af_encoder_forward(t->model, AF_STUDENT, t->img, B));
    AF_TRY(af_decoder_forward(t->model, t->model->enc_acts[AF_STUDENT].out, t->abn, B));
    size_t n = (size_t)B * t->L * t->Q;
    if (pred != NULL) memcpy(pred, t->model->dec_acts.pred, sizeof(float) * n);
    if (target != NULL) memcpy(target, t->target, sizeof(float) * n);
    if (!all_finite(t->model->dec_acts.pred, n))
        return af_error(AF_ENONFINITE, "the restoration contains NaN/Inf (diverged weights?)");
    return AF_OK;
}

af_status af_trainer_anomaly(af_trainer *t, double *score, double *log_score, double *err,
                             const uint8_t *images, int B) {
    AF_TRY(af_trainer_restore(t, NULL, NULL, images, NULL, B));
    return af_anomaly_score(score, log_score, err, t->model->dec_acts.pred, t->target, B, t->L, t->Q);
}
