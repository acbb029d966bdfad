// The device twin of csrc/core/params.c: input normalisation, the model's lifetime
// (create, reserve, free, zero_grad, sync_teacher), the bf16 weight shadows of the bf16 paths
// and the fast path's buffers (fast.cuh). Layouts, tables and initialisation are params.c's
// own (run on the host, uploaded).
#include <stdlib.h>

#include "model_internal.cuh"

// ------------------------------------------------------------------ input normalisation

// twin of af_normalize_images: out[b,ch,k] = (x/255 - mean[ch]) * (1/std[ch])
__global__ void normalize_kernel(float *out, const uint8_t *img, int64_t B, int C, int64_t SS,
                                 float m0, float m1, float m2, float i0, float i1, float i2) {
    int64_t total = B * C * SS;
    AF_GRID_STRIDE(int64_t, i, total) {
        int64_t k = i % SS, bc = i / SS;
        int ch = (int)(bc % C);
        int64_t b = bc / C;
        float mean = ch == 0 ? m0 : ch == 1 ? m1 : m2, inv = ch == 0 ? i0 : ch == 1 ? i1 : i2;
        out[i] = ((float)img[b * SS + k] / 255.0f - mean) * inv;
    }
}

extern "C" af_status af_cuda_normalize_images(af_cuda_context *ctx, float *out, const uint8_t *img,
                                              int B, int C, int S) {
    AF_CUDA_CHECK(out && img, "normalize_images: NULL buffer");
    AF_CUDA_CHECK(B >= 0 && S > 0, "normalize_images: bad sizes B=%d S=%d", B, S);
    AF_CUDA_CHECK(C == 1 || C == 3, "normalize_images: in_chans must be 1 or 3, got %d", C);
    if (B == 0) return AF_OK;
    // the constants and 1/std exactly as params.c computes them (float)
    const float mean1 = 0.449f, std1 = 0.226f;
    const float mean3[3] = {0.485f, 0.456f, 0.406f}, std3[3] = {0.229f, 0.224f, 0.225f};
    float mean[3], inv[3];
    for (int c = 0; c < 3; c++) {
        mean[c] = C == 1 ? mean1 : mean3[c];
        inv[c] = 1.0f / (C == 1 ? std1 : std3[c]);
    }
    int64_t total = (int64_t)B * C * S * S;
    normalize_kernel<<<af_grid_1d(total, TPB), TPB, 0, ctx->stream>>>(
        out, img, B, C, (int64_t)S * S, mean[0], mean[1], mean[2], inv[0], inv[1], inv[2]);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}


// ------------------------------------------------------------------ lifetime

static void fast_free(af_cuda_fast *f);

extern "C" af_status af_cuda_model_zero_grad(af_cuda_context *ctx, af_cuda_model *m) {
    for (int n = 0; n < AF_NET_COUNT; n++)
        AF_TRY(dzero(ctx, m->grads[n], m->numel[n] * sizeof(float)));
    return AF_OK;
}

extern "C" af_status af_cuda_model_sync_teacher(af_cuda_context *ctx, af_cuda_model *m) {
    for (int n = 0; n < 2; n++)
        AF_TRY(dcopy(ctx, m->teacher[n], m->params[n], m->numel[n] * sizeof(float)));
    return AF_OK;
}

extern "C" void af_cuda_model_free(af_cuda_model *m) {
    if (m == nullptr) return;
    for (int n = 0; n < AF_NET_COUNT; n++) {
        af_free(m->table[n]);
        af_cuda_free(m->params[n]);
        af_cuda_free(m->grads[n]);
        af_cuda_free(m->adam_m[n]);
        af_cuda_free(m->adam_v[n]);
    }
    af_cuda_free(m->teacher[0]);
    af_cuda_free(m->teacher[1]);
    if (m->tensors) cudaFree(m->tensors);
    if (m->sumsq) cudaFree(m->sumsq);
    af_cuda_free(m->coef);
    af_cuda_free(m->act_mem);
    af_cuda_free(m->wn_grad);
    if (m->dec_acts.mask) cudaFree(m->dec_acts.mask);
    for (int n = 0; n < AF_NET_COUNT; n++)
        if (m->params_h[n]) cudaFree(m->params_h[n]);
    for (int n = 0; n < 2; n++)
        if (m->teacher_h[n]) cudaFree(m->teacher_h[n]);
    if (m->hscratch[0]) cudaFree(m->hscratch[0]);
    fast_free(m->fast);
    af_free(m);
}

