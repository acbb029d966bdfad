// Attention of the fast path (fast.cuh): non-causal multi-head SDPA on bf16 qkv[B,T,3D],
// through cuDNN's fused SDPA operations (the backend graph API, one operation each:
// CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, cuDNN >= 9.13.1, and
// CUDNN_BACKEND_OPERATION_SDPA_BWD_DESCRIPTOR, cuDNN >= 9.17) or our kernel.
//
// Layouts, hd = D/H, scale = 1/sqrt(hd): cuDNN reads [b, h, s, d] tensors with strides, so
// q, k and v are views of qkv in place (no permute):
//   Q, K, V  dims [B, H, T, hd]  strides [T*3D, hd, 3D, 1]  at qkv, qkv + D, qkv + 2D
//   O, dO    dims [B, H, T, hd]  strides [T*D,  hd, D,  1]
//   Stats    dims [B, H, T, 1]   strides [H*T,  T,  1,  1]  fp32: lse = log sum_j exp(s_ij)
//   dQ, dK, dV as Q, K, V inside dqkv; scale a by-value fp32 scalar.
// Plans are built once per (B, T, D, H, direction), from the heuristic's engine list in
// order, skipping engines cuDNN marks non-deterministic (reruns must be bit-identical), and
// cached in the context; an execution allocates nothing. Where no plan builds (cuDNN older
// than the operation, no engine for the shape, hd not a multiple of 8, a pointer not 16-byte
// aligned, a build without cuDNN) the call runs our kernel and the reason is recorded
// (af_sdpa_status, afire.cuda.fast_path_status()).
//
// Our kernel (the fallback, and the check path of the tests): strided-batched cuBLAS GEMMs
// on bf16 operands with fp32 accumulation, one head per call batched over the images (as
// attention.cu), the row softmax in fp32. It keeps only lse: the backward recomputes the
// probabilities of its one layer from S and lse into scratch, so no T x T matrix outlives
// the call (scratch: S, dP fp32 and P bf16, B*H*T*T values each).
//   S  = scale K^T Q : gemm(T,N) m=T  n=T k=hd  A=K  B=Q   -> s (fp32)
//   P  = softmax(S), lse; P -> bf16
//   O  = V P         : gemm(N,N) m=hd n=T k=T   A=V  B=P   -> out (bf16)
//   backward: S again, P = exp(S - lse)
//   dP = dO V^T      : gemm(T,N) m=T  n=T k=hd  A=V  B=dO  -> dp (fp32)
//   dV = P^T dO      : gemm(N,T) m=hd n=T k=T   A=dO B=P   -> dqkv (bf16)
//   dS = P (dP - rowsum(dP P)) (fp32), -> bf16
//   dQ = scale dS K  : gemm(N,N) m=hd n=T k=T   A=K  B=dS
//   dK = scale dS^T Q: gemm(N,T) m=hd n=T k=T   A=Q  B=dS
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#ifdef AFIRE_HAVE_CUDNN
#include <cudnn.h>
#endif

#include "fast.cuh"
#include "ops_internal.cuh"

static char g_status[2][320] = {"forward: not used yet", "backward: not used yet"};

static void set_status(int bwd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_status(int bwd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_status[bwd], sizeof g_status[bwd], fmt, ap);
    va_end(ap);
}

void af_sdpa_status(char *buf, size_t n) {
    snprintf(buf, n, "%s\n%s", g_status[0], g_status[1]);
}

static af_status check_sizes(const char *what, int B, int T, int D, int H) {
    AF_CUDA_CHECK(B > 0 && T > 0 && D > 0 && H > 0, "%s: bad sizes B=%d T=%d D=%d H=%d", what, B,
                  T, D, H);
    AF_CUDA_CHECK(D % H == 0, "%s: D=%d is not divisible by H=%d", what, D, H);
    return AF_OK;
}

// ------------------------------------------------------------------ our kernel

