// The AFiRe networks on the GPU (model.cuh): the twins of params.c (lifetime), vit.c
// (encoder, decoder, transformer blocks) and head.c (projection head), composed from the
// cuda/ops kernels in the same order as the CPU so every intermediate has a CPU twin.
// fp32 path: exact fp32 GEMMs when the context has TF32 off. bf16 path (m->bf16): the GEMMs
// of linear layers and attention take bf16 operands (weights from the shadow copies,
// activations rounded just before the GEMM) with fp32 accumulation and fp32 results; the
// residual stream, LayerNorm, GELU, softmax, the weight-normalised last layer and every
// gradient stay fp32.
#include <string.h>

#include "common.cuh"
#include "model.cuh"
#include "ops_internal.cuh"
#include "ops/ops.h"

#define ENC_EPS 1e-6f  // vit.c
#define DEC_EPS 1e-5f
#define L2_EPS 1e-12f  // head.c

#define TPB 256

// ------------------------------------------------------------------ small kernels

// The coordinates of flat index i = (b*T + t)*D + d of a [B,T,D] array.
struct btd {
    int64_t b;
    int t, d;
};
__device__ __forceinline__ btd split_btd(int64_t i, int T, int D) {
    int64_t bt = i / D;
    btd r = {bt / T, (int)(bt % T), (int)(i % D)};
    return r;
}

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

// twin of head.c transpose_bl: dst[j,b,:] = src[b,j,:] for src [B,L,C]
__global__ void transpose_bl_kernel(float *dst, const float *src, int B, int L, int C) {
    int64_t total = (int64_t)B * L * C;
    AF_GRID_STRIDE(int64_t, i, total) {
        int c = (int)(i % C);
        int64_t r = i / C;  // dst row j*B + b
        int64_t j = r / B, b = r % B;
        dst[i] = src[(b * L + j) * C + c];
    }
}

// dtokens[b,1+j,:] += dx[b,j,:] (the last loop of af_head_backward)
__global__ void add_rows_kernel(float *dtokens, const float *dx, int64_t B, int L, int D) {
    int64_t total = B * L * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        btd x = split_btd(i, L, D);  // (b, j, d)
        dtokens[(x.b * (L + 1) + 1 + x.t) * D + x.d] += dx[i];
    }
}

// ------------------------------------------------------------------ small helpers

#define LAUNCH_1D(kernel, n, ...)                                                             \
    do {                                                                                      \
        kernel<<<af_grid_1d((int64_t)(n), TPB), TPB, 0, ctx->stream>>>(__VA_ARGS__);         \
        AF_CUDA_LAUNCHED();                                                                   \
    } while (0)

static af_status dzero(af_cuda_context *ctx, void *p, size_t bytes) {
    if (bytes) AF_CUDA_TRY(cudaMemsetAsync(p, 0, bytes, ctx->stream));
    return AF_OK;
}

static af_status dcopy(af_cuda_context *ctx, void *dst, const void *src, size_t bytes) {
    if (bytes) AF_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx->stream));
    return AF_OK;
}

// dst[b] (rows of `width` floats) <- src + b*src_rows_stride: B blocks of `n` floats each
static af_status copy_blocks(af_cuda_context *ctx, float *dst, size_t dst_stride, const float *src,
                             size_t src_stride, size_t n, int B) {
    AF_CUDA_TRY(cudaMemcpy2DAsync(dst, dst_stride * sizeof(float), src, src_stride * sizeof(float),
                                  n * sizeof(float), (size_t)B, cudaMemcpyDeviceToDevice,
                                  ctx->stream));
    return AF_OK;
}

// ------------------------------------------------------------------ precision dispatch