// ------------------------------------------------------------------ bf16 shadows and scratch

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

static af_status bf16_malloc(af_bf16 **p, size_t n) {
    *p = nullptr;
    cudaError_t e = cudaMalloc((void **)p, (n ? n : 1) * sizeof(af_bf16));
    if (e != cudaSuccess) {
        cudaGetLastError();
        *p = nullptr;
        return af_error(e == cudaErrorMemoryAllocation ? AF_ENOMEM : AF_ECUDA,
                        "cudaMalloc of %zu bf16 values failed: %s", n, cudaGetErrorString(e));
    }
    return AF_OK;
}

// Values per GEMM-operand scratch region for `cap` images: the widest row of any rounded
// operand (linear inputs and output gradients, qkv, the attention probabilities of all heads
// of a token, dO) times cap*T rows (head rows number cap*L <= cap*T).
static size_t hscratch_values(const af_cuda_model *m, int cap) {
    const af_config *c = &m->cfg;
    size_t W = max_sz((size_t)c->D, (size_t)c->Dd), NH = (size_t)(c->H > c->Hd ? c->H : c->Hd);
    size_t T = (size_t)m->T, R = (size_t)c->mlp_ratio;
    size_t row = max_sz(max_sz(R * W, 3 * W), max_sz(NH * T, (size_t)m->Q));
    row = max_sz(row, max_sz((size_t)c->head_hidden, (size_t)c->head_bottleneck));
    return (size_t)cap * T * row;
}

// Three regions carved from one allocation (hscratch[0] owns it).
static af_status hscratch_alloc(af_cuda_model *m, int cap, af_bf16 *out[3], size_t *n) {
    *n = hscratch_values(m, cap);
    size_t stride = (*n + 127) & ~(size_t)127;  // 256-byte aligned regions
    out[0] = out[1] = out[2] = nullptr;
    AF_TRY(bf16_malloc(&out[0], 3 * stride));
    out[1] = out[0] + stride;
    out[2] = out[1] + stride;
    return AF_OK;
}

// ------------------------------------------------------------------ fast path buffers

// Carving arrays out of one allocation, 256-byte aligned; base NULL only counts bytes.
struct arena {
    char *base;
    size_t off;
};

template <typename T>
static T *take(arena *a, size_t n) {
    size_t bytes = (n * sizeof(T) + 255) & ~(size_t)255;
    T *p = a->base ? (T *)(a->base + a->off) : nullptr;
    a->off += bytes ? bytes : 256;
    return p;
}

static size_t round_up(size_t n, size_t k) { return (n + k - 1) / k * k; }

// NL blocks of width W, N = cap*T rows, heads*T softmax statistics per image; layer strides
// rounded to 256 bytes so every layer's arrays are aligned as cuDNN and cuBLASLt like.
static void carve_blocks(arena *a, af_fast_blocks *b, int NL, size_t N, int W, int R,
                         size_t stats) {
    size_t sW = round_up(N * W, 128), sRW = round_up(N * R * W, 128), sN = round_up(N, 64),
           sH = round_up(stats, 64), nl = (size_t)NL;
    b->ln1 = take<bf16>(a, nl * sW);
    b->qkv = take<bf16>(a, nl * 3 * sW);
    b->atty = take<bf16>(a, nl * sW);
    b->ln2 = take<bf16>(a, nl * sW);
    b->fch = take<bf16>(a, nl * sRW);
    b->ln1_mean = take<float>(a, nl * sN);
    b->ln1_rstd = take<float>(a, nl * sN);
    b->ln2_mean = take<float>(a, nl * sN);
    b->ln2_rstd = take<float>(a, nl * sN);
    b->lse = take<float>(a, nl * sH);
    b->res2 = take<float>(a, nl * sW);
    b->res3 = take<float>(a, nl * sW);
    b->sW = sW, b->sRW = sRW, b->sN = sN, b->sH = sH;
}