// In place on s[rows, T]: p = softmax(s), lse[row] = max + log(sum exp(s - max)). One warp
// per row.
__global__ void softmax_lse_kernel(float *s, float *lse, int64_t rows, int T) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float *x = s + row * T;
    float m = -INFINITY;
    for (int c = lane; c < T; c += 32) m = fmaxf(m, x[c]);
    m = af_warp_max(m);
    float z = 0.0f;
    for (int c = lane; c < T; c += 32) z += expf(x[c] - m);
    z = af_warp_sum(z);
    float inv = 1.0f / z;
    for (int c = lane; c < T; c += 32) x[c] = expf(x[c] - m) * inv;
    if (lane == 0) lse[row] = m + logf(z);
}

// In place on s[rows, T]: p = exp(s - lse[row]).
__global__ void probs_from_lse_kernel(float *s, const float *lse, int64_t rows, int T) {
    int64_t total = rows * T;
    AF_GRID_STRIDE(int64_t, i, total) s[i] = expf(s[i] - lse[i / T]);
}

static af_status gemm_batched(af_cuda_context *ctx, cublasOperation_t ta, cublasOperation_t tb,
                              int m, int n, int k, float alpha, const void *A, int lda,
                              long long sA, const void *B, int ldb, long long sB, void *C,
                              cudaDataType ct, int ldc, long long sC, int count) {
    const float beta = 0.0f;
    AF_CUBLAS_TRY(cublasGemmStridedBatchedEx(ctx->cublas, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF,
                                             lda, sA, B, CUDA_R_16BF, ldb, sB, &beta, C, ct, ldc,
                                             sC, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return AF_OK;
}

void af_sdpa_scratch_free(af_sdpa_scratch *ws) {
    if (ws == nullptr) return;
    if (ws->s) cudaFree(ws->s);
    if (ws->dp) cudaFree(ws->dp);
    if (ws->p) cudaFree(ws->p);
    memset(ws, 0, sizeof *ws);
}

// Grow the scratch to n values (the stream is drained first: queued work may use the old).
static af_status scratch_reserve(af_cuda_context *ctx, af_sdpa_scratch *ws, size_t n) {
    AF_CUDA_CHECK(ws != nullptr, "sdpa: our kernel needs scratch");
    if (ws->n >= n) return AF_OK;
    AF_CUDA_TRY(cudaStreamSynchronize(ctx->stream));
    af_sdpa_scratch_free(ws);
    cudaError_t e = cudaMalloc((void **)&ws->s, n * sizeof(float));
    if (e == cudaSuccess) e = cudaMalloc((void **)&ws->dp, n * sizeof(float));
    if (e == cudaSuccess) e = cudaMalloc((void **)&ws->p, n * sizeof(bf16));
    if (e != cudaSuccess) {
        cudaGetLastError();
        af_sdpa_scratch_free(ws);
        return af_error(e == cudaErrorMemoryAllocation ? AF_ENOMEM : AF_ECUDA,
                        "sdpa scratch of 3 x %zu values: %s", n, cudaGetErrorString(e));
    }
    ws->n = n;
    return AF_OK;
}

// S_h = scale K_h^T Q_h for every head into ws->s [B,H,T,T].
static af_status scores(af_cuda_context *ctx, af_sdpa_scratch *ws, const bf16 *qkv, int B, int T,
                        int D, int H) {
    const int hd = D / H;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long s_qkv = (long long)T * 3 * D, s_att = (long long)H * T * T;
    for (int h = 0; h < H; h++)
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, scale, qkv + D + h * hd,
                            3 * D, s_qkv, qkv + h * hd, 3 * D, s_qkv, ws->s + (size_t)h * T * T,
                            CUDA_R_32F, T, s_att, B));
    return AF_OK;
}

