/* Argument checking shared by the CPU bindings (afire._C: py_ops.c, py_objective.c,
 * py_slm.c) and their GPU twins (afire._C_cuda: py_cuda.c, py_cuda_objective.c). One
 * implementation of every check, so both extensions raise the same exception with the same
 * message for the same bad input. Compiled into both extensions.
 *
 * A parser fills a struct with the checked input arrays (float32 C-contiguous unless said
 * otherwise), the zero-filled output arrays and the sizes the kernel needs:
 *   af_parse_<op>(args, kw, &a)   reads the Python arguments too (ops, af_slm_generate: the two
 *                                 twins have the same signature);
 *   af_check_<fn>(objects..., &a) starts from parsed objects (objective: the GPU twins take
 *                                 extra keywords).
 * On success it returns 0 and a.own holds a new reference to every array of `a`: run the
 * kernel, build the result, then af_owned_release(&a.own). On failure it returns -1 with a
 * Python exception set (TypeError for a dtype, ValueError naming the argument otherwise) and
 * `a` owns nothing. */
#ifndef AFIRE_PY_ARGS_H
#define AFIRE_PY_ARGS_H

#include "py_util.h"
#include "slm.h"

/* ------------------------------------------------------------------ ownership */

#define AF_OWNED_MAX 8

typedef struct {
    PyArrayObject *arr[AF_OWNED_MAX];
    int n;
} af_owned;

/* Records `a` (a new reference, or NULL, which is passed through) in `o`; returns `a`. */
PyArrayObject *af_own(af_owned *o, PyArrayObject *a);
/* Drops every recorded reference; `o` is empty afterwards. */
void af_owned_release(af_owned *o);

/* ------------------------------------------------------------------ generic checks */

/* float32 of rank `ndim` (-1: any rank >= 1), every dimension in [1, INT_MAX] (the kernels
 * use int sizes). New reference or NULL. */
PyArrayObject *af_arg_f32(PyObject *obj, const char *name, int ndim);
/* float32 of rank `ndim` whose values are all finite (NaN/Inf -> ValueError). */
PyArrayObject *af_arg_f32_finite(PyObject *obj, const char *name, int ndim);
/* Same shape as `ref`. 0/-1. */
int af_check_same_shape(PyArrayObject *a, const char *name, PyArrayObject *ref,
                        const char *ref_name);
/* Every dimension in [1, 2^31). 0/-1. */
int af_check_int_dims(PyArrayObject *a, const char *name);
/* An int size in [1, INT_MAX]. 0/-1. */
int af_check_positive_int(long v, const char *name);
/* A finite real > 0 (temperatures, Sinkhorn eps). 0/-1. */
int af_check_positive_real(double v, const char *name);
/* A finite real >= 0 (layer-norm / Adam eps, weight decay). 0/-1. */
int af_check_eps(double eps, const char *name);

/* Zero-filled float32 arrays. */
PyArrayObject *af_zeros1(npy_intp a);
PyArrayObject *af_zeros2(npy_intp a, npy_intp b);
PyArrayObject *af_zeros_like(PyArrayObject *ref);

/* ------------------------------------------------------------------ layer ops
 * Arguments and checks of afire._C.ops (csrc/ops/ops.h names the sizes). */

typedef struct {
    af_owned own;
    PyArrayObject *out, *inp, *weight, *bias; /* bias NULL when None */
    int N, C, OC;
} af_linear_forward_args;

typedef struct {
    af_owned own;
    PyArrayObject *dinp, *dweight, *dbias, *dout, *inp, *weight; /* dbias NULL: no bias */
    int N, C, OC;
} af_linear_backward_args;

typedef struct {
    af_owned own;
    PyArrayObject *out, *mean, *rstd, *inp, *weight, *bias;
    int N, C;
    float eps;
} af_layernorm_forward_args;

typedef struct {
    af_owned own;
    PyArrayObject *dinp, *dweight, *dbias, *dout, *inp, *weight, *mean, *rstd;
    int N, C;
} af_layernorm_backward_args;

