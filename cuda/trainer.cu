// The AFiRe training step and inference passes on one GPU (trainer.cuh): the twin of
// csrc/core/trainer.c, stage for stage. Buffers are sized once at creation; a step allocates
// nothing and synchronises once (the download of its scalars).
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "common.cuh"
#include "objective.cuh"
#include "ops/ops.h"
#include "trainer.cuh"

#define TPB 256

// ------------------------------------------------------------------ small kernels

// *out = how many of x[0..n) satisfy pred. One block of TPB threads, integer tree sum.
template <typename Count, typename T, typename Pred>
__global__ void count_kernel(Count *out, const T *x, int64_t n, Pred pred) {
    __shared__ Count part[TPB];
    Count s = 0;
    for (int64_t i = threadIdx.x; i < n; i += TPB) s += pred(x[i]);
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = TPB / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = part[0];
}

// abnormal tokens (the abnormal_fraction of the stats)
struct is_nonzero {
    __device__ bool operator()(uint8_t v) const { return v != 0; }
};
// non-finite values (af_trainer_restore's all_finite)
struct is_nonfinite {
    __device__ bool operator()(float v) const { return !isfinite(v); }
};

// The total loss (af_step_loss, as the host reports it) and the update flag: finite loss and
// finite gradient norm.
__global__ void finalize_kernel(af_cuda_step_scalars *s, int objective, float w_stru,
                                float w_cate, float w_recon) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    s->loss = af_step_loss(objective, w_stru, w_cate, w_recon, s->f_stru, s->f_cate, s->f_cst,
                           s->f_recon);
    s->ok = isfinite(s->loss) && isfinite(s->grad_norm);
}

// protos <- protos_next, only when the step is accepted
__global__ void commit_kernel(float *dst, const float *src, int64_t n, const int *ok) {
    if (!*ok) return;
    AF_GRID_STRIDE(int64_t, i, n)
        dst[i] = src[i];
}

// ------------------------------------------------------------------ lifetime

static af_status dmalloc(void **p, size_t bytes) {
    *p = nullptr;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        *p = nullptr;
        return af_error(e == cudaErrorMemoryAllocation ? AF_ENOMEM : AF_ECUDA,
                        "cudaMalloc of %zu bytes failed: %s", bytes, cudaGetErrorString(e));
    }
    return cudaMemset(*p, 0, bytes ? bytes : 1) == cudaSuccess
               ? AF_OK
               : af_error(AF_ECUDA, "cudaMemset failed");
}

static af_status hmalloc(void **p, size_t bytes) {
    *p = nullptr;
    cudaError_t e = cudaMallocHost(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        *p = nullptr;
        return af_error(AF_ENOMEM, "cudaMallocHost of %zu bytes failed: %s", bytes,
                        cudaGetErrorString(e));
    }
    memset(*p, 0, bytes ? bytes : 1);
    return AF_OK;
}

static void dist_free(af_cuda_trainer_dist *d) {
    void *dev[] = {d->logits, d->dlogits, d->abn, d->abn_pad, d->obj_scratch, d->sums, d->share};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) cudaFree(dev[i]);
    for (int i = 0; i < AF_NET_COUNT; i++)
        if (d->ev_grad[i]) cudaEventDestroy((cudaEvent_t)d->ev_grad[i]);
    if (d->ev_done) cudaEventDestroy((cudaEvent_t)d->ev_done);
    if (d->comm_stream) {
        if (d->nccl == nullptr || !af_nccl_broken(d->nccl))
            cudaStreamSynchronize((cudaStream_t)d->comm_stream);
        cudaStreamDestroy((cudaStream_t)d->comm_stream);
    }
    af_free(d->counts);
    memset(d, 0, sizeof *d);
}

extern "C" void af_cuda_trainer_free(af_cuda_trainer *t) {
    if (t == nullptr) return;
    if (t->ctx) {
        cudaSetDevice(t->ctx->device);
        // a broken communicator may leave NCCL kernels that never finish: do not wait
        if (t->dist.nccl == nullptr || !af_nccl_broken(t->dist.nccl))
            cudaStreamSynchronize(t->ctx->stream);
    }
    dist_free(&t->dist);
    af_cuda_model_free(t->model);
    void *dev[] = {t->protos, t->protos_next, t->images, t->x_prime, t->mask, t->abn, t->img,
                   t->img_prime, t->target, t->q_teacher, t->dlogits, t->dpred, t->dtokens,
                   t->obj_scratch, t->anomaly, t->dev};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) cudaFree(dev[i]);
    if (t->staging) cudaFreeHost(t->staging);
    if (t->host) cudaFreeHost(t->host);
    af_cuda_context_destroy(t->ctx);
    af_free(t);
}

