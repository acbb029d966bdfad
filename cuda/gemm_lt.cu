// The fast path's GEMMs (fast.cuh) through cuBLASLt: bf16 A and B, fp32 accumulation
// (CUBLAS_COMPUTE_32F), bf16 or fp32 C = D. Each distinct GEMM (shape, transposes, types,
// epilogue, beta, pointer alignments) gets one descriptor set and the heuristic's first
// algorithm, cached in the context, so a step after the first queries nothing. cuBLAS
// guarantees the same bits on reruns with a fixed algorithm on one GPU model, so the cache
// also keeps runs bit-identical.
//
// Row-major linear layers in cuBLAS's column-major terms (as linear.cu; X[N,IC] row-major is
// the column-major IC x N matrix X^T):
//   out[N,OC]       = (T, N) m=OC n=N  k=IC  A=w(ld IC)   B=inp(ld IC)  C=out(ld OC)   + BIAS
//   dinp[N,IC]      = (N, N) m=IC n=N  k=OC  A=w(ld IC)   B=dout(ld OC) C=dinp(ld IC)
//   dweight[OC,IC] += (N, T) m=IC n=OC k=N   A=inp(ld IC) B=dout(ld OC) C=dweight(ld IC)
//                     with BGRADB: dbias[OC] = the sum of B = dout over k = N (its rows)
// The bias of a bf16 output is bf16 (cuBLASLt's bias type is D's); an fp32 output takes the
// fp32 bias. An epilogue the heuristic has no algorithm for is done by our kernels instead
// (a bias add, our deterministic column sum), as is every epilogue when
// AFIRE_CUDA_LT_EPILOGUE=0; a GEMM with no cuBLASLt algorithm at all (pointers aligned to
// less than 16 bytes, say) runs through cublasGemmEx.
#include <cublasLt.h>
#include <stdio.h>
#include <string.h>

#include "fast.cuh"

#define AF_LT_CACHE 192

enum { EPI_NONE = 0, EPI_BIAS = 1, EPI_BGRADB = 2 };

struct lt_key {
    int ta, tb, m, n, k, lda, ldb, ldc;
    int atype, btype, ctype;  // cudaDataType
    int epi, beta1;
    unsigned align[4];        // bytes (<= 256) of A, B, C = D, bias / bias gradient
};

struct lt_entry {
    lt_key key;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    int ok;  // the heuristic returned an algorithm
};

struct af_lt_cache {
    int n, next;  // entries in use; the entry replaced next when all are in use
    lt_entry e[AF_LT_CACHE];
};

// Process-wide counts for af_lt_status (relaxed atomics: a report, not a synchronisation).
static long g_builds, g_no_algo, g_epi_plans, g_fused, g_unfused, g_gemmex, g_epi_off;
static void count(long *c) { __atomic_fetch_add(c, 1, __ATOMIC_RELAXED); }

static unsigned align_of(const void *p) {
    uintptr_t x = (uintptr_t)p;
    unsigned a = 256;
    while (a > 1 && x % a != 0) a >>= 1;
    return a;
}

static void entry_destroy(lt_entry *e) {
    if (e->desc) cublasLtMatmulDescDestroy(e->desc);
    if (e->a) cublasLtMatrixLayoutDestroy(e->a);
    if (e->b) cublasLtMatrixLayoutDestroy(e->b);
    if (e->c) cublasLtMatrixLayoutDestroy(e->c);
    memset(e, 0, sizeof *e);
}

size_t af_lt_cache_bytes(void) { return sizeof(af_lt_cache); }

void af_lt_cache_free(af_lt_cache *c) {
    if (c == nullptr) return;
    for (int i = 0; i < c->n; i++) entry_destroy(&c->e[i]);
    free(c);
}

