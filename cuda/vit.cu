// The ViT encoder and the restoration decoder on the GPU: the twin of csrc/core/vit.c,
// composed from the cuda/ops kernels in the same order as the CPU so every intermediate has a
// CPU twin; the fast bf16 path (fast.cuh) is the last section. Dimension letters as afire.h;
// N = B*T rows.
#include "blocks.h"
#include "model_internal.cuh"

#define ENC_EPS 1e-6f  // vit.c
#define DEC_EPS 1e-5f

// ------------------------------------------------------------------ small kernels

// twin of the x0 loop of af_encoder_forward: x0[b,0] = cls + pos[0], x0[b,1+j] = emb[b,j] + pos[1+j]
__global__ void encoder_embed_kernel(float *x0, const float *emb, const float *cls, const float *pos,
                                     int64_t B, int T, int D) {
    int64_t total = B * T * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        btd x = split_btd(i, T, D);
        int64_t b = x.b;
        int t = x.t, d = x.d;
        float v = t == 0 ? cls[d] : emb[(b * (T - 1) + t - 1) * D + d];
        x0[i] = v + pos[(int64_t)t * D + d];
    }
}

// out[c] += sum_r x[r*stride + c], r = 0..rows-1 in order (deterministic; the cls and learned
// pos gradient loops of af_encoder_backward).
__global__ void strided_colsum_kernel(float *out, const float *x, int rows, int64_t cols,
                                      int64_t stride) {
    AF_GRID_STRIDE(int64_t, c, cols) {
        float s = 0.0f;
        for (int r = 0; r < rows; r++) s += x[(int64_t)r * stride + c];
        out[c] += s;
    }
}

// twin of the mask loop of af_decoder_forward: replaced tokens take their mask token, then
// every row adds the fixed pos embedding
__global__ void decoder_mask_pos_kernel(float *x0, const uint8_t *mask, const float *mask_token,
                                        const float *pos, int64_t B, int T, int Dd, int shared) {
    int L = T - 1;
    int64_t total = B * T * Dd;
    AF_GRID_STRIDE(int64_t, i, total) {
        btd x = split_btd(i, T, Dd);
        int64_t b = x.b;
        int t = x.t, d = x.d;
        float v = x0[i];
        if (t > 0 && mask[b * L + t - 1]) v = mask_token[(shared ? 0 : (int64_t)(t - 1) * Dd) + d];
        x0[i] = v + pos[(int64_t)t * Dd + d];
    }
}

// twin of the mask loop of af_decoder_backward, part 1: mask-token gradients, summed over
// the images (and positions when shared) in the CPU's order. One thread per (row, d).
__global__ void mask_token_grad_kernel(float *g, const float *dres, const uint8_t *mask, int B,
                                       int T, int Dd, int shared) {
    int L = T - 1, rows = shared ? 1 : L;
    int64_t total = (int64_t)rows * Dd;
    AF_GRID_STRIDE(int64_t, i, total) {
        int d = (int)(i % Dd), j0 = (int)(i / Dd);
        float s = 0.0f;
        for (int b = 0; b < B; b++)
            for (int j = shared ? 0 : j0; j < (shared ? L : j0 + 1); j++)
                if (mask[(int64_t)b * L + j]) s += dres[((int64_t)b * T + 1 + j) * Dd + d];
        g[i] += s;
    }
}

// part 2: a replaced token's gradient does not reach the embedding
__global__ void zero_masked_rows_kernel(float *dres, const uint8_t *mask, int64_t B, int T, int Dd) {
    int L = T - 1;
    int64_t total = B * L * Dd;
    AF_GRID_STRIDE(int64_t, i, total) {
        btd x = split_btd(i, L, Dd);  // (b, j, d)
        if (mask[i / Dd]) dres[(x.b * T + 1 + x.t) * Dd + x.d] = 0.0f;
    }
}

// the fast path (at the end of this file)
static af_status fast_encoder_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                                      const float *images, int B);
static af_status fast_encoder_backward(af_cuda_context *ctx, af_cuda_model *m,
                                       const float *dtokens, int B);
static af_status fast_decoder_forward(af_cuda_context *ctx, af_cuda_model *m, const float *tokens,
                                      const uint8_t *token_mask, int B);