// What inference and the teacher need (af_cuda_model_reserve); returns the bytes.
static size_t carve_reserved(af_cuda_fast *f, const af_cuda_model *m, int cap, char *base) {
    const af_config *c = &m->cfg;
    size_t T = (size_t)m->T, N = (size_t)cap * T, NL = (size_t)cap * m->L, Q = (size_t)m->Q;
    size_t D = (size_t)c->D, Dd = (size_t)c->Dd, R = (size_t)c->mlp_ratio;
    size_t Wm = max_sz(D, Dd), NHm = (size_t)(c->H > c->Hd ? c->H : c->Hd);
    size_t Hh = (size_t)c->head_hidden, Bn = (size_t)c->head_bottleneck, K = (size_t)c->K;
    size_t nlast = c->shared_last_layer ? 1 : (size_t)m->L;
    arena a = {base, 0};
    carve_blocks(&a, &f->slot, 1, N, (int)Wm, (int)R, (size_t)cap * NHm * T);
    f->branch = take<bf16>(&a, N * Wm);
    f->gelu = take<bf16>(&a, N * R * Wm);
    f->patches32 = take<float>(&a, NL * Q);
    f->patches = take<bf16>(&a, NL * Q);
    f->enc_x0 = take<float>(&a, N * D);
    for (int br = 0; br < 2; br++) {
        f->enc_out[br] = take<float>(&a, N * D);
        f->enc_mean[br] = take<float>(&a, N);
        f->enc_rstd[br] = take<float>(&a, N);
    }
    f->dec_tokens = take<bf16>(&a, N * D);
    f->dec_x0 = take<float>(&a, N * Dd);
    f->dec_lnf = take<bf16>(&a, N * Dd);
    f->dec_mean = take<float>(&a, N);
    f->dec_rstd = take<float>(&a, N);
    f->dec_pred_full = take<float>(&a, N * Q);
    f->dec_pred = take<float>(&a, NL * Q);
    f->head_x = take<bf16>(&a, NL * D);
    f->head_h1 = take<bf16>(&a, NL * Hh);
    f->head_h2 = take<bf16>(&a, NL * Hh);
    f->head_g = take<bf16>(&a, NL * Hh);
    for (int br = 0; br < 2; br++) {
        f->head_z[br] = take<float>(&a, NL * Bn);
        f->head_znorm[br] = take<float>(&a, NL);
        f->head_zn_t[br] = take<float>(&a, NL * Bn);
        f->head_w_eff[br] = take<float>(&a, nlast * K * Bn);
        f->head_vnorm[br] = take<float>(&a, nlast * K);
        f->head_logits_t[br] = take<float>(&a, NL * K);
        f->head_logits[br] = take<float>(&a, NL * K);
    }
    size_t wide = max_sz(max_sz(K, Bn), D);  // dlogits_t, dzn / dz, the fc1 dinp (fp32)
    f->head_fa = take<float>(&a, NL * wide);
    f->head_fb = take<float>(&a, NL * wide);
    f->head_dz_t = take<float>(&a, NL * Bn);
    return a.off;
}

// The saved activations and backward scratch (af_cuda_model_set_training); returns the bytes.
static size_t carve_training(af_cuda_fast *f, const af_cuda_model *m, int cap, char *base) {
    const af_config *c = &m->cfg;
    size_t T = (size_t)m->T, N = (size_t)cap * T, NL = (size_t)cap * m->L, Q = (size_t)m->Q;
    size_t D = (size_t)c->D, Dd = (size_t)c->Dd, R = (size_t)c->mlp_ratio, Wm = max_sz(D, Dd);
    size_t Hh = (size_t)c->head_hidden, Bn = (size_t)c->head_bottleneck;
    arena a = {base, 0};
    carve_blocks(&a, &f->enc, c->depth, N, c->D, c->mlp_ratio, (size_t)cap * c->H * T);
    carve_blocks(&a, &f->dec, c->depth_d, N, c->Dd, c->mlp_ratio, (size_t)cap * c->Hd * T);
    f->dres = take<float>(&a, N * Wm);
    f->dres_h = take<bf16>(&a, N * Wm);
    f->dln = take<bf16>(&a, N * Wm);
    f->datty = take<bf16>(&a, N * Wm);
    f->dqkv = take<bf16>(&a, N * 3 * Wm);
    f->dfch = take<bf16>(&a, N * R * Wm);
    f->dfull = take<float>(&a, N * Q);
    f->dfull_h = take<bf16>(&a, N * Q);
    f->head_dz = take<bf16>(&a, NL * Bn);
    f->head_da = take<bf16>(&a, NL * Hh);
    f->head_db = take<bf16>(&a, NL * Hh);
    return a.off;
}