static af_status ours_forward(af_cuda_context *ctx, af_sdpa_scratch *ws, bf16 *out, float *lse,
                              const bf16 *qkv, int B, int T, int D, int H) {
    const int hd = D / H;
    const size_t n = (size_t)B * H * T * T;
    const long long s_qkv = (long long)T * 3 * D, s_att = (long long)H * T * T,
                    s_out = (long long)T * D;
    AF_TRY(scratch_reserve(ctx, ws, n));
    AF_TRY(scores(ctx, ws, qkv, B, T, D, H));
    int64_t rows = (int64_t)B * H * T;
    softmax_lse_kernel<<<(unsigned)((rows + 7) / 8), 256, 0, ctx->stream>>>(ws->s, lse, rows, T);
    AF_CUDA_LAUNCHED();
    AF_TRY(af_cuda_to_bf16(ctx, (af_bf16 *)ws->p, ws->s, n));
    for (int h = 0; h < H; h++)
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, 1.0f, qkv + 2 * D + h * hd,
                            3 * D, s_qkv, ws->p + (size_t)h * T * T, T, s_att, out + h * hd,
                            CUDA_R_16BF, D, s_out, B));
    return AF_OK;
}

static af_status ours_backward(af_cuda_context *ctx, af_sdpa_scratch *ws, bf16 *dqkv,
                               const bf16 *dout, const bf16 *qkv, const float *lse, int B, int T,
                               int D, int H) {
    const int hd = D / H;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t n = (size_t)B * H * T * T;
    const long long s_qkv = (long long)T * 3 * D, s_att = (long long)H * T * T,
                    s_out = (long long)T * D;
    const int64_t rows = (int64_t)B * H * T;
    AF_TRY(scratch_reserve(ctx, ws, n));
    AF_TRY(scores(ctx, ws, qkv, B, T, D, H));
    probs_from_lse_kernel<<<af_grid_1d((int64_t)n, 256), 256, 0, ctx->stream>>>(ws->s, lse, rows,
                                                                                T);
    AF_CUDA_LAUNCHED();
    AF_TRY(af_cuda_to_bf16(ctx, (af_bf16 *)ws->p, ws->s, n));
    for (int h = 0; h < H; h++) {
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, 1.0f, qkv + 2 * D + h * hd,
                            3 * D, s_qkv, dout + h * hd, D, s_out, ws->dp + (size_t)h * T * T,
                            CUDA_R_32F, T, s_att, B));
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, 1.0f, dout + h * hd, D, s_out,
                            ws->p + (size_t)h * T * T, T, s_att, dqkv + 2 * D + h * hd,
                            CUDA_R_16BF, 3 * D, s_qkv, B));
    }
    AF_TRY(af_softmax_rows_backward(ctx, ws->dp, ws->dp, ws->s, rows, T));
    AF_TRY(af_cuda_to_bf16(ctx, (af_bf16 *)ws->p, ws->dp, n));  // dS replaces P
    for (int h = 0; h < H; h++) {
        const bf16 *ds = ws->p + (size_t)h * T * T;
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, scale, qkv + D + h * hd,
                            3 * D, s_qkv, ds, T, s_att, dqkv + h * hd, CUDA_R_16BF, 3 * D, s_qkv,
                            B));
        AF_TRY(gemm_batched(ctx, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, scale, qkv + h * hd, 3 * D,
                            s_qkv, ds, T, s_att, dqkv + D + h * hd, CUDA_R_16BF, 3 * D, s_qkv, B));
    }
    return AF_OK;
}

// ------------------------------------------------------------------ cuDNN

#define SDPA_PLANS 32

#ifdef AFIRE_HAVE_CUDNN

enum { UID_Q = 1, UID_K, UID_V, UID_O, UID_STATS, UID_SCALE, UID_DO, UID_DQ, UID_DK, UID_DV,
       UID_COUNT };

struct sdpa_plan {
    int B, T, D, H, bwd;
    int ok;                 // a plan was built
    cudnnBackendDescriptor_t desc[UID_COUNT + 4];  // tensors, operation, graph, heuristics
    cudnnBackendDescriptor_t *cfgs;                // the heuristic's engine configs
    int64_t ncfg;
    cudnnBackendDescriptor_t plan;
    int64_t workspace;
    alignas(16) float scale;  // the by-value scalar the variant pack points at
};