static af_status fast_decoder_backward(af_cuda_context *ctx, af_cuda_model *m, const float *dpred,
                                       float *dtokens, int B);

// ------------------------------------------------------------------ transformer blocks

// twin of vit.c blocks_forward
static af_status blocks_forward(af_cuda_context *ctx, const af_cuda_model *m,
                                af_blocks_acts *acts, const float *x,
                                const af_blocks_params *p, int NL, int B, int T, int W, int R,
                                int NH, float eps) {
    int N = B * T;
    size_t nw = (size_t)N * W;
    for (int l = 0; l < NL; l++) {
        af_block_view w = af_block_at(p, l, W, R);
        af_block_acts_view a = af_block_acts_at(acts, l, T, W, R, NH);
        const float *in = l == 0 ? x : af_block_acts_at(acts, l - 1, T, W, R, NH).res3;
        AF_TRY(af_cuda_layernorm_forward(ctx, a.ln1, a.ln1_mean, a.ln1_rstd, in, w.ln1_w, w.ln1_b,
                                         N, W, eps));
        AF_TRY(linear_fwd(ctx, m, a.qkv, a.ln1, w.qkv_w, w.qkv_b, N, W, 3 * W));
        AF_TRY(attention_fwd(ctx, m, a.atty, a.att, a.qkv, B, T, W, NH));
        AF_TRY(linear_fwd(ctx, m, a.res2, a.atty, w.proj_w, w.proj_b, N, W, W));
        AF_TRY(af_cuda_residual_forward(ctx, a.res2, a.res2, in, nw));
        AF_TRY(af_cuda_layernorm_forward(ctx, a.ln2, a.ln2_mean, a.ln2_rstd, a.res2, w.ln2_w,
                                         w.ln2_b, N, W, eps));
        AF_TRY(linear_fwd(ctx, m, a.fch, a.ln2, w.fc1_w, w.fc1_b, N, W, R * W));
        AF_TRY(af_cuda_gelu_forward(ctx, a.fch_gelu, a.fch, (size_t)N * R * W));
        AF_TRY(linear_fwd(ctx, m, a.res3, a.fch_gelu, w.fc2_w, w.fc2_b, N, R * W, W));
        AF_TRY(af_cuda_residual_forward(ctx, a.res3, a.res3, a.res2, nw));
    }
    return AF_OK;
}

// twin of vit.c blocks_backward. In: s->dres = d(last res3). Out: s->dres = d(x). Parameter
// grads accumulate; each residual adds the skip path's gradient to its branch's.
static af_status blocks_backward(af_cuda_context *ctx, const af_cuda_model *m, af_scratch *s,
                                 af_blocks_params *g,
                                 const af_blocks_acts *acts, const float *x,
                                 const af_blocks_params *p, int NL, int B, int T, int W, int R,
                                 int NH) {
    int N = B * T;
    size_t nw = (size_t)N * W, nm = (size_t)N * R * W;
    for (int l = NL - 1; l >= 0; l--) {
        af_block_view w = af_block_at(p, l, W, R), dw = af_block_at(g, l, W, R);
        af_block_acts_view a = af_block_acts_at(acts, l, T, W, R, NH);
        const float *in = l == 0 ? x : af_block_acts_at(acts, l - 1, T, W, R, NH).res3;
        // MLP branch: res3 = res2 + fc2(gelu(fc1(ln2(res2))))
        AF_TRY(linear_bwd(ctx, m, s->dfch_gelu, dw.fc2_w, dw.fc2_b, s->dres, a.fch_gelu,
                          w.fc2_w, N, R * W, W));
        AF_TRY(af_cuda_gelu_backward(ctx, s->dfch, s->dfch_gelu, a.fch, nm));
        AF_TRY(linear_bwd(ctx, m, s->dln, dw.fc1_w, dw.fc1_b, s->dfch, a.ln2, w.fc1_w, N,
                          W, R * W));
        AF_TRY(af_cuda_layernorm_backward(ctx, s->dres2, dw.ln2_w, dw.ln2_b, s->dln, a.res2,
                                          w.ln2_w, a.ln2_mean, a.ln2_rstd, N, W));
        AF_TRY(af_cuda_residual_backward(ctx, s->dres2, nullptr, s->dres, nw));  // + skip path
        // attention branch: res2 = in + proj(attn(qkv(ln1(in))))
        AF_TRY(linear_bwd(ctx, m, s->datty, dw.proj_w, dw.proj_b, s->dres2, a.atty,
                          w.proj_w, N, W, W));
        AF_TRY(attention_bwd(ctx, m, s->dqkv, s->datt, s->datty, a.qkv, a.att, B, T, W,
                             NH));
        AF_TRY(linear_bwd(ctx, m, s->dln, dw.qkv_w, dw.qkv_b, s->dqkv, a.ln1, w.qkv_w, N,
                          W, 3 * W));
        AF_TRY(af_cuda_layernorm_backward(ctx, s->dres, dw.ln1_w, dw.ln1_b, s->dln, in, w.ln1_w,
                                          a.ln1_mean, a.ln1_rstd, N, W));
        AF_TRY(af_cuda_residual_backward(ctx, s->dres, nullptr, s->dres2, nw));  // + skip path
    }
    return AF_OK;
}