static void clear_training(af_cuda_fast *f) {
    memset(&f->enc, 0, sizeof f->enc);
    memset(&f->dec, 0, sizeof f->dec);
    f->dres = nullptr;
    f->dres_h = f->dln = f->datty = f->dqkv = f->dfch = f->dfull_h = nullptr;
    f->dfull = nullptr;
    f->head_dz = f->head_da = f->head_db = nullptr;
}

static void fast_free(af_cuda_fast *f) {
    if (f == nullptr) return;
    if (f->mem) cudaFree(f->mem);
    if (f->train_mem) cudaFree(f->train_mem);
    af_sdpa_scratch_free(&f->sdpa_ws);
    af_free(f);
}

static af_status dev_alloc(void **p, size_t bytes, const char *what) {
    *p = nullptr;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        *p = nullptr;
        return af_error(e == cudaErrorMemoryAllocation ? AF_ENOMEM : AF_ECUDA,
                        "cudaMalloc of %zu bytes (%s) failed: %s", bytes, what,
                        cudaGetErrorString(e));
    }
    return AF_OK;
}

// The fast path's af_cuda_model_reserve: its own buffers, the fp32 outputs others read
// pointed at from the af_*_acts structs (everything else there stays NULL).
static af_status fast_reserve(af_cuda_context *ctx, af_cuda_model *m, int B) {
    af_cuda_fast *f = m->fast;
    size_t unused;
    AF_TRY(af_acts_size(&m->cfg, B, 2, AF_ACTS_ALIGN_CUDA, &unused));  // params.c's size checks
    af_cuda_fast tmp = *f;
    size_t bytes = carve_reserved(&tmp, m, B, nullptr);
    void *mem = nullptr;
    uint8_t *mask = nullptr;
    AF_TRY(dev_alloc(&mem, bytes, "fast path activations"));
    af_status st = dev_alloc((void **)&mask, (size_t)B * m->L, "token mask");
    if (st == AF_OK) st = dzero(ctx, mem, bytes);  // a first read of an unused tail is defined
    if (st == AF_OK) st = dzero(ctx, mask, (size_t)B * m->L);
    if (st != AF_OK) {
        if (mem) cudaFree(mem);
        if (mask) cudaFree(mask);
        return st;
    }
    cudaStreamSynchronize(ctx->stream);  // the old buffers may still be in use by queued work
    if (f->mem) cudaFree(f->mem);
    if (f->train_mem) cudaFree(f->train_mem);  // sized for the old capacity: made again lazily
    f->train_mem = nullptr;
    clear_training(f);
    if (m->dec_acts.mask) cudaFree(m->dec_acts.mask);
    f->mem = mem;
    carve_reserved(f, m, B, (char *)mem);
    f->cap = B;
    memset(m->enc_acts, 0, sizeof m->enc_acts);
    memset(m->head_acts, 0, sizeof m->head_acts);
    memset(&m->dec_acts, 0, sizeof m->dec_acts);
    memset(&m->scratch, 0, sizeof m->scratch);
    for (int br = 0; br < 2; br++) {
        af_encoder_acts *e = &m->enc_acts[br];
        e->out = f->enc_out[br], e->lnf_mean = f->enc_mean[br], e->lnf_rstd = f->enc_rstd[br];
        e->blocks.cap = B;
        af_head_acts *h = &m->head_acts[br];
        h->z = f->head_z[br], h->znorm = f->head_znorm[br], h->zn_t = f->head_zn_t[br];
        h->w_eff = f->head_w_eff[br], h->vnorm = f->head_vnorm[br];
        h->logits_t = f->head_logits_t[br], h->logits = f->head_logits[br];
    }
    m->dec_acts.pred_full = f->dec_pred_full;
    m->dec_acts.pred = f->dec_pred;
    m->dec_acts.blocks.cap = B;
    m->dec_acts.mask = mask;
    m->scratch.dh_a = f->head_fa, m->scratch.dh_b = f->head_fb, m->scratch.dz_t = f->head_dz_t;
    m->capacity = B;
    m->enc_B[0] = m->enc_B[1] = m->head_B[0] = m->head_B[1] = m->dec_B = 0;
    return AF_OK;
}