extern "C" af_status af_cuda_trainer_create(af_cuda_trainer **out, const af_trainer_config *cfg,
                                            int batch, int device) {
    *out = nullptr;
    AF_TRY(af_trainer_config_check(cfg, batch));  // the checks of af_trainer_create
    AF_CHECK(cfg->precision == AF_PRECISION_FP32 || cfg->precision == AF_PRECISION_BF16,
             AF_EINVAL, "precision must be 'bf16' or 'fp32'");
    // not in the paper and not on the GPU yet: refuse rather than train Eq. 12 silently
    AF_CHECK(cfg->stru_target == AF_STRU_PROTOTYPE, AF_EINVAL,
             "stru_target 'teacher_token' runs on the CPU only (the CUDA trainer computes "
             "Eq. 12's prototype target); use device='cpu' or stru_target='prototype'");
    af_cuda_trainer *t = (af_cuda_trainer *)af_calloc(1, sizeof *t);
    if (t == nullptr) return AF_ENOMEM;
    t->cfg = *cfg;
    t->B = batch;
    af_status st = af_cuda_context_create(&t->ctx, device, 0);  // exact fp32 GEMMs
    if (st == AF_OK) st = af_cuda_model_create(t->ctx, &t->model, &cfg->net);
    if (st == AF_OK && cfg->precision == AF_PRECISION_BF16)
        st = af_cuda_model_set_bf16(t->ctx, t->model);  // before reserve: sizes its scratch
    if (st == AF_OK) st = af_cuda_model_reserve(t->ctx, t->model, batch);
    if (st != AF_OK) {
        af_cuda_trainer_free(t);
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
    size_t B = (size_t)batch, S2 = (size_t)n->S * n->S, BL = B * t->L, f = sizeof(float);
    size_t scratch = cfg->objective == AF_OBJECTIVE_PAPER
                         ? af_cuda_paper_loss_scratch_floats(batch, t->L, t->K)
                         : af_cuda_released_loss_scratch_floats(t->L, t->K);
    struct {
        void **p;
        size_t bytes;
    } dev[] = {{(void **)&t->protos, (size_t)t->L * t->K * f},
               {(void **)&t->protos_next, (size_t)t->L * t->K * f},
               {(void **)&t->images, B * S2},
               {(void **)&t->x_prime, B * S2},
               {(void **)&t->mask, B * S2},
               {(void **)&t->abn, BL},
               {(void **)&t->img, B * t->C * S2 * f},
               {(void **)&t->img_prime, B * t->C * S2 * f},
               {(void **)&t->target, BL * t->Q * f},
               {(void **)&t->q_teacher, BL * t->K * f},
               {(void **)&t->dlogits, BL * t->K * f},
               {(void **)&t->dpred, BL * t->Q * f},
               {(void **)&t->dtokens, B * t->T * t->D * f},
               {(void **)&t->obj_scratch, (scratch ? scratch : 1) * f},
               {(void **)&t->anomaly, (2 * B + BL) * sizeof(double)},
               {(void **)&t->dev, sizeof(af_cuda_step_scalars)}};
    for (size_t i = 0; st == AF_OK && i < sizeof dev / sizeof dev[0]; i++)
        st = dmalloc(dev[i].p, dev[i].bytes);
    if (st == AF_OK) st = hmalloc((void **)&t->staging, B * S2 + BL);
    if (st == AF_OK) st = hmalloc((void **)&t->host, sizeof(af_cuda_step_scalars));
    if (st == AF_OK && cudaDeviceSynchronize() != cudaSuccess)  // the plain cudaMemsets
        st = af_error(AF_ECUDA, "CUDA trainer initialisation failed: %s",
                      cudaGetErrorString(cudaGetLastError()));
    if (st != AF_OK) {
        af_cuda_trainer_free(t);
        return st;
    }
    *out = t;
    return AF_OK;
}

extern "C" af_status af_cuda_trainer_acquire(af_cuda_trainer *t) {
    if (__atomic_exchange_n(&t->busy, 1, __ATOMIC_ACQUIRE))
        return af_error(AF_EBUSY, "this AFiRe model is being used by another thread; use one "
                                  "model per thread or serialise the calls");
    return AF_OK;
}

extern "C" void af_cuda_trainer_release(af_cuda_trainer *t) {
    __atomic_store_n(&t->busy, 0, __ATOMIC_RELEASE);
}

// ------------------------------------------------------------------ shared stages

// A call that fails half-way may leave copies queued that still read the staging buffer or
// write host outputs: drain the stream before returning the error.
static af_status finish(af_cuda_trainer *t, af_status st) {
    if (st == AF_OK) return st;
    if (t->dist.nccl == nullptr) {
        cudaStreamSynchronize(t->ctx->stream);
    } else if (!af_nccl_broken(t->dist.nccl)) {
        // bounded by the deadline: a collective whose peers left must not hang this rank
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", af_last_error());
        af_nccl_wait(t->dist.nccl, t->ctx->stream, "draining the stream after an error");
        af_error(st, "%s", msg);  // the first error is the one to report
    }
    return st;
}

static af_status begin(af_cuda_trainer *t, int B) {
    AF_CHECK(B >= 1 && B <= t->B, AF_EINVAL, "batch of %d images: must be between 1 and the "
             "model's batch capacity %d", B, t->B);
    AF_CUDA_TRY(cudaSetDevice(t->ctx->device));  // the calling thread may hold another device
    // bf16 path: the GEMM weights are re-rounded from the fp32 master weights at the start
    // of every call, so updates, uploads (load_buffers) and any other write to the state are
    // always seen (about 6 bytes of traffic per parameter: well under 1% of a step)
    return af_cuda_model_refresh_bf16(t->ctx, t->model);
}

// host uint8 images (and token mask) -> pinned staging -> device, on the context's stream.
// Every call ends with a synchronisation, so the staging buffer is free again.
static af_status upload_batch(af_cuda_trainer *t, const uint8_t *images, const uint8_t *token_mask,
                              int B) {
    cudaStream_t s = t->ctx->stream;
    size_t n = (size_t)B * t->S * t->S, off = (size_t)t->B * t->S * t->S, nl = (size_t)B * t->L;
    memcpy(t->staging, images, n);
    AF_CUDA_TRY(cudaMemcpyAsync(t->images, t->staging, n, cudaMemcpyHostToDevice, s));
    if (token_mask != nullptr) {
        memcpy(t->staging + off, token_mask, nl);
        AF_CUDA_TRY(cudaMemcpyAsync(t->abn, t->staging + off, nl, cudaMemcpyHostToDevice, s));
    }
    return AF_OK;
}

// twin of trainer.c prepare_inputs: normalised x and its MAE-order target patches
static af_status prepare_inputs(af_cuda_trainer *t, int B) {
    AF_TRY(af_cuda_normalize_images(t->ctx, t->img, t->images, B, t->C, t->S));
    return af_cuda_patchify_forward(t->ctx, t->target, t->img, B, t->C, t->S, t->cfg.net.P,
                                    AF_PATCH_PQC);
}

// The one host synchronisation of a call: the scalars come back with it.
static af_status fetch_scalars(af_cuda_trainer *t) {
    AF_CUDA_TRY(cudaMemcpyAsync(t->host, t->dev, sizeof(af_cuda_step_scalars),
                                cudaMemcpyDeviceToHost, t->ctx->stream));
    if (t->dist.nccl != nullptr)  // several ranks: wait against the deadline
        return af_nccl_wait(t->dist.nccl, t->ctx->stream, "the training step");
    AF_CUDA_TRY(cudaStreamSynchronize(t->ctx->stream));
    return AF_OK;
}

// ------------------------------------------------------------------ several ranks

static af_status dist_allreduce(void *ctx, void *buf, size_t count, af_comm_type type,
                                af_comm_op op, const char *what) {
    af_cuda_trainer_dist *d = (af_cuda_trainer_dist *)ctx;
    return af_nccl_allreduce(d->red.nccl, buf, count, type, op, d->red.stream, what);
}

extern "C" af_status af_cuda_trainer_set_comm(af_cuda_trainer *t, af_nccl *nccl) {
    AF_CUDA_TRY(cudaSetDevice(t->ctx->device));
    AF_CUDA_TRY(cudaStreamSynchronize(t->ctx->stream));
    dist_free(&t->dist);
    if (nccl == nullptr) return AF_OK;
    AF_CUDA_CHECK(af_nccl_device(nccl) == t->ctx->device, "the NCCL communicator is on device "
                  "%d, the trainer on device %d", af_nccl_device(nccl), t->ctx->device);
    const int W = af_nccl_size(nccl), L = t->L, K = t->K;
    int64_t mine[6] = {t->B, L, K, t->Q, t->cfg.objective, t->cfg.net.D};
    int64_t *all = (int64_t *)af_calloc((size_t)W * 6, sizeof(int64_t));
    if (all == nullptr) return AF_ENOMEM;
    af_status st = af_nccl_host_allgather(nccl, mine, all, sizeof mine, "trainer setup");
    for (int r = 0; st == AF_OK && r < W; r++)
        if (memcmp(all + 6 * r, mine, sizeof mine) != 0)
            st = af_error(AF_EINVAL, "rank %d's trainer differs from rank %d's (batch capacity "
                          "%lld vs %lld, K %lld vs %lld, objective %lld vs %lld): every rank "
                          "needs the same config and per-rank batch", r, af_nccl_rank(nccl),
                          (long long)all[6 * r], (long long)mine[0], (long long)all[6 * r + 2],
                          (long long)mine[2], (long long)all[6 * r + 4], (long long)mine[4]);
    af_free(all);
    AF_TRY(st);
    AF_CUDA_CHECK((double)W * t->B * L <= 2147483647.0 / (K > 1 ? K : 1),
                  "%d ranks x %d images are too many for one global batch", W, t->B);
    af_cuda_trainer_dist *d = &t->dist;
    const int BG = W * t->B;
    const size_t LK = (size_t)L * K, rows = (size_t)BG * L, f = sizeof(float);
    size_t scratch = t->cfg.objective == AF_OBJECTIVE_PAPER
                         ? af_cuda_paper_loss_scratch_floats(BG, L, K)
                         : af_cuda_released_loss_scratch_floats(L, K);
    AF_CUDA_CHECK(scratch > 0, "the objective's scratch for a global batch of %d images is too "
                  "large", BG);
    struct {
        void **p;
        size_t bytes;
    } dev[] = {{(void **)&d->logits, rows * K * f},      {(void **)&d->dlogits, rows * K * f},
               {(void **)&d->abn, rows},                 {(void **)&d->abn_pad, rows},
               {(void **)&d->obj_scratch, scratch * f},  {(void **)&d->sums, (LK + K + 2) * 8},
               {(void **)&d->share, 8}};
    for (size_t i = 0; st == AF_OK && i < sizeof dev / sizeof dev[0]; i++)
        st = dmalloc(dev[i].p, dev[i].bytes);
    d->counts = (int64_t *)af_calloc((size_t)W, sizeof(int64_t));
    if (st == AF_OK && d->counts == nullptr) st = AF_ENOMEM;
    cudaStream_t cs = nullptr;
    if (st == AF_OK && cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking) != cudaSuccess)
        st = af_error(AF_ECUDA, "cannot create the gradient all-reduce stream");
    d->comm_stream = cs;
    for (int i = 0; st == AF_OK && i <= AF_NET_COUNT; i++) {
        cudaEvent_t ev;
        if (cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) != cudaSuccess)
            st = af_error(AF_ECUDA, "cannot create a CUDA event");
        else if (i < AF_NET_COUNT) d->ev_grad[i] = ev;
        else d->ev_done = ev;
    }
    if (st == AF_OK && cudaDeviceSynchronize() != cudaSuccess)  // the plain cudaMemsets
        st = af_error(AF_ECUDA, "CUDA trainer initialisation failed: %s",
                      cudaGetErrorString(cudaGetLastError()));
    if (st != AF_OK) {
        dist_free(d);
        return st;
    }
    const char *ov = getenv("AFIRE_NCCL_OVERLAP");
    d->overlap = !(ov != nullptr && strcmp(ov, "0") == 0);
    d->nccl = nccl;
    d->rank = af_nccl_rank(nccl);
    d->world = W;
    d->red.nccl = nccl;
    d->red.stream = t->ctx->stream;
    return AF_OK;
}