/* Element-wise ops over n values: gelu, residual. */
typedef struct {
    af_owned own;
    PyArrayObject *out, *inp;
    size_t n;
} af_gelu_forward_args;

typedef struct {
    af_owned own;
    PyArrayObject *dinp, *dout, *inp;
    size_t n;
} af_gelu_backward_args;

typedef struct {
    af_owned own;
    PyArrayObject *out, *a, *b;
    size_t n;
} af_residual_forward_args;

typedef struct {
    af_owned own;
    PyArrayObject *da, *db, *dout;
    size_t n;
} af_residual_backward_args;

typedef struct {
    af_owned own;
    PyArrayObject *out, *inp;
    int N, C;
} af_softmax_forward_args;

typedef struct {
    af_owned own;
    PyArrayObject *dinp, *dout, *out;
    int N, C;
} af_softmax_backward_args;

typedef struct {
    af_owned own;
    PyArrayObject *out, *att, *qkv;
    int B, T, D, H;
} af_attention_forward_args;

typedef struct {
    af_owned own;
    PyArrayObject *dqkv, *dout, *qkv, *att;
    int B, T, D, H;
} af_attention_backward_args;

/* af_patchify_forward: img -> out (patches); af_patchify_backward / af_unpatchify: patches -> img. */
typedef struct {
    af_owned own;
    PyArrayObject *img, *patches;
    int B, C, S, P, order;
} af_patchify_args;

typedef struct {
    af_owned own;
    PyArrayObject *out, *norm, *inp;
    int N, C;
    float eps;
} af_l2norm_forward_args;

typedef struct {
    af_owned own;
    PyArrayObject *dinp, *dout, *inp, *norm;
    int N, C;
    float eps;
} af_l2norm_backward_args;

typedef struct {
    af_owned own;
    PyArrayObject *out, *w_eff, *vnorm, *inp, *v;
    int N, C, K;
} af_wn_linear_forward_args;

typedef struct {
    af_owned own;
    PyArrayObject *dinp, *dv, *dout, *inp, *w_eff, *vnorm;
    int N, C, K;
} af_wn_linear_backward_args;

/* params, m, v are updated in place: borrowed from the call's arguments, not owned. */
typedef struct {
    af_owned own;
    PyArrayObject *params, *grads, *m, *v;
    size_t n;
    float lr, beta1, beta2, eps, weight_decay;
    int t;
} af_adamw_args;

int af_parse_linear_forward(PyObject *args, PyObject *kw, af_linear_forward_args *a);
int af_parse_linear_backward(PyObject *args, PyObject *kw, af_linear_backward_args *a);
int af_parse_layernorm_forward(PyObject *args, PyObject *kw, af_layernorm_forward_args *a);
int af_parse_layernorm_backward(PyObject *args, PyObject *kw, af_layernorm_backward_args *a);
int af_parse_gelu_forward(PyObject *args, PyObject *kw, af_gelu_forward_args *a);
int af_parse_gelu_backward(PyObject *args, PyObject *kw, af_gelu_backward_args *a);
int af_parse_residual_forward(PyObject *args, PyObject *kw, af_residual_forward_args *a);
int af_parse_residual_backward(PyObject *args, PyObject *kw, af_residual_backward_args *a);
int af_parse_softmax_forward(PyObject *args, PyObject *kw, af_softmax_forward_args *a);
int af_parse_softmax_backward(PyObject *args, PyObject *kw, af_softmax_backward_args *a);
int af_parse_attention_forward(PyObject *args, PyObject *kw, af_attention_forward_args *a);
int af_parse_attention_backward(PyObject *args, PyObject *kw, af_attention_backward_args *a);
int af_parse_patchify_forward(PyObject *args, PyObject *kw, af_patchify_args *a);
/* af_patchify_backward and af_unpatchify: `fmt` carries the function name for messages. */
int af_parse_patches_to_image(PyObject *args, PyObject *kw, const char *fmt,
                              af_patchify_args *a);