#define LT_TRY(call)                                                                        \
    do {                                                                                    \
        cublasStatus_t af_s_ = (call);                                                      \
        if (af_s_ != CUBLAS_STATUS_SUCCESS) {                                               \
            st = af_error(AF_ECUDA, "%s failed: %s", #call, cublasLtGetStatusString(af_s_)); \
            goto done;                                                                      \
        }                                                                                   \
    } while (0)

// Descriptors and the heuristic's best algorithm for e->key (e->ok = 0: none, not an error).
static af_status build(af_cuda_context *ctx, lt_entry *e, const void *bias) {
    const lt_key *k = &e->key;
    cublasLtHandle_t lt = (cublasLtHandle_t)ctx->lt;
    cublasLtMatmulPreference_t pref = nullptr;
    af_status st = AF_OK;
    int32_t ta = k->ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb = k->tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    uint32_t epi = k->epi == EPI_BIAS     ? CUBLASLT_EPILOGUE_BIAS
                   : k->epi == EPI_BGRADB ? CUBLASLT_EPILOGUE_BGRADB
                                          : CUBLASLT_EPILOGUE_DEFAULT;
    uint64_t ws = ctx->lt_ws_bytes;
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    memset(&res, 0, sizeof res);
    LT_TRY(cublasLtMatmulDescCreate(&e->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    if (k->epi != EPI_NONE)  // the heuristic reads the pointer's alignment
        LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                              sizeof bias));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->a, (cudaDataType)k->atype, k->ta ? k->k : k->m,
                                      k->ta ? k->m : k->k, k->lda));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->b, (cudaDataType)k->btype, k->tb ? k->n : k->k,
                                      k->tb ? k->k : k->n, k->ldb));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->c, (cudaDataType)k->ctype, k->m, k->n, k->ldc));
    LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &ws, sizeof ws));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                &k->align[0], sizeof k->align[0]));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                &k->align[1], sizeof k->align[1]));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                &k->align[2], sizeof k->align[2]));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                &k->align[2], sizeof k->align[2]));
    {
        cublasStatus_t h = cublasLtMatmulAlgoGetHeuristic(lt, e->desc, e->a, e->b, e->c, e->c,
                                                          pref, 1, &res, &found);
        // NOT_SUPPORTED: no algorithm for this combination (e.g. the epilogue) -> e->ok = 0
        if (h != CUBLAS_STATUS_SUCCESS && h != CUBLAS_STATUS_NOT_SUPPORTED) {
            st = af_error(AF_ECUDA, "cublasLtMatmulAlgoGetHeuristic failed: %s",
                          cublasLtGetStatusString(h));
            goto done;
        }
        e->ok = h == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS;
        if (e->ok) e->algo = res.algo;
    }
done:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    return st;
}

// The cached entry for `key`, built on first use (NULL with an error set on failure).
static lt_entry *lookup(af_cuda_context *ctx, const lt_key *key, const void *bias,
                        af_status *st) {
    af_lt_cache *c = ctx->lt_cache;
    for (int i = 0; i < c->n; i++)
        if (memcmp(&c->e[i].key, key, sizeof *key) == 0) return &c->e[i];
    lt_entry *e;
    if (c->n < AF_LT_CACHE) {
        e = &c->e[c->n++];
    } else {  // full (many batch sizes): replace entries in turn
        e = &c->e[c->next];
        c->next = (c->next + 1) % AF_LT_CACHE;
        entry_destroy(e);
    }
    memset(e, 0, sizeof *e);
    e->key = *key;
    count(&g_builds);
    *st = build(ctx, e, bias);
    if (*st == AF_OK && !e->ok) count(&g_no_algo);
    if (*st == AF_OK && e->ok && key->epi != EPI_NONE) count(&g_epi_plans);
    if (!ctx->lt_epilogues) __atomic_store_n(&g_epi_off, 1, __ATOMIC_RELAXED);
    if (*st != AF_OK) {
        entry_destroy(e);
        e->key = *key;  // keep the slot valid: ok = 0 and no descriptors (never matched again
        e->key.m = -1;  // with m = -1)
        return nullptr;
    }
    return e;
}