// The images of every rank in this step (a host exchange): B_global and this rank's offset.
static af_status dist_begin(af_cuda_trainer *t, int B) {
    af_cuda_trainer_dist *d = &t->dist;
    int64_t mine = B;
    AF_TRY(af_nccl_host_allgather(d->nccl, &mine, d->counts, sizeof mine, "image counts"));
    return af_dist_batch_offsets(d->counts, d->world, d->rank, t->B, &d->B_global, &d->offset);
}

// dst = every rank's rows of the padded gather src (blocks of the capacity), in rank order
static af_status dist_compact(af_cuda_trainer *t, void *dst, const void *src, size_t row_bytes) {
    af_cuda_trainer_dist *d = &t->dist;
    const size_t block = (size_t)t->B * row_bytes;
    size_t at = 0;
    for (int r = 0; r < d->world; r++) {
        const size_t n = (size_t)d->counts[r] * row_bytes;
        AF_CUDA_TRY(cudaMemcpyAsync((char *)dst + at, (const char *)src + (size_t)r * block, n,
                                    cudaMemcpyDeviceToDevice, t->ctx->stream));
        at += n;
    }
    return AF_OK;
}

__global__ void share_out_kernel(double *share, const af_cuda_step_scalars *s, double w) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *share = (double)s->f_recon * w;
}
__global__ void share_in_kernel(af_cuda_step_scalars *s, const double *share) {
    if (threadIdx.x == 0 && blockIdx.x == 0) s->f_recon = (float)*share;
}

