/* The CPU model's lifetime (model.h): creation (training or inference), its activation
 * layout (af_acts_layout_cpu) and bf16 workspace, reserve, free. Separate from params.c, which
 * the CUDA extension shares, because these size CPU kernels' scratch (csrc/ops). */
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "model.h"
#include "ops/ops.h"

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

af_acts_layout af_acts_layout_cpu(const af_config *c, int cap, int inference) {
    af_acts_layout l = {1, 1, 1, inference != 0, 1};
#ifdef _OPENMP
    l.threads = omp_get_max_threads();
#endif
    int T = (c->S / c->P) * (c->S / c->P) + 1, NH = c->H > c->Hd ? c->H : c->Hd;
    l.att_scratch_floats = inference ? af_attention_fused_forward_scratch_floats(T, l.threads)
                                     : af_attention_fused_scratch_floats(cap, T, NH, l.threads);
    return l;
}

/* Bytes of af_gemm_bf16 workspace for every linear layer of the model at `cap` images
 * (forward, and unless inference the input and weight gradients), `threads` threads. */
static size_t bf16_workspace(const af_config *c, int cap, int inference, int threads) {
    int L = (c->S / c->P) * (c->S / c->P), T = L + 1, Q = c->P * c->P * c->C;
    int R = c->mlp_ratio, D = c->D, Dd = c->Dd;
    int shapes[][3] = {/* rows, IC, OC */
                       {cap * L, Q, D},          {cap * T, D, 3 * D},  {cap * T, D, D},
                       {cap * T, D, R * D},      {cap * T, R * D, D},  {cap * L, D, c->head_hidden},
                       {cap * L, c->head_hidden, c->head_hidden},
                       {cap * L, c->head_hidden, c->head_bottleneck},
                       {cap * T, D, Dd},         {cap * T, Dd, 3 * Dd}, {cap * T, Dd, Dd},
                       {cap * T, Dd, R * Dd},    {cap * T, R * Dd, Dd}, {cap * T, Dd, Q}};
    size_t ws = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int N = shapes[i][0], IC = shapes[i][1], OC = shapes[i][2];
        size_t f = af_gemm_bf16_workspace(N, OC, IC, threads);
        if (!inference) {
            size_t d = af_gemm_bf16_workspace(N, IC, OC, threads);
            size_t w = af_gemm_bf16_workspace(OC, IC, N, threads);
            f = max_sz(f, max_sz(d, w));
        }
        ws = max_sz(ws, f);
    }
    /* the attention's GEMMs use it too, one slot per thread */
    ws = max_sz(ws, af_attention_bf16_workspace(T, D, c->H, threads));
    return max_sz(ws, af_attention_bf16_workspace(T, Dd, c->Hd, threads));
}

af_status af_model_reserve(af_model *m, int B) {
    AF_CHECK(m != NULL, AF_EINVAL, "reserve: model is NULL");
    AF_CHECK(B >= 1, AF_EINVAL, "batch size must be >= 1, got %d", B);
    if (B <= m->capacity) return AF_OK;
    size_t floats;
    m->layout = af_acts_layout_cpu(&m->cfg, B, m->inference);
    AF_TRY(af_acts_size_layout(&m->cfg, B, m->branches, AF_ACTS_ALIGN_CPU, &m->layout, &floats));
    float *mem = af_calloc(floats, sizeof(float));
    if (mem == NULL) return AF_ENOMEM;
    uint8_t *mask = af_calloc((size_t)B * m->L, 1);
    size_t ws_bytes = m->bf16 ? bf16_workspace(&m->cfg, B, m->inference, m->layout.threads) : 0;
    void *ws = ws_bytes ? af_calloc(ws_bytes, 1) : NULL;
    if (mask == NULL || (ws_bytes && ws == NULL)) {
        af_free(mem);
        af_free(mask);
        af_free(ws);
        return AF_ENOMEM;
    }
    af_free(m->bf16_ws);
    m->bf16_ws = ws;
    m->bf16_ws_bytes = ws_bytes;
    af_free(m->act_mem);
    af_free(m->dec_acts.mask);
    m->act_mem = mem;
    m->act_floats = floats;
    af_acts_carve_layout(&m->cfg, B, m->branches, mem, AF_ACTS_ALIGN_CPU, &m->layout, m->enc_acts,
                         m->head_acts, &m->dec_acts, &m->scratch);
    m->dec_acts.mask = mask;
    m->capacity = B;
    m->enc_B[0] = m->enc_B[1] = m->head_B[0] = m->head_B[1] = m->dec_B = 0;
    return AF_OK;
}