// ------------------------------------------------------------------ encoder

extern "C" af_status af_cuda_encoder_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                                             const float *images, int B) {
    AF_TRY(check_batch(m, B, "encoder_forward"));
    AF_CUDA_CHECK(br == AF_STUDENT || br == AF_TEACHER, "encoder_forward: bad branch %d", (int)br);
    AF_CUDA_CHECK(images != nullptr, "encoder_forward: images is NULL");
    if (m->fast) return fast_encoder_forward(ctx, m, br, images, B);
    const af_config *c = &m->cfg;
    const af_encoder_params *p = &m->enc[br];
    af_encoder_acts *a = &m->enc_acts[br];
    int L = m->L, T = m->T, D = c->D, Q = m->Q;
    AF_TRY(af_cuda_patchify_forward(ctx, a->patches, images, B, c->C, c->S, c->P, AF_PATCH_CPQ));
    float *emb = m->scratch.dres;  // [B*L, D] temporary
    AF_TRY(linear_fwd(ctx, m, emb, a->patches, p->patch_w, p->patch_b, B * L, Q, D));
    LAUNCH_1D(encoder_embed_kernel, (int64_t)B * T * D, a->x0, emb, p->cls, p->pos, (int64_t)B, T, D);
    AF_TRY(blocks_forward(ctx, m, &a->blocks, a->x0, &p->blocks, c->depth, B, T, D, c->mlp_ratio,
                          c->H, ENC_EPS));
    const float *last = af_blocks_output(&a->blocks, c->depth, T, D, c->mlp_ratio, c->H);
    AF_TRY(af_cuda_layernorm_forward(ctx, a->out, a->lnf_mean, a->lnf_rstd, last, p->norm_w,
                                     p->norm_b, B * T, D, ENC_EPS));
    m->enc_B[br] = B;
    return AF_OK;
}

extern "C" af_status af_cuda_encoder_backward(af_cuda_context *ctx, af_cuda_model *m,
                                              const float *dtokens) {
    AF_CUDA_CHECK(m != nullptr && dtokens != nullptr, "encoder_backward: NULL argument");
    int B = m->enc_B[AF_STUDENT];
    AF_CUDA_CHECK(B > 0, "encoder_backward: no student encoder forward to differentiate");
    if (m->fast) return fast_encoder_backward(ctx, m, dtokens, B);
    const af_config *c = &m->cfg;
    const af_encoder_params *p = &m->enc[AF_STUDENT];
    af_encoder_params *g = &m->enc_grad;
    const af_encoder_acts *a = &m->enc_acts[AF_STUDENT];
    af_scratch *s = &m->scratch;
    int L = m->L, T = m->T, D = c->D, N = B * T, Q = m->Q;
    const float *last = af_blocks_output(&a->blocks, c->depth, T, D, c->mlp_ratio, c->H);
    AF_TRY(af_cuda_layernorm_backward(ctx, s->dres, g->norm_w, g->norm_b, dtokens, last, p->norm_w,
                                      a->lnf_mean, a->lnf_rstd, N, D));
    AF_TRY(blocks_backward(ctx, m, s, &g->blocks, &a->blocks, a->x0, &p->blocks, c->depth, B, T, D,
                           c->mlp_ratio, c->H));
    // d(x0): cls takes row 0 of every image, a learned pos takes every row
    LAUNCH_1D(strided_colsum_kernel, D, g->cls, s->dres, B, (int64_t)D, (int64_t)T * D);
    if (c->learned_pos)
        LAUNCH_1D(strided_colsum_kernel, (int64_t)T * D, g->pos, s->dres, B, (int64_t)T * D,
                  (int64_t)T * D);
    float *demb = s->dln;  // [B*L, D] gathered rows 1..L
    AF_TRY(copy_blocks(ctx, demb, (size_t)L * D, s->dres + D, (size_t)T * D, (size_t)L * D, B));
    AF_TRY(linear_bwd(ctx, m, nullptr, g->patch_w, g->patch_b, demb, a->patches,
                      p->patch_w, B * L, Q, D));
    return AF_OK;
}

