/* ViT encoder and restoration decoder on the CPU (METHOD.md §2): pre-norm transformer
 * blocks shared by both, each *_forward next to its *_backward. Dimension letters as
 * afire.h; N = B*T rows. */
#include "blocks.h"
#include "common.h"
#include "model.h"
#include "ops/ops.h"

#define ENC_EPS 1e-6f /* timm ViT LayerNorm (norm_layer eps=1e-6)            */
#define DEC_EPS 1e-5f /* released decoder uses nn.LayerNorm's default eps    */

/* ------------------------------------------------------------------ linear layers */

void af_model_linear_forward(const af_model *m, float *out, const float *inp, const float *w,
                             const float *b, int N, int IC, int OC) {
    if (m->bf16) af_linear_forward_bf16(out, inp, w, b, N, IC, OC, m->bf16_ws, m->bf16_ws_bytes);
    else af_linear_forward(out, inp, w, b, N, IC, OC);
}

void af_model_linear_backward(const af_model *m, float *dinp, float *dw, float *db,
                              const float *dout, const float *inp, const float *w, int N, int IC,
                              int OC) {
    if (m->bf16)
        af_linear_backward_bf16(dinp, dw, db, dout, inp, w, N, IC, OC, m->bf16_ws,
                                m->bf16_ws_bytes);
    else af_linear_backward(dinp, dw, db, dout, inp, w, N, IC, OC);
}

/* ------------------------------------------------------------------ transformer blocks */

