// Host fallback of cuda/objective.cuh: each function copies its device inputs to the host,
// runs the CPU twin (slm.c, objective.c) and copies the results back (synchronising the
// stream). The definitions are WEAK: the device kernels (branch cudaobj) replace them at
// link time when they are built in, so the trainer always links and, without those
// kernels, still computes exactly the CPU objective. Slow (allocates and syncs per call):
// a correctness path, not the fast path.
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "objective.cuh"
#include "objective.h"

#define AF_WEAK extern "C" __attribute__((weak))

namespace {

// Host buffers of one call, freed together.
struct host_bufs {
    void *p[8] = {nullptr};
    int n = 0;
    void *get(size_t bytes) {
        void *q = calloc(bytes ? bytes : 1, 1);
        p[n++] = q;
        return q;
    }
    ~host_bufs() {
        for (int i = 0; i < n; i++) free(p[i]);
    }
};

af_status down(af_cuda_context *ctx, void *host, const void *dev, size_t bytes) {
    if (bytes == 0 || dev == nullptr) return AF_OK;
    AF_CUDA_TRY(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, ctx->stream));
    AF_CUDA_TRY(cudaStreamSynchronize(ctx->stream));
    return AF_OK;
}

af_status up(af_cuda_context *ctx, void *dev, const void *host, size_t bytes) {
    if (bytes == 0 || dev == nullptr) return AF_OK;
    AF_CUDA_TRY(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, ctx->stream));
    AF_CUDA_TRY(cudaStreamSynchronize(ctx->stream));  // the host buffer is freed next
    return AF_OK;
}

#define NOMEM(...) \
    if (!(__VA_ARGS__)) return af_error(AF_ENOMEM, "objective host fallback: out of memory")

}  // namespace

AF_WEAK af_status af_cuda_slm_generate(af_cuda_context *ctx, uint8_t *x_prime, uint8_t *mask,
                                       uint8_t *token_labels, const uint8_t *x, int B, int S,
                                       int P, const af_slm_config *cfg, uint64_t seed,
                                       uint64_t step, uint64_t first_image_index) {
    AF_CUDA_CHECK(B >= 1 && S >= 1 && P >= 1 && S % P == 0, "slm_generate: bad sizes");
    size_t n = (size_t)B * S * S, nl = (size_t)B * (S / P) * (S / P);
    host_bufs h;
    uint8_t *hx = (uint8_t *)h.get(n), *hxp = (uint8_t *)h.get(n), *hm = (uint8_t *)h.get(n),
            *ht = (uint8_t *)h.get(nl);
    NOMEM(hx && hxp && hm && ht);
    AF_TRY(down(ctx, hx, x, n));
    AF_TRY(slm_generate(hxp, hm, ht, hx, B, S, P, cfg, seed, step, first_image_index));
    AF_TRY(up(ctx, x_prime, hxp, n));
    AF_TRY(up(ctx, mask, hm, n));
    return up(ctx, token_labels, ht, nl);
}

AF_WEAK af_status af_cuda_sinkhorn_knopp(af_cuda_context *ctx, float *q, const float *logits,
                                         int N, int K, float eps, int iters) {
    AF_CUDA_CHECK(N >= 1 && K >= 1, "sinkhorn_knopp: bad sizes N=%d K=%d", N, K);
    size_t bytes = (size_t)N * K * sizeof(float);
    host_bufs h;
    float *hl = (float *)h.get(bytes), *hq = (float *)h.get(bytes);
    NOMEM(hl && hq);
    AF_TRY(down(ctx, hl, logits, bytes));
    AF_TRY(sinkhorn_knopp(hq, hl, N, K, eps, iters));
    return up(ctx, q, hq, bytes);
}