// The bf16 shadow of a weight inside the student or teacher flat buffers (same offset).
static const af_bf16 *shadow(const af_cuda_model *m, const float *w) {
    uintptr_t x = (uintptr_t)w;
    for (int n = 0; n < AF_NET_COUNT; n++) {
        uintptr_t p = (uintptr_t)m->params[n];
        if (m->params_h[n] && x >= p && x < p + m->numel[n] * sizeof(float))
            return m->params_h[n] + (w - m->params[n]);
        if (n < 2 && m->teacher_h[n]) {
            uintptr_t t = (uintptr_t)m->teacher[n];
            if (x >= t && x < t + m->numel[n] * sizeof(float))
                return m->teacher_h[n] + (w - m->teacher[n]);
        }
    }
    return nullptr;
}

static af_status linear_fwd(af_cuda_context *ctx, const af_cuda_model *m, float *out,
                            const float *inp, const float *w, const float *b, int N, int C,
                            int OC) {
    if (!m->bf16) return af_cuda_linear_forward(ctx, out, inp, w, b, N, C, OC);
    const af_bf16 *wh = shadow(m, w);
    AF_CUDA_CHECK(wh != nullptr, "linear_forward: the weight has no bf16 shadow");
    return af_cuda_linear_forward_bf16(ctx, out, inp, wh, b, N, C, OC, m->hscratch[0]);
}

static af_status linear_bwd(af_cuda_context *ctx, const af_cuda_model *m, float *dinp,
                            float *dw, float *db, const float *dout, const float *inp,
                            const float *w, int N, int C, int OC) {
    if (!m->bf16) return af_cuda_linear_backward(ctx, dinp, dw, db, dout, inp, w, N, C, OC);
    const af_bf16 *wh = shadow(m, w);
    AF_CUDA_CHECK(wh != nullptr, "linear_backward: the weight has no bf16 shadow");
    return af_cuda_linear_backward_bf16(ctx, dinp, dw, db, dout, inp, wh, N, C, OC,
                                        m->hscratch[0], m->hscratch[1]);
}

static af_status attention_fwd(af_cuda_context *ctx, const af_cuda_model *m, float *out,
                               float *att, const float *qkv, int B, int T, int D, int H) {
    if (!m->bf16) return af_cuda_attention_forward(ctx, out, att, qkv, B, T, D, H);
    return af_cuda_attention_forward_bf16(ctx, out, att, qkv, B, T, D, H, m->hscratch[0],
                                          m->hscratch[1]);
}

static af_status attention_bwd(af_cuda_context *ctx, const af_cuda_model *m, float *dqkv,
                               float *scratch, const float *dout, const float *qkv,
                               const float *att, int B, int T, int D, int H) {
    if (!m->bf16)
        return af_cuda_attention_backward(ctx, dqkv, scratch, dout, qkv, att, B, T, D, H);
    return af_cuda_attention_backward_bf16(ctx, dqkv, scratch, dout, qkv, att, B, T, D, H,
                                           m->hscratch[0], m->hscratch[1], m->hscratch[2]);
}

// ------------------------------------------------------------------ transformer blocks

typedef struct {
    float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
    float *ln2_w, *ln2_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
} block_view;

static block_view block_at(const af_blocks_params *p, int l, int W, int R) {
    size_t w = (size_t)W, m = (size_t)R * W, L_ = (size_t)l;
    block_view v = {p->ln1_w + L_ * w, p->ln1_b + L_ * w, p->qkv_w + L_ * 3 * w * w,
                    p->qkv_b + L_ * 3 * w, p->proj_w + L_ * w * w, p->proj_b + L_ * w,
                    p->ln2_w + L_ * w, p->ln2_b + L_ * w, p->fc1_w + L_ * m * w,
                    p->fc1_b + L_ * m, p->fc2_w + L_ * w * m, p->fc2_b + L_ * w};
    return v;
}

typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *att, *atty, *res2, *ln2, *ln2_mean, *ln2_rstd,
        *fch, *fch_gelu, *res3;
} block_acts_view;