// ------------------------------------------------------------------ decoder

extern "C" af_status af_cuda_decoder_forward(af_cuda_context *ctx, af_cuda_model *m,
                                             const float *tokens, const uint8_t *token_mask,
                                             int B) {
    AF_TRY(check_batch(m, B, "decoder_forward"));
    AF_CUDA_CHECK(tokens && token_mask, "decoder_forward: NULL argument");
    if (m->fast) return fast_decoder_forward(ctx, m, tokens, token_mask, B);
    const af_config *c = &m->cfg;
    const af_decoder_params *p = &m->dec;
    af_decoder_acts *a = &m->dec_acts;
    int L = m->L, T = m->T, D = c->D, Dd = c->Dd, Q = m->Q, N = B * T;
    AF_TRY(dcopy(ctx, a->tokens, tokens, (size_t)N * D * sizeof(float)));
    AF_TRY(dcopy(ctx, a->mask, token_mask, (size_t)B * L));
    AF_TRY(linear_fwd(ctx, m, a->x0, a->tokens, p->embed_w, p->embed_b, N, D, Dd));
    LAUNCH_1D(decoder_mask_pos_kernel, (int64_t)N * Dd, a->x0, a->mask, p->mask_token, p->pos,
              (int64_t)B, T, Dd, c->shared_mask_token);
    AF_TRY(blocks_forward(ctx, m, &a->blocks, a->x0, &p->blocks, c->depth_d, B, T, Dd, c->mlp_ratio,
                          c->Hd, DEC_EPS));
    const float *last = af_blocks_output(&a->blocks, c->depth_d, T, Dd, c->mlp_ratio, c->Hd);
    AF_TRY(af_cuda_layernorm_forward(ctx, a->lnf, a->lnf_mean, a->lnf_rstd, last, p->norm_w,
                                     p->norm_b, N, Dd, DEC_EPS));
    AF_TRY(linear_fwd(ctx, m, a->pred_full, a->lnf, p->pred_w, p->pred_b, N, Dd, Q));
    AF_TRY(copy_blocks(ctx, a->pred, (size_t)L * Q, a->pred_full + Q, (size_t)T * Q, (size_t)L * Q,
                       B));  // drop cls
    m->dec_B = B;
    return AF_OK;
}