int af_parse_l2norm_forward(PyObject *args, PyObject *kw, af_l2norm_forward_args *a);
int af_parse_l2norm_backward(PyObject *args, PyObject *kw, af_l2norm_backward_args *a);
int af_parse_wn_linear_forward(PyObject *args, PyObject *kw, af_wn_linear_forward_args *a);
int af_parse_wn_linear_backward(PyObject *args, PyObject *kw, af_wn_linear_backward_args *a);
int af_parse_adamw_update(PyObject *args, PyObject *kw, af_adamw_args *a);

/* Method-table entries F(name, doc) of the op functions both extensions define (their
 * docstrings, written once). */
#define AF_OP_METHODS(F) \
    F(linear_forward, "linear_forward(inp[N,C], weight[OC,C], bias[OC]=None) -> out[N,OC]"), \
    F(linear_backward, "linear_backward(dout[N,OC], inp[N,C], weight[OC,C], has_bias=True) -> " \
                       "(dinp[N,C], dweight[OC,C], dbias[OC] or None)"), \
    F(layernorm_forward, "layernorm_forward(inp[N,C], weight[C], bias[C], eps=1e-6) -> " \
                         "(out[N,C], mean[N], rstd[N])"), \
    F(layernorm_backward, "layernorm_backward(dout, inp, weight, mean, rstd) -> " \
                          "(dinp[N,C], dweight[C], dbias[C])"), \
    F(gelu_forward, "gelu_forward(inp) -> out (exact erf GELU, any shape)"), \
    F(gelu_backward, "gelu_backward(dout, inp) -> (dinp,)"), \
    F(softmax_forward, "softmax_forward(inp[N,C]) -> out[N,C] (row softmax)"), \
    F(softmax_backward, "softmax_backward(dout[N,C], out[N,C]) -> (dinp,)"), \
    F(attention_forward, "attention_forward(qkv[B,T,3D], H) -> (out[B,T,D], att[B,H,T,T])"), \
    F(attention_backward, "attention_backward(dout[B,T,D], qkv[B,T,3D], att[B,H,T,T], H) -> " \
                          "(dqkv[B,T,3D],)"), \
    F(residual_forward, "residual_forward(a, b) -> a + b"), \
    F(residual_backward, "residual_backward(dout) -> (da, db)"), \
    F(patchify_forward, "patchify_forward(img[B,C,S,S], P, order=PATCH_PQC) -> " \
                        "patches[B,(S/P)^2,P*P*C]"), \
    F(patchify_backward, "patchify_backward(dpatches[B,L,P*P*C], C, S, P, order=PATCH_PQC) -> " \
                         "(dimg[B,C,S,S],)"), \
    F(unpatchify, "unpatchify(patches[B,L,P*P*C], C, S, P, order=PATCH_PQC) -> img[B,C,S,S]"), \
    F(l2norm_forward, "l2norm_forward(inp[N,C], eps=1e-12) -> (out[N,C], norm[N])"), \
    F(l2norm_backward, "l2norm_backward(dout, inp, norm, eps=1e-12) -> (dinp,)"), \
    F(wn_linear_forward, "wn_linear_forward(inp[N,C], v[K,C]) -> (out[N,K], w_eff[K,C], " \
                         "vnorm[K])"), \
    F(wn_linear_backward, "wn_linear_backward(dout[N,K], inp, w_eff, vnorm) -> " \
                          "(dinp[N,C], dv[K,C])"), \
    F(adamw_update, "adamw_update(params, grads, m, v, *, lr, t, beta1=0.9, beta2=0.999, " \
                    "eps=1e-8, weight_decay=0.0) -> None; updates params, m, v in place")

/* ------------------------------------------------------------------ objective
 * Arguments of afire._C.objective (csrc/core/objective.h names the sizes). */

