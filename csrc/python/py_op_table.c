/* The op table: one row per kernel that tests and benchmarks call from Python (py_op.h states
 * the signature language and what a row becomes in each extension). Compiled into both:
 * afire._C runs each row's CPU call (csrc/ops, csrc/core), afire._C_cuda its GPU call (cuda/)
 * on device copies. In afire._C.objective every float input must be finite (NaN would
 * silently poison the losses); the layer ops are raw kernels and pass NaN through.
 *
 * A call reads its arguments by the names the signature gives: F(x) float32 array, U8(x),
 * F64(x), COUNT(x) its element count, I(N) a letter or an int/bool scalar, R(x) a float,
 * U64(x), CFG the SLM config, CTX the CUDA context. af_op_register checks every name a call
 * uses against its signature at import. */
#include "py_op.h" /* Python.h first */

#include <limits.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "anomaly.h"
#include "objective.h"
#include "ops/ops.h"
#include "ops/ops_internal.h"
#include "slm.h"
#ifdef AFIRE_HAVE_CUDA
#include "../cuda/bf16.cuh"
#include "../cuda/anomaly.cuh"
#include "../cuda/objective.cuh"
#endif

#define F(x) ((float *)af_op_ptr(p, o, #x))
#define U8(x) ((uint8_t *)af_op_ptr(p, o, #x))
#define F64(x) ((double *)af_op_ptr(p, o, #x))
#define COUNT(x) (o->count[af_op_slot(o, #x)])
#undef I /* <complex.h>'s imaginary unit, which NumPy's headers pull in */
#define I(x) ((int)af_op_int(o, #x))
#define R(x) ((float)af_op_real(o, #x))
#define U64(x) af_op_u64(o, #x)
#define CFG (&o->cfg)
#define CTX ((af_cuda_context *)ctx)
#define VOID(call) ((call), AF_OK) /* the csrc/ops kernels return nothing */
#define NONE AF_ENOTSUP            /* no GPU twin: the row is afire._C only */
#define STR_(x) #x
#define STR(x) STR_(x)

static void *af_op_ptr(void *const *p, const af_op_call *o, const char *name) {
    int s = af_op_slot(o, name);
    return s < 0 ? NULL : p[s];
}

/* ------------------------------------------------------------------ check hooks */

/* qkv[B,T,3*D]: the H heads split the width. */
static int check_heads(af_op_call *o) {
    int D = I(D), H = I(H);
    if (D % H == 0) return 0;
    PyErr_Format(PyExc_ValueError, "H=%d must divide the width D=%d", H, D);
    return -1;
}

/* An image side S cut into P x P patches: L = (S/P)^2 tokens of P*P*C values. */
static int check_patches(af_op_call *o) {
    int C = I(C), S = I(S), P = I(P), order = I(order);
    if (S % P != 0) {
        PyErr_Format(PyExc_ValueError, "patch side P=%d must divide the image side S=%d", P, S);
        return -1;
    }
    if ((long long)P * P * C > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "P*P*C is too large");
        return -1;
    }
    if (order != AF_PATCH_PQC && order != AF_PATCH_CPQ) {
        PyErr_Format(PyExc_ValueError, "order must be PATCH_PQC (0) or PATCH_CPQ (1), got %d",
                     order);
        return -1;
    }
    int64_t G = S / P;
    return af_op_let(o, "L", G * G, "patches", 1);
}

/* The bf16 GEMM's workspace (csrc/ops/gemm_bf16.c, afire._C only: its rows have no GPU twin,
 * so afire._C_cuda never calls these hooks), in floats, for this thread count. */
static size_t gemm_bf16_ws(int M, int N, int K) {
#ifdef AFIRE_HAVE_CUDA
    (void)M, (void)N, (void)K;
    return 0;
#else
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    return af_gemm_bf16_workspace(M, N, K, threads);
#endif
}

static int check_gemm_bf16(af_op_call *o) {
    size_t bytes = gemm_bf16_ws(I(M), I(N), I(K));
    return af_op_let(o, "WS", (int64_t)((bytes + 3) / 4), "ws", 0);
}

/* The bf16 linear layer's: forward, input and weight gradients. */
static int check_linear_bf16(af_op_call *o) {
    int N = I(N), C = I(C), OC = I(OC);
    size_t f = gemm_bf16_ws(N, OC, C), d = gemm_bf16_ws(N, C, OC), w = gemm_bf16_ws(OC, C, N);
    size_t bytes = f > d ? f : d;
    bytes = bytes > w ? bytes : w;
    return af_op_let(o, "WS", (int64_t)((bytes + 3) / 4), "ws", 0);
}

/* With eps = 0 the zero-norm branch would divide by eps. */
static int check_l2norm_eps(af_op_call *o) {
    const float *norm = AF_F32(af_op_array(o, "norm"));
    for (int n = 0; R(eps) == 0.0f && n < I(N); n++) {
        if (!(norm[n] > 0.0f)) {
            PyErr_Format(PyExc_ValueError, "norm[%d] is 0 and eps is 0: gradient undefined", n);
            return -1;
        }
    }
    return 0;
}

/* A zero row of v has no direction. */
static int check_wn_rows(af_op_call *o) {
    const float *v = AF_F32(af_op_array(o, "v"));
    int K = I(K), C = I(C);
    for (int k = 0; k < K; k++) {
        int nz = 0;
        for (int c = 0; c < C && !nz; c++) nz = v[(size_t)k * C + c] != 0.0f;
        if (!nz) {
            PyErr_Format(PyExc_ValueError, "v: row %d is all zeros (its norm is 0)", k);
            return -1;
        }
    }
    return 0;
}

static int check_wn_vnorm(af_op_call *o) {
    const float *vnorm = AF_F32(af_op_array(o, "vnorm"));
    for (int k = 0; k < I(K); k++) {
        if (!(vnorm[k] > 0.0f)) {
            PyErr_Format(PyExc_ValueError, "vnorm[%d] must be > 0", k);
            return -1;
        }
    }
    return 0;
}

static int check_adamw(af_op_call *o) {
    PyArrayObject *params = af_op_array(o, "params"), *m = af_op_array(o, "m"),
                  *v = af_op_array(o, "v");
    if (params != m && params != v && m != v) return 0;
    PyErr_SetString(PyExc_ValueError, "params, m and v must be distinct arrays");
    return -1;
}

/* MAE's table: (1 if cls) + G*G rows of width D, D split in four sin/cos blocks. */
static int check_sincos(af_op_call *o) {
    if (I(D) % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "D must be divisible by 4, got %d", I(D));
        return -1;
    }
    return af_op_let(o, "R", (int64_t)I(G) * I(G) + (I(cls) ? 1 : 0), "out", 0);
}

/* C[L,K] as the paper loss reads it: probabilities, >= 0 with positive finite row sums
 * (the GPU leaves this to its caller; checked here for both twins). */