AF_WEAK af_status af_cuda_prototypes_update(af_cuda_context *ctx, float *C, const float *src,
                                            int B, int L, int K, float m, int overwrite) {
    AF_CUDA_CHECK(B >= 1 && L >= 1 && K >= 1, "prototypes_update: bad sizes");
    size_t bc = (size_t)L * K * sizeof(float), bs = (size_t)B * bc;
    host_bufs h;
    float *hc = (float *)h.get(bc), *hs = (float *)h.get(bs);
    NOMEM(hc && hs);
    AF_TRY(down(ctx, hc, C, bc));
    AF_TRY(down(ctx, hs, src, bs));
    AF_TRY(prototypes_update(hc, hs, B, L, K, m, overwrite));
    return up(ctx, C, hc, bc);
}

AF_WEAK size_t af_cuda_paper_loss_scratch_floats(int B, int L, int K) { return 1; }

AF_WEAK af_status af_cuda_paper_loss(af_cuda_context *ctx, float *l_stru, float *l_cate,
                                     float *ds_stru, float *ds_cate, const float *s,
                                     const float *C, const uint8_t *abn, int B, int L, int K,
                                     float tau_s, float tau, float w_stru, float w_cate,
                                     float *scratch) {
    AF_CUDA_CHECK(B >= 1 && L >= 1 && K >= 1, "paper_loss: bad sizes");
    size_t n = (size_t)B * L * K, bytes = n * sizeof(float);
    host_bufs h;
    float *hs = (float *)h.get(bytes), *hc = (float *)h.get((size_t)L * K * sizeof(float));
    uint8_t *ha = (uint8_t *)h.get((size_t)B * L);
    float *hd1 = ds_stru ? (float *)h.get(bytes) : nullptr;
    float *hd2 = ds_cate == nullptr ? nullptr : ds_cate == ds_stru ? hd1 : (float *)h.get(bytes);
    float *hscr = (float *)h.get(paper_loss_scratch_floats(B, L, K) * sizeof(float));
    NOMEM(hs && hc && ha && hscr && (!ds_stru || hd1) && (!ds_cate || hd2));
    AF_TRY(down(ctx, hs, s, bytes));
    AF_TRY(down(ctx, hc, C, (size_t)L * K * sizeof(float)));
    AF_TRY(down(ctx, ha, abn, (size_t)B * L));
    AF_TRY(down(ctx, hd1, ds_stru, bytes));
    if (hd2 != hd1) AF_TRY(down(ctx, hd2, ds_cate, bytes));
    float ls = 0.0f, lc = 0.0f;
    AF_TRY(paper_loss(&ls, &lc, hd1, hd2, hs, hc, ha, B, L, K, tau_s, tau, w_stru, w_cate, hscr));
    AF_TRY(up(ctx, ds_stru, hd1, bytes));
    if (hd2 != hd1) AF_TRY(up(ctx, ds_cate, hd2, bytes));
    AF_TRY(up(ctx, l_stru, &ls, sizeof(float)));
    return up(ctx, l_cate, &lc, sizeof(float));
}

AF_WEAK af_status af_cuda_recon_loss(af_cuda_context *ctx, float *loss, float *dy, const float *y,
                                     const float *x, const uint8_t *abn, int B, int L, int PPC,
                                     float w_abn, float weight) {
    AF_CUDA_CHECK(B >= 1 && L >= 1 && PPC >= 1, "recon_loss: bad sizes");
    size_t bytes = (size_t)B * L * PPC * sizeof(float);
    host_bufs h;
    float *hy = (float *)h.get(bytes), *hx = (float *)h.get(bytes);
    float *hd = dy ? (float *)h.get(bytes) : nullptr;
    uint8_t *ha = abn ? (uint8_t *)h.get((size_t)B * L) : nullptr;
    NOMEM(hy && hx && (!dy || hd) && (!abn || ha));
    AF_TRY(down(ctx, hy, y, bytes));
    AF_TRY(down(ctx, hx, x, bytes));
    AF_TRY(down(ctx, hd, dy, bytes));
    AF_TRY(down(ctx, ha, abn, (size_t)B * L));
    float l = 0.0f;
    AF_TRY(recon_loss(&l, hd, hy, hx, ha, B, L, PPC, w_abn, weight));
    AF_TRY(up(ctx, dy, hd, bytes));
    return up(ctx, loss, &l, sizeof(float));
}