static void add_inplace(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* x[B,T,W] -> NL blocks; the output is the last block's res3. Three row-tile kernels and the
 * fused attention per block (no T x T kept; att_stats NULL in a forward that keeps nothing)
 * on the model's scratch. */
static void blocks_forward(af_blocks_acts *acts, af_scratch *s, const float *x,
                           const af_blocks_params *p, int NL, int B, int T, int W, int R, int NH,
                           float eps) {
    int N = B * T;
    for (int l = 0; l < NL; l++) {
        af_block_view w = af_block_at(p, l, W, R);
        af_block_acts_view a = af_block_acts_at(acts, l, T, W, R, NH);
        /* with a shared slot, `in` is this layer's res3: read before the MLP overwrites it */
        const float *in = l == 0 ? x : af_block_acts_at(acts, l - 1, T, W, R, NH).res3;
        af_layernorm_linear_forward(a.ln1, a.ln1_mean, a.ln1_rstd, a.qkv, in, w.ln1_w, w.ln1_b,
                                    eps, w.qkv_w, w.qkv_b, N, W, 3 * W);
        af_attention_fused_forward(a.atty, a.att_stats, s->datt, s->datt_floats, a.qkv, B, T, W,
                                   NH, NULL, 0);
        af_linear_residual_layernorm_forward(a.res2, a.ln2, a.ln2_mean, a.ln2_rstd, a.atty,
                                             w.proj_w, w.proj_b, in, w.ln2_w, w.ln2_b, eps, N,
                                             W, W);
        af_mlp_forward(a.fch, a.fch_gelu, a.res3, a.ln2, w.fc1_w, w.fc1_b, w.fc2_w, w.fc2_b,
                       a.res2, N, W, R * W);
    }
}

/* In: s->dres = d(last res3). Out: s->dres = d(x). Parameter grads accumulate (+=); each
 * residual adds the skip path's gradient to its branch's (ops.h). gelu(fc1) is recomputed
 * (into dfch_gelu) next to its backward, whether or not the layout kept it. */
static void blocks_backward(af_scratch *s, af_blocks_params *g, const af_blocks_acts *acts,
                            const float *x, const af_blocks_params *p, int NL, int B, int T,
                            int W, int R, int NH) {
    int N = B * T;
    for (int l = NL - 1; l >= 0; l--) {
        af_block_view w = af_block_at(p, l, W, R), dw = af_block_at(g, l, W, R);
        af_block_acts_view a = af_block_acts_at(acts, l, T, W, R, NH);
        const float *in = l == 0 ? x : af_block_acts_at(acts, l - 1, T, W, R, NH).res3;
        /* MLP branch: res3 = res2 + fc2(gelu(fc1(ln2(res2)))) */
        af_mlp_backward_data(s->dfch, s->dfch_gelu, s->dres, a.fch, w.fc2_w, N, W, R * W);
        af_linear_grad mlp[2] = {{dw.fc2_w, dw.fc2_b, s->dres, s->dfch_gelu, N, R * W, W},
                                 {dw.fc1_w, dw.fc1_b, s->dfch, a.ln2, N, W, R * W}};
        af_linear_backward_params(mlp, 2);
        /* dres2 = LN2 backward of dfch @ fc1_w, + the skip path (dres) */
        af_linear_layernorm_backward_data(s->dres2, s->dln, s->dfch, w.fc1_w, a.res2, w.ln2_w,
                                          a.ln2_mean, a.ln2_rstd, s->dres, N, W, R * W);
        af_layernorm_backward(NULL, dw.ln2_w, dw.ln2_b, s->dln, a.res2, w.ln2_w, a.ln2_mean,
                              a.ln2_rstd, N, W);
        /* attention branch: res2 = in + proj(attn(qkv(ln1(in)))) */
        af_linear_backward(s->datty, dw.proj_w, dw.proj_b, s->dres2, a.atty, w.proj_w, N, W, W);
        af_attention_fused_backward(s->dqkv, s->datt, s->datt_floats, s->datty, a.qkv,
                                    a.att_stats, B, T, W, NH, NULL, 0);
        af_linear_backward(NULL, dw.qkv_w, dw.qkv_b, s->dqkv, a.ln1, w.qkv_w, N, W, 3 * W);
        /* dres = LN1 backward of dqkv @ qkv_w, + the skip path (dres2) */
        af_linear_layernorm_backward_data(s->dres, s->dln, s->dqkv, w.qkv_w, in, w.ln1_w,
                                          a.ln1_mean, a.ln1_rstd, s->dres2, N, W, 3 * W);
        af_layernorm_backward(NULL, dw.ln1_w, dw.ln1_b, s->dln, in, w.ln1_w, a.ln1_mean,
                              a.ln1_rstd, N, W);
    }
}

/* The bf16 twins of blocks_forward / blocks_backward: the same steps as separate ops, each
 * linear layer one bf16 GEMM over all rows (af_gemm_bf16 packs its B operand once for all
 * threads; row tiles would pack it once per tile). */
static void blocks_forward_bf16(const af_model *m, af_blocks_acts *acts, af_scratch *s,
                                const float *x, const af_blocks_params *p, int NL, int B, int T,
                                int W, int R, int NH, float eps) {
    int N = B * T;
    size_t nw = (size_t)N * W;
    for (int l = 0; l < NL; l++) {
        af_block_view w = af_block_at(p, l, W, R);
        af_block_acts_view a = af_block_acts_at(acts, l, T, W, R, NH);
        const float *in = l == 0 ? x : af_block_acts_at(acts, l - 1, T, W, R, NH).res3;
        af_layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, in, w.ln1_w, w.ln1_b, N, W, eps);
        af_model_linear_forward(m, a.qkv, a.ln1, w.qkv_w, w.qkv_b, N, W, 3 * W);
        af_attention_fused_forward(a.atty, a.att_stats, s->datt, s->datt_floats, a.qkv, B, T, W,
                                   NH, m->bf16_ws, m->bf16_ws_bytes);
        af_model_linear_forward(m, a.res2, a.atty, w.proj_w, w.proj_b, N, W, W);
        af_residual_forward(a.res2, a.res2, in, nw);
        af_layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res2, w.ln2_w, w.ln2_b, N, W, eps);
        af_model_linear_forward(m, a.fch, a.ln2, w.fc1_w, w.fc1_b, N, W, R * W);
        af_gelu_forward(a.fch_gelu, a.fch, (size_t)N * R * W);
        af_model_linear_forward(m, a.res3, a.fch_gelu, w.fc2_w, w.fc2_b, N, R * W, W);
        af_residual_forward(a.res3, a.res3, a.res2, nw);
    }
}

