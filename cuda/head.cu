// The projection head on the GPU: the twin of csrc/core/head.c (same stages, same
// position-major last layer), composed from the cuda/ops kernels; then the fast bf16 path.
#include "model_internal.cuh"

#define L2_EPS 1e-12f  // head.c

// twin of head.c transpose_bl: dst[j,b,:] = src[b,j,:] for src [B,L,IC]
__global__ void transpose_bl_kernel(float *dst, const float *src, int B, int L, int IC) {
    int64_t total = (int64_t)B * L * IC;
    AF_GRID_STRIDE(int64_t, i, total) {
        int c = (int)(i % IC);
        int64_t r = i / IC;  // dst row j*B + b
        int64_t j = r / B, b = r % B;
        dst[i] = src[(b * L + j) * IC + c];
    }
}

// dtokens[b,1+j,:] += dx[b,j,:] (the last loop of af_head_backward: the decoder's gradient is
// already in dtokens). One thread per element of dx, each dtokens element has one writer.
__global__ void add_rows_kernel(float *dtokens, const float *dx, int64_t B, int L, int D) {
    int64_t total = B * L * D;
    AF_GRID_STRIDE(int64_t, i, total) {
        btd x = split_btd(i, L, D);  // (b, j, d)
        dtokens[(x.b * (L + 1) + 1 + x.t) * D + x.d] += dx[i];
    }
}

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

// dz_t = dlogits_t @ w_eff (written: one GEMM per position covers its B rows of dz_t);
// dw_eff = dlogits_t^T @ zn_t; dv += (dw_eff - w (dw_eff.w)) / ||v||
static af_status last_layer_backward(af_cuda_context *ctx, af_cuda_model *m, float *dz_t, float *dv,
                                     const float *dlogits_t, const af_head_acts *a, int B) {
    const af_config *c = &m->cfg;
    int L = m->L, Bn = c->head_bottleneck, K = c->K, nlast = c->shared_last_layer ? 1 : L;
    int rows = c->shared_last_layer ? B * L : B;
    const float one = 1.0f, zero = 0.0f;
    AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_N, Bn, rows, K, &one,
                                            a->w_eff, Bn, (long long)K * Bn, dlogits_t, K,
                                            (long long)rows * K, &zero, dz_t, Bn,
                                            (long long)rows * Bn, nlast));
    AF_CUBLAS_TRY(cublasSgemmStridedBatched(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_T, Bn, K, rows, &one,
                                            a->zn_t, Bn, (long long)rows * Bn, dlogits_t, K,
                                            (long long)rows * K, &zero, m->wn_grad, Bn,
                                            (long long)K * Bn, nlast));
    return af_wn_dv_rows(ctx, dv, m->wn_grad, a->w_eff, a->vnorm, nlast * K, Bn);
}

// ------------------------------------------------------------------ fast path (fast.cuh)
// The MLP on bf16 (fc1, fc2 with GELU kept as bf16 pre-activations, fc3 to fp32 z); the L2 norm,
// the transposes and the weight-normalised last layer are the fp32 code above. The bf16
// buffers are shared by both branches (the teacher's forward runs before the student's).

static af_status fast_head_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                                   const float *tokens, int B) {
    af_cuda_fast *f = m->fast;
    const af_config *c = &m->cfg;
    const af_head_params *p = &m->head[br];
    af_head_acts *a = &m->head_acts[br];
    int L = m->L, T = m->T, D = c->D, Hh = c->head_hidden, Bn = c->head_bottleneck, K = c->K;
    int N = B * L;
    size_t nh = (size_t)N * Hh;
    AF_TRY(af_fast_gather_tokens(ctx, f->head_x, tokens, B, T, D));
    AF_TRY(fast_linear(ctx, m, f->head_h1, 0, f->head_x, p->fc1_w, p->fc1_b, N, D, Hh));
    AF_TRY(af_fast_gelu_forward(ctx, f->head_g, f->head_h1, nh));
    AF_TRY(fast_linear(ctx, m, f->head_h2, 0, f->head_g, p->fc2_w, p->fc2_b, N, Hh, Hh));
    AF_TRY(af_fast_gelu_forward(ctx, f->head_g, f->head_h2, nh));
    AF_TRY(fast_linear(ctx, m, a->z, 1, f->head_g, p->fc3_w, p->fc3_b, N, Hh, Bn));
    float *zn = m->scratch.dh_a;
    AF_TRY(af_cuda_l2norm_forward(ctx, zn, a->znorm, a->z, N, Bn, L2_EPS));
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * Bn, a->zn_t, zn, B, L, Bn);
    AF_TRY(last_layer_forward(ctx, m, a, p->last_v, B));
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * K, a->logits, a->logits_t, L, B, K);
    m->head_B[br] = B;
    if (br != AF_STUDENT) m->head_B[AF_STUDENT] = 0;  // the shared bf16 buffers are overwritten
    return AF_OK;
}