AF_WEAK size_t af_cuda_released_loss_scratch_floats(int L, int K) { return 1; }

AF_WEAK af_status af_cuda_released_loss(af_cuda_context *ctx, float *l_cst, float *l_recon,
                                        float *ds, float *dy, const float *s, const float *C,
                                        const uint8_t *abn, const float *y, const float *x,
                                        int B, int L, int K, int PPC, float tau_s, float eps,
                                        int iters, float w_cst, float w_recon, float *scratch) {
    AF_CUDA_CHECK(B >= 1 && L >= 1 && K >= 1 && PPC >= 1, "released_loss: bad sizes");
    size_t bs = (size_t)B * L * K * sizeof(float), by = (size_t)B * L * PPC * sizeof(float);
    host_bufs h;
    float *hs = (float *)h.get(bs), *hc = (float *)h.get((size_t)L * K * sizeof(float));
    uint8_t *ha = (uint8_t *)h.get((size_t)B * L);
    float *hy = (float *)h.get(by), *hx = (float *)h.get(by);
    float *hds = ds ? (float *)h.get(bs) : nullptr, *hdy = dy ? (float *)h.get(by) : nullptr;
    float *hscr = (float *)h.get(released_loss_scratch_floats(L, K) * sizeof(float));
    NOMEM(hs && hc && ha && hy && hx && hscr && (!ds || hds) && (!dy || hdy));
    AF_TRY(down(ctx, hs, s, bs));
    AF_TRY(down(ctx, hc, C, (size_t)L * K * sizeof(float)));
    AF_TRY(down(ctx, ha, abn, (size_t)B * L));
    AF_TRY(down(ctx, hy, y, by));
    AF_TRY(down(ctx, hx, x, by));
    AF_TRY(down(ctx, hds, ds, bs));
    AF_TRY(down(ctx, hdy, dy, by));
    float lc = 0.0f, lr = 0.0f;
    AF_TRY(released_loss(&lc, &lr, hds, hdy, hs, hc, ha, hy, hx, B, L, K, PPC, tau_s, eps, iters,
                         w_cst, w_recon, hscr));
    AF_TRY(up(ctx, ds, hds, bs));
    AF_TRY(up(ctx, dy, hdy, by));
    AF_TRY(up(ctx, l_cst, &lc, sizeof(float)));
    return up(ctx, l_recon, &lr, sizeof(float));
}

AF_WEAK af_status af_cuda_anomaly_score(af_cuda_context *ctx, double *score, double *log_score,
                                        double *err, const float *y, const float *x, int B, int L,
                                        int PPC) {
    AF_CUDA_CHECK(B >= 1 && L >= 1 && PPC >= 1, "anomaly_score: bad sizes");
    size_t by = (size_t)B * L * PPC * sizeof(float);
    host_bufs h;
    float *hy = (float *)h.get(by), *hx = (float *)h.get(by);
    double *hs = (double *)h.get(B * sizeof(double)), *hl = (double *)h.get(B * sizeof(double)),
           *he = (double *)h.get((size_t)B * L * sizeof(double));
    NOMEM(hy && hx && hs && hl && he);
    AF_TRY(down(ctx, hy, y, by));
    AF_TRY(down(ctx, hx, x, by));
    AF_TRY(anomaly_score(hs, hl, he, hy, hx, B, L, PPC));
    AF_TRY(up(ctx, score, hs, B * sizeof(double)));
    AF_TRY(up(ctx, log_score, hl, B * sizeof(double)));
    return up(ctx, err, he, (size_t)B * L * sizeof(double));
}