struct af_sdpa_cache {
    cudnnHandle_t handle;
    int unavailable;        // cudnnCreate failed or the library is too old: why says why
    char why[200];
    int n, next;
    sdpa_plan p[SDPA_PLANS];
};

static void plan_destroy(sdpa_plan *p) {
    if (p->plan) cudnnBackendDestroyDescriptor(p->plan);
    for (int64_t i = 0; i < p->ncfg; i++)
        if (p->cfgs[i]) cudnnBackendDestroyDescriptor(p->cfgs[i]);
    free(p->cfgs);
    for (int i = UID_COUNT + 3; i >= 0; i--)
        if (p->desc[i]) cudnnBackendDestroyDescriptor(p->desc[i]);
    memset(p, 0, sizeof *p);
}

void af_sdpa_cache_free(af_sdpa_cache *c) {
    if (c == nullptr) return;
    for (int i = 0; i < c->n; i++) plan_destroy(&c->p[i]);
    if (c->handle) cudnnDestroy(c->handle);
    free(c);
}

// Building a plan: every failing call records what failed in `why` and ends the attempt.
#define CK(call)                                                                            \
    do {                                                                                    \
        cudnnStatus_t s_ = (call);                                                          \
        if (s_ != CUDNN_STATUS_SUCCESS) {                                                   \
            snprintf(why, nwhy, "%s: %s", #call, cudnnGetErrorString(s_));                  \
            return 0;                                                                       \
        }                                                                                   \
    } while (0)

static int make_tensor(cudnnBackendDescriptor_t *t, int64_t uid, cudnnDataType_t dt,
                       const int64_t dims[4], const int64_t strides[4], bool by_value,
                       char *why, size_t nwhy) {
    int64_t align = 16;
    CK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_TENSOR_DESCRIPTOR, t));
    CK(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt));
    CK(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims));
    CK(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides));
    CK(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid));
    CK(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align));
    if (by_value)
        CK(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1,
                                    &by_value));
    CK(cudnnBackendFinalize(*t));
    return 1;
}

static int deterministic(cudnnBackendDescriptor_t cfg) {
    cudnnBackendDescriptor_t engine = nullptr;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &engine) !=
        CUDNN_STATUS_SUCCESS)
        return 0;
    int64_t got = 0;
    int ok = 0;
    if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                                 &got, &engine) == CUDNN_STATUS_SUCCESS) {
        cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
        int64_t n = 0;
        if (cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
                                     CUDNN_TYPE_NUMERICAL_NOTE, CUDNN_NUMERICAL_NOTE_TYPE_COUNT,
                                     &n, notes) == CUDNN_STATUS_SUCCESS) {
            ok = 1;
            for (int64_t i = 0; i < n; i++) ok &= notes[i] != CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC;
        }
    }
    cudnnBackendDestroyDescriptor(engine);
    return ok;
}