// D = C = alpha op(A) op(B) + beta C (column-major). With epi != EPI_NONE, *fused says whether
// the epilogue ran (else the caller does its work).
static af_status lt_gemm(af_cuda_context *ctx, int ta, int tb, int m, int n, int k,
                         const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                         int ldb, float beta, void *C, cudaDataType ct, int ldc, int epi,
                         const void *bias, int *fused) {
    lt_key key;
    memset(&key, 0, sizeof key);  // padding too: keys are compared with memcmp
    key.ta = ta, key.tb = tb, key.m = m, key.n = n, key.k = k;
    key.lda = lda, key.ldb = ldb, key.ldc = ldc;
    key.atype = at, key.btype = bt, key.ctype = ct;
    key.epi = ctx->lt_epilogues ? epi : EPI_NONE;
    key.beta1 = beta != 0.0f;
    key.align[0] = align_of(A), key.align[1] = align_of(B), key.align[2] = align_of(C);
    key.align[3] = key.epi != EPI_NONE ? align_of(bias) : 0;
    af_status st = AF_OK;
    lt_entry *e = lookup(ctx, &key, bias, &st);
    if (e == nullptr) return st;
    if (!e->ok && key.epi != EPI_NONE) {  // no algorithm with the epilogue: plain GEMM
        key.epi = EPI_NONE;
        key.align[3] = 0;
        e = lookup(ctx, &key, nullptr, &st);
        if (e == nullptr) return st;
    }
    const float alpha = 1.0f;
    if (fused) *fused = e->ok && key.epi != EPI_NONE;
    if (!e->ok) {  // not even a plain algorithm (an odd pointer alignment): cuBLAS GemmEx
        if (epi != EPI_NONE) count(&g_unfused);
        count(&g_gemmex);
        AF_CUBLAS_TRY(cublasGemmEx(ctx->cublas, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   tb ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, &alpha, A, at, lda, B,
                                   bt, ldb, &beta, C, ct, ldc, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
        return AF_OK;
    }
    if (key.epi != EPI_NONE) {
        AF_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                     &bias, sizeof bias));
        count(&g_fused);
    } else if (epi != EPI_NONE) {
        count(&g_unfused);
    }
    AF_CUBLAS_TRY(cublasLtMatmul((cublasLtHandle_t)ctx->lt, e->desc, &alpha, A, e->a, B, e->b,
                                 &beta, C, e->c, C, e->c, &e->algo, ctx->lt_ws,
                                 ctx->lt_ws_bytes, ctx->stream));
    return AF_OK;
}

// ------------------------------------------------------------------ our epilogues

// out[r, c] += bias[c] for row-major out[N, OC] (the BIAS epilogue's work when cuBLASLt
// has no fused algorithm).
template <typename T>
__global__ void add_bias_kernel(T *out, const T *bias, int64_t N, int OC) {
    int64_t total = N * OC;
    AF_GRID_STRIDE(int64_t, i, total) {
        float v = (float)out[i] + (float)bias[i % OC];
        out[i] = (T)v;
    }
}

// dbias[c] += g[c]
__global__ void add_vec_kernel(float *dst, const float *src, int n) {
    AF_GRID_STRIDE(int, i, n) dst[i] += src[i];
}

static af_status check_linear(const char *what, int N, int IC, int OC) {
    AF_CUDA_CHECK(N > 0 && IC > 0 && OC > 0, "%s: bad sizes N=%d IC=%d OC=%d", what, N, IC, OC);
    return AF_OK;
}