static af_status fast_head_backward(af_cuda_context *ctx, af_cuda_model *m, const float *dlogits,
                                    float *dtokens, int B) {
    af_cuda_fast *f = m->fast;
    const af_config *c = &m->cfg;
    const af_head_params *p = &m->head[AF_STUDENT];
    af_head_params *g = &m->head_grad;
    const af_head_acts *a = &m->head_acts[AF_STUDENT];
    af_scratch *s = &m->scratch;
    int L = m->L, D = c->D, Hh = c->head_hidden, Bn = c->head_bottleneck, K = c->K;
    int N = B * L;
    size_t nh = (size_t)N * Hh;
    AF_CUDA_CHECK(f->head_da != nullptr, "head_backward: no training buffers");
    float *ga = s->dh_a, *gb = s->dh_b;
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * K, gb, dlogits, B, L, K);  // dlogits_t [L,B,K]
    AF_TRY(last_layer_backward(ctx, m, s->dz_t, g->last_v, gb, a, B));
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * Bn, ga, s->dz_t, L, B, Bn);  // dzn [B*L, Bn]
    AF_TRY(af_cuda_l2norm_backward(ctx, gb, ga, a->z, a->znorm, N, Bn, L2_EPS));
    AF_TRY(af_cuda_to_bf16(ctx, (af_bf16 *)f->head_dz, gb, (size_t)N * Bn));
    AF_TRY(af_fast_gelu_forward(ctx, f->head_g, f->head_h2, nh));  // g2 again
    AF_TRY(fast_linear_bwd(ctx, m, f->head_da, 0, g->fc3_w, g->fc3_b, f->head_dz, f->head_g,
                           p->fc3_w, N, Hh, Bn));
    AF_TRY(af_fast_gelu_backward(ctx, f->head_da, f->head_da, f->head_h2, nh));
    AF_TRY(af_fast_gelu_forward(ctx, f->head_g, f->head_h1, nh));  // g1 again
    AF_TRY(fast_linear_bwd(ctx, m, f->head_db, 0, g->fc2_w, g->fc2_b, f->head_da, f->head_g,
                           p->fc2_w, N, Hh, Hh));
    AF_TRY(af_fast_gelu_backward(ctx, f->head_db, f->head_db, f->head_h1, nh));
    if (dtokens == nullptr)
        return fast_linear_bwd(ctx, m, nullptr, 0, g->fc1_w, g->fc1_b, f->head_db, f->head_x,
                               p->fc1_w, N, D, Hh);
    AF_TRY(fast_linear_bwd(ctx, m, ga, 1, g->fc1_w, g->fc1_b, f->head_db, f->head_x, p->fc1_w, N,
                           D, Hh));
    LAUNCH_1D(add_rows_kernel, (int64_t)N * D, dtokens, ga, (int64_t)B, L, D);
    return AF_OK;
}

extern "C" af_status af_cuda_head_forward(af_cuda_context *ctx, af_cuda_model *m, af_branch br,
                                          const float *tokens, int B) {
    AF_TRY(check_batch(m, B, "head_forward"));
    AF_CUDA_CHECK(tokens != nullptr, "head_forward: NULL tokens");
    AF_CUDA_CHECK(br == AF_STUDENT || br == AF_TEACHER, "head_forward: bad branch %d", (int)br);
    if (m->fast) return fast_head_forward(ctx, m, br, tokens, B);
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
    if (m->fast) return fast_head_backward(ctx, m, dlogits, dtokens, B);
    const af_config *c = &m->cfg;
    const af_head_params *p = &m->head[AF_STUDENT];
    af_head_params *g = &m->head_grad;
    const af_head_acts *a = &m->head_acts[AF_STUDENT];
    af_scratch *s = &m->scratch;
    int L = m->L, D = c->D, Hh = c->head_hidden, Bn = c->head_bottleneck, K = c->K;
    int N = B * L;
    float *ga = s->dh_a, *gb = s->dh_b;
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * K, gb, dlogits, B, L, K);  // dlogits_t [L,B,K]
    AF_TRY(last_layer_backward(ctx, m, s->dz_t, g->last_v, gb, a, B));
    LAUNCH_1D(transpose_bl_kernel, (int64_t)N * Bn, ga, s->dz_t, L, B, Bn);  // dzn [B*L, Bn]
    AF_TRY(af_cuda_l2norm_backward(ctx, gb, ga, a->z, a->znorm, N, Bn, L2_EPS));
    AF_TRY(linear_bwd(ctx, m, ga, g->fc3_w, g->fc3_b, gb, a->g2, p->fc3_w, N, Hh, Bn));
    AF_TRY(af_cuda_gelu_backward(ctx, gb, ga, a->h2, (size_t)N * Hh));
    AF_TRY(linear_bwd(ctx, m, ga, g->fc2_w, g->fc2_b, gb, a->g1, p->fc2_w, N, Hh, Hh));
    AF_TRY(af_cuda_gelu_backward(ctx, gb, ga, a->h1, (size_t)N * Hh));
    if (dtokens == nullptr)
        return linear_bwd(ctx, m, nullptr, g->fc1_w, g->fc1_b, gb, a->x, p->fc1_w, N, D,
                          Hh);
    AF_TRY(linear_bwd(ctx, m, ga, g->fc1_w, g->fc1_b, gb, a->x, p->fc1_w, N, D, Hh));
    LAUNCH_1D(add_rows_kernel, (int64_t)N * D, dtokens, ga, (int64_t)B, L, D);
    return AF_OK;
}