extern "C" af_status af_cuda_decoder_backward(af_cuda_context *ctx, af_cuda_model *m,
                                              const float *dpred, float *dtokens) {
    AF_CUDA_CHECK(m != nullptr && dpred != nullptr, "decoder_backward: NULL argument");
    int B = m->dec_B;
    AF_CUDA_CHECK(B > 0, "decoder_backward: no decoder forward to differentiate");
    if (m->fast) return fast_decoder_backward(ctx, m, dpred, dtokens, B);
    const af_config *c = &m->cfg;
    const af_decoder_params *p = &m->dec;
    af_decoder_params *g = &m->dec_grad;
    const af_decoder_acts *a = &m->dec_acts;
    af_scratch *s = &m->scratch;
    int L = m->L, T = m->T, D = c->D, Dd = c->Dd, Q = m->Q, N = B * T;
    float *dfull = s->dh_a;  // [B,T,Q], zero on the cls rows
    AF_TRY(dzero(ctx, dfull, (size_t)N * Q * sizeof(float)));
    AF_TRY(copy_blocks(ctx, dfull + Q, (size_t)T * Q, dpred, (size_t)L * Q, (size_t)L * Q, B));
    AF_TRY(linear_bwd(ctx, m, s->dln, g->pred_w, g->pred_b, dfull, a->lnf, p->pred_w, N,
                      Dd, Q));
    const float *last = af_blocks_output(&a->blocks, c->depth_d, T, Dd, c->mlp_ratio, c->Hd);
    AF_TRY(af_cuda_layernorm_backward(ctx, s->dres, g->norm_w, g->norm_b, s->dln, last, p->norm_w,
                                      a->lnf_mean, a->lnf_rstd, N, Dd));
    AF_TRY(blocks_backward(ctx, m, s, &g->blocks, &a->blocks, a->x0, &p->blocks, c->depth_d, B, T,
                           Dd, c->mlp_ratio, c->Hd));
    int rows = c->shared_mask_token ? 1 : L;
    LAUNCH_1D(mask_token_grad_kernel, (int64_t)rows * Dd, g->mask_token, s->dres, a->mask, B, T, Dd,
              c->shared_mask_token);
    LAUNCH_1D(zero_masked_rows_kernel, (int64_t)B * L * Dd, s->dres, a->mask, (int64_t)B, T, Dd);
    AF_TRY(linear_bwd(ctx, m, dtokens, g->embed_w, g->embed_b, s->dres, a->tokens,
                      p->embed_w, N, D, Dd));
    return AF_OK;
}

// ================================================================== fast path (fast.cuh)
// The stages above on bf16 activations, with the residual add fused into the next LayerNorm:
//   ln1 = LN1(x0);  per block l:  qkv = ln1 Wqkv + b;  atty, lse = SDPA(qkv);
//   res2 = in + (atty Wproj + b);  ln2 = LN2(res2);  fch = ln2 W1 + b;
//   res3 = res2 + (gelu(fch) W2 + b);  ln1(l+1) = LN1'(res3)  (the last block: the final norm)
// The fp32 residual stream (x0, res2, res3) and the statistics are what the backward reads
// besides the bf16 GEMM operands; gelu(fch) is recomputed there.

struct fast_final {  // where the last residual add's LayerNorm goes: the stack's final norm
    void *out;
    int f32;
    float *mean, *rstd;
    const float *w, *b;
};

// twin of blocks_forward. keep: activations of block l go to layer l of A (the student's, for
// its backward); else every block runs in layer 0 of A (the slot).
static af_status fast_blocks_forward(af_cuda_context *ctx, const af_cuda_model *m,
                                     const af_fast_blocks *A, int keep, const float *x0,
                                     const af_blocks_params *p, int NL, int B, int T, int W,
                                     int R, int NH, float eps, const fast_final *fin) {
    af_cuda_fast *f = m->fast;
    int N = B * T;
    af_block_view w0 = af_block_at(p, 0, W, R);
    af_fast_block_view v0 = af_fast_block_at(A, 0);
    AF_TRY(af_fast_residual_layernorm(ctx, nullptr, v0.ln1, 0, v0.ln1_mean, v0.ln1_rstd, x0,
                                      nullptr, w0.ln1_w, w0.ln1_b, N, W, eps));
    for (int l = 0; l < NL; l++) {
        af_block_view w = af_block_at(p, l, W, R);
        af_fast_block_view v = af_fast_block_at(A, keep ? l : 0);
        const float *in = l == 0 ? x0 : af_fast_block_at(A, keep ? l - 1 : 0).res3;
        AF_TRY(fast_linear(ctx, m, v.qkv, 0, v.ln1, w.qkv_w, w.qkv_b, N, W, 3 * W));
        AF_TRY(af_sdpa_forward(ctx, f->sdpa, &f->sdpa_ws, v.atty, v.lse, v.qkv, B, T, W, NH));
        AF_TRY(fast_linear(ctx, m, f->branch, 0, v.atty, w.proj_w, w.proj_b, N, W, W));
        AF_TRY(af_fast_residual_layernorm(ctx, v.res2, v.ln2, 0, v.ln2_mean, v.ln2_rstd, in,
                                          f->branch, w.ln2_w, w.ln2_b, N, W, eps));
        AF_TRY(fast_linear(ctx, m, v.fch, 0, v.ln2, w.fc1_w, w.fc1_b, N, W, R * W));
        AF_TRY(af_fast_gelu_forward(ctx, f->gelu, v.fch, (size_t)N * R * W));
        AF_TRY(fast_linear(ctx, m, f->branch, 0, f->gelu, w.fc2_w, w.fc2_b, N, R * W, W));
        if (l + 1 < NL) {  // res3, and the next block's LN1 of it
            af_block_view wn = af_block_at(p, l + 1, W, R);
            af_fast_block_view vn = af_fast_block_at(A, keep ? l + 1 : 0);
            AF_TRY(af_fast_residual_layernorm(ctx, v.res3, vn.ln1, 0, vn.ln1_mean, vn.ln1_rstd,
                                              v.res2, f->branch, wn.ln1_w, wn.ln1_b, N, W, eps));
        } else {
            AF_TRY(af_fast_residual_layernorm(ctx, v.res3, fin->out, fin->f32, fin->mean,
                                              fin->rstd, v.res2, f->branch, fin->w, fin->b, N, W,
                                              eps));
        }
    }
    return AF_OK;
}