static block_acts_view block_acts_at(const af_blocks_acts *a, int l, int T, int W, int R, int NH) {
    int B = a->cap;  // the layer stride is the capacity, as vit.c
    size_t N = (size_t)B * T, L_ = (size_t)l, w = (size_t)W, m = (size_t)R * W;
    block_acts_view v = {a->ln1 + L_ * N * w, a->ln1_mean + L_ * N, a->ln1_rstd + L_ * N,
                         a->qkv + L_ * N * 3 * w, a->att + L_ * (size_t)B * NH * T * T,
                         a->atty + L_ * N * w, a->res2 + L_ * N * w, a->ln2 + L_ * N * w,
                         a->ln2_mean + L_ * N, a->ln2_rstd + L_ * N, a->fch + L_ * N * m,
                         a->fch_gelu + L_ * N * m, a->res3 + L_ * N * w};
    return v;
}

// twin of vit.c blocks_forward
static af_status blocks_forward(af_cuda_context *ctx, const af_cuda_model *m,
                                af_blocks_acts *acts, const float *x,
                                const af_blocks_params *p, int NL, int B, int T, int W, int R,
                                int NH, float eps) {
    int N = B * T;
    size_t nw = (size_t)N * W;
    for (int l = 0; l < NL; l++) {
        block_view w = block_at(p, l, W, R);
        block_acts_view a = block_acts_at(acts, l, T, W, R, NH);
        const float *in = l == 0 ? x : block_acts_at(acts, l - 1, T, W, R, NH).res3;
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

// twin of vit.c blocks_backward. In: s->dres = d(last res3). Out: s->dres = d(x).
static af_status blocks_backward(af_cuda_context *ctx, const af_cuda_model *m, af_scratch *s,
                                 af_blocks_params *g,
                                 const af_blocks_acts *acts, const float *x,
                                 const af_blocks_params *p, int NL, int B, int T, int W, int R,
                                 int NH) {
    int N = B * T;
    size_t nw = (size_t)N * W, nm = (size_t)N * R * W, f = sizeof(float);
    for (int l = NL - 1; l >= 0; l--) {
        block_view w = block_at(p, l, W, R), dw = block_at(g, l, W, R);
        block_acts_view a = block_acts_at(acts, l, T, W, R, NH);
        const float *in = l == 0 ? x : block_acts_at(acts, l - 1, T, W, R, NH).res3;
        // MLP branch
        AF_TRY(dcopy(ctx, s->dres2, s->dres, nw * f));
        AF_TRY(dzero(ctx, s->dfch_gelu, nm * f));
        AF_TRY(linear_bwd(ctx, m, s->dfch_gelu, dw.fc2_w, dw.fc2_b, s->dres, a.fch_gelu,
                          w.fc2_w, N, R * W, W));
        AF_TRY(dzero(ctx, s->dfch, nm * f));
        AF_TRY(af_cuda_gelu_backward(ctx, s->dfch, s->dfch_gelu, a.fch, nm));
        AF_TRY(dzero(ctx, s->dln, nw * f));
        AF_TRY(linear_bwd(ctx, m, s->dln, dw.fc1_w, dw.fc1_b, s->dfch, a.ln2, w.fc1_w, N,
                          W, R * W));
        AF_TRY(af_cuda_layernorm_backward(ctx, s->dres2, dw.ln2_w, dw.ln2_b, s->dln, a.res2,
                                          w.ln2_w, a.ln2_mean, a.ln2_rstd, N, W));
        // attention branch
        AF_TRY(dcopy(ctx, s->dres, s->dres2, nw * f));
        AF_TRY(dzero(ctx, s->datty, nw * f));
        AF_TRY(linear_bwd(ctx, m, s->datty, dw.proj_w, dw.proj_b, s->dres2, a.atty,
                          w.proj_w, N, W, W));
        AF_TRY(dzero(ctx, s->dqkv, nw * 3 * f));
        AF_TRY(attention_bwd(ctx, m, s->dqkv, s->datt, s->datty, a.qkv, a.att, B, T, W,
                             NH));
        AF_TRY(dzero(ctx, s->dln, nw * f));
        AF_TRY(linear_bwd(ctx, m, s->dln, dw.qkv_w, dw.qkv_b, s->dqkv, a.ln1, w.qkv_w, N,
                          W, 3 * W));
        AF_TRY(af_cuda_layernorm_backward(ctx, s->dres, dw.ln1_w, dw.ln1_b, s->dln, in, w.ln1_w,
                                          a.ln1_mean, a.ln1_rstd, N, W));
    }
    return AF_OK;
}

static const float *blocks_output(const af_blocks_acts *acts, int NL, int T, int W, int R, int NH) {
    return block_acts_at(acts, NL - 1, T, W, R, NH).res3;
}

static af_status check_batch(const af_cuda_model *m, int B, const char *what) {
    AF_CUDA_CHECK(m != nullptr, "%s: model is NULL", what);
    AF_CUDA_CHECK(B >= 1 && B <= m->capacity, "%s: batch %d not in [1, capacity %d]", what, B,
                  m->capacity);
    return AF_OK;
}

// ------------------------------------------------------------------ encoder (vit.c)

extern "C" af_status af_cuda_encoder_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                                             const float *images, int B) {
    AF_TRY(check_batch(m, B, "encoder_forward"));
    AF_CUDA_CHECK(br == AF_STUDENT || br == AF_TEACHER, "encoder_forward: bad branch %d", (int)br);
    AF_CUDA_CHECK(images != nullptr, "encoder_forward: images is NULL");
    const af_config *c = &m->cfg;
    const af_encoder_params *p = &m->enc[br];
    af_encoder_acts *a = &m->enc_acts[br];
    int L = m->L, T = m->T, D = c->D, CPP = c->C * c->P * c->P;
    AF_TRY(af_cuda_patchify_forward(ctx, a->patches, images, B, c->C, c->S, c->P, AF_PATCH_CPQ));
    float *emb = m->scratch.dres;  // [B*L, D] temporary
    AF_TRY(linear_fwd(ctx, m, emb, a->patches, p->patch_w, p->patch_b, B * L, CPP, D));
    LAUNCH_1D(encoder_embed_kernel, (int64_t)B * T * D, a->x0, emb, p->cls, p->pos, (int64_t)B, T, D);
    AF_TRY(blocks_forward(ctx, m, &a->blocks, a->x0, &p->blocks, c->depth, B, T, D, c->mlp_ratio,
                          c->H, ENC_EPS));
    const float *last = blocks_output(&a->blocks, c->depth, T, D, c->mlp_ratio, c->H);
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
    const af_config *c = &m->cfg;
    const af_encoder_params *p = &m->enc[AF_STUDENT];
    af_encoder_params *g = &m->enc_grad;
    const af_encoder_acts *a = &m->enc_acts[AF_STUDENT];
    af_scratch *s = &m->scratch;
    int L = m->L, T = m->T, D = c->D, N = B * T, CPP = c->C * c->P * c->P;
    const float *last = blocks_output(&a->blocks, c->depth, T, D, c->mlp_ratio, c->H);
    AF_TRY(dzero(ctx, s->dres, (size_t)N * D * sizeof(float)));
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
                      p->patch_w, B * L, CPP, D));
    return AF_OK;
}