static int check_paper(af_op_call *o) {
    if (af_op_array(o, "ds") != NULL && !I(combined)) {
        PyErr_SetString(PyExc_ValueError, "ds (a gradient to accumulate into) needs combined=True");
        return -1;
    }
    const float *c = AF_F32(af_op_array(o, "C"));
    int B = I(B), L = I(L), K = I(K);
    for (int l = 0; l < L; l++) {
        double rs = 0.0;
        for (int k = 0; k < K; k++) {
            float v = c[(size_t)l * K + k];
            if (!(v >= 0.0f)) {
                af_errorf(PyExc_ValueError, "C must be finite and >= 0 (probabilities), got %g "
                          "at [%d, %d]", (double)v, l, k);
                return -1;
            }
            rs += v;
        }
        if (!(rs > 0.0 && isfinite(rs))) {
            af_errorf(PyExc_ValueError, "C: row %d must have a positive finite sum, got %g", l, rs);
            return -1;
        }
    }
    size_t W = AF_BACKEND(af_paper_loss_scratch_floats, af_cuda_paper_loss_scratch_floats)(B, L, K);
    if (W == 0) {
        PyErr_Format(PyExc_MemoryError, "paper_loss: B=%d, L=%d, K=%d need too much scratch", B,
                     L, K);
        return -1;
    }
    return af_op_let(o, "W", (int64_t)W, "scratch", 0);
}

/* qt[B,L,K] as the teacher-token structure loss reads it: rows >= 0 with positive finite
 * sums (checked here for both twins, as check_paper does for C). */
static int check_stru_token(af_op_call *o) {
    const float *qt = AF_F32(af_op_array(o, "qt"));
    int B = I(B), L = I(L), K = I(K);
    for (size_t n = 0; n < (size_t)B * L; n++) {
        double rs = 0.0;
        for (int k = 0; k < K; k++) {
            float v = qt[n * K + k];
            if (!(v >= 0.0f)) {
                af_errorf(PyExc_ValueError, "qt must be finite and >= 0 (probabilities), got %g "
                          "at token %zu, class %d", (double)v, n, k);
                return -1;
            }
            rs += v;
        }
        if (!(rs > 0.0 && isfinite(rs))) {
            af_errorf(PyExc_ValueError, "qt: token %zu must have a positive finite sum, got %g",
                      n, rs);
            return -1;
        }
    }
#ifdef AFIRE_HAVE_CUDA
    size_t W = 1; /* no GPU twin: the row answers "not supported" after the checks */
#else
    size_t W = af_stru_token_loss_scratch_floats(B, L, K);
#endif
    if (W == 0) {
        PyErr_Format(PyExc_MemoryError, "stru_token_loss: B=%d, L=%d, K=%d need too much "
                     "scratch", B, L, K);
        return -1;
    }
    return af_op_let(o, "W", (int64_t)W, "scratch", 0);
}

static int check_released(af_op_call *o) {
    size_t W = AF_BACKEND(af_released_loss_scratch_floats,
                          af_cuda_released_loss_scratch_floats)(I(L), I(K));
    return af_op_let(o, "W", (int64_t)W, "scratch", 0);
}

/* images[B,S,W] square, patch divides S; an empty batch runs nothing. */
static int check_slm(af_op_call *o) {
    int B = I(B), S = I(S), W = I(W), P = I(patch);
    if (W != S) {
        PyErr_Format(PyExc_ValueError, "images must be square [B, S, S], got [%d, %d, %d]", B, S,
                     W);
        return -1;
    }
    if (S < 1 || S > AF_SLM_MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "images: need 1 <= S <= %d and B < 2**31, got B=%d S=%d",
                     AF_SLM_MAX_SIDE, B, S);
        return -1;
    }
    if (P < 1 || S % P != 0) {
        PyErr_Format(PyExc_ValueError, "patch must be >= 1 and divide the image side %d, got %d",
                     S, P);
        return -1;
    }
    o->skip = B == 0;
    return af_op_let(o, "L", (int64_t)(S / P) * (S / P), "token_labels", 1);
}

/* ------------------------------------------------------------------ CPU twins of the fast path
 * The fast bf16 path's kernels (cuda/fast.cuh) have fused or reformulated interfaces; their
 * CPU twins compose the fp32 CPU ops into the same results (the reference the GPU's bf16
 * rounding is compared with). Only afire._C runs them (the GPU build stringifies the CPU
 * calls). */
#ifndef AFIRE_HAVE_CUDA

/* res = a + b (a when b is NULL); out, mean, rstd = LayerNorm(res). */
static af_status cpu_residual_layernorm(float *res, float *out, float *mean, float *rstd,
                                        const float *a, const float *b, const float *w,
                                        const float *bias, int N, int C, float eps) {
    size_t n = (size_t)N * C;
    if (b != NULL)
        af_residual_forward(res, a, b, n);
    else
        memcpy(res, a, n * sizeof(float));
    af_layernorm_forward(out, mean, rstd, res, w, bias, N, C, eps);
    return AF_OK;
}

/* dinp = dres + LayerNorm backward (dres may be NULL); dinp_h = dinp (no rounding here). */
static af_status cpu_layernorm_backward_residual(float *dinp, float *dw, float *db, float *dinp_h,
                                                 const float *dout, const float *inp,
                                                 const float *w, const float *mean,
                                                 const float *rstd, const float *dres, int N,
                                                 int C) {
    size_t n = (size_t)N * C;
    af_layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
    if (dres != NULL)
        for (size_t i = 0; i < n; i++) dinp[i] += dres[i];
    memcpy(dinp_h, dinp, n * sizeof(float));
    return AF_OK;
}

/* out as af_attention_forward; lse[b,h,i] = log sum_j exp(scale q_i.k_j), in double. */
static af_status cpu_sdpa_forward(float *out, float *lse, const float *qkv, int B, int T, int D,
                                  int H) {
    float *att = af_calloc((size_t)B * H * T * T, sizeof(float));
    double *s = af_calloc((size_t)T, sizeof(double));
    if (att == NULL || s == NULL) {
        af_free(att);
        af_free(s);
        return AF_ENOMEM;
    }
    af_attention_forward(out, att, qkv, B, T, D, H);
    int hd = D / H;
    double scale = 1.0f / sqrtf((float)hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++) {
                const float *q = qkv + ((size_t)b * T + i) * 3 * D + h * hd;
                double m = -INFINITY, z = 0.0;
                for (int j = 0; j < T; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * 3 * D + D + h * hd;
                    double d = 0.0;
                    for (int c = 0; c < hd; c++) d += (double)q[c] * k[c];
                    s[j] = scale * d;
                    if (s[j] > m) m = s[j];
                }
                for (int j = 0; j < T; j++) z += exp(s[j] - m);
                lse[((size_t)b * H + h) * T + i] = (float)(m + log(z));
            }
    af_free(att);
    af_free(s);
    return AF_OK;
}

/* dqkv as af_attention_backward, the probabilities recomputed from qkv (out, lse unused). */
static af_status cpu_sdpa_backward(float *dqkv, const float *dout, const float *qkv, int B, int T,
                                   int D, int H) {
    size_t tt = (size_t)B * H * T * T;
    float *att = af_calloc(tt, sizeof(float)), *scratch = af_calloc(tt, sizeof(float));
    float *out = af_calloc((size_t)B * T * D, sizeof(float));
    if (att == NULL || scratch == NULL || out == NULL) {
        af_free(att);
        af_free(scratch);
        af_free(out);
        return AF_ENOMEM;
    }
    af_attention_forward(out, att, qkv, B, T, D, H);
    af_attention_backward(dqkv, scratch, dout, qkv, att, B, T, D, H);
    af_free(att);
    af_free(scratch);
    af_free(out);
    return AF_OK;
}
#endif
/* ---- anomaly scores (csrc/core/anomaly.h): the data checks of both twins ---- */