// Stage 4 with several ranks (trainer.c dist_losses): the cross-image terms on the gathered
// global batch (the same numbers on every rank; this rank keeps its gradient rows), the
// restoration on the own images weighted B / B_global and summed, the abnormal tokens of all.
static af_status dist_losses(af_cuda_trainer *t, int B, const float *logits, const float *pred) {
    af_cuda_trainer_dist *d = &t->dist;
    const af_trainer_config *c = &t->cfg;
    af_cuda_context *ctx = t->ctx;
    af_cuda_step_scalars *dv = t->dev;
    cudaStream_t s = ctx->stream;
    const int L = t->L, K = t->K, Q = t->Q, BG = (int)d->B_global;
    const size_t LK = (size_t)L * K, f = sizeof(float);
    AF_TRY(af_nccl_allgather(d->nccl, logits, d->dlogits, (size_t)t->B * LK * f, s,
                             "student logits gather"));
    AF_TRY(af_nccl_allgather(d->nccl, t->abn, d->abn_pad, (size_t)t->B * L, s,
                             "token labels gather"));
    AF_TRY(dist_compact(t, d->logits, d->dlogits, LK * f));
    AF_TRY(dist_compact(t, d->abn, d->abn_pad, (size_t)L));
    count_kernel<<<1, TPB, 0, s>>>(&dv->n_abn, d->abn, (int64_t)BG * L, is_nonzero());
    AF_CUDA_LAUNCHED();
    AF_CUDA_TRY(cudaMemsetAsync(d->dlogits, 0, (size_t)BG * LK * f, s));
    const double share = (double)B / BG;
    const float w_recon = (float)(c->w_recon * share);
    if (c->objective == AF_OBJECTIVE_PAPER) {
        AF_TRY(af_cuda_paper_loss(ctx, &dv->f_stru, &dv->f_cate, d->dlogits, d->dlogits,
                                  d->logits, t->protos_next, d->abn, BG, L, K, c->tau_s, c->tau,
                                  c->w_stru, c->w_cate, d->obj_scratch));
        AF_TRY(af_cuda_recon_loss(ctx, &dv->f_recon, t->dpred, pred, t->target, t->abn, B, L, Q,
                                  c->w_abn, w_recon));
    } else {
        AF_TRY(af_cuda_released_cst_loss(ctx, &dv->f_cst, d->dlogits, d->logits, t->protos_next,
                                         d->abn, BG, L, K, c->tau_s, c->sinkhorn_eps,
                                         c->sinkhorn_iters, c->w_stru, d->obj_scratch));
        AF_TRY(af_cuda_recon_loss(ctx, &dv->f_recon, t->dpred, pred, t->target, nullptr, B, L,
                                  Q, 1.0f, w_recon));
    }
    AF_CUDA_TRY(cudaMemcpyAsync(t->dlogits, d->dlogits + (size_t)d->offset * LK,
                                (size_t)B * LK * f, cudaMemcpyDeviceToDevice, s));
    share_out_kernel<<<1, 32, 0, s>>>(d->share, dv, share);
    AF_CUDA_LAUNCHED();
    AF_TRY(af_nccl_allreduce(d->nccl, d->share, 1, AF_COMM_F64, AF_COMM_SUM, s,
                             "restoration loss"));
    share_in_kernel<<<1, 32, 0, s>>>(dv, d->share);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

// Network `net` has its gradients: with overlap, all-reduce them on the comm stream now.
static af_status dist_grads_ready(af_cuda_trainer *t, int net) {
    af_cuda_trainer_dist *d = &t->dist;
    if (!d->overlap) return AF_OK;
    cudaStream_t cs = (cudaStream_t)d->comm_stream;
    AF_CUDA_TRY(cudaEventRecord((cudaEvent_t)d->ev_grad[net], t->ctx->stream));
    AF_CUDA_TRY(cudaStreamWaitEvent(cs, (cudaEvent_t)d->ev_grad[net], 0));
    return af_nccl_allreduce(d->nccl, t->model->grads[net], t->model->numel[net], AF_COMM_F32,
                             AF_COMM_SUM, cs, "gradient all-reduce");
}

// Every gradient summed over the ranks before the compute stream goes on (clipping).
static af_status dist_grads_reduced(af_cuda_trainer *t) {
    af_cuda_trainer_dist *d = &t->dist;
    if (!d->overlap) {
        for (int net = 0; net < AF_NET_COUNT; net++)
            AF_TRY(af_nccl_allreduce(d->nccl, t->model->grads[net], t->model->numel[net],
                                     AF_COMM_F32, AF_COMM_SUM, t->ctx->stream,
                                     "gradient all-reduce"));
        return AF_OK;
    }
    AF_CUDA_TRY(cudaEventRecord((cudaEvent_t)d->ev_done, (cudaStream_t)d->comm_stream));
    AF_CUDA_TRY(cudaStreamWaitEvent(t->ctx->stream, (cudaEvent_t)d->ev_done, 0));
    return AF_OK;
}

// Steps 1-6 of af_trainer_grads, then (update) step 7 of af_trainer_step gated on the device.
static af_status run_step(af_cuda_trainer *t, const uint8_t *images, int B, af_step_stats *stats,
                          int update) {
    AF_TRY(begin(t, B));
    const af_trainer_config *c = &t->cfg;
    af_cuda_context *ctx = t->ctx;
    af_cuda_model *m = t->model;
    af_cuda_step_scalars *d = t->dev;
    const int L = t->L, K = t->K, Q = t->Q;
    const size_t BL = (size_t)B * L, f = sizeof(float);
    af_schedule_values sv = af_schedule_at(&c->sched, t->step);
    memset(stats, 0, sizeof *stats);
    stats->step = t->step;
    af_cuda_trainer_dist *dd = &t->dist;
    const int dist = dd->nccl != nullptr;
    const af_reducer red = {dd, dist_allreduce};
    if (dist) AF_TRY(dist_begin(t, B));
    AF_CUDA_TRY(cudaMemsetAsync(d, 0, sizeof *d, ctx->stream));
    AF_TRY(upload_batch(t, images, nullptr, B));

    // 1. synthetic lesions, determined by (seed, step, global image index)
    AF_TRY(af_cuda_slm_generate(ctx, t->x_prime, t->mask, t->abn, t->images, B, t->S, c->net.P,
                                &c->slm, c->seed, (uint64_t)t->step,
                                dist ? (uint64_t)dd->offset : 0));
    count_kernel<<<1, TPB, 0, ctx->stream>>>(&d->n_abn, t->abn, (int64_t)BL, is_nonzero());
    AF_CUDA_LAUNCHED();
    AF_TRY(prepare_inputs(t, B));
    AF_TRY(af_cuda_normalize_images(ctx, t->img_prime, t->x_prime, B, t->C, t->S));

    // 2. teacher on the normal image -> prototypes, staged in protos_next
    AF_TRY(af_cuda_encoder_forward(ctx, m, AF_TEACHER, t->img, B));
    AF_TRY(af_cuda_head_forward(ctx, m, AF_TEACHER, m->enc_acts[AF_TEACHER].out, B));
    const float *proto_src = m->head_acts[AF_TEACHER].logits;
    // (several ranks: the Sinkhorn sums and the prototype means over the global batch; a
    // NaN on one rank reaches every rank's prototypes, so the update gate agrees)
    if (c->objective == AF_OBJECTIVE_PAPER) {
        AF_TRY(af_cuda_sinkhorn_knopp_dist(ctx, t->q_teacher, proto_src, (int)BL, K,
                                           (float)sv.teacher_temp, c->sinkhorn_iters,
                                           dist ? dd->B_global * L : (int64_t)BL,
                                           dist ? dd->sums + (size_t)L * K : nullptr,
                                           dist ? &red : nullptr));
        proto_src = t->q_teacher;
    }
    AF_CUDA_TRY(cudaMemcpyAsync(t->protos_next, t->protos, (size_t)L * K * f,
                                cudaMemcpyDeviceToDevice, ctx->stream));
    AF_TRY(af_cuda_prototypes_update_dist(ctx, t->protos_next, proto_src, B,
                                          dist ? dd->B_global : B, L, K, c->proto_m,
                                          sv.first_epoch || !t->protos_set,
                                          dist ? dd->sums : nullptr, dist ? &red : nullptr));

    // 3. student on x' -> head logits and the restoration of masked tokens (the fast path
    // keeps the student's activations only between set_training 1 and 0)
    AF_TRY(af_cuda_model_set_training(ctx, m, 1));
    AF_TRY(af_cuda_encoder_forward(ctx, m, AF_STUDENT, t->img_prime, B));
    const float *tokens = m->enc_acts[AF_STUDENT].out;
    AF_TRY(af_cuda_head_forward(ctx, m, AF_STUDENT, tokens, B));
    AF_TRY(af_cuda_decoder_forward(ctx, m, tokens, t->abn, B));
    const float *logits = m->head_acts[AF_STUDENT].logits;
    const float *pred = m->dec_acts.pred;

    // 4. losses (device scalars) and their weighted gradients
    AF_CUDA_TRY(cudaMemsetAsync(t->dlogits, 0, BL * K * f, ctx->stream));
    AF_CUDA_TRY(cudaMemsetAsync(t->dpred, 0, BL * Q * f, ctx->stream));
    int paper = c->objective == AF_OBJECTIVE_PAPER;
    if (dist) {
        AF_TRY(dist_losses(t, B, logits, pred));
    } else if (paper) {
        AF_TRY(af_cuda_paper_loss(ctx, &d->f_stru, &d->f_cate, t->dlogits, t->dlogits, logits,
                                  t->protos_next, t->abn, B, L, K, c->tau_s, c->tau, c->w_stru,
                                  c->w_cate, t->obj_scratch));
        AF_TRY(af_cuda_recon_loss(ctx, &d->f_recon, t->dpred, pred, t->target, t->abn, B, L, Q,
                                  c->w_abn, c->w_recon));
    } else {
        AF_TRY(af_cuda_released_loss(ctx, &d->f_cst, &d->f_recon, t->dlogits, t->dpred, logits,
                                     t->protos_next, t->abn, pred, t->target, B, L, K, Q,
                                     c->tau_s, c->sinkhorn_eps, c->sinkhorn_iters, c->w_stru,
                                     c->w_recon, t->obj_scratch));
    }

    // 5. backward (a non-finite loss only poisons the gradients: the update is gated); the
    // decoder writes dtokens, the head adds its part
    // several ranks: each network's gradients are summed over them once its backward is done
    AF_TRY(af_cuda_model_zero_grad(ctx, m));
    AF_TRY(af_cuda_decoder_backward(ctx, m, t->dpred, t->dtokens));
    if (dist) AF_TRY(dist_grads_ready(t, AF_NET_DECODER));
    AF_TRY(af_cuda_head_backward(ctx, m, t->dlogits, t->dtokens));
    if (dist) AF_TRY(dist_grads_ready(t, AF_NET_HEAD));
    AF_TRY(af_cuda_encoder_backward(ctx, m, t->dtokens));
    if (dist) {
        AF_TRY(dist_grads_ready(t, AF_NET_ENCODER));
        AF_TRY(dist_grads_reduced(t));
    }
    AF_TRY(af_cuda_model_set_training(ctx, m, 0));

    // 6. clip; the update flag = finite loss and finite gradient norm
    AF_TRY(af_cuda_clip_grad(ctx, m, c->clip > 0 ? c->clip : 0.0f, c->clip_global, &d->grad_norm));
    finalize_kernel<<<1, 32, 0, ctx->stream>>>(d, c->objective, c->w_stru, c->w_cate,
                                               c->w_recon);
    AF_CUDA_LAUNCHED();

    // 7. AdamW, EMA teacher, prototypes: skipped on the device unless d->ok
    if (update) {
        af_adamw_args a = {(float)sv.lr, (float)sv.wd, c->beta1, c->beta2, c->adam_eps,
                           (int)(t->step + 1), sv.freeze_last_layer};
        AF_TRY(af_cuda_adamw_step(ctx, m, &a, &d->ok));
        AF_TRY(af_cuda_ema_update(ctx, m, (float)sv.ema, &d->ok));
        int64_t n = (int64_t)L * K;
        commit_kernel<<<af_grid_1d(n, TPB), TPB, 0, ctx->stream>>>(t->protos, t->protos_next, n,
                                                                   &d->ok);
        AF_CUDA_LAUNCHED();
    }
    AF_TRY(fetch_scalars(t));

    // the stats and the refusals of af_trainer_grads, from the downloaded scalars
    const af_cuda_step_scalars *h = t->host;
    stats->abnormal_fraction = (double)h->n_abn / (double)(dist ? dd->B_global * L : (int64_t)BL);
    AF_TRY(af_step_stats_fill(stats, c, &sv, h->f_stru, h->f_cate, h->f_cst, h->f_recon));
    AF_TRY(af_step_stats_grad_norm(stats, h->grad_norm, h->ok));
    if (update) {
        t->protos_set = 1;
        t->step++;
    }
    return AF_OK;
}

extern "C" af_status af_cuda_trainer_step(af_cuda_trainer *t, const uint8_t *images, int B,
                                          af_step_stats *stats) {
    return finish(t, run_step(t, images, B, stats, 1));
}

extern "C" af_status af_cuda_trainer_grads(af_cuda_trainer *t, const uint8_t *images, int B,
                                           af_step_stats *stats) {
    return finish(t, run_step(t, images, B, stats, 0));
}

// ------------------------------------------------------------------ inference

static af_status encode(af_cuda_trainer *t, float *tokens, const uint8_t *images, int B,
                        af_branch branch) {
    AF_TRY(begin(t, B));
    AF_TRY(upload_batch(t, images, nullptr, B));
    AF_TRY(af_cuda_normalize_images(t->ctx, t->img, t->images, B, t->C, t->S));
    AF_TRY(af_cuda_encoder_forward(t->ctx, t->model, branch, t->img, B));
    return af_cuda_download(t->ctx, tokens, t->model->enc_acts[branch].out,
                            (size_t)B * t->T * t->D);
}

// Restoration queued on the stream (no sync): pred in model->dec_acts.pred, target in
// t->target, the non-finite count in dev->nonfinite.
static af_status queue_restore(af_cuda_trainer *t, const uint8_t *images,
                               const uint8_t *token_mask, int B) {
    af_cuda_context *ctx = t->ctx;
    AF_CUDA_TRY(cudaMemsetAsync(t->dev, 0, sizeof *t->dev, ctx->stream));
    AF_TRY(upload_batch(t, images, token_mask, B));
    if (token_mask == nullptr)
        AF_CUDA_TRY(cudaMemsetAsync(t->abn, 0, (size_t)B * t->L, ctx->stream));
    AF_TRY(prepare_inputs(t, B));
    AF_TRY(af_cuda_encoder_forward(ctx, t->model, AF_STUDENT, t->img, B));
    AF_TRY(af_cuda_decoder_forward(ctx, t->model, t->model->enc_acts[AF_STUDENT].out, t->abn, B));
    count_kernel<<<1, TPB, 0, ctx->stream>>>(&t->dev->nonfinite, t->model->dec_acts.pred,
                                             (int64_t)B * t->L * t->Q, is_nonfinite());
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

static af_status download_async(af_cuda_trainer *t, void *host, const void *dev, size_t bytes) {
    if (host != nullptr && bytes)
        AF_CUDA_TRY(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, t->ctx->stream));
    return AF_OK;
}

static af_status restoration_finite(const af_cuda_trainer *t) {
    if (t->host->nonfinite)
        return af_error(AF_ENONFINITE, "the restoration contains NaN/Inf (diverged weights?)");
    return AF_OK;
}

static af_status restore(af_cuda_trainer *t, float *pred, float *target, const uint8_t *images,
                         const uint8_t *token_mask, int B) {
    AF_TRY(begin(t, B));
    AF_TRY(queue_restore(t, images, token_mask, B));
    size_t bytes = (size_t)B * t->L * t->Q * sizeof(float);
    AF_TRY(download_async(t, pred, t->model->dec_acts.pred, bytes));
    AF_TRY(download_async(t, target, t->target, bytes));
    AF_TRY(fetch_scalars(t));
    return restoration_finite(t);
}

static af_status anomaly(af_cuda_trainer *t, double *score, double *log_score, double *err,
                         const uint8_t *images, int B) {
    AF_TRY(begin(t, B));
    AF_TRY(queue_restore(t, images, nullptr, B));
    double *d_score = t->anomaly, *d_log = t->anomaly + B, *d_err = t->anomaly + 2 * B;
    AF_TRY(af_cuda_anomaly_score(t->ctx, d_score, d_log, d_err, t->model->dec_acts.pred, t->target,
                                 B, t->L, t->Q));
    AF_TRY(download_async(t, score, d_score, (size_t)B * sizeof(double)));
    AF_TRY(download_async(t, log_score, d_log, (size_t)B * sizeof(double)));
    AF_TRY(download_async(t, err, d_err, (size_t)B * t->L * sizeof(double)));
    AF_TRY(fetch_scalars(t));
    return restoration_finite(t);
}

extern "C" af_status af_cuda_trainer_encode(af_cuda_trainer *t, float *tokens,
                                            const uint8_t *images, int B, af_branch branch) {
    return finish(t, encode(t, tokens, images, B, branch));
}

extern "C" af_status af_cuda_trainer_restore(af_cuda_trainer *t, float *pred, float *target,
                                             const uint8_t *images, const uint8_t *token_mask,
                                             int B) {
    return finish(t, restore(t, pred, target, images, token_mask, B));
}

extern "C" af_status af_cuda_trainer_anomaly(af_cuda_trainer *t, double *score, double *log_score,
                                             double *err, const uint8_t *images, int B) {
    return finish(t, anomaly(t, score, log_score, err, images, B));
}

// encoder output -> a caller-owned device buffer (no host copy)
static af_status encode_device(af_cuda_trainer *t, float *dst, const uint8_t *images, int B,
                               af_branch branch) {
    AF_CHECK(dst != nullptr, AF_EINVAL, "encode_device: destination buffer is NULL");
    AF_TRY(begin(t, B));
    AF_TRY(upload_batch(t, images, nullptr, B));
    AF_TRY(af_cuda_normalize_images(t->ctx, t->img, t->images, B, t->C, t->S));
    AF_TRY(af_cuda_encoder_forward(t->ctx, t->model, branch, t->img, B));
    AF_CUDA_TRY(cudaMemcpyAsync(dst, t->model->enc_acts[branch].out,
                                (size_t)B * t->T * t->D * sizeof(float),
                                cudaMemcpyDeviceToDevice, t->ctx->stream));
    // the staging buffer is free again and dst is complete for consumers on any stream
    AF_CUDA_TRY(cudaStreamSynchronize(t->ctx->stream));
    return AF_OK;
}

extern "C" af_status af_cuda_trainer_encode_device(af_cuda_trainer *t, float *dst,
                                                   const uint8_t *images, int B,
                                                   af_branch branch) {
    return finish(t, encode_device(t, dst, images, B, branch));
}

extern "C" int af_cuda_trainer_device(const af_cuda_trainer *t) { return t->ctx->device; }

// ------------------------------------------------------------------ state transfer

extern "C" float *af_cuda_trainer_buffer(af_cuda_trainer *t, const char *prefix, int net,
                                         size_t *count) {
    af_cuda_model *m = t->model;
    *count = 0;
    if (strcmp(prefix, "prototypes") == 0) {
        *count = (size_t)t->L * t->K;
        return t->protos;
    }
    if (net < 0 || net >= AF_NET_COUNT) return nullptr;
    float *p = nullptr;
    if (strcmp(prefix, "student") == 0) p = m->params[net];
    else if (strcmp(prefix, "teacher") == 0) p = net < 2 ? m->teacher[net] : nullptr;
    else if (strcmp(prefix, "adam_m") == 0) p = m->adam_m[net];
    else if (strcmp(prefix, "adam_v") == 0) p = m->adam_v[net];
    else if (strcmp(prefix, "grad") == 0) p = m->grads[net];
    if (p != nullptr) *count = m->numel[net];
    return p;
}

extern "C" af_status af_cuda_trainer_download(af_cuda_trainer *t, float *host, const float *dev,
                                              size_t n) {
    AF_CUDA_TRY(cudaSetDevice(t->ctx->device));
    return af_cuda_download(t->ctx, host, dev, n);
}

extern "C" af_status af_cuda_trainer_upload(af_cuda_trainer *t, float *dev, const float *host,
                                            size_t n) {
    AF_CUDA_TRY(cudaSetDevice(t->ctx->device));
    AF_TRY(af_cuda_upload(t->ctx, dev, host, n));
    return af_cuda_synchronize(t->ctx);  // the caller may free `host` right after
}