// ------------------------------------------------------------------ decoder (vit.c)

extern "C" af_status af_cuda_decoder_forward(af_cuda_context *ctx, af_cuda_model *m,
                                             const float *tokens, const uint8_t *token_mask,
                                             int B) {
    AF_TRY(check_batch(m, B, "decoder_forward"));
    AF_CUDA_CHECK(tokens && token_mask, "decoder_forward: NULL argument");
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
    const float *last = blocks_output(&a->blocks, c->depth_d, T, Dd, c->mlp_ratio, c->Hd);
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
    const af_config *c = &m->cfg;
    const af_decoder_params *p = &m->dec;
    af_decoder_params *g = &m->dec_grad;
    const af_decoder_acts *a = &m->dec_acts;
    af_scratch *s = &m->scratch;
    int L = m->L, T = m->T, D = c->D, Dd = c->Dd, Q = m->Q, N = B * T;
    float *dfull = s->dh_a;  // [B,T,Q], zero on the cls rows
    AF_TRY(dzero(ctx, dfull, (size_t)N * Q * sizeof(float)));
    AF_TRY(copy_blocks(ctx, dfull + Q, (size_t)T * Q, dpred, (size_t)L * Q, (size_t)L * Q, B));
    AF_TRY(dzero(ctx, s->dln, (size_t)N * Dd * sizeof(float)));
    AF_TRY(linear_bwd(ctx, m, s->dln, g->pred_w, g->pred_b, dfull, a->lnf, p->pred_w, N,
                      Dd, Q));
    const float *last = blocks_output(&a->blocks, c->depth_d, T, Dd, c->mlp_ratio, c->Hd);
    AF_TRY(dzero(ctx, s->dres, (size_t)N * Dd * sizeof(float)));
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

// ------------------------------------------------------------------ head (head.c)

// The weight-normalised last layer(s) on zn_t [L,B,Bn] -> logits_t [L,B,K]: one batched GEMM
// over the L positions (or one GEMM over all B*L rows when shared), row-major as linear.cu.
static af_status last_layer_forward(af_cuda_context *ctx, af_cuda_model *m, af_head_acts *a,
                                    const float *v, int B) {
    const af_config *c = &m->cfg;
    int L = m->L, Bn = c->head_bottleneck, K = c->K, nlast = c->shared_last_layer ? 1 : L;
    int rows = c->shared_last_layer ? B * L : B;
    AF_TRY(af_wn_normalise_rows(ctx, a->w_eff, a->vnorm, v, nlast * K, Bn));
    const float one = 1.0f, zero = 0.0f;
    AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, K, rows, Bn, &one,
                                            a->w_eff, Bn, (long long)K * Bn, a->zn_t, Bn,
                                            (long long)rows * Bn, &zero, a->logits_t, K,
                                            (long long)rows * K, nlast));
    return AF_OK;
}