static int finite_array(af_op_call *o, const char *name) {
    PyArrayObject *a = af_op_array(o, name);
    return a == NULL ? 0 : af_check_finite(a, name);
}

/* K = stride^2 masks of L = G*G tokens. */
static int check_inpaint_masks(af_op_call *o) {
    int G = I(G), stride = I(stride);
    if (stride > G) {
        PyErr_Format(PyExc_ValueError, "stride=%d is larger than the grid side G=%d (some masks "
                     "would hide nothing)", stride, G);
        return -1;
    }
    if ((int64_t)G * G > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "G*G is too large");
        return -1;
    }
    if (af_op_let(o, "K", (int64_t)stride * stride, "masks", 0) < 0) return -1;
    return af_op_let(o, "L", (int64_t)G * G, "masks", 1);
}

/* Errors are finite and >= 0 (their logarithms are taken). */
static int check_errors(af_op_call *o, const char *name) {
    PyArrayObject *a = af_op_array(o, name);
    if (a == NULL) return 0;
    const float *p = AF_F32(a);
    for (npy_intp i = 0, n = PyArray_SIZE(a); i < n; i++) {
        if (!(p[i] >= 0.0f && isfinite(p[i]))) {
            af_errorf(PyExc_ValueError, "%s must hold finite errors >= 0, got %g at flat index "
                      "%zd", name, (double)p[i], (Py_ssize_t)i);
            return -1;
        }
    }
    return 0;
}

static int check_position_stats(af_op_call *o) {
    if (I(N) < 2) {
        PyErr_Format(PyExc_ValueError, "num: need at least 2 reference maps, got %d", I(N));
        return -1;
    }
    return check_errors(o, "num") < 0 || check_errors(o, "den") < 0 ? -1 : 0;
}

static int check_position_zscore(af_op_call *o) {
    if (check_errors(o, "num") < 0 || check_errors(o, "den") < 0 ||
        finite_array(o, "mean") < 0 || finite_array(o, "std") < 0)
        return -1;
    const float *sd = AF_F32(af_op_array(o, "std"));
    for (int j = 0; j < I(L); j++) {
        if (!(sd[j] > 0.0f)) {
            af_errorf(PyExc_ValueError, "std must be > 0, got %g at position %d", (double)sd[j], j);
            return -1;
        }
    }
    return 0;
}

/* tokens[.,T,D] with a cls token first: T >= 2. */
static int check_tokens(af_op_call *o) {
    if (I(T) < 2) {
        PyErr_Format(PyExc_ValueError, "tokens: need the cls token and at least one patch token "
                     "(T >= 2), got T=%d", I(T));
        return -1;
    }
    return finite_array(o, "tokens");
}

static int check_gauss_fit(af_op_call *o) {
    if (check_tokens(o) < 0) return -1;
    if (I(N) < 2) {
        PyErr_Format(PyExc_ValueError, "tokens: need at least 2 reference images, got %d", I(N));
        return -1;
    }
    return af_op_let(o, "G", I(pooled) ? 1 : (int64_t)I(T) - 1, "mean", 0);
}

static int check_gauss_score(af_op_call *o) {
    if (check_tokens(o) < 0 || finite_array(o, "mean") < 0 || finite_array(o, "prec") < 0)
        return -1;
    return af_op_let(o, "G", I(pooled) ? 1 : (int64_t)I(T) - 1, "mean", 0);
}

static int check_knn(af_op_call *o) {
    if (check_tokens(o) < 0 || finite_array(o, "ref") < 0) return -1;
    int k = I(k), N = I(N);
    if (k > N || k > AF_ANOMALY_MAX_K) {
        PyErr_Format(PyExc_ValueError, "k=%d must be at most the %d reference images and %d", k, N,
                     AF_ANOMALY_MAX_K);
        return -1;
    }
    return af_op_let(o, "L", (int64_t)I(T) - 1, "map", 1);
}

/* ------------------------------------------------------------------ the table */

#define OBJ_PROSE_SINKHORN "\n\n" \
    "SwAV Sinkhorn-Knopp on logits float32 [N, K]: q = exp((logits - max) / eps), total 1,\n" \
    "then `iters` times columns -> 1/K and rows -> 1/N; rows finally sum to 1."
#define OBJ_PROSE_PROTOTYPES "\n\n" \
    "In place on C float32 [L, K] (C-contiguous, writeable): qbar = src.mean(0) for src\n" \
    "float32 [B, L, K]; C = qbar if overwrite else m * C + (1 - m) * qbar."
#define OBJ_PROSE_PAPER "\n\n" \
    "The paper's L_stru (Eq. 12) and L_cate (Eq. 14-16, f = exp(-H/tau)) on student logits\n" \
    "s with prototypes C (>= 0, rows renormalised) and token labels abn (1 = abnormal).\n" \
    "ds_stru and ds_cate are the gradients of each loss w.r.t. s. GPU keywords: ds_* are\n" \
    "w_* times the gradients; combined=True accumulates both into one buffer (initially ds,\n" \
    "or zeros) and returns (l_stru, l_cate, ds_total, None)."
#define OBJ_PROSE_STRU_TOKEN "\n\n" \
    "NOT IN THE PAPER (Config.stru_target='teacher_token'): the structure term against the\n" \
    "teacher's own tokens. For each normal token (i, j): -log[ f(q_ij, t_ij) / sum_b f(q_ij,\n" \
    "t_bj) ], an InfoNCE over the images b at the same position j, with q = softmax(s/tau_s),\n" \
    "t = qt rows renormalised, f = exp(-H/tau) as Eq. 12; l_stru is its mean over normal\n" \
    "tokens, ds its gradient w.r.t. s (qt is a target). CPU only (no GPU twin yet)."
#define OBJ_PROSE_RECON "\n\n" \
    "Eq. 20: mean over tokens of w * ||y - x||^2 / PPC (w = w_abn on abnormal tokens, 1\n" \
    "elsewhere). GPU keyword: dy is weight times the gradient."
#define OBJ_PROSE_RELEASED "\n\n" \
    "The released code's objective: P = sinkhorn_knopp(C, eps, iters) over the L rows of\n" \
    "C; l_cst = mean over normal tokens of -sum_k P_jk log softmax(s_ij / tau_s)_k;\n" \
    "l_recon = MSE of y against x over all values."
#define OBJ_PROSE_ANOMALY "\n\n" \
    "Eq. 51: err = ||y_ij - x_ij||^2; log_score = log(mean_j exp(err_ij)) (finite, use it\n" \
    "for ranking); score = exp(log_score) = 1/A(x) (higher = more abnormal; inf only when it\n" \
    "overflows float64)."
#define SLM_PROSE "\n\n" \
    "images: uint8[B,S,S] normal images; image b has global index first_index + b. Config\n" \
    "(keyword-only): lesions_min=1, lesions_max=4, size_min=16, size_max=64, crop_max=60,\n" \
    "gamma2=0.5, strength=0.5, token_rule='paper'|'released', region_rule='random'|'largest'.\n" \
    "The GPU twin is bit-identical."