static void blocks_backward_bf16(const af_model *m, af_scratch *s, af_blocks_params *g,
                                 const af_blocks_acts *acts, const float *x,
                                 const af_blocks_params *p, int NL, int B, int T, int W, int R,
                                 int NH) {
    int N = B * T;
    size_t nw = (size_t)N * W, nm = (size_t)N * R * W;
    for (int l = NL - 1; l >= 0; l--) {
        af_block_view w = af_block_at(p, l, W, R), dw = af_block_at(g, l, W, R);
        af_block_acts_view a = af_block_acts_at(acts, l, T, W, R, NH);
        const float *in = l == 0 ? x : af_block_acts_at(acts, l - 1, T, W, R, NH).res3;
        /* MLP: dg = dres @ fc2_w; gelu(fc1) again (dfch_gelu) and dfch in one pass */
        af_model_linear_backward(m, s->dfch, NULL, NULL, s->dres, NULL, w.fc2_w, N, R * W, W);
        af_gelu_recompute_backward(s->dfch_gelu, s->dfch, s->dfch, a.fch, nm);
        af_model_linear_backward(m, NULL, dw.fc2_w, dw.fc2_b, s->dres, s->dfch_gelu, w.fc2_w, N,
                                 R * W, W);
        af_model_linear_backward(m, s->dln, dw.fc1_w, dw.fc1_b, s->dfch, a.ln2, w.fc1_w, N, W,
                                 R * W);
        af_layernorm_backward(s->dres2, dw.ln2_w, dw.ln2_b, s->dln, a.res2, w.ln2_w, a.ln2_mean,
                              a.ln2_rstd, N, W);
        af_residual_backward(s->dres2, NULL, s->dres, nw); /* + the skip path */
        af_model_linear_backward(m, s->datty, dw.proj_w, dw.proj_b, s->dres2, a.atty, w.proj_w,
                                 N, W, W);
        af_attention_fused_backward(s->dqkv, s->datt, s->datt_floats, s->datty, a.qkv,
                                    a.att_stats, B, T, W, NH, m->bf16_ws, m->bf16_ws_bytes);
        af_model_linear_backward(m, s->dln, dw.qkv_w, dw.qkv_b, s->dqkv, a.ln1, w.qkv_w, N, W,
                                 3 * W);
        af_layernorm_backward(s->dres, dw.ln1_w, dw.ln1_b, s->dln, in, w.ln1_w, a.ln1_mean,
                              a.ln1_rstd, N, W);
        af_residual_backward(s->dres, NULL, s->dres2, nw); /* + the skip path */
    }
}

static af_status check_batch(const af_model *m, int B, const char *what) {
    AF_CHECK(m != NULL, AF_EINVAL, "%s: model is NULL", what);
    AF_CHECK(B >= 1, AF_EINVAL, "%s: batch size must be >= 1, got %d", what, B);
    AF_CHECK(B <= m->capacity, AF_EINVAL, "%s: batch %d exceeds the reserved capacity %d (call "
             "af_model_reserve first)", what, B, m->capacity);
    return AF_OK;
}

/* ------------------------------------------------------------------ encoder */

af_status af_encoder_forward(af_model *m, af_branch br, const float *images, int B) {
    AF_TRY(check_batch(m, B, "encoder_forward"));
    AF_CHECK(br == AF_STUDENT || br == AF_TEACHER, AF_EINVAL, "encoder_forward: bad branch %d", br);
    AF_CHECK((int)br < m->branches, AF_EINVAL, "encoder_forward: this model has no activations for "
             "the teacher (a student-only downstream network)");
    AF_CHECK(images != NULL, AF_EINVAL, "encoder_forward: images is NULL");
    const af_config *c = &m->cfg;
    const af_encoder_params *p = &m->enc[br];
    af_encoder_acts *a = &m->enc_acts[br];
    int L = m->L, T = m->T, D = c->D, Q = m->Q;
    /* patch embedding = the stride-P conv as a matmul over (c, p, q)-flattened patches */
    af_patchify_forward(a->patches, images, B, c->C, c->S, c->P, AF_PATCH_CPQ);
    float *emb = m->scratch.dres; /* [B*L, D] temporary */
    af_model_linear_forward(m, emb, a->patches, p->patch_w, p->patch_b, B * L, Q, D);
    for (int b = 0; b < B; b++) {
        float *x = a->x0 + (size_t)b * T * D;
        for (int d = 0; d < D; d++) x[d] = p->cls[d] + p->pos[d];
        for (int j = 0; j < L; j++) {
            const float *e = emb + ((size_t)b * L + j) * D, *pe = p->pos + (size_t)(1 + j) * D;
            float *xr = x + (size_t)(1 + j) * D;
            for (int d = 0; d < D; d++) xr[d] = e[d] + pe[d];
        }
    }
    if (m->bf16)
        blocks_forward_bf16(m, &a->blocks, &m->scratch, a->x0, &p->blocks, c->depth, B, T, D,
                            c->mlp_ratio, c->H, ENC_EPS);
    else
        blocks_forward(&a->blocks, &m->scratch, a->x0, &p->blocks, c->depth, B, T, D,
                       c->mlp_ratio, c->H, ENC_EPS);
    const float *last = af_blocks_output(&a->blocks, c->depth, T, D, c->mlp_ratio, c->H);
    af_layernorm_forward(a->out, a->lnf_mean, a->lnf_rstd, last, p->norm_w, p->norm_b, B * T, D,
                      ENC_EPS);
    m->enc_B[br] = B;
    return AF_OK;
}