// Builds p->plan for its shape and direction; 0 with the reason in why.
static int build_plan(cudnnHandle_t handle, sdpa_plan *p, char *why, size_t nwhy) {
    const int64_t B = p->B, T = p->T, D = p->D, H = p->H, hd = D / H;
    const int64_t dims[4] = {B, H, T, hd}, sdims[4] = {B, H, T, 1}, one[4] = {1, 1, 1, 1};
    const int64_t s_qkv[4] = {T * 3 * D, hd, 3 * D, 1}, s_o[4] = {T * D, hd, D, 1},
                  s_stats[4] = {H * T, T, 1, 1};
    cudnnBackendDescriptor_t *d = p->desc;
    const cudnnDataType_t bf = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
    p->scale = 1.0f / sqrtf((float)hd);
    if (!make_tensor(&d[UID_Q], UID_Q, bf, dims, s_qkv, false, why, nwhy) ||
        !make_tensor(&d[UID_K], UID_K, bf, dims, s_qkv, false, why, nwhy) ||
        !make_tensor(&d[UID_V], UID_V, bf, dims, s_qkv, false, why, nwhy) ||
        !make_tensor(&d[UID_O], UID_O, bf, dims, s_o, false, why, nwhy) ||
        !make_tensor(&d[UID_STATS], UID_STATS, f32, sdims, s_stats, false, why, nwhy) ||
        !make_tensor(&d[UID_SCALE], UID_SCALE, f32, one, one, true, why, nwhy))
        return 0;
    if (p->bwd &&
        (!make_tensor(&d[UID_DO], UID_DO, bf, dims, s_o, false, why, nwhy) ||
         !make_tensor(&d[UID_DQ], UID_DQ, bf, dims, s_qkv, false, why, nwhy) ||
         !make_tensor(&d[UID_DK], UID_DK, bf, dims, s_qkv, false, why, nwhy) ||
         !make_tensor(&d[UID_DV], UID_DV, bf, dims, s_qkv, false, why, nwhy)))
        return 0;
    cudnnBackendDescriptor_t *op = &d[UID_COUNT], *graph = &d[UID_COUNT + 1],
                             *heur = &d[UID_COUNT + 2];
    const cudnnBackendAttributeType_t BD = CUDNN_TYPE_BACKEND_DESCRIPTOR;
#define SET(desc, attr, ptr) CK(cudnnBackendSetAttribute(desc, attr, BD, 1, ptr))
    if (!p->bwd) {
        CK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, op));
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, &d[UID_Q]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, &d[UID_K]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, &d[UID_V]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, &d[UID_O]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_FWD_STATSDESC, &d[UID_STATS]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, &d[UID_SCALE]);
    } else {
        CK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_OPERATION_SDPA_BWD_DESCRIPTOR, op));
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_QDESC, &d[UID_Q]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_KDESC, &d[UID_K]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_VDESC, &d[UID_V]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_ODESC, &d[UID_O]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_DODDESC, &d[UID_DO]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_STATSDESC, &d[UID_STATS]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_SCALEDESC, &d[UID_SCALE]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_DQDESC, &d[UID_DQ]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_DKDESC, &d[UID_DK]);
        SET(*op, CUDNN_ATTR_OPERATION_SDPA_BWD_DVDESC, &d[UID_DV]);
    }
    CK(cudnnBackendFinalize(*op));
    CK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, graph));
    SET(*graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, op);
    CK(cudnnBackendSetAttribute(*graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1,
                                &handle));
    CK(cudnnBackendFinalize(*graph));
    cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    CK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, heur));
    SET(*heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph);
    CK(cudnnBackendSetAttribute(*heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode));
    CK(cudnnBackendFinalize(*heur));
#undef SET
    int64_t count = 0;
    CK(cudnnBackendGetAttribute(*heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, BD, 0, &count, nullptr));
    if (count <= 0) {
        snprintf(why, nwhy, "the cuDNN heuristics list no engine for this shape");
        return 0;
    }
    p->cfgs = (cudnnBackendDescriptor_t *)calloc((size_t)count, sizeof *p->cfgs);
    if (p->cfgs == nullptr) {
        snprintf(why, nwhy, "out of host memory");
        return 0;
    }
    for (int64_t i = 0; i < count; i++) {
        CK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &p->cfgs[i]));
        p->ncfg = i + 1;
    }
    int64_t got = 0;
    CK(cudnnBackendGetAttribute(*heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, BD, count, &got, p->cfgs));
    int nondet = 0;
    snprintf(why, nwhy, "none of the %lld engine configs built a plan", (long long)got);
    for (int64_t i = 0; i < got; i++) {
        if (!deterministic(p->cfgs[i])) {
            nondet++;
            continue;
        }
        cudnnBackendDescriptor_t plan = nullptr;
        if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan) !=
            CUDNN_STATUS_SUCCESS)
            continue;
        int64_t ws = 0, n = 0;
        if (cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1,
                                     &handle) == CUDNN_STATUS_SUCCESS &&
            cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, BD, 1,
                                     &p->cfgs[i]) == CUDNN_STATUS_SUCCESS &&
            cudnnBackendFinalize(plan) == CUDNN_STATUS_SUCCESS &&
            cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                     CUDNN_TYPE_INT64, 1, &n, &ws) == CUDNN_STATUS_SUCCESS) {
            p->plan = plan;
            p->workspace = ws;
            snprintf(why, nwhy, "engine config %lld of %lld, workspace %lld bytes", (long long)i,
                     (long long)got, (long long)ws);
            return 1;
        }
        cudnnBackendDestroyDescriptor(plan);
    }
    if (nondet)
        snprintf(why, nwhy, "of %lld engine configs, %d are non-deterministic and the others "
                 "built no plan", (long long)got, nondet);
    return 0;
}
#undef CK