/* Token labels abn[B,L]: uint8 (or bool) holding only 0/1. New reference or NULL. */
PyArrayObject *af_arg_abn(PyObject *obj, npy_intp B, npy_intp L);

typedef struct {
    af_owned own;
    PyArrayObject *q, *logits;
    int N, K, iters;
    float eps;
} af_sinkhorn_args;

typedef struct {
    af_owned own;
    PyArrayObject *C, *src; /* C updated in place (it is the caller's array) */
    int B, L, K;
    float m;
} af_prototypes_args;

/* The inputs of af_paper_loss; the outputs differ between the twins. */
typedef struct {
    af_owned own;
    PyArrayObject *s, *C, *abn;
    int B, L, K;
} af_paper_loss_args;

typedef struct {
    af_owned own;
    PyArrayObject *dy, *y, *x, *abn;
    int B, L, PPC;
} af_recon_loss_args;

typedef struct {
    af_owned own;
    PyArrayObject *ds, *dy, *s, *C, *abn, *y, *x;
    int B, L, K, PPC, iters;
    float tau_s, eps;
} af_released_loss_args;

typedef struct {
    af_owned own;
    PyArrayObject *score, *log_score, *err, *y, *x; /* outputs float64 */
    int B, L, PPC;
} af_anomaly_args;

int af_check_sinkhorn(PyObject *o_logits, double eps, int iters, af_sinkhorn_args *a);
int af_check_prototypes_update(PyObject *o_C, PyObject *o_src, double m, af_prototypes_args *a);
/* probs: also check C >= 0 with positive finite row sums here (the GPU code leaves that to
 * its caller; the CPU core checks it itself). tau_s and tau are checked by the caller. */
int af_check_paper_loss(PyObject *o_s, PyObject *o_C, PyObject *o_abn, int probs,
                        af_paper_loss_args *a);
int af_check_w_abn(double w_abn);
int af_check_recon_loss(PyObject *o_y, PyObject *o_x, PyObject *o_abn, af_recon_loss_args *a);
int af_check_released_loss(PyObject *o_s, PyObject *o_C, PyObject *o_abn, PyObject *o_y,
                           PyObject *o_x, double tau_s, double eps, int iters,
                           af_released_loss_args *a);
int af_check_anomaly_score(PyObject *o_y, PyObject *o_x, af_anomaly_args *a);

/* ------------------------------------------------------------------ SLM config
 * The keyword-only config arguments of every SLM function (csrc/core/slm.h states the rules):
 * append AF_SLM_CFG_KWLIST to a kwlist, AF_SLM_CFG_FORMAT to the format and
 * AF_SLM_CFG_ARGS(c, tok, reg) to the outputs, then call af_slm_config_finish. */
#define AF_SLM_CFG_KWLIST "lesions_min", "lesions_max", "size_min", "size_max", "crop_max", \
                          "gamma2", "strength", "token_rule", "region_rule"
#define AF_SLM_CFG_FORMAT "$iiiiiffss"
#define AF_SLM_CFG_ARGS(c, tok, reg) &(c).lesions_min, &(c).lesions_max, &(c).size_min, \
                                     &(c).size_max, &(c).crop_max, &(c).gamma2, &(c).strength, \
                                     &(tok), &(reg)

/* "O&" converter: a Python int in [0, 2**64) into a uint64_t (OverflowError otherwise). */
int af_conv_u64(PyObject *obj, void *out);
/* Rule names (NULL: the default) -> enum values, then af_slm_config_check. 0/-1. */
int af_slm_config_finish(af_slm_config *c, const char *tok, const char *reg);

/* af_slm_generate(images uint8[B,S,S], seed, step=0, first_index=0, patch=16, **config) */
typedef struct {
    af_owned own;
    PyArrayObject *xp, *masks, *labels, *images; /* all uint8 */
    int B, S, P;
    uint64_t seed, step, first;
    af_slm_config cfg;
} af_slm_generate_args;

int af_parse_slm_generate(PyObject *args, PyObject *kw, af_slm_generate_args *a);

#endif