af_status af_encoder_backward(af_model *m, const float *dtokens) {
    AF_CHECK(m != NULL && dtokens != NULL, AF_EINVAL, "encoder_backward: NULL argument");
    AF_CHECK(!m->inference, AF_EINVAL, "encoder_backward: this model was made for inference");
    int B = m->enc_B[AF_STUDENT];
    AF_CHECK(B > 0, AF_EINVAL, "encoder_backward: no student encoder forward to differentiate");
    const af_config *c = &m->cfg;
    const af_encoder_params *p = &m->enc[AF_STUDENT];
    af_encoder_params *g = &m->enc_grad;
    const af_encoder_acts *a = &m->enc_acts[AF_STUDENT];
    af_scratch *s = &m->scratch;
    int L = m->L, T = m->T, D = c->D, N = B * T, Q = m->Q;
    const float *last = af_blocks_output(&a->blocks, c->depth, T, D, c->mlp_ratio, c->H);
    af_layernorm_backward(s->dres, g->norm_w, g->norm_b, dtokens, last, p->norm_w, a->lnf_mean,
                       a->lnf_rstd, N, D);
    if (m->bf16)
        blocks_backward_bf16(m, s, &g->blocks, &a->blocks, a->x0, &p->blocks, c->depth, B, T, D,
                             c->mlp_ratio, c->H);
    else
        blocks_backward(s, &g->blocks, &a->blocks, a->x0, &p->blocks, c->depth, B, T, D,
                        c->mlp_ratio, c->H);
    /* s->dres = d(x0): x0[b,0] = cls + pos[0], x0[b,1+j] = emb[b,j] + pos[1+j] */
    for (int b = 0; b < B; b++) {
        const float *dx = s->dres + (size_t)b * T * D;
        for (int d = 0; d < D; d++) g->cls[d] += dx[d];
        if (m->cfg.learned_pos)
            for (size_t i = 0; i < (size_t)T * D; i++) g->pos[i] += dx[i];
    }
    float *demb = s->dln; /* [B*L, D] gathered rows 1..L */
    for (int b = 0; b < B; b++)
        memcpy(demb + (size_t)b * L * D, s->dres + ((size_t)b * T + 1) * D,
               (size_t)L * D * sizeof(float));
    af_model_linear_backward(m, NULL, g->patch_w, g->patch_b, demb, a->patches, p->patch_w,
                             B * L, Q, D);
    return AF_OK;
}

/* ------------------------------------------------------------------ decoder */