// twin of blocks_backward. In: f->dres (fp32) and f->dres_h (its bf16) = d(last res3). Out: the
// same = d(x0). Each LayerNorm backward adds its dx to the skip path's gradient in place.
static af_status fast_blocks_backward(af_cuda_context *ctx, const af_cuda_model *m,
                                      af_blocks_params *g, const af_fast_blocks *A,
                                      const float *x0, const af_blocks_params *p, int NL, int B,
                                      int T, int W, int R, int NH) {
    af_cuda_fast *f = m->fast;
    int N = B * T;
    size_t nm = (size_t)N * R * W;
    for (int l = NL - 1; l >= 0; l--) {
        af_block_view w = af_block_at(p, l, W, R), dw = af_block_at(g, l, W, R);
        af_fast_block_view v = af_fast_block_at(A, l);
        const float *in = l == 0 ? x0 : af_fast_block_at(A, l - 1).res3;
        // MLP branch: res3 = res2 + fc2(gelu(fc1(ln2(res2))))
        AF_TRY(af_fast_gelu_forward(ctx, f->gelu, v.fch, nm));
        AF_TRY(fast_linear_bwd(ctx, m, f->dfch, 0, dw.fc2_w, dw.fc2_b, f->dres_h, f->gelu,
                               w.fc2_w, N, R * W, W));
        AF_TRY(af_fast_gelu_backward(ctx, f->dfch, f->dfch, v.fch, nm));
        AF_TRY(fast_linear_bwd(ctx, m, f->dln, 0, dw.fc1_w, dw.fc1_b, f->dfch, v.ln2, w.fc1_w, N,
                               W, R * W));
        AF_TRY(af_fast_layernorm_backward(ctx, f->dres, f->dres_h, 1, dw.ln2_w, dw.ln2_b, f->dln,
                                          0, v.res2, w.ln2_w, v.ln2_mean, v.ln2_rstd, N, W));
        // attention branch: res2 = in + proj(attn(qkv(ln1(in))))
        AF_TRY(fast_linear_bwd(ctx, m, f->datty, 0, dw.proj_w, dw.proj_b, f->dres_h, v.atty,
                               w.proj_w, N, W, W));
        AF_TRY(af_sdpa_backward(ctx, f->sdpa, &f->sdpa_ws, f->dqkv, f->datty, v.qkv, v.atty,
                                v.lse, B, T, W, NH));
        AF_TRY(fast_linear_bwd(ctx, m, f->dln, 0, dw.qkv_w, dw.qkv_b, f->dqkv, v.ln1, w.qkv_w, N,
                               W, 3 * W));
        AF_TRY(af_fast_layernorm_backward(ctx, f->dres, f->dres_h, 1, dw.ln1_w, dw.ln1_b, f->dln,
                                          0, in, w.ln1_w, v.ln1_mean, v.ln1_rstd, N, W));
    }
    return AF_OK;
}