// The cache and handle of ctx, created on first use; NULL when cuDNN cannot be used (why).
static af_sdpa_cache *cache_of(af_cuda_context *ctx, char *why, size_t nwhy) {
    if (ctx->sdpa_cache == nullptr) {
        af_sdpa_cache *c = (af_sdpa_cache *)calloc(1, sizeof *c);
        if (c == nullptr) {
            snprintf(why, nwhy, "out of host memory");
            return nullptr;
        }
        size_t v = cudnnGetVersion();
        cudnnStatus_t s = CUDNN_STATUS_SUCCESS;
        if (v < 91301) {
            c->unavailable = 1;
            snprintf(c->why, sizeof c->why, "cuDNN %zu is loaded: the fused SDPA operations need "
                     "9.13.1 (forward) and 9.17 (backward)", v);
        } else if ((s = cudnnCreate(&c->handle)) != CUDNN_STATUS_SUCCESS ||
                   (s = cudnnSetStream(c->handle, ctx->stream)) != CUDNN_STATUS_SUCCESS) {
            c->unavailable = 1;
            snprintf(c->why, sizeof c->why, "cudnnCreate / cudnnSetStream: %s",
                     cudnnGetErrorString(s));
        }
        ctx->sdpa_cache = c;
    }
    if (ctx->sdpa_cache->unavailable) {
        snprintf(why, nwhy, "%s", ctx->sdpa_cache->why);
        return nullptr;
    }
    return ctx->sdpa_cache;
}

// The plan for (B, T, D, H, bwd), built on first use; NULL (why) when there is none.
static sdpa_plan *plan_for(af_cuda_context *ctx, int B, int T, int D, int H, int bwd, char *why,
                           size_t nwhy) {
    af_sdpa_cache *c = cache_of(ctx, why, nwhy);
    if (c == nullptr) {
        set_status(bwd, "%s: our kernel (%s)", bwd ? "backward" : "forward", why);
        return nullptr;
    }
    for (int i = 0; i < c->n; i++) {
        sdpa_plan *p = &c->p[i];
        if (p->B == B && p->T == T && p->D == D && p->H == H && p->bwd == bwd) {
            if (!p->ok) snprintf(why, nwhy, "no plan for this shape (see the first attempt)");
            return p->ok ? p : nullptr;
        }
    }
    sdpa_plan *p;
    if (c->n < SDPA_PLANS) {
        p = &c->p[c->n++];
    } else {
        p = &c->p[c->next];
        c->next = (c->next + 1) % SDPA_PLANS;
        plan_destroy(p);
    }
    memset(p, 0, sizeof *p);
    p->B = B, p->T = T, p->D = D, p->H = H, p->bwd = bwd;
    size_t v = cudnnGetVersion();
    if (bwd && v < 91700) {
        snprintf(why, nwhy, "cuDNN %zu has no fused SDPA backward operation (9.17+)", v);
    } else if ((D / H) % 8 != 0 || D % 8 != 0) {
        snprintf(why, nwhy, "head dim %d: cuDNN needs a multiple of 8", D / H);
    } else {
        p->ok = build_plan(c->handle, p, why, nwhy);
    }
    char shape[96];
    snprintf(shape, sizeof shape, "B=%d T=%d H=%d hd=%d", B, T, H, D / H);
    if (p->ok) {
        // the workspace grows here, never during an execution
        if ((size_t)p->workspace > ctx->sdpa_ws_bytes) {
            cudaError_t e = cudaStreamSynchronize(ctx->stream);
            if (ctx->sdpa_ws) cudaFree(ctx->sdpa_ws);
            ctx->sdpa_ws = nullptr;
            ctx->sdpa_ws_bytes = 0;
            if (e == cudaSuccess) e = cudaMalloc(&ctx->sdpa_ws, (size_t)p->workspace);
            if (e != cudaSuccess) {
                cudaGetLastError();
                ctx->sdpa_ws = nullptr;
                snprintf(why, nwhy, "workspace of %lld bytes: %s", (long long)p->workspace,
                         cudaGetErrorString(e));
                p->ok = 0;
            } else {
                ctx->sdpa_ws_bytes = (size_t)p->workspace;
            }
        }
    }
    if (p->ok)
        set_status(bwd, "%s: cuDNN %zu fused SDPA (%s; %s)", bwd ? "backward" : "forward", v, shape,
                   why);
    else
        set_status(bwd, "%s: our kernel, cuDNN %zu could not (%s; %s)", bwd ? "backward" : "forward",
                   v, shape, why);
    return p->ok ? p : nullptr;
}