af_status af_decoder_forward(af_model *m, const float *tokens, const uint8_t *token_mask, int B) {
    AF_TRY(check_batch(m, B, "decoder_forward"));
    AF_CHECK(tokens != NULL && token_mask != NULL, AF_EINVAL, "decoder_forward: NULL argument");
    const af_config *c = &m->cfg;
    const af_decoder_params *p = &m->dec;
    af_decoder_acts *a = &m->dec_acts;
    int L = m->L, T = m->T, D = c->D, Dd = c->Dd, Q = m->Q, N = B * T;
    memcpy(a->tokens, tokens, (size_t)N * D * sizeof(float));
    memcpy(a->mask, token_mask, (size_t)B * L);
    af_model_linear_forward(m, a->x0, a->tokens, p->embed_w, p->embed_b, N, D, Dd);
    /* masked tokens (lesion patches) are replaced after the embedding; cls never is */
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *x = a->x0 + ((size_t)b * T + t) * Dd;
            if (t > 0 && a->mask[(size_t)b * L + t - 1]) {
                const float *mt = p->mask_token + (c->shared_mask_token ? 0 : (size_t)(t - 1) * Dd);
                memcpy(x, mt, (size_t)Dd * sizeof(float));
            }
            add_inplace(x, p->pos + (size_t)t * Dd, (size_t)Dd);
        }
    if (m->bf16)
        blocks_forward_bf16(m, &a->blocks, &m->scratch, a->x0, &p->blocks, c->depth_d, B, T, Dd,
                            c->mlp_ratio, c->Hd, DEC_EPS);
    else
        blocks_forward(&a->blocks, &m->scratch, a->x0, &p->blocks, c->depth_d, B, T, Dd,
                       c->mlp_ratio, c->Hd, DEC_EPS);
    const float *last = af_blocks_output(&a->blocks, c->depth_d, T, Dd, c->mlp_ratio, c->Hd);
    af_layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, last, p->norm_w, p->norm_b, N, Dd, DEC_EPS);
    af_model_linear_forward(m, a->pred_full, a->lnf, p->pred_w, p->pred_b, N, Dd, Q);
    for (int b = 0; b < B; b++) /* drop cls */
        memcpy(a->pred + (size_t)b * L * Q, a->pred_full + ((size_t)b * T + 1) * Q,
               (size_t)L * Q * sizeof(float));
    m->dec_B = B;
    return AF_OK;
}

af_status af_decoder_backward(af_model *m, const float *dpred, float *dtokens) {
    AF_CHECK(m != NULL && dpred != NULL, AF_EINVAL, "decoder_backward: NULL argument");
    AF_CHECK(!m->inference, AF_EINVAL, "decoder_backward: this model was made for inference");
    int B = m->dec_B;
    AF_CHECK(B > 0, AF_EINVAL, "decoder_backward: no decoder forward to differentiate");
    const af_config *c = &m->cfg;
    const af_decoder_params *p = &m->dec;
    af_decoder_params *g = &m->dec_grad;
    const af_decoder_acts *a = &m->dec_acts;
    af_scratch *s = &m->scratch;
    int L = m->L, T = m->T, D = c->D, Dd = c->Dd, Q = m->Q, N = B * T;
    float *dfull = s->dh_a; /* [B,T,Q], zero on the cls rows */
    memset(dfull, 0, (size_t)N * Q * sizeof(float));
    for (int b = 0; b < B; b++)
        memcpy(dfull + ((size_t)b * T + 1) * Q, dpred + (size_t)b * L * Q,
               (size_t)L * Q * sizeof(float));
    af_model_linear_backward(m, s->dln, g->pred_w, g->pred_b, dfull, a->lnf, p->pred_w, N, Dd, Q);
    const float *last = af_blocks_output(&a->blocks, c->depth_d, T, Dd, c->mlp_ratio, c->Hd);
    af_layernorm_backward(s->dres, g->norm_w, g->norm_b, s->dln, last, p->norm_w, a->lnf_mean,
                       a->lnf_rstd, N, Dd);
    if (m->bf16)
        blocks_backward_bf16(m, s, &g->blocks, &a->blocks, a->x0, &p->blocks, c->depth_d, B, T,
                             Dd, c->mlp_ratio, c->Hd);
    else
        blocks_backward(s, &g->blocks, &a->blocks, a->x0, &p->blocks, c->depth_d, B, T, Dd,
                        c->mlp_ratio, c->Hd);
    /* the fixed pos embedding takes no gradient; a replaced token's gradient goes to its
     * mask token and not to the embedding */
    for (int b = 0; b < B; b++)
        for (int j = 0; j < L; j++)
            if (a->mask[(size_t)b * L + j]) {
                float *dx = s->dres + ((size_t)b * T + 1 + j) * Dd;
                add_inplace(g->mask_token + (c->shared_mask_token ? 0 : (size_t)j * Dd), dx,
                            (size_t)Dd);
                memset(dx, 0, (size_t)Dd * sizeof(float));
            }
    af_model_linear_backward(m, dtokens, g->embed_w, g->embed_b, s->dres, a->tokens, p->embed_w,
                             N, D, Dd);
    return AF_OK;
}