// dz_t += dlogits_t @ w_eff; G = dlogits_t^T @ zn_t; dv += (G - w (G.w)) / ||v||
static af_status last_layer_backward(af_cuda_context *ctx, af_cuda_model *m, float *dz_t, float *dv,
                                     const float *dlogits_t, const af_head_acts *a, int B) {
    const af_config *c = &m->cfg;
    int L = m->L, Bn = c->head_bottleneck, K = c->K, nlast = c->shared_last_layer ? 1 : L;
    int rows = c->shared_last_layer ? B * L : B;
    const float one = 1.0f, zero = 0.0f;
    AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_N, Bn, rows, K, &one,
                                            a->w_eff, Bn, (long long)K * Bn, dlogits_t, K,
                                            (long long)rows * K, &one, dz_t, Bn,
                                            (long long)rows * Bn, nlast));
    AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_T, Bn, K, rows, &one,
                                            a->zn_t, Bn, (long long)rows * Bn, dlogits_t, K,
                                            (long long)rows * K, &zero, m->wn_grad, Bn,
                                            (long long)K * Bn, nlast));
    return af_wn_dv_rows(ctx, dv, m->wn_grad, a->w_eff, a->vnorm, nlast * K, Bn);
}

extern "C" af_status af_cuda_head_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                                          const float *tokens, int B) {
    AF_TRY(check_batch(m, B, "head_forward"));
    AF_CUDA_CHECK(tokens != nullptr, "head_forward: NULL tokens");
    AF_CUDA_CHECK(br == AF_STUDENT || br == AF_TEACHER, "head_forward: bad branch %d", (int)br);
    const af_config *c = &m->cfg;
    const af_head_params *p = &m->head[br];
    af_head_acts *a = &m->head_acts[br];
    int L = m->L, T = m->T, D = c->D, Hh = c->head_hidden, Bn = c->head_bottleneck, K = c->K;
    int N = B * L;
    AF_TRY(copy_blocks(ctx, a->x, (size_t)L * D, tokens + D, (size_t)T * D, (size_t)L * D, B));
    AF_TRY(linear_fwd(ctx, m, a->h1, a->x, p->fc1_w, p->fc1_b, N, D, Hh));
    AF_TRY(af_cuda_gelu_forward(ctx, a->g1, a->h1, (size_t)N * Hh));
    AF_TRY(linear_fwd(ctx, m, a->h2, a->g1, p->fc2_w, p->fc2_b, N, Hh, Hh));
    AF_TRY(af_cuda_gelu_forward(ctx, a->g2, a->h2, (size_t)N * Hh));
    AF_TRY(linear_fwd(ctx, m, a->z, a->g2, p->fc3_w, p->fc3_b, N, Hh, Bn));
    float *zn = m->scratch.dh_a;
    AF_TRY(af_cuda_l2norm_forward(ctx, zn, a->znorm, a->z, N, Bn, L2_EPS));
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * Bn, a->zn_t, zn, B, L, Bn);
    AF_TRY(last_layer_forward(ctx, m, a, p->last_v, B));
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * K, a->logits, a->logits_t, L, B, K);
    m->head_B[br] = B;
    return AF_OK;
}