#define FAST_PROSE "\n\n" \
    "A kernel of the fast bf16 GPU path (AFIRE_CUDA_FAST=1, cuda/fast.cuh). The CPU twin is\n" \
    "the fp32 reference; the GPU twin rounds its operands to bf16 (nearest even), runs the\n" \
    "kernel (fp32 accumulation) and widens its bf16 outputs to fp32."
#define SDPA_PROSE FAST_PROSE "\n" \
    "GPU keyword backend: 0 cuDNN's fused SDPA when a plan builds, else our kernel; 1 cuDNN\n" \
    "only (RuntimeError saying why when it cannot); 2 our kernel. lse[b,h,i] = log sum_j\n" \
    "exp(q_i.k_j / sqrt(D/H)) (natural log)."
#define ANOMALY_PROSE_INPAINT "\n\n" \
    "Not in the paper. Complementary in-painting masks: K = stride^2 masks of the G x G token\n" \
    "grid; token (r, c) is hidden (1) in mask ((r // block) % stride) * stride +\n" \
    "(c // block) % stride, so every token is hidden exactly once."
#define ANOMALY_PROSE_ERROR "\n\n" \
    "Not in the paper. err[b, j] = mean over the Q values of token j of (y - x)^2 for the\n" \
    "tokens with mask[b, j] = 1 (all tokens without mask); the others keep err0 (or 0)."
#define ANOMALY_PROSE_STATS "\n\n" \
    "Not in the paper. Per-position mean and sample std (floored at 1e-6) over N reference\n" \
    "maps of v = log(num + eps) - log(den + eps) (without den: log(num + eps))."
#define ANOMALY_PROSE_ZSCORE "\n\n" \
    "Not in the paper. map = (v - mean) / std per position, v as position_stats;\n" \
    "score = the mean of the map over the L tokens (higher = more abnormal)."
#define ANOMALY_PROSE_GAUSS_FIT "\n\n" \
    "Not in the paper. Gaussian reference of encoder tokens (cls first, never used): pooled\n" \
    "-> one Gaussian (G = 1) of the GAP features; else one per position (G = T - 1). prec is\n" \
    "the inverse of (1 - shrinkage) S + shrinkage tr(S)/D I, S the sample covariance."
#define ANOMALY_PROSE_GAUSS_SCORE "\n\n" \
    "Not in the paper. map = squared Mahalanobis distance of each GAP feature (pooled) or\n" \
    "patch token to its Gaussian; score = the mean of the map (higher = more abnormal)."
#define ANOMALY_PROSE_KNN "\n\n" \
    "Not in the paper. map[b, j] = mean of the k smallest squared distances of patch token j\n" \
    "of image b to patch token j of the N reference images; score = the mean of the map."