static af_status fast_encoder_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                                      const float *images, int B) {
    af_cuda_fast *f = m->fast;
    const af_config *c = &m->cfg;
    const af_encoder_params *p = &m->enc[br];
    int L = m->L, T = m->T, D = c->D, Q = m->Q;
    int keep = br == AF_STUDENT && f->train;
    AF_CUDA_CHECK(!keep || f->enc.ln1 != nullptr, "encoder_forward: no training buffers");
    AF_TRY(af_cuda_patchify_forward(ctx, f->patches32, images, B, c->C, c->S, c->P, AF_PATCH_CPQ));
    AF_TRY(af_cuda_to_bf16(ctx, (af_bf16 *)f->patches, f->patches32, (size_t)B * L * Q));
    float *emb = f->enc_out[br];  // [B*L, D] temporary: the final norm writes enc_out last
    AF_TRY(fast_linear(ctx, m, emb, 1, f->patches, p->patch_w, p->patch_b, B * L, Q, D));
    LAUNCH_1D(encoder_embed_kernel, (int64_t)B * T * D, f->enc_x0, emb, p->cls, p->pos,
              (int64_t)B, T, D);
    fast_final fin = {f->enc_out[br], 1, f->enc_mean[br], f->enc_rstd[br], p->norm_w, p->norm_b};
    AF_TRY(fast_blocks_forward(ctx, m, keep ? &f->enc : &f->slot, keep, f->enc_x0, &p->blocks,
                               c->depth, B, T, D, c->mlp_ratio, c->H, ENC_EPS, &fin));
    m->enc_B[br] = B;
    if (!keep) m->enc_B[AF_STUDENT] = 0;  // the patches and x0 it shares are overwritten
    return AF_OK;
}

static af_status fast_encoder_backward(af_cuda_context *ctx, af_cuda_model *m,
                                       const float *dtokens, int B) {
    af_cuda_fast *f = m->fast;
    const af_config *c = &m->cfg;
    const af_encoder_params *p = &m->enc[AF_STUDENT];
    af_encoder_params *g = &m->enc_grad;
    int L = m->L, T = m->T, D = c->D, N = B * T, Q = m->Q;
    AF_CUDA_CHECK(f->enc.ln1 != nullptr && f->dres != nullptr,
                  "encoder_backward: no training buffers");
    const float *last = af_fast_block_at(&f->enc, c->depth - 1).res3;
    AF_TRY(af_fast_layernorm_backward(ctx, f->dres, f->dres_h, 0, g->norm_w, g->norm_b, dtokens, 1,
                                      last, p->norm_w, f->enc_mean[AF_STUDENT],
                                      f->enc_rstd[AF_STUDENT], N, D));
    AF_TRY(fast_blocks_backward(ctx, m, &g->blocks, &f->enc, f->enc_x0, &p->blocks, c->depth, B,
                                T, D, c->mlp_ratio, c->H));
    // d(x0): cls takes row 0 of every image, a learned pos takes every row (fp32 sums)
    LAUNCH_1D(strided_colsum_kernel, D, g->cls, f->dres, B, (int64_t)D, (int64_t)T * D);
    if (c->learned_pos)
        LAUNCH_1D(strided_colsum_kernel, (int64_t)T * D, g->pos, f->dres, B, (int64_t)T * D,
                  (int64_t)T * D);
    bf16 *demb = f->dln;  // [B*L, D] the patch rows of d(x0), bf16
    AF_CUDA_TRY(cudaMemcpy2DAsync(demb, (size_t)L * D * sizeof(bf16), f->dres_h + D,
                                  (size_t)T * D * sizeof(bf16), (size_t)L * D * sizeof(bf16),
                                  (size_t)B, cudaMemcpyDeviceToDevice, ctx->stream));
    return fast_linear_bwd(ctx, m, nullptr, 0, g->patch_w, g->patch_b, demb, f->patches,
                           p->patch_w, B * L, Q, D);
}