static int aligned16(const void *p) { return (uintptr_t)p % 16 == 0; }

static af_status execute(af_cuda_context *ctx, sdpa_plan *p, int n, const int64_t *uids,
                         void **ptrs) {
    cudnnBackendDescriptor_t vp = nullptr;
    cudnnStatus_t s = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &vp);
    void *ws = ctx->sdpa_ws;
    if (s == CUDNN_STATUS_SUCCESS)
        s = cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n,
                                     uids);
    if (s == CUDNN_STATUS_SUCCESS)
        s = cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                     n, ptrs);
    if (s == CUDNN_STATUS_SUCCESS)
        s = cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1,
                                     &ws);
    if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(vp);
    if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendExecute(ctx->sdpa_cache->handle, p->plan, vp);
    if (vp) cudnnBackendDestroyDescriptor(vp);
    if (s != CUDNN_STATUS_SUCCESS)
        return af_error(AF_ECUDA, "cuDNN SDPA %s (B=%d T=%d D=%d H=%d): %s",
                        p->bwd ? "backward" : "forward", p->B, p->T, p->D, p->H,
                        cudnnGetErrorString(s));
    return AF_OK;
}

// A plan whose execution failed (auto mode): never used again; the call falls back.
static void give_up(sdpa_plan *p, int bwd, char *why, size_t nwhy) {
    snprintf(why, nwhy, "%s", af_last_error());
    p->ok = 0;
    set_status(bwd, "%s: our kernel, the cuDNN plan failed to execute (B=%d T=%d H=%d hd=%d: %s)",
               bwd ? "backward" : "forward", p->B, p->T, p->H, p->D / p->H, why);
    af_clear_error();
}

void af_sdpa_release(af_cuda_context *ctx) {
    af_sdpa_cache_free(ctx->sdpa_cache);
    ctx->sdpa_cache = nullptr;
    if (ctx->sdpa_ws) cudaFree(ctx->sdpa_ws);
    ctx->sdpa_ws = nullptr;
    ctx->sdpa_ws_bytes = 0;
}

#else  // built without cuDNN

struct af_sdpa_cache {
    int unused;
};
struct sdpa_plan {
    int unused;
};
void af_sdpa_cache_free(af_sdpa_cache *c) { free(c); }
void af_sdpa_release(af_cuda_context *ctx) {
    af_sdpa_cache_free(ctx->sdpa_cache);
    ctx->sdpa_cache = nullptr;
}
static sdpa_plan *plan_for(af_cuda_context *ctx, int B, int T, int D, int H, int bwd, char *why,
                           size_t nwhy) {
    (void)ctx, (void)B, (void)T, (void)D, (void)H;
    snprintf(why, nwhy, "afire was built without cuDNN (cudnn.h not found)");
    set_status(bwd, "%s: our kernel (%s)", bwd ? "backward" : "forward", why);
    return nullptr;
}
static int aligned16(const void *p) { return (uintptr_t)p % 16 == 0; }
#endif