void af_model_free(af_model *m) {
    if (m == NULL) return;
    for (int n = 0; n < AF_NET_COUNT; n++) {
        af_free(m->table[n]);
        af_free(m->params[n]);
        af_free(m->grads[n]);
        af_free(m->adam_m[n]);
        af_free(m->adam_v[n]);
    }
    af_free(m->teacher[0]);
    af_free(m->teacher[1]);
    af_free(m->act_mem);
    af_free(m->dec_acts.mask);
    af_free(m->bf16_ws);
    af_free(m);
}

af_status af_model_create(af_model **out, const af_config *cfg) {
    return af_model_create_mode(out, cfg, 0, 0);
}

af_status af_model_create_mode(af_model **out, const af_config *cfg, int inference, int bf16) {
    AF_CHECK(out != NULL, AF_EINVAL, "model_create: out is NULL");
    *out = NULL;
    AF_TRY(af_config_validate(cfg));
    af_model *m = af_calloc(1, sizeof(af_model));
    if (m == NULL) return AF_ENOMEM;
    m->cfg = *cfg;
    m->branches = 2;
    m->inference = inference != 0;
    m->bf16 = bf16 != 0;
    m->L = (cfg->S / cfg->P) * (cfg->S / cfg->P);
    m->T = m->L + 1;
    m->Q = cfg->P * cfg->P * cfg->C;
    af_status st = AF_OK;
    for (int n = 0; n < AF_NET_COUNT && st == AF_OK; n++) {
        st = af_param_table(cfg, (af_net)n, &m->table[n], &m->ntable[n], &m->numel[n]);
        if (st != AF_OK) break;
        if (m->inference && n == AF_NET_HEAD) continue; /* encode / restore never run it */
        size_t k = m->numel[n];
        m->params[n] = af_calloc(k, sizeof(float));
        if (!m->inference) {
            m->grads[n] = af_calloc(k, sizeof(float));
            m->adam_m[n] = af_calloc(k, sizeof(float));
            m->adam_v[n] = af_calloc(k, sizeof(float));
            if (!m->grads[n] || !m->adam_m[n] || !m->adam_v[n]) st = AF_ENOMEM;
        }
        if (!m->params[n]) st = AF_ENOMEM;
        if (st == AF_OK && n < 2 && (m->teacher[n] = af_calloc(k, sizeof(float))) == NULL)
            st = AF_ENOMEM;
        if (st == AF_OK) st = af_init_params(cfg, (af_net)n, m->params[n]);
    }
    if (st != AF_OK) {
        af_model_free(m);
        return st;
    }
    af_encoder_carve(&m->enc[AF_STUDENT], m->params[AF_NET_ENCODER], cfg);
    af_encoder_carve(&m->enc[AF_TEACHER], m->teacher[AF_NET_ENCODER], cfg);
    af_decoder_carve(&m->dec, m->params[AF_NET_DECODER], cfg);
    if (!m->inference) {
        af_encoder_carve(&m->enc_grad, m->grads[AF_NET_ENCODER], cfg);
        af_head_carve(&m->head[AF_STUDENT], m->params[AF_NET_HEAD], cfg);
        af_head_carve(&m->head[AF_TEACHER], m->teacher[AF_NET_HEAD], cfg);
        af_head_carve(&m->head_grad, m->grads[AF_NET_HEAD], cfg);
        af_decoder_carve(&m->dec_grad, m->grads[AF_NET_DECODER], cfg);
    }
    af_model_sync_teacher(m);
    *out = m;
    return AF_OK;
}

void af_model_zero_grad(af_model *m) {
    for (int n = 0; n < AF_NET_COUNT; n++)
        if (m->grads[n] != NULL) memset(m->grads[n], 0, m->numel[n] * sizeof(float));
}

void af_model_sync_teacher(af_model *m) {
    for (int n = 0; n < 2; n++)
        if (m->teacher[n] != NULL)
            memcpy(m->teacher[n], m->params[n], m->numel[n] * sizeof(float));
}
