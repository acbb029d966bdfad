// The device twin of csrc/core/params.c: input normalisation, the model's lifetime
// (create, reserve, free, zero_grad, sync_teacher) and the bf16 weight shadows of the fast
// path. Layouts, tables and initialisation are params.c's own (run on the host, uploaded).
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
    if (m->capacity > 0) AF_TRY(hscratch_alloc(m, m->capacity, m->hscratch, &m->hscratch_n));
    m->bf16 = 1;
    return af_cuda_model_refresh_bf16(ctx, m);
}

extern "C" af_status af_cuda_model_reserve(af_cuda_context *ctx, af_cuda_model *m, int B) {
    AF_CUDA_CHECK(m != nullptr, "reserve: model is NULL");
    AF_CUDA_CHECK(B >= 1, "batch size must be >= 1, got %d", B);
    if (B <= m->capacity) return AF_OK;
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