af_status af_lt_linear_forward(af_cuda_context *ctx, void *out, int out_f32, const bf16 *inp,
                               const bf16 *w, const void *bias, int N, int IC, int OC) {
    AF_TRY(check_linear("lt_linear_forward", N, IC, OC));
    AF_CUDA_CHECK(out && inp && w, "lt_linear_forward: NULL pointer");
    AF_TRY(af_cuda_fast_init(ctx));
    cudaDataType ot = out_f32 ? CUDA_R_32F : CUDA_R_16BF;
    int fused = 0;
    AF_TRY(lt_gemm(ctx, 1, 0, OC, N, IC, w, CUDA_R_16BF, IC, inp, CUDA_R_16BF, IC, 0.0f, out, ot,
                   OC, bias ? EPI_BIAS : EPI_NONE, bias, &fused));
    if (bias != nullptr && !fused) {
        unsigned g = af_grid_1d((int64_t)N * OC, 256);
        if (out_f32)
            add_bias_kernel<float><<<g, 256, 0, ctx->stream>>>((float *)out, (const float *)bias,
                                                               N, OC);
        else
            add_bias_kernel<bf16><<<g, 256, 0, ctx->stream>>>((bf16 *)out, (const bf16 *)bias, N,
                                                              OC);
        AF_CUDA_LAUNCHED();
    }
    return AF_OK;
}

af_status af_lt_linear_backward(af_cuda_context *ctx, void *dinp, int dinp_f32, float *dweight,
                                float *dbias, const bf16 *dout, const bf16 *inp, const bf16 *w,
                                int N, int IC, int OC) {
    AF_TRY(check_linear("lt_linear_backward", N, IC, OC));
    AF_CUDA_CHECK(dout != nullptr, "lt_linear_backward: NULL dout");
    AF_TRY(af_cuda_fast_init(ctx));
    if (dinp != nullptr) {
        AF_CUDA_CHECK(w != nullptr, "lt_linear_backward: dinp needs the weight");
        AF_TRY(lt_gemm(ctx, 0, 0, IC, N, OC, w, CUDA_R_16BF, IC, dout, CUDA_R_16BF, OC, 0.0f, dinp,
                       dinp_f32 ? CUDA_R_32F : CUDA_R_16BF, IC, EPI_NONE, nullptr, nullptr));
    }
    int fused = 0;
    if (dweight != nullptr) {
        AF_CUDA_CHECK(inp != nullptr, "lt_linear_backward: dweight needs inp");
        AF_CUDA_CHECK((size_t)OC <= AF_FAST_AUX_FLOATS, "lt_linear_backward: OC=%d too large", OC);
        float *bgrad = ctx->fast_aux;  // written by the epilogue, then added to dbias
        AF_TRY(lt_gemm(ctx, 0, 1, IC, OC, N, inp, CUDA_R_16BF, IC, dout, CUDA_R_16BF, OC, 1.0f,
                       dweight, CUDA_R_32F, IC, dbias ? EPI_BGRADB : EPI_NONE, bgrad, &fused));
        if (dbias != nullptr && fused) {
            add_vec_kernel<<<af_grid_1d(OC, 256), 256, 0, ctx->stream>>>(dbias, bgrad, OC);
            AF_CUDA_LAUNCHED();
        }
    }
    if (dbias != nullptr && !fused) AF_TRY(af_fast_colsum_bf16(ctx, dbias, 1, dout, N, OC));
    return AF_OK;
}

void af_lt_status(char *buf, size_t n) {
    snprintf(buf, n,
             "cuBLASLt: %ld GEMM plans built (%ld with a fused epilogue, %ld without any "
             "algorithm); epilogue calls fused %ld, by our kernels %ld; cublasGemmEx calls %ld%s",
             __atomic_load_n(&g_builds, __ATOMIC_RELAXED),
             __atomic_load_n(&g_epi_plans, __ATOMIC_RELAXED),
             __atomic_load_n(&g_no_algo, __ATOMIC_RELAXED),
             __atomic_load_n(&g_fused, __ATOMIC_RELAXED),
             __atomic_load_n(&g_unfused, __ATOMIC_RELAXED),
             __atomic_load_n(&g_gemmex, __ATOMIC_RELAXED),
             __atomic_load_n(&g_epi_off, __ATOMIC_RELAXED) ? " (AFIRE_CUDA_LT_EPILOGUE=0 seen)"
                                                           : "");
}