extern "C" af_status af_cuda_model_set_training(af_cuda_context *ctx, af_cuda_model *m, int on) {
    if (m == nullptr || m->fast == nullptr) return AF_OK;
    af_cuda_fast *f = m->fast;
    if (on && f->train_mem == nullptr) {
        AF_CUDA_CHECK(f->cap > 0, "set_training: the model has no activations reserved");
        af_cuda_fast tmp = *f;
        size_t bytes = carve_training(&tmp, m, f->cap, nullptr);
        void *mem = nullptr;
        AF_TRY(dev_alloc(&mem, bytes, "fast path training activations"));
        af_status st = dzero(ctx, mem, bytes);
        if (st != AF_OK) {
            cudaFree(mem);
            return st;
        }
        f->train_mem = mem;
        carve_training(f, m, f->cap, (char *)mem);
    }
    f->train = on ? 1 : 0;
    return AF_OK;
}

// AFIRE_CUDA_FAST=1: the fast path (fast.cuh) for this model. Before the first reserve only.
static af_status fast_create(af_cuda_context *ctx, af_cuda_model *m) {
    AF_TRY(af_cuda_fast_init(ctx));  // cuBLASLt and its workspaces now, not in a step
    af_cuda_fast *f = (af_cuda_fast *)af_calloc(1, sizeof *f);
    if (f == nullptr) return AF_ENOMEM;
    const char *e = getenv("AFIRE_CUDA_SDPA");
    f->sdpa = e == nullptr || e[0] == 0 || strcmp(e, "auto") == 0 ? AF_SDPA_AUTO
              : strcmp(e, "cudnn") == 0                            ? AF_SDPA_CUDNN
              : strcmp(e, "ours") == 0                             ? AF_SDPA_OURS
                                                                   : -1;
    if (f->sdpa < 0) {
        af_free(f);
        return af_error(AF_EINVAL, "AFIRE_CUDA_SDPA must be auto, cudnn or ours, got '%s'", e);
    }
    m->fast = f;
    return AF_OK;
}

static int fast_requested(void) {
    const char *e = getenv("AFIRE_CUDA_FAST");
    return e != nullptr && strcmp(e, "1") == 0;
}


extern "C" af_status af_cuda_model_refresh_bf16(af_cuda_context *ctx, af_cuda_model *m) {
    if (m == nullptr || !m->bf16) return AF_OK;
    for (int n = 0; n < AF_NET_COUNT; n++)
        AF_TRY(af_cuda_to_bf16(ctx, m->params_h[n], m->params[n], m->numel[n]));
    for (int n = 0; n < 2; n++)
        AF_TRY(af_cuda_to_bf16(ctx, m->teacher_h[n], m->teacher[n], m->numel[n]));
    return AF_OK;
}

extern "C" af_status af_cuda_model_set_bf16(af_cuda_context *ctx, af_cuda_model *m) {
    AF_CUDA_CHECK(m != nullptr, "set_bf16: model is NULL");
    if (m->bf16) return AF_OK;
    for (int n = 0; n < AF_NET_COUNT; n++) {
        AF_TRY(bf16_malloc(&m->params_h[n], m->numel[n]));
        if (n < 2) AF_TRY(bf16_malloc(&m->teacher_h[n], m->numel[n]));
    }
    if (m->capacity == 0 && fast_requested()) {
        AF_TRY(fast_create(ctx, m));  // its buffers come with af_cuda_model_reserve
    } else if (m->capacity > 0) {
        AF_TRY(hscratch_alloc(m, m->capacity, m->hscratch, &m->hscratch_n));
    }
    m->bf16 = 1;
    return af_cuda_model_refresh_bf16(ctx, m);
}