/* X(module, name, signature, check, cpu_call, cuda_call) */
#define AF_OP_TABLE(X)                                                                           \
    X(ops, linear_forward, "inp[N,C] weight[OC,C] bias[OC]=None -> out[N,OC]", NULL,             \
      VOID(af_linear_forward(F(out), F(inp), F(weight), F(bias), I(N), I(C), I(OC))),            \
      af_cuda_linear_forward(CTX, F(out), F(inp), F(weight), F(bias), I(N), I(C), I(OC)))        \
    X(ops, linear_backward, "dout[N,OC] inp[N,C] weight[OC,C] has_bias:bool=True -> "            \
      "(dinp[N,C], dweight[OC,C], dbias[OC] if has_bias)", NULL,                                 \
      VOID(af_linear_backward(F(dinp), F(dweight), F(dbias), F(dout), F(inp), F(weight), I(N),   \
                              I(C), I(OC))),                                                     \
      af_cuda_linear_backward(CTX, F(dinp), F(dweight), F(dbias), F(dout), F(inp), F(weight),    \
                              I(N), I(C), I(OC)))                                                \
    X(ops, layernorm_forward, "inp[N,C] weight[C] bias[C] eps:float>=0=1e-6 -> "                 \
      "(out[N,C], mean[N], rstd[N])", NULL,                                                      \
      VOID(af_layernorm_forward(F(out), F(mean), F(rstd), F(inp), F(weight), F(bias), I(N),      \
                                I(C), R(eps))),                                                  \
      af_cuda_layernorm_forward(CTX, F(out), F(mean), F(rstd), F(inp), F(weight), F(bias), I(N), \
                                I(C), R(eps)))                                                   \
    X(ops, layernorm_backward, "dout[inp] inp[N,C] weight[C] mean[N] rstd[N] -> "                \
      "(dinp[N,C], dweight[C], dbias[C])", NULL,                                                 \
      VOID(af_layernorm_backward(F(dinp), F(dweight), F(dbias), F(dout), F(inp), F(weight),      \
                                 F(mean), F(rstd), I(N), I(C))),                                 \
      af_cuda_layernorm_backward(CTX, F(dinp), F(dweight), F(dbias), F(dout), F(inp), F(weight), \
                                 F(mean), F(rstd), I(N), I(C)))                                  \
    X(ops, gelu_forward, "inp[...] -> out[inp]\n\nExact erf GELU, any shape.", NULL,             \
      VOID(af_gelu_forward(F(out), F(inp), COUNT(inp))),                                         \
      af_cuda_gelu_forward(CTX, F(out), F(inp), COUNT(inp)))                                     \
    X(ops, gelu_backward, "dout[inp] inp[...] -> (dinp[inp])", NULL,                             \
      VOID(af_gelu_backward(F(dinp), F(dout), F(inp), COUNT(inp))),                              \
      af_cuda_gelu_backward(CTX, F(dinp), F(dout), F(inp), COUNT(inp)))                          \
    X(ops, softmax_forward, "inp[N,C] -> out[N,C]\n\nRow softmax.", NULL,                        \
      VOID(af_softmax_forward(F(out), F(inp), I(N), I(C))),                                      \
      af_cuda_softmax_forward(CTX, F(out), F(inp), I(N), I(C)))                                  \
    X(ops, softmax_backward, "dout[out] out[N,C] -> (dinp[N,C])", NULL,                          \
      VOID(af_softmax_backward(F(dinp), F(dout), F(out), I(N), I(C))),                           \
      af_cuda_softmax_backward(CTX, F(dinp), F(dout), F(out), I(N), I(C)))                       \
    X(ops, attention_forward, "qkv[B,T,3*D] H:int>0 -> (out[B,T,D], att[B,H,T,T])",              \
      check_heads,                                                                               \
      VOID(af_attention_forward(F(out), F(att), F(qkv), I(B), I(T), I(D), I(H))),                \
      af_cuda_attention_forward(CTX, F(out), F(att), F(qkv), I(B), I(T), I(D), I(H)))            \
    X(ops, attention_backward, "dout[B,T,D] qkv[B,T,3*D] att[B,H,T,T] H:int>0 -> (dqkv[qkv]) "   \
      "using datt[att]", check_heads,                                                            \
      VOID(af_attention_backward(F(dqkv), F(datt), F(dout), F(qkv), F(att), I(B), I(T), I(D),    \
                                 I(H))),                                                         \
      af_cuda_attention_backward(CTX, F(dqkv), F(datt), F(dout), F(qkv), F(att), I(B), I(T),     \
                                 I(D), I(H)))                                                    \
    X(ops, attention_fused_forward, "qkv[B,T,3*D] H:int>0 -> (out[B,T,D], stats[B,H,T,2]) "     \
      "using scratch[B,H,T,2*T]\n\nThe CPU model's attention: saves the softmax row max and "    \
      "1/sum,\nnot the T x T probabilities.", check_heads,                                      \
      VOID(af_attention_fused_forward(F(out), F(stats), F(scratch), COUNT(scratch), F(qkv),     \
                                      I(B), I(T), I(D), I(H), NULL, 0)),                        \
      NONE)                                                                                      \
    X(ops, attention_fused_backward, "dout[B,T,D] qkv[B,T,3*D] stats[B,H,T,2] H:int>0 -> "      \
      "(dqkv[qkv]) using scratch[B,H,T,2*T]", check_heads,                                       \
      VOID(af_attention_fused_backward(F(dqkv), F(scratch), COUNT(scratch), F(dout), F(qkv),    \
                                       F(stats), I(B), I(T), I(D), I(H), NULL, 0)),             \
      NONE)                                                                                      \
    X(ops, cpu_linear_forward_bf16, "inp[N,C] weight[OC,C] bias[OC]=None -> out[N,OC] using "   \
      "ws[WS]\n\nlinear_forward with bf16 GEMM operands and fp32 sums (the CPU's "               \
      "precision='bf16').",                                                                      \
      check_linear_bf16,                                                                         \
      VOID(af_linear_forward_bf16(F(out), F(inp), F(weight), F(bias), I(N), I(C), I(OC), F(ws), \
                                  (size_t)COUNT(ws) * 4)),                                       \
      NONE)                                                                                      \
    X(ops, cpu_linear_backward_bf16, "dout[N,OC] inp[N,C] weight[OC,C] has_bias:bool=True -> "   \
      "(dinp[N,C], dweight[OC,C], dbias[OC] if has_bias) using ws[WS]", check_linear_bf16,       \
      VOID(af_linear_backward_bf16(F(dinp), F(dweight), F(dbias), F(dout), F(inp), F(weight),   \
                                   I(N), I(C), I(OC), F(ws), (size_t)COUNT(ws) * 4)),            \
      NONE)                                                                                      \
    X(ops, layernorm_linear_forward, "x[N,C] ln_w[C] ln_b[C] w[OC,C] b[OC]=None "                \
      "eps:float>=0=1e-6 -> (y[N,C], mean[N], rstd[N], out[N,OC])\n\nFused row tiles: "          \
      "y = LayerNorm(x), out = y @ w^T + b.", NULL,                                              \
      VOID(af_layernorm_linear_forward(F(y), F(mean), F(rstd), F(out), F(x), F(ln_w), F(ln_b),  \
                                       R(eps), F(w), F(b), I(N), I(C), I(OC))),                  \
      NONE)                                                                                      \
    X(ops, linear_residual_layernorm_forward, "x[N,C] w[OC,C] b[OC] res[N,OC] ln_w[OC] "        \
      "ln_b[OC] eps:float>=0=1e-6 -> (r[N,OC], y[N,OC], mean[N], rstd[N])\n\nFused row tiles: "  \
      "r = x @ w^T + b + res, y = LayerNorm(r).", NULL,                                          \
      VOID(af_linear_residual_layernorm_forward(F(r), F(y), F(mean), F(rstd), F(x), F(w), F(b),  \
                                                F(res), F(ln_w), F(ln_b), R(eps), I(N), I(C),   \
                                                I(OC))),                                         \
      NONE)                                                                                      \
    X(ops, mlp_forward, "x[N,C] w1[HC,C] b1[HC] w2[C,HC] b2[C] res[N,C]=None -> "                \
      "(h[N,HC], g[N,HC], out[N,C])\n\nFused row tiles: h = x @ w1^T + b1, g = gelu(h), "        \
      "out = g @ w2^T + b2 + res.", NULL,                                                        \
      VOID(af_mlp_forward(F(h), F(g), F(out), F(x), F(w1), F(b1), F(w2), F(b2), F(res), I(N),   \
                          I(C), I(HC))),                                                         \
      NONE)                                                                                      \
    X(ops, mlp_backward_data, "dout[N,C] h[N,HC] w2[C,HC] -> (dh[N,HC], g[N,HC])\n\n"           \
      "Fused row tiles: dh = (dout @ w2) * gelu'(h), g = gelu(h).", NULL,                        \
      VOID(af_mlp_backward_data(F(dh), F(g), F(dout), F(h), F(w2), I(N), I(C), I(HC))),         \
      NONE)                                                                                      \
    X(ops, linear_layernorm_backward_data, "dout[N,OC] w[OC,C] x[N,C] ln_w[C] mean[N] rstd[N] "  \
      "skip[N,C]=None -> (dx[N,C], dy[N,C])\n\nFused row tiles: dy = dout @ w, dx = the "        \
      "LayerNorm input gradient of dy (+ skip).", NULL,                                          \
      VOID(af_linear_layernorm_backward_data(F(dx), F(dy), F(dout), F(w), F(x), F(ln_w),        \
                                             F(mean), F(rstd), F(skip), I(N), I(C), I(OC))),     \
      NONE)                                                                                      \
    X(ops, matmul_bf16, "a[M,K] b[K,N] -> out[M,N] using ws[WS]\n\na @ b with a and b "        \
      "rounded to bfloat16 and fp32 sums\n(the GEMM of the CPU's precision='bf16').",            \
      check_gemm_bf16,                                                                            \
      VOID(af_gemm_bf16(0, 0, I(M), I(N), I(K), 1.0f, F(a), I(K), F(b), I(N), 0.0f, F(out),     \
                        I(N), F(ws), (size_t)COUNT(ws) * 4)),                                    \
      NONE)                                                                                      \
    X(ops, residual_forward, "a[...] b[a] -> out[a]\n\na + b.", NULL,                            \
      VOID(af_residual_forward(F(out), F(a), F(b), COUNT(a))),                                   \
      af_cuda_residual_forward(CTX, F(out), F(a), F(b), COUNT(a)))                               \
    X(ops, residual_backward, "dout[...] -> (da[dout], db[dout])", NULL,                         \
      VOID(af_residual_backward(F(da), F(db), F(dout), COUNT(dout))),                            \
      af_cuda_residual_backward(CTX, F(da), F(db), F(dout), COUNT(dout)))                        \
    X(ops, patchify_forward, "img[B,C,S,S] P:int>0 order:int=0 -> patches[B,L,P*P*C]\n\n"        \
      "order: PATCH_PQC (MAE's, 0) or PATCH_CPQ (1).", check_patches,                            \
      VOID(af_patchify_forward(F(patches), F(img), I(B), I(C), I(S), I(P), I(order))),           \
      af_cuda_patchify_forward(CTX, F(patches), F(img), I(B), I(C), I(S), I(P), I(order)))       \
    X(ops, patchify_backward, "patches[B,L,P*P*C] C:int>0 S:int>0 P:int>0 order:int=0 -> "       \
      "(img[B,C,S,S])", check_patches,                                                           \
      VOID(af_patchify_backward(F(img), F(patches), I(B), I(C), I(S), I(P), I(order))),          \
      af_cuda_patchify_backward(CTX, F(img), F(patches), I(B), I(C), I(S), I(P), I(order)))      \
    X(ops, unpatchify, "patches[B,L,P*P*C] C:int>0 S:int>0 P:int>0 order:int=0 -> img[B,C,S,S]", \
      check_patches,                                                                             \
      VOID(af_unpatchify(F(img), F(patches), I(B), I(C), I(S), I(P), I(order))),                 \
      af_cuda_unpatchify(CTX, F(img), F(patches), I(B), I(C), I(S), I(P), I(order)))             \
    X(ops, sincos_2d_embed, "D:int>0 G:int>0 cls:bool=False -> out[R,D]\n\n"                     \
      "MAE's 2D sin-cos table: (1 if cls) + G*G rows.", check_sincos,                            \
      VOID(af_sincos_2d_embed(F(out), I(D), I(G), I(cls))), NONE)                                \
    X(ops, l2norm_forward, "inp[N,C] eps:float>=0=1e-12 -> (out[N,C], norm[N])", NULL,           \
      VOID(af_l2norm_forward(F(out), F(norm), F(inp), I(N), I(C), R(eps))),                      \
      af_cuda_l2norm_forward(CTX, F(out), F(norm), F(inp), I(N), I(C), R(eps)))                  \
    X(ops, l2norm_backward, "dout[inp] inp[N,C] norm[N] eps:float>=0=1e-12 -> (dinp[N,C])",      \
      check_l2norm_eps,                                                                          \
      VOID(af_l2norm_backward(F(dinp), F(dout), F(inp), F(norm), I(N), I(C), R(eps))),           \
      af_cuda_l2norm_backward(CTX, F(dinp), F(dout), F(inp), F(norm), I(N), I(C), R(eps)))       \
    X(ops, wn_linear_forward, "inp[N,C] v[K,C] -> (out[N,K], w_eff[K,C], vnorm[K])",             \
      check_wn_rows,                                                                             \
      VOID(af_wn_linear_forward(F(out), F(w_eff), F(vnorm), F(inp), F(v), I(N), I(C), I(K))),    \
      af_cuda_wn_linear_forward(CTX, F(out), F(w_eff), F(vnorm), F(inp), F(v), I(N), I(C),       \
                                I(K)))                                                           \
    X(ops, wn_linear_backward, "dout[N,K] inp[N,C] w_eff[K,C] vnorm[K] -> (dinp[N,C], dv[K,C]) " \
      "using @dw[K,C]", check_wn_vnorm,                                                          \
      VOID(af_wn_linear_backward(F(dinp), F(dv), F(dout), F(inp), F(w_eff), F(vnorm), I(N),      \
                                 I(C), I(K))),                                                   \
      af_cuda_wn_linear_backward(CTX, F(dinp), F(dv), F(dw), F(dout), F(inp), F(w_eff),          \
                                 F(vnorm), I(N), I(C), I(K)))                                    \
    X(ops, _wn_linear_backward_dv_lowmem, "dv0[w_eff] dout[N,K] inp[N,C] w_eff[K,C] vnorm[K] "   \
      "-> dv[w_eff] from dv0\n\nTest hook: dv0 + the dv of wn_linear_backward, computed "        \
      "without a K x C buffer (the out-of-memory path).", NULL,                                  \
      VOID(af_wn_linear_backward_dv_lowmem(F(dv), F(dout), F(inp), F(w_eff), F(vnorm), I(N),     \
                                           I(C), I(K))), NONE)                                   \
    X(ops, adamw_update, "params[...]! grads[params] m[params]! v[params]! * lr:float>=0 "       \
      "t:int>0 beta1:float[0,1)=0.9 beta2:float[0,1)=0.999 eps:float>=0=1e-8 "                   \
      "weight_decay:float>=0=0 -> None\n\nUpdates params, m and v in place (t: the step "        \
      "count, from 1).", check_adamw,                                                            \
      VOID(af_adamw_update(F(params), F(grads), F(m), F(v), COUNT(params), R(lr), R(beta1),      \
                           R(beta2), R(eps), R(weight_decay), I(t))),                            \
      af_cuda_adamw_update(CTX, F(params), F(grads), F(m), F(v), COUNT(params), R(lr), R(beta1), \
                           R(beta2), R(eps), R(weight_decay), I(t)))                             \
    X(ops, linear_forward_bf16, "inp[N,C] weight[OC,C] bias[OC]=None * @out_f32:bool=False "    \
      "@epilogue:bool=True -> out[N,OC]" FAST_PROSE "\nGPU keywords: out_f32 (an fp32 output, "   \
      "fp32 bias), epilogue=False (our bias kernel, not cuBLASLt's).", NULL,                      \
      VOID(af_linear_forward(F(out), F(inp), F(weight), F(bias), I(N), I(C), I(OC))),            \
      af_cuda_check_linear_forward(CTX, F(out), F(inp), F(weight), F(bias), I(N), I(C), I(OC),   \
                                   I(out_f32), I(epilogue)))                                     \
    X(ops, linear_backward_bf16, "dout[N,OC] inp[N,C] weight[OC,C] has_bias:bool=True * "         \
      "@dinp_f32:bool=False @epilogue:bool=True -> (dinp[N,C], dweight[OC,C], dbias[OC] if "      \
      "has_bias)" FAST_PROSE "\nGPU keywords: dinp_f32, epilogue=False (our column sum for "       \
      "dbias, not the BGRADB epilogue).", NULL,                                                  \
      VOID(af_linear_backward(F(dinp), F(dweight), F(dbias), F(dout), F(inp), F(weight), I(N),   \
                              I(C), I(OC))),                                                     \
      af_cuda_check_linear_backward(CTX, F(dinp), F(dweight), F(dbias), F(dout), F(inp),         \
                                    F(weight), I(N), I(C), I(OC), I(dinp_f32), I(epilogue)))     \
    X(ops, residual_layernorm_forward, "a[N,C] weight[C] bias[C] eps:float>=0=1e-6 * "            \
      "b[N,C]=None @out_f32:bool=False -> (res[N,C], out[N,C], mean[N], rstd[N])" FAST_PROSE      \
      "\nres = a + b (a when b is None; the GPU rounds b), out = LayerNorm(res) (bf16 unless "   \
      "out_f32).", NULL,                                                                          \
      cpu_residual_layernorm(F(res), F(out), F(mean), F(rstd), F(a), F(b), F(weight), F(bias),   \
                             I(N), I(C), R(eps)),                                                \
      af_cuda_check_residual_layernorm(CTX, F(res), F(out), F(mean), F(rstd), F(a), F(b),        \
                                       F(weight), F(bias), I(N), I(C), R(eps), I(out_f32)))      \
    X(ops, layernorm_backward_residual, "dout[inp] inp[N,C] weight[C] mean[N] rstd[N] * "          \
      "dres[inp]=None @dout_f32:bool=False -> (dinp[N,C], dweight[C], dbias[C], dinp_h[N,C])"     \
      FAST_PROSE "\ndinp = dres + the LayerNorm backward of dout (one kernel with dweight, "      \
      "dbias); dinp_h: the bf16 copy the GPU writes (= dinp on the CPU).", NULL,                  \
      cpu_layernorm_backward_residual(F(dinp), F(dweight), F(dbias), F(dinp_h), F(dout), F(inp), \
                                      F(weight), F(mean), F(rstd), F(dres), I(N), I(C)),         \
      af_cuda_check_layernorm_backward(CTX, F(dinp), F(dweight), F(dbias), F(dinp_h), F(dout),   \
                                       F(inp), F(weight), F(mean), F(rstd), F(dres), I(N), I(C), \
                                       I(dout_f32)))                                             \
    X(ops, gelu_forward_bf16, "inp[...] -> out[inp]" FAST_PROSE, NULL,                            \
      VOID(af_gelu_forward(F(out), F(inp), COUNT(inp))),                                         \
      af_cuda_check_gelu_forward(CTX, F(out), F(inp), COUNT(inp)))                               \
    X(ops, gelu_backward_bf16, "dout[inp] inp[...] -> (dinp[inp])" FAST_PROSE, NULL,              \
      VOID(af_gelu_backward(F(dinp), F(dout), F(inp), COUNT(inp))),                              \
      af_cuda_check_gelu_backward(CTX, F(dinp), F(dout), F(inp), COUNT(inp)))                    \
    X(ops, sdpa_forward, "qkv[B,T,3*D] H:int>0 * @backend:int>=0=0 -> (out[B,T,D], lse[B,H,T])"  \
      SDPA_PROSE, check_heads,                                                                    \
      cpu_sdpa_forward(F(out), F(lse), F(qkv), I(B), I(T), I(D), I(H)),                          \
      af_cuda_check_sdpa_forward(CTX, F(out), F(lse), F(qkv), I(B), I(T), I(D), I(H),            \
                                 I(backend)))                                                    \
    X(ops, sdpa_backward, "dout[B,T,D] qkv[B,T,3*D] out[B,T,D] lse[B,H,T] H:int>0 * "             \
      "@backend:int>=0=0 -> (dqkv[qkv])" SDPA_PROSE "\nThe CPU twin recomputes the "             \
      "probabilities from qkv (out and lse unused).", check_heads,                                \
      cpu_sdpa_backward(F(dqkv), F(dout), F(qkv), I(B), I(T), I(D), I(H)),                       \
      af_cuda_check_sdpa_backward(CTX, F(dqkv), F(dout), F(qkv), F(out), F(lse), I(B), I(T),     \
                                  I(D), I(H), I(backend)))                                       \
    X(objective, sinkhorn_knopp, "logits[N,K] eps:float>0=" STR(AF_SINKHORN_EPS)                 \
      " iters:int>=0=" STR(AF_SINKHORN_ITERS) " -> q[N,K]" OBJ_PROSE_SINKHORN, NULL,             \
      af_sinkhorn_knopp(F(q), F(logits), I(N), I(K), R(eps), I(iters)),                          \
      af_cuda_sinkhorn_knopp(CTX, F(q), F(logits), I(N), I(K), R(eps), I(iters)))                \
    X(objective, prototypes_update, "C[L,K]! src[B,L,K] m:float[0,1]=" STR(AF_PROTO_M)           \
      " overwrite:bool=False -> None" OBJ_PROSE_PROTOTYPES, NULL,                                 \
      af_prototypes_update(F(C), F(src), I(B), I(L), I(K), R(m), I(overwrite)),                  \
      af_cuda_prototypes_update(CTX, F(C), F(src), I(B), I(L), I(K), R(m), I(overwrite)))        \
    X(objective, paper_loss, "s[B,L,K] C[L,K] abn[B,L]:labels tau_s:float>0=" STR(AF_TAU_S)      \
      " tau:float>0=" STR(AF_TAU) " * @w_stru:float=1 @w_cate:float=1 @combined:bool=False "     \
      "@ds[B,L,K]=None -> (l_stru:float, l_cate:float, ds_stru[s] from ds, "                     \
      "ds_cate[s] unless combined) using scratch[W]" OBJ_PROSE_PAPER, check_paper,               \
      af_paper_loss(F(l_stru), F(l_cate), F(ds_stru), F(ds_cate), F(s), F(C), U8(abn), I(B),     \
                    I(L), I(K), R(tau_s), R(tau), 1.0f, 1.0f, F(scratch)),                       \
      af_cuda_paper_loss(CTX, F(l_stru), F(l_cate), F(ds_stru),                                  \
                         I(combined) ? F(ds_stru) : F(ds_cate), F(s), F(C), U8(abn), I(B), I(L), \
                         I(K), R(tau_s), R(tau), R(w_stru), R(w_cate), F(scratch)))              \
    X(objective, stru_token_loss, "s[B,L,K] qt[B,L,K] abn[B,L]:labels tau_s:float>0="         \
      STR(AF_TAU_S) " tau:float>0=" STR(AF_TAU) " -> (l_stru:float, ds[s]) using scratch[W]"     \
      OBJ_PROSE_STRU_TOKEN, check_stru_token,                                                    \
      af_stru_token_loss(F(l_stru), F(ds), F(s), F(qt), U8(abn), I(B), I(L), I(K), R(tau_s),     \
                         R(tau), 1.0f, F(scratch)),                                              \
      NONE)                                                                                      \
    X(objective, recon_loss, "y[B,L,PPC] x[B,L,PPC] abn[B,L]:labels w_abn:float>=0="             \
      STR(AF_W_ABN) " * @weight:float=1 -> (loss:float, dy[y])" OBJ_PROSE_RECON, NULL,           \
      af_recon_loss(F(loss), F(dy), F(y), F(x), U8(abn), I(B), I(L), I(PPC), R(w_abn), 1.0f),    \
      af_cuda_recon_loss(CTX, F(loss), F(dy), F(y), F(x), U8(abn), I(B), I(L), I(PPC), R(w_abn), \
                         R(weight)))                                                             \
    X(objective, released_loss, "s[B,L,K] C[L,K] abn[B,L]:labels y[B,L,PPC] x[B,L,PPC] "        \
      "tau_s:float>0=" STR(AF_TAU_S) " eps:float>0=" STR(AF_SINKHORN_EPS) " iters:int>=0="       \
      STR(AF_SINKHORN_ITERS) " -> (l_cst:float, l_recon:float, ds[s], dy[y]) using scratch[W]"   \
      OBJ_PROSE_RELEASED, check_released,                                                        \
      af_released_loss(F(l_cst), F(l_recon), F(ds), F(dy), F(s), F(C), U8(abn), F(y), F(x),     \
                       I(B), I(L), I(K), I(PPC), R(tau_s), R(eps), I(iters), 1.0f, 1.0f,         \
                       F(scratch)),                                                              \
      af_cuda_released_loss(CTX, F(l_cst), F(l_recon), F(ds), F(dy), F(s), F(C), U8(abn), F(y),  \
                            F(x), I(B), I(L), I(K), I(PPC), R(tau_s), R(eps), I(iters), 1.0f,    \
                            1.0f, F(scratch)))                                                   \
    X(objective, anomaly_score, "y[B,L,PPC] x[B,L,PPC] -> "                                      \
      "(score[B]:f64, log_score[B]:f64, err[B,L]:f64)" OBJ_PROSE_ANOMALY, NULL,                  \
      af_anomaly_score(F64(score), F64(log_score), F64(err), F(y), F(x), I(B), I(L), I(PPC)),    \
      af_cuda_anomaly_score(CTX, F64(score), F64(log_score), F64(err), F(y), F(x), I(B), I(L),   \
                            I(PPC)))                                                             \
    X(anomaly, inpaint_masks, "G:int>0 stride:int>0=2 block:int>0=1 -> masks[K,L]:u8"           \
      ANOMALY_PROSE_INPAINT, check_inpaint_masks,                                                \
      af_anomaly_inpaint_masks(U8(masks), I(G), I(stride), I(block)), NONE)                      \
    X(anomaly, token_error, "y[B,L,Q] x[B,L,Q] mask[B,L]:labels=None err0[B,L]=None -> "         \
      "err[B,L] from err0" ANOMALY_PROSE_ERROR, NULL,                                            \
      af_anomaly_token_error(F(err), F(y), F(x), U8(mask), I(B), I(L), I(Q)),                    \
      af_cuda_anomaly_token_error(CTX, F(err), F(y), F(x), U8(mask), I(B), I(L), I(Q)))          \
    X(anomaly, position_stats, "num[N,L] den[N,L]=None eps:float>0=1e-4 -> (mean[L], std[L])"    \
      ANOMALY_PROSE_STATS, check_position_stats,                                                 \
      af_anomaly_position_stats(F(mean), F(std), F(num), F(den), I(N), I(L), R(eps)),            \
      af_cuda_anomaly_position_stats(CTX, F(mean), F(std), F(num), F(den), I(N), I(L), R(eps)))  \
    X(anomaly, position_zscore, "num[B,L] mean[L] std[L] den[B,L]=None eps:float>0=1e-4 -> "     \
      "(score[B]:f64, map[B,L])" ANOMALY_PROSE_ZSCORE, check_position_zscore,                    \
      af_anomaly_position_zscore(F64(score), F(map), F(num), F(den), F(mean), F(std), I(B),      \
                                 I(L), R(eps)),                                                  \
      af_cuda_anomaly_position_zscore(CTX, F64(score), F(map), F(num), F(den), F(mean), F(std),  \
                                      I(B), I(L), R(eps)))                                       \
    X(anomaly, gauss_fit, "tokens[N,T,D] pooled:bool=False shrinkage:float[0,1]=0.1 -> "         \
      "(mean[G,D], prec[G,D,D])" ANOMALY_PROSE_GAUSS_FIT, check_gauss_fit,                       \
      af_anomaly_gauss_fit(F(mean), F(prec), F(tokens), I(N), I(T), I(D), I(pooled),             \
                           R(shrinkage)),                                                        \
      af_cuda_anomaly_gauss_fit(CTX, F(mean), F(prec), F(tokens), I(N), I(T), I(D), I(pooled),   \
                                R(shrinkage)))                                                   \
    X(anomaly, gauss_score, "tokens[B,T,D] mean[G,D] prec[G,D,D] pooled:bool=False -> "          \
      "(score[B]:f64, map[B,G])" ANOMALY_PROSE_GAUSS_SCORE, check_gauss_score,                   \
      af_anomaly_gauss_score(F64(score), F(map), F(tokens), F(mean), F(prec), I(B), I(T), I(D),  \
                             I(pooled)),                                                         \
      af_cuda_anomaly_gauss_score(CTX, F64(score), F(map), F(tokens), F(mean), F(prec), I(B),    \
                                  I(T), I(D), I(pooled)))                                        \
    X(anomaly, knn_score, "tokens[B,T,D] ref[N,T,D] k:int>0=1 -> (score[B]:f64, map[B,L])"       \
      ANOMALY_PROSE_KNN, check_knn,                                                              \
      af_anomaly_knn_score(F64(score), F(map), F(tokens), F(ref), I(B), I(N), I(T), I(D), I(k)), \
      af_cuda_anomaly_knn_score(CTX, F64(score), F(map), F(tokens), F(ref), I(B), I(N), I(T),    \
                                I(D), I(k)))                                                     \
    X(slm, slm_generate, "images[B,S,W]:u8 seed:u64 step:u64=0 first_index:u64=0 patch:int=16 "  \
      "**config -> (x_prime[images]:u8, masks[images]:u8, token_labels[B,L]:u8)" SLM_PROSE,      \
      check_slm,                                                                                 \
      af_slm_generate(U8(x_prime), U8(masks), U8(token_labels), U8(images), I(B), I(S),          \
                      I(patch), CFG, U64(seed), U64(step), U64(first_index)),                    \
      af_cuda_slm_generate(CTX, U8(x_prime), U8(masks), U8(token_labels), U8(images), I(B),      \
                           I(S), I(patch), CFG, U64(seed), U64(step), U64(first_index)))