static af_status fast_decoder_forward(af_cuda_context *ctx, af_cuda_model *m, const float *tokens,
                                      const uint8_t *token_mask, int B) {
    af_cuda_fast *f = m->fast;
    const af_config *c = &m->cfg;
    const af_decoder_params *p = &m->dec;
    af_decoder_acts *a = &m->dec_acts;
    int L = m->L, T = m->T, D = c->D, Dd = c->Dd, Q = m->Q, N = B * T;
    int keep = f->train;
    AF_CUDA_CHECK(!keep || f->dec.ln1 != nullptr, "decoder_forward: no training buffers");
    AF_TRY(af_cuda_to_bf16(ctx, (af_bf16 *)f->dec_tokens, tokens, (size_t)N * D));
    AF_TRY(dcopy(ctx, a->mask, token_mask, (size_t)B * L));
    AF_TRY(fast_linear(ctx, m, f->dec_x0, 1, f->dec_tokens, p->embed_w, p->embed_b, N, D, Dd));
    LAUNCH_1D(decoder_mask_pos_kernel, (int64_t)N * Dd, f->dec_x0, a->mask, p->mask_token, p->pos,
              (int64_t)B, T, Dd, c->shared_mask_token);
    fast_final fin = {f->dec_lnf, 0, f->dec_mean, f->dec_rstd, p->norm_w, p->norm_b};
    AF_TRY(fast_blocks_forward(ctx, m, keep ? &f->dec : &f->slot, keep, f->dec_x0, &p->blocks,
                               c->depth_d, B, T, Dd, c->mlp_ratio, c->Hd, DEC_EPS, &fin));
    AF_TRY(fast_linear(ctx, m, a->pred_full, 1, f->dec_lnf, p->pred_w, p->pred_b, N, Dd, Q));
    AF_TRY(copy_blocks(ctx, a->pred, (size_t)L * Q, a->pred_full + Q, (size_t)T * Q, (size_t)L * Q,
                       B));  // drop cls
    m->dec_B = keep ? B : 0;
    return AF_OK;
}

static af_status fast_decoder_backward(af_cuda_context *ctx, af_cuda_model *m, const float *dpred,
                                       float *dtokens, int B) {
    af_cuda_fast *f = m->fast;
    const af_config *c = &m->cfg;
    const af_decoder_params *p = &m->dec;
    af_decoder_params *g = &m->dec_grad;
    const af_decoder_acts *a = &m->dec_acts;
    int L = m->L, T = m->T, D = c->D, Dd = c->Dd, Q = m->Q, N = B * T;
    AF_CUDA_CHECK(f->dec.ln1 != nullptr && f->dres != nullptr,
                  "decoder_backward: no training buffers");
    AF_TRY(dzero(ctx, f->dfull, (size_t)N * Q * sizeof(float)));  // zero on the cls rows
    AF_TRY(copy_blocks(ctx, f->dfull + Q, (size_t)T * Q, dpred, (size_t)L * Q, (size_t)L * Q, B));
    AF_TRY(af_cuda_to_bf16(ctx, (af_bf16 *)f->dfull_h, f->dfull, (size_t)N * Q));
    AF_TRY(fast_linear_bwd(ctx, m, f->dln, 0, g->pred_w, g->pred_b, f->dfull_h, f->dec_lnf,
                           p->pred_w, N, Dd, Q));
    const float *last = af_fast_block_at(&f->dec, c->depth_d - 1).res3;
    AF_TRY(af_fast_layernorm_backward(ctx, f->dres, f->dres_h, 0, g->norm_w, g->norm_b, f->dln, 0,
                                      last, p->norm_w, f->dec_mean, f->dec_rstd, N, Dd));
    AF_TRY(fast_blocks_backward(ctx, m, &g->blocks, &f->dec, f->dec_x0, &p->blocks, c->depth_d, B,
                                T, Dd, c->mlp_ratio, c->Hd));
    int rows = c->shared_mask_token ? 1 : L;
    LAUNCH_1D(mask_token_grad_kernel, (int64_t)rows * Dd, g->mask_token, f->dres, a->mask, B, T,
              Dd, c->shared_mask_token);
    LAUNCH_1D(zero_masked_rows_kernel, (int64_t)B * L * Dd, f->dres, a->mask, (int64_t)B, T, Dd);
    AF_TRY(af_cuda_to_bf16(ctx, (af_bf16 *)f->dres_h, f->dres, (size_t)N * Dd));
    return fast_linear_bwd(ctx, m, dtokens, 1, g->embed_w, g->embed_b, f->dres_h, f->dec_tokens,
                           p->embed_w, N, D, Dd);
}