extern "C" af_status af_cuda_model_reserve(af_cuda_context *ctx, af_cuda_model *m, int B) {
    AF_CUDA_CHECK(m != nullptr, "reserve: model is NULL");
    AF_CUDA_CHECK(B >= 1, "batch size must be >= 1, got %d", B);
    if (B <= m->capacity) return AF_OK;
    if (m->fast) return fast_reserve(ctx, m, B);
    size_t floats;
    AF_TRY(af_acts_size(&m->cfg, B, 2, AF_ACTS_ALIGN_CUDA, &floats));  // the checks of params.c
    float *mem = nullptr;
    AF_TRY(af_cuda_malloc(ctx, &mem, floats));
    uint8_t *mask = nullptr;
    cudaError_t e = cudaMalloc((void **)&mask, (size_t)B * m->L);
    if (e != cudaSuccess) {
        cudaGetLastError();
        af_cuda_free(mem);
        return af_error(AF_ENOMEM, "cudaMalloc of the token mask failed: %s", cudaGetErrorString(e));
    }
    // zero once so a first read of an unused tail is defined (as the CPU's calloc)
    af_status st = af_cuda_zero(ctx, mem, floats);
    if (st == AF_OK) st = dzero(ctx, mask, (size_t)B * m->L);
    af_bf16 *hs[3] = {nullptr, nullptr, nullptr};
    size_t hn = 0;
    if (st == AF_OK && m->bf16) st = hscratch_alloc(m, B, hs, &hn);
    if (st != AF_OK) {
        af_cuda_free(mem);
        cudaFree(mask);
        return st;
    }
    cudaStreamSynchronize(ctx->stream);  // the old block may still be in use by queued work
    af_cuda_free(m->act_mem);
    if (m->dec_acts.mask) cudaFree(m->dec_acts.mask);
    if (m->bf16) {
        if (m->hscratch[0]) cudaFree(m->hscratch[0]);
        for (int i = 0; i < 3; i++) m->hscratch[i] = hs[i];
        m->hscratch_n = hn;
    }
    m->act_mem = mem;
    m->act_floats = floats;
    af_acts_carve(&m->cfg, B, 2, mem, AF_ACTS_ALIGN_CUDA, m->enc_acts, m->head_acts,
                  &m->dec_acts, &m->scratch);
    m->dec_acts.mask = mask;
    m->capacity = B;
    m->enc_B[0] = m->enc_B[1] = m->head_B[0] = m->head_B[1] = m->dec_B = 0;
    return AF_OK;
}