/* Each row becomes an adapter running this build's call and a Python entry point. */
#define ADAPTER(module, name, sig, check, cpu, cuda)                                         \
    static af_status run_##name(void *ctx, void *const *p, const af_op_call *o) {            \
        (void)ctx, (void)p, (void)o;                                                         \
        return AF_BACKEND(cpu, cuda);                                                        \
    }                                                                                        \
    static PyObject *py_##name(PyObject *self, PyObject *args, PyObject *kw);
AF_OP_TABLE(ADAPTER)

#define ROW(module, name, sig, check, cpu, cuda) \
    {#module, #name, sig, check, run_##name, AF_BACKEND(#cpu, #cuda), #cuda},
const af_op_row af_op_rows[] = {AF_OP_TABLE(ROW)};
const int af_op_nrows = sizeof af_op_rows / sizeof af_op_rows[0];
af_op_sig af_op_sigs[sizeof af_op_rows / sizeof af_op_rows[0]];

#define DEF(module, name, sig, check, cpu, cuda) \
    {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, NULL},
PyMethodDef af_op_defs[] = {AF_OP_TABLE(DEF)};

enum {
#define INDEX(module, name, sig, check, cpu, cuda) AF_OP_##name,
    AF_OP_TABLE(INDEX)
};

#define ENTRY(module, name, sig, check, cpu, cuda)                              \
    static PyObject *py_##name(PyObject *self, PyObject *args, PyObject *kw) {  \
        return af_op_call_py(&af_op_rows[AF_OP_##name], &af_op_sigs[AF_OP_##name], args, kw); \
    }
AF_OP_TABLE(ENTRY)

/* ------------------------------------------------------------------ afire._C submodules */

int af_register_ops(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "ops", NULL,
                                     "CPU layer kernels (fp32): forward/backward pairs. Float32 "
                                     "arrays in (non-contiguous input is copied, another dtype "
                                     "is a TypeError), new arrays out.");
    if (sub == NULL || af_op_register(sub, "ops") < 0) return -1;
    if (PyModule_AddIntConstant(sub, "PATCH_PQC", AF_PATCH_PQC) < 0 ||
        PyModule_AddIntConstant(sub, "PATCH_CPQ", AF_PATCH_CPQ) < 0)
        return -1;
    return 0;
}

/* Also registers afire._C.anomaly, the scores beside Eq. 51 (csrc/core/anomaly.h). */
int af_register_objective(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "objective", NULL,
                                     "The AFiRe objective: Sinkhorn, prototypes, paper and "
                                     "released losses, anomaly score.");
    if (sub == NULL || af_op_register(sub, "objective") < 0) return -1;
    sub = af_add_submodule(m, "anomaly", NULL,
                           "Anomaly scores beside Eq. 51 (none of them in the paper): "
                           "in-painting masks and per-token errors, per-position z-scores, "
                           "Gaussian and nearest-neighbour references of encoder tokens "
                           "(csrc/core/anomaly.h).");
    return sub == NULL ? -1 : af_op_register(sub, "anomaly");
}