// ------------------------------------------------------------------ dispatch

af_status af_sdpa_forward(af_cuda_context *ctx, int backend, af_sdpa_scratch *ws, bf16 *out,
                          float *lse, const bf16 *qkv, int B, int T, int D, int H) {
    AF_TRY(check_sizes("sdpa_forward", B, T, D, H));
    AF_CUDA_CHECK(out && lse && qkv, "sdpa_forward: NULL pointer");
    char why[200] = "";
    if (backend != AF_SDPA_OURS) {
        sdpa_plan *p = plan_for(ctx, B, T, D, H, 0, why, sizeof why);
        if (p != nullptr && !(aligned16(qkv) && aligned16(out) && aligned16(lse))) {
            snprintf(why, sizeof why, "a pointer is not 16-byte aligned");
            p = nullptr;
        }
#ifdef AFIRE_HAVE_CUDNN
        if (p != nullptr) {
            const int64_t uids[6] = {UID_Q, UID_K, UID_V, UID_O, UID_STATS, UID_SCALE};
            void *ptrs[6] = {(void *)qkv, (void *)(qkv + D), (void *)(qkv + 2 * D), out, lse,
                             &p->scale};
            af_status st = execute(ctx, p, 6, uids, ptrs);
            if (st == AF_OK || backend == AF_SDPA_CUDNN) return st;
            give_up(p, 0, why, sizeof why);  // auto: this shape runs our kernel from now on
        }
#endif
        if (backend == AF_SDPA_CUDNN)
            return af_error(AF_ENOTSUP, "cuDNN SDPA forward unavailable: %s", why);
    } else {
        set_status(0, "forward: our kernel (asked for)");
    }
    return ours_forward(ctx, ws, out, lse, qkv, B, T, D, H);
}

af_status af_sdpa_backward(af_cuda_context *ctx, int backend, af_sdpa_scratch *ws, bf16 *dqkv,
                           const bf16 *dout, const bf16 *qkv, const bf16 *out,
                           const float *lse, int B, int T, int D, int H) {
    AF_TRY(check_sizes("sdpa_backward", B, T, D, H));
    AF_CUDA_CHECK(dqkv && dout && qkv && out && lse, "sdpa_backward: NULL pointer");
    char why[200] = "";
    if (backend != AF_SDPA_OURS) {
        sdpa_plan *p = plan_for(ctx, B, T, D, H, 1, why, sizeof why);
        if (p != nullptr && !(aligned16(qkv) && aligned16(out) && aligned16(lse) &&
                              aligned16(dout) && aligned16(dqkv))) {
            snprintf(why, sizeof why, "a pointer is not 16-byte aligned");
            p = nullptr;
        }
#ifdef AFIRE_HAVE_CUDNN
        if (p != nullptr) {
            const int64_t uids[10] = {UID_Q,  UID_K,     UID_V,  UID_O,  UID_DO,
                                      UID_STATS, UID_SCALE, UID_DQ, UID_DK, UID_DV};
            void *ptrs[10] = {(void *)qkv,       (void *)(qkv + D),  (void *)(qkv + 2 * D),
                              (void *)out,       (void *)dout,       (void *)lse,
                              &p->scale,         (void *)dqkv,       (void *)(dqkv + D),
                              (void *)(dqkv + 2 * D)};
            af_status st = execute(ctx, p, 10, uids, ptrs);
            if (st == AF_OK || backend == AF_SDPA_CUDNN) return st;
            give_up(p, 1, why, sizeof why);
        }
#endif
        if (backend == AF_SDPA_CUDNN)
            return af_error(AF_ENOTSUP, "cuDNN SDPA backward unavailable: %s", why);
    } else {
        set_status(1, "backward: our kernel (asked for)");
    }
    return ours_backward(ctx, ws, dqkv, dout, qkv, lse, B, T, D, H);
}