// The trainable tensors in table order, for the multi-tensor optimiser kernels.
static af_status build_tensor_list(af_cuda_context *ctx, af_cuda_model *m) {
    int k = 0;
    for (int n = 0; n < AF_NET_COUNT; n++)
        for (int i = 0; i < m->ntable[n]; i++) k += m->table[n][i].trainable;
    m->ntrain = k;
    af_cuda_tensor *host = (af_cuda_tensor *)af_calloc(k ? k : 1, sizeof(af_cuda_tensor));
    if (host == nullptr) return AF_ENOMEM;
    k = 0;
    for (int n = 0; n < AF_NET_COUNT; n++)
        for (int i = 0; i < m->ntable[n]; i++) {
            const af_param_info *e = &m->table[n][i];
            if (!e->trainable) continue;
            size_t o = e->offset;
            af_cuda_tensor t = {m->params[n] + o, m->grads[n] + o, m->adam_m[n] + o,
                                m->adam_v[n] + o, n < 2 ? m->teacher[n] + o : nullptr,
                                e->numel, e->decay, e->last_layer};
            host[k++] = t;
        }
    af_status st = AF_OK;
    cudaError_t e = cudaMalloc((void **)&m->tensors, sizeof(af_cuda_tensor) * (k ? k : 1));
    if (e == cudaSuccess) e = cudaMalloc((void **)&m->sumsq, sizeof(double) * (k ? k : 1));
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(m->tensors, host, sizeof(af_cuda_tensor) * k, cudaMemcpyHostToDevice,
                            ctx->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(ctx->stream);  // `host` is freed next
    if (e != cudaSuccess) {
        cudaGetLastError();
        st = af_error(AF_ECUDA, "optimiser tensor list: %s", cudaGetErrorString(e));
    }
    if (st == AF_OK) st = af_cuda_malloc(ctx, &m->coef, k ? k : 1);
    af_free(host);
    return st;
}

extern "C" af_status af_cuda_model_create(af_cuda_context *ctx, af_cuda_model **out,
                                          const af_config *cfg) {
    AF_CUDA_CHECK(out != nullptr && ctx != nullptr, "cuda_model_create: NULL argument");
    *out = nullptr;
    AF_TRY(af_config_validate(cfg));
    af_cuda_model *m = (af_cuda_model *)af_calloc(1, sizeof(af_cuda_model));
    if (m == nullptr) return AF_ENOMEM;
    m->cfg = *cfg;
    m->L = (cfg->S / cfg->P) * (cfg->S / cfg->P);
    m->T = m->L + 1;
    m->Q = cfg->P * cfg->P * cfg->C;
    af_status st = AF_OK;
    for (int n = 0; n < AF_NET_COUNT && st == AF_OK; n++) {
        st = af_param_table(cfg, (af_net)n, &m->table[n], &m->ntable[n], &m->numel[n]);
        if (st != AF_OK) break;
        size_t k = m->numel[n];
        float *host = (float *)af_calloc(k, sizeof(float));
        if (host == nullptr) st = AF_ENOMEM;
        if (st == AF_OK) st = af_init_params(cfg, (af_net)n, host);  // same init as the CPU
        if (st == AF_OK) st = af_cuda_malloc(ctx, &m->params[n], k);
        if (st == AF_OK) st = af_cuda_malloc(ctx, &m->grads[n], k);
        if (st == AF_OK) st = af_cuda_malloc(ctx, &m->adam_m[n], k);
        if (st == AF_OK) st = af_cuda_malloc(ctx, &m->adam_v[n], k);
        if (st == AF_OK && n < 2) st = af_cuda_malloc(ctx, &m->teacher[n], k);
        if (st == AF_OK) st = af_cuda_upload(ctx, m->params[n], host, k);
        if (st == AF_OK) st = af_cuda_zero(ctx, m->grads[n], k);
        if (st == AF_OK) st = af_cuda_zero(ctx, m->adam_m[n], k);
        if (st == AF_OK) st = af_cuda_zero(ctx, m->adam_v[n], k);
        if (st == AF_OK) st = af_cuda_synchronize(ctx);  // the upload reads `host`
        af_free(host);
    }
    if (st == AF_OK) st = af_cuda_model_sync_teacher(ctx, m);
    if (st == AF_OK) st = build_tensor_list(ctx, m);
    if (st == AF_OK) st = af_cuda_synchronize(ctx);
    if (st != AF_OK) {
        cudaStreamSynchronize(ctx->stream);
        af_cuda_model_free(m);
        return st;
    }
    af_encoder_carve(&m->enc[AF_STUDENT], m->params[AF_NET_ENCODER], cfg);
    af_encoder_carve(&m->enc[AF_TEACHER], m->teacher[AF_NET_ENCODER], cfg);
    af_encoder_carve(&m->enc_grad, m->grads[AF_NET_ENCODER], cfg);
    af_head_carve(&m->head[AF_STUDENT], m->params[AF_NET_HEAD], cfg);
    af_head_carve(&m->head[AF_TEACHER], m->teacher[AF_NET_HEAD], cfg);
    af_head_carve(&m->head_grad, m->grads[AF_NET_HEAD], cfg);
    af_decoder_carve(&m->dec, m->params[AF_NET_DECODER], cfg);
    af_decoder_carve(&m->dec_grad, m->grads[AF_NET_DECODER], cfg);
    size_t nlast = cfg->shared_last_layer ? 1 : (size_t)m->L;
    st = af_cuda_malloc(ctx, &m->wn_grad, nlast * cfg->K * cfg->head_bottleneck);
    if (st != AF_OK) {
        af_cuda_model_free(m);
        return st;
    }
    *out = m;
    return AF_OK;
}