extern "C" af_status af_cuda_head_backward(af_cuda_context *ctx, af_cuda_model *m,
                                           const float *dlogits, float *dtokens) {
    AF_CUDA_CHECK(m != nullptr && dlogits != nullptr, "head_backward: NULL argument");
    int B = m->head_B[AF_STUDENT];
    AF_CUDA_CHECK(B > 0, "head_backward: no student head forward to differentiate");
    const af_config *c = &m->cfg;
    const af_head_params *p = &m->head[AF_STUDENT];
    af_head_params *g = &m->head_grad;
    const af_head_acts *a = &m->head_acts[AF_STUDENT];
    af_scratch *s = &m->scratch;
    int L = m->L, D = c->D, Hh = c->head_hidden, Bn = c->head_bottleneck, K = c->K;
    int N = B * L;
    size_t f = sizeof(float);
    float *ga = s->dh_a, *gb = s->dh_b;
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * K, gb, dlogits, B, L, K);  // dlogits_t [L,B,K]
    AF_TRY(dzero(ctx, s->dz_t, (size_t)N * Bn * f));
    AF_TRY(last_layer_backward(ctx, m, s->dz_t, g->last_v, gb, a, B));
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * Bn, ga, s->dz_t, L, B, Bn);  // dzn [B*L, Bn]
    AF_TRY(dzero(ctx, gb, (size_t)N * Bn * f));
    AF_TRY(af_cuda_l2norm_backward(ctx, gb, ga, a->z, a->znorm, N, Bn, L2_EPS));
    AF_TRY(dzero(ctx, ga, (size_t)N * Hh * f));
    AF_TRY(linear_bwd(ctx, m, ga, g->fc3_w, g->fc3_b, gb, a->g2, p->fc3_w, N, Hh, Bn));
    AF_TRY(dzero(ctx, gb, (size_t)N * Hh * f));
    AF_TRY(af_cuda_gelu_backward(ctx, gb, ga, a->h2, (size_t)N * Hh));
    AF_TRY(dzero(ctx, ga, (size_t)N * Hh * f));
    AF_TRY(linear_bwd(ctx, m, ga, g->fc2_w, g->fc2_b, gb, a->g1, p->fc2_w, N, Hh, Hh));
    AF_TRY(dzero(ctx, gb, (size_t)N * Hh * f));
    AF_TRY(af_cuda_gelu_backward(ctx, gb, ga, a->h1, (size_t)N * Hh));
    if (dtokens == nullptr)
        return linear_bwd(ctx, m, nullptr, g->fc1_w, g->fc1_b, gb, a->x, p->fc1_w, N, D,
                          Hh);
    AF_TRY(dzero(ctx, ga, (size_t)N * D * f));
    AF_TRY(linear_bwd(ctx, m, ga, g->fc1_w, g->fc1_b, gb, a->x, p->fc1_w, N, D, Hh));
    LAUNCH_1D(add_rows_kernel, (int64_t)N * D, dtokens, ga, (int64_t)B, L, D);
    return AF_OK;
}

// ------------------------------------------------------------------ lifetime (params.c)

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
