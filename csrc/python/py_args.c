/* Argument checking shared by the CPU bindings and their CUDA twins (py_args.h). Each parser
 * follows one pattern: clear the struct, check scalars, take each array with GET (recorded in
 * a->own), check its sizes, allocate the outputs with ALLOC; any failure jumps to `fail`,
 * which drops everything taken so far. */
#include "py_args.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#include "ops/ops.h"

/* ------------------------------------------------------------------ ownership */

PyArrayObject *af_own(af_owned *o, PyArrayObject *a) {
    if (a != NULL) o->arr[o->n++] = a; /* parsers take at most AF_OWNED_MAX arrays */
    return a;
}

void af_owned_release(af_owned *o) {
    for (int i = 0; i < o->n; i++) Py_DECREF(o->arr[i]);
    o->n = 0;
}

#define D_(arr, i) ((int)PyArray_DIM((arr), (i)))
#define KEEP(var, expr) \
    if ((a->var = af_own(&a->own, (expr))) == NULL) goto fail
#define GET(var, obj, name, nd) KEEP(var, af_arg_f32((obj), (name), (nd)))
#define ALLOC(var, expr) KEEP(var, expr)
#define CHECK(cond) \
    if ((cond) < 0) goto fail
#define DIM(arr, name, axis, expected) CHECK(af_check_dim(a->arr, (name), (axis), (expected)))

/* ------------------------------------------------------------------ generic checks */

PyArrayObject *af_arg_f32(PyObject *obj, const char *name, int ndim) {
    PyArrayObject *a = af_arg_array(obj, name, NPY_FLOAT32, ndim);
    if (a == NULL) return NULL;
    if (PyArray_NDIM(a) == 0) {
        PyErr_Format(PyExc_ValueError, "%s must have at least one dimension", name);
        goto fail;
    }
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        npy_intp d = PyArray_DIM(a, i);
        if (d < 1) {
            PyErr_Format(PyExc_ValueError, "%s must be non-empty, dimension %d is 0", name, i);
            goto fail;
        }
        if (d > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d is too large (%zd)", name, i,
                         (Py_ssize_t)d);
            goto fail;
        }
    }
    return a;
fail:
    Py_DECREF(a);
    return NULL;
}

PyArrayObject *af_arg_f32_finite(PyObject *obj, const char *name, int ndim) {
    PyArrayObject *a = af_arg_array(obj, name, NPY_FLOAT32, ndim);
    if (a == NULL) return NULL;
    if (af_check_finite(a, name) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

int af_check_same_shape(PyArrayObject *a, const char *name, PyArrayObject *ref,
                        const char *ref_name) {
    if (PyArray_NDIM(a) == PyArray_NDIM(ref) &&
        PyArray_CompareLists(PyArray_DIMS(a), PyArray_DIMS(ref), PyArray_NDIM(a)))
        return 0;
    PyErr_Format(PyExc_ValueError, "%s must have the same shape as %s", name, ref_name);
    return -1;
}

int af_check_int_dims(PyArrayObject *a, const char *name) {
    for (int d = 0; d < PyArray_NDIM(a); d++) {
        if (PyArray_DIM(a, d) <= 0 || PyArray_DIM(a, d) > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d must be in [1, 2^31), got %zd",
                         name, d, (Py_ssize_t)PyArray_DIM(a, d));
            return -1;
        }
    }
    return 0;
}

int af_check_positive_int(long v, const char *name) {
    if (v >= 1 && v <= INT_MAX) return 0;
    PyErr_Format(PyExc_ValueError, "%s must be a positive int, got %ld", name, v);
    return -1;
}

int af_check_positive_real(double v, const char *name) {
    if (isfinite(v) && v > 0.0) return 0;
    af_errorf(PyExc_ValueError, "%s must be a finite number > 0, got %g", name, v);
    return -1;
}

int af_check_eps(double eps, const char *name) {
    if (isfinite(eps) && eps >= 0.0) return 0;
    af_errorf(PyExc_ValueError, "%s must be finite and >= 0, got %g", name, eps);
    return -1;
}

PyArrayObject *af_zeros1(npy_intp a) { return af_new_array(1, &a, NPY_FLOAT32); }

PyArrayObject *af_zeros2(npy_intp a, npy_intp b) {
    npy_intp s[2] = {a, b};
    return af_new_array(2, s, NPY_FLOAT32);
}

PyArrayObject *af_zeros_like(PyArrayObject *ref) {
    return af_new_array(PyArray_NDIM(ref), PyArray_DIMS(ref), NPY_FLOAT32);
}

/* ------------------------------------------------------------------ linear */

int af_parse_linear_forward(PyObject *args, PyObject *kw, af_linear_forward_args *a) {
    static char *kwl[] = {"inp", "weight", "bias", NULL};
    PyObject *oi, *ow, *ob = Py_None;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:linear_forward", kwl, &oi, &ow, &ob))
        return -1;
    GET(inp, oi, "inp", 2);
    GET(weight, ow, "weight", 2);
    a->N = D_(a->inp, 0), a->C = D_(a->inp, 1), a->OC = D_(a->weight, 0);
    DIM(weight, "weight", 1, a->C);
    if (ob != Py_None) {
        GET(bias, ob, "bias", 1);
        DIM(bias, "bias", 0, a->OC);
    }
    ALLOC(out, af_zeros2(a->N, a->OC));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_linear_backward(PyObject *args, PyObject *kw, af_linear_backward_args *a) {
    static char *kwl[] = {"dout", "inp", "weight", "has_bias", NULL};
    PyObject *od, *oi, *ow;
    int has_bias = 1;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|p:linear_backward", kwl, &od, &oi, &ow,
                                     &has_bias))
        return -1;
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(weight, ow, "weight", 2);
    a->N = D_(a->inp, 0), a->C = D_(a->inp, 1), a->OC = D_(a->weight, 0);
    DIM(weight, "weight", 1, a->C);
    DIM(dout, "dout", 0, a->N);
    DIM(dout, "dout", 1, a->OC);
    ALLOC(dinp, af_zeros2(a->N, a->C));
    ALLOC(dweight, af_zeros2(a->OC, a->C));
    if (has_bias) ALLOC(dbias, af_zeros1(a->OC));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ layernorm */

int af_parse_layernorm_forward(PyObject *args, PyObject *kw, af_layernorm_forward_args *a) {
    static char *kwl[] = {"inp", "weight", "bias", "eps", NULL};
    PyObject *oi, *ow, *ob;
    double eps = 1e-6;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d:layernorm_forward", kwl, &oi, &ow, &ob,
                                     &eps))
        return -1;
    if (af_check_eps(eps, "eps") < 0) return -1;
    a->eps = (float)eps;
    GET(inp, oi, "inp", 2);
    GET(weight, ow, "weight", 1);
    GET(bias, ob, "bias", 1);
    a->N = D_(a->inp, 0), a->C = D_(a->inp, 1);
    DIM(weight, "weight", 0, a->C);
    DIM(bias, "bias", 0, a->C);
    ALLOC(out, af_zeros_like(a->inp));
    ALLOC(mean, af_zeros1(a->N));
    ALLOC(rstd, af_zeros1(a->N));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_layernorm_backward(PyObject *args, PyObject *kw, af_layernorm_backward_args *a) {
    static char *kwl[] = {"dout", "inp", "weight", "mean", "rstd", NULL};
    PyObject *od, *oi, *ow, *om, *orr;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:layernorm_backward", kwl, &od, &oi, &ow,
                                     &om, &orr))
        return -1;
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(weight, ow, "weight", 1);
    GET(mean, om, "mean", 1);
    GET(rstd, orr, "rstd", 1);
    a->N = D_(a->inp, 0), a->C = D_(a->inp, 1);
    CHECK(af_check_same_shape(a->dout, "dout", a->inp, "inp"));
    DIM(weight, "weight", 0, a->C);
    DIM(mean, "mean", 0, a->N);
    DIM(rstd, "rstd", 0, a->N);
    ALLOC(dinp, af_zeros_like(a->inp));
    ALLOC(dweight, af_zeros_like(a->weight));
    ALLOC(dbias, af_zeros_like(a->weight));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ gelu, residual */

int af_parse_gelu_forward(PyObject *args, PyObject *kw, af_gelu_forward_args *a) {
    static char *kwl[] = {"inp", NULL};
    PyObject *oi;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:gelu_forward", kwl, &oi)) return -1;
    GET(inp, oi, "inp", -1);
    ALLOC(out, af_zeros_like(a->inp));
    a->n = (size_t)PyArray_SIZE(a->inp);
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_gelu_backward(PyObject *args, PyObject *kw, af_gelu_backward_args *a) {
    static char *kwl[] = {"dout", "inp", NULL};
    PyObject *od, *oi;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:gelu_backward", kwl, &od, &oi)) return -1;
    GET(dout, od, "dout", -1);
    GET(inp, oi, "inp", -1);
    CHECK(af_check_same_shape(a->dout, "dout", a->inp, "inp"));
    ALLOC(dinp, af_zeros_like(a->inp));
    a->n = (size_t)PyArray_SIZE(a->inp);
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_residual_forward(PyObject *args, PyObject *kw, af_residual_forward_args *a) {
    static char *kwl[] = {"a", "b", NULL};
    PyObject *oa, *ob;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:residual_forward", kwl, &oa, &ob)) return -1;
    GET(a, oa, "a", -1);
    GET(b, ob, "b", -1);
    CHECK(af_check_same_shape(a->b, "b", a->a, "a"));
    ALLOC(out, af_zeros_like(a->a));
    a->n = (size_t)PyArray_SIZE(a->a);
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_residual_backward(PyObject *args, PyObject *kw, af_residual_backward_args *a) {
    static char *kwl[] = {"dout", NULL};
    PyObject *od;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:residual_backward", kwl, &od)) return -1;
    GET(dout, od, "dout", -1);
    ALLOC(da, af_zeros_like(a->dout));
    ALLOC(db, af_zeros_like(a->dout));
    a->n = (size_t)PyArray_SIZE(a->dout);
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ softmax */

int af_parse_softmax_forward(PyObject *args, PyObject *kw, af_softmax_forward_args *a) {
    static char *kwl[] = {"inp", NULL};
    PyObject *oi;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:softmax_forward", kwl, &oi)) return -1;
    GET(inp, oi, "inp", 2);
    ALLOC(out, af_zeros_like(a->inp));
    a->N = D_(a->inp, 0), a->C = D_(a->inp, 1);
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_softmax_backward(PyObject *args, PyObject *kw, af_softmax_backward_args *a) {
    static char *kwl[] = {"dout", "out", NULL};
    PyObject *od, *oo;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:softmax_backward", kwl, &od, &oo)) return -1;
    GET(dout, od, "dout", 2);
    GET(out, oo, "out", 2);
    CHECK(af_check_same_shape(a->dout, "dout", a->out, "out"));
    ALLOC(dinp, af_zeros_like(a->out));
    a->N = D_(a->out, 0), a->C = D_(a->out, 1);
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ attention */

/* qkv[B,T,3D] with D % H == 0; fills B, T, D. */
static int attn_sizes(PyArrayObject *qkv, int H, int *B, int *T, int *D) {
    if (af_check_positive_int(H, "H") < 0) return -1;
    *B = D_(qkv, 0);
    *T = D_(qkv, 1);
    int D3 = D_(qkv, 2);
    if (D3 % 3 != 0) {
        PyErr_Format(PyExc_ValueError, "qkv: last dimension must be 3*D, got %d", D3);
        return -1;
    }
    *D = D3 / 3;
    if (*D % H != 0) {
        PyErr_Format(PyExc_ValueError, "H=%d must divide the width D=%d", H, *D);
        return -1;
    }
    return 0;
}

int af_parse_attention_forward(PyObject *args, PyObject *kw, af_attention_forward_args *a) {
    static char *kwl[] = {"qkv", "H", NULL};
    PyObject *oq;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi:attention_forward", kwl, &oq, &a->H))
        return -1;
    GET(qkv, oq, "qkv", 3);
    CHECK(attn_sizes(a->qkv, a->H, &a->B, &a->T, &a->D));
    npy_intp so[3] = {a->B, a->T, a->D}, sa[4] = {a->B, a->H, a->T, a->T};
    ALLOC(out, af_new_array(3, so, NPY_FLOAT32));
    ALLOC(att, af_new_array(4, sa, NPY_FLOAT32));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_attention_backward(PyObject *args, PyObject *kw, af_attention_backward_args *a) {
    static char *kwl[] = {"dout", "qkv", "att", "H", NULL};
    PyObject *od, *oq, *oa;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOi:attention_backward", kwl, &od, &oq, &oa,
                                     &a->H))
        return -1;
    GET(dout, od, "dout", 3);
    GET(qkv, oq, "qkv", 3);
    GET(att, oa, "att", 4);
    CHECK(attn_sizes(a->qkv, a->H, &a->B, &a->T, &a->D));
    npy_intp want_dout[3] = {a->B, a->T, a->D}, want_att[4] = {a->B, a->H, a->T, a->T};
    for (int i = 0; i < 3; i++) DIM(dout, "dout", i, want_dout[i]);
    for (int i = 0; i < 4; i++) DIM(att, "att", i, want_att[i]);
    ALLOC(dqkv, af_zeros_like(a->qkv));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ patchify */

/* C, S, P, order for an image side S cut into P x P patches. */
static int patch_sizes(int C, int S, int P, int order) {
    if (af_check_positive_int(C, "C") < 0 || af_check_positive_int(S, "S") < 0 ||
        af_check_positive_int(P, "P") < 0)
        return -1;
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
    return 0;
}

int af_parse_patchify_forward(PyObject *args, PyObject *kw, af_patchify_args *a) {
    static char *kwl[] = {"img", "P", "order", NULL};
    PyObject *oi;
    memset(a, 0, sizeof *a);
    a->order = AF_PATCH_PQC;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi|i:patchify_forward", kwl, &oi, &a->P,
                                     &a->order))
        return -1;
    GET(img, oi, "img", 4);
    a->B = D_(a->img, 0), a->C = D_(a->img, 1), a->S = D_(a->img, 2);
    DIM(img, "img", 3, a->S); /* square images */
    CHECK(patch_sizes(a->C, a->S, a->P, a->order));
    int G = a->S / a->P;
    npy_intp so[3] = {a->B, (npy_intp)G * G, (npy_intp)a->P * a->P * a->C};
    ALLOC(patches, af_new_array(3, so, NPY_FLOAT32));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_patches_to_image(PyObject *args, PyObject *kw, const char *fmt,
                              af_patchify_args *a) {
    static char *kwl[] = {"patches", "C", "S", "P", "order", NULL};
    PyObject *op;
    memset(a, 0, sizeof *a);
    a->order = AF_PATCH_PQC;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwl, &op, &a->C, &a->S, &a->P, &a->order))
        return -1;
    if (patch_sizes(a->C, a->S, a->P, a->order) < 0) return -1;
    GET(patches, op, "patches", 3);
    a->B = D_(a->patches, 0);
    int G = a->S / a->P;
    DIM(patches, "patches", 1, (npy_intp)G * G);
    DIM(patches, "patches", 2, (npy_intp)a->P * a->P * a->C);
    npy_intp si[4] = {a->B, a->C, a->S, a->S};
    ALLOC(img, af_new_array(4, si, NPY_FLOAT32));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ l2norm */

int af_parse_l2norm_forward(PyObject *args, PyObject *kw, af_l2norm_forward_args *a) {
    static char *kwl[] = {"inp", "eps", NULL};
    PyObject *oi;
    double eps = 1e-12;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|d:l2norm_forward", kwl, &oi, &eps)) return -1;
    if (af_check_eps(eps, "eps") < 0) return -1;
    a->eps = (float)eps;
    GET(inp, oi, "inp", 2);
    a->N = D_(a->inp, 0), a->C = D_(a->inp, 1);
    ALLOC(out, af_zeros_like(a->inp));
    ALLOC(norm, af_zeros1(a->N));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_l2norm_backward(PyObject *args, PyObject *kw, af_l2norm_backward_args *a) {
    static char *kwl[] = {"dout", "inp", "norm", "eps", NULL};
    PyObject *od, *oi, *on;
    double eps = 1e-12;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d:l2norm_backward", kwl, &od, &oi, &on, &eps))
        return -1;
    if (af_check_eps(eps, "eps") < 0) return -1;
    a->eps = (float)eps;
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(norm, on, "norm", 1);
    a->N = D_(a->inp, 0), a->C = D_(a->inp, 1);
    CHECK(af_check_same_shape(a->dout, "dout", a->inp, "inp"));
    DIM(norm, "norm", 0, a->N);
    if (eps == 0.0) { /* the zero-norm branch would divide by eps */
        const float *pn = AF_F32(a->norm);
        for (int n = 0; n < a->N; n++) {
            if (!(pn[n] > 0.0f)) {
                PyErr_Format(PyExc_ValueError, "norm[%d] is 0 and eps is 0: gradient undefined", n);
                goto fail;
            }
        }
    }
    ALLOC(dinp, af_zeros_like(a->inp));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ wn_linear */

int af_parse_wn_linear_forward(PyObject *args, PyObject *kw, af_wn_linear_forward_args *a) {
    static char *kwl[] = {"inp", "v", NULL};
    PyObject *oi, *ov;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:wn_linear_forward", kwl, &oi, &ov))
        return -1;
    GET(inp, oi, "inp", 2);
    GET(v, ov, "v", 2);
    int N = D_(a->inp, 0), C = D_(a->inp, 1), K = D_(a->v, 0);
    a->N = N, a->C = C, a->K = K;
    DIM(v, "v", 1, C);
    const float *pv = AF_F32(a->v);
    for (int k = 0; k < K; k++) { /* a zero row has no direction */
        int nz = 0;
        for (int c = 0; c < C && !nz; c++) nz = pv[(size_t)k * C + c] != 0.0f;
        if (!nz) {
            PyErr_Format(PyExc_ValueError, "v: row %d is all zeros (its norm is 0)", k);
            goto fail;
        }
    }
    ALLOC(out, af_zeros2(N, K));
    ALLOC(w_eff, af_zeros_like(a->v));
    ALLOC(vnorm, af_zeros1(K));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_parse_wn_linear_backward(PyObject *args, PyObject *kw, af_wn_linear_backward_args *a) {
    static char *kwl[] = {"dout", "inp", "w_eff", "vnorm", NULL};
    PyObject *od, *oi, *ow, *on;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO:wn_linear_backward", kwl, &od, &oi, &ow, &on))
        return -1;
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(w_eff, ow, "w_eff", 2);
    GET(vnorm, on, "vnorm", 1);
    int N = D_(a->inp, 0), C = D_(a->inp, 1), K = D_(a->w_eff, 0);
    a->N = N, a->C = C, a->K = K;
    DIM(w_eff, "w_eff", 1, C);
    DIM(vnorm, "vnorm", 0, K);
    DIM(dout, "dout", 0, N);
    DIM(dout, "dout", 1, K);
    const float *pn = AF_F32(a->vnorm);
    for (int k = 0; k < K; k++) {
        if (!(pn[k] > 0.0f)) {
            PyErr_Format(PyExc_ValueError, "vnorm[%d] must be > 0", k);
            goto fail;
        }
    }
    ALLOC(dinp, af_zeros_like(a->inp));
    ALLOC(dv, af_zeros_like(a->w_eff));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ adamw */

/* An array updated in place: must already be float32, C-contiguous, aligned, writeable. */
static int inplace_arg(PyObject *obj, const char *name) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of float32", name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (PyArray_TYPE(arr) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32 (it is updated in place)", name);
        return -1;
    }
    if (!PyArray_ISCARRAY(arr)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous, aligned and writeable (it is "
                     "updated in place)", name);
        return -1;
    }
    return 0;
}

int af_parse_adamw_update(PyObject *args, PyObject *kw, af_adamw_args *a) {
    static char *kwl[] = {"params", "grads", "m", "v", "lr", "t", "beta1", "beta2", "eps",
                          "weight_decay", NULL};
    PyObject *op, *og, *om, *ov;
    double lr = NAN, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.0;
    int t = 0; /* lr and t are required keywords: the sentinels are rejected below */
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|$didddd:adamw_update", kwl, &op, &og, &om,
                                     &ov, &lr, &t, &beta1, &beta2, &eps, &wd))
        return -1;
    if (inplace_arg(op, "params") < 0 || inplace_arg(om, "m") < 0 || inplace_arg(ov, "v") < 0)
        return -1;
    if (!(isfinite(lr) && lr >= 0.0)) {
        af_errorf(PyExc_ValueError, "lr (keyword, required) must be finite and >= 0, got %g", lr);
        return -1;
    }
    if (t < 1) {
        PyErr_Format(PyExc_ValueError, "t (keyword, required: the step count) must be >= 1, got %d", t);
        return -1;
    }
    if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0)) {
        af_errorf(PyExc_ValueError, "beta1 and beta2 must be in [0, 1), got %g, %g", beta1, beta2);
        return -1;
    }
    if (af_check_eps(eps, "eps") < 0 || af_check_eps(wd, "weight_decay") < 0) return -1;
    a->params = (PyArrayObject *)op, a->m = (PyArrayObject *)om, a->v = (PyArrayObject *)ov;
    GET(grads, og, "grads", -1);
    CHECK(af_check_same_shape(a->grads, "grads", a->params, "params"));
    CHECK(af_check_same_shape(a->m, "m", a->params, "params"));
    CHECK(af_check_same_shape(a->v, "v", a->params, "params"));
    if (op == om || op == ov || om == ov) {
        PyErr_SetString(PyExc_ValueError, "params, m and v must be distinct arrays");
        goto fail;
    }
    a->n = (size_t)PyArray_SIZE(a->params);
    a->lr = (float)lr, a->beta1 = (float)beta1, a->beta2 = (float)beta2;
    a->eps = (float)eps, a->weight_decay = (float)wd, a->t = t;
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ objective */

#undef GET
#define GET(var, obj, name, nd) KEEP(var, af_arg_f32_finite((obj), (name), (nd)))

PyArrayObject *af_arg_abn(PyObject *obj, npy_intp B, npy_intp L) {
    int type = PyArray_Check(obj) && PyArray_TYPE((PyArrayObject *)obj) == NPY_BOOL
                   ? NPY_BOOL : NPY_UINT8;
    PyArrayObject *a = af_arg_array(obj, "abn", type, 2);
    if (a == NULL) return NULL;
    if (af_check_dim(a, "abn", 0, B) < 0 || af_check_dim(a, "abn", 1, L) < 0) goto fail;
    const uint8_t *p = AF_U8(a);
    for (npy_intp i = 0, n = PyArray_SIZE(a); i < n; i++) {
        if (p[i] > 1) {
            PyErr_Format(PyExc_ValueError, "abn must hold only 0 (normal) and 1 (abnormal), "
                         "got %d at flat index %zd", (int)p[i], (Py_ssize_t)i);
            goto fail;
        }
    }
    return a;
fail:
    Py_DECREF(a);
    return NULL;
}

static int check_iters(int iters) {
    if (iters >= 0) return 0;
    PyErr_Format(PyExc_ValueError, "iters must be >= 0, got %d", iters);
    return -1;
}

/* C[L,K] as the paper loss needs it (prototype_logs of objective.c): >= 0, rows > 0. */
static int check_probs(PyArrayObject *C) {
    int L = D_(C, 0), K = D_(C, 1);
    const float *c = AF_F32(C);
    for (int l = 0; l < L; l++) {
        double rs = 0.0;
        for (int k = 0; k < K; k++) {
            float v = c[(size_t)l * K + k];
            if (!(v >= 0.0f)) {
                af_errorf(PyExc_ValueError,
                          "C must be finite and >= 0 (probabilities), got %g at [%d, %d]",
                          (double)v, l, k);
                return -1;
            }
            rs += v;
        }
        if (!(rs > 0.0 && isfinite(rs))) {
            af_errorf(PyExc_ValueError, "C: row %d must have a positive finite sum, got %g", l,
                      rs);
            return -1;
        }
    }
    return 0;
}

/* y and x: float32 [B,L,PPC] of the same shape, recorded in `own`. */
static int arg_patches(af_owned *own, PyObject *o_y, PyObject *o_x, PyArrayObject **y,
                       PyArrayObject **x) {
    if (!(*y = af_own(own, af_arg_f32_finite(o_y, "y", 3))) || af_check_int_dims(*y, "y") < 0)
        return -1;
    if (!(*x = af_own(own, af_arg_f32_finite(o_x, "x", 3)))) return -1;
    for (int d = 0; d < 3; d++)
        if (af_check_dim(*x, "x", d, PyArray_DIM(*y, d)) < 0) return -1;
    return 0;
}

int af_check_sinkhorn(PyObject *o_logits, double eps, int iters, af_sinkhorn_args *a) {
    memset(a, 0, sizeof *a);
    if (af_check_positive_real(eps, "eps") < 0 || check_iters(iters) < 0) return -1;
    a->eps = (float)eps, a->iters = iters;
    GET(logits, o_logits, "logits", 2);
    CHECK(af_check_int_dims(a->logits, "logits"));
    a->N = D_(a->logits, 0), a->K = D_(a->logits, 1);
    ALLOC(q, af_new_array(2, PyArray_DIMS(a->logits), NPY_FLOAT32));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_check_prototypes_update(PyObject *o_C, PyObject *o_src, double m, af_prototypes_args *a) {
    memset(a, 0, sizeof *a);
    if (!(isfinite(m) && m >= 0.0 && m <= 1.0)) {
        af_errorf(PyExc_ValueError, "m must be in [0, 1], got %g", m);
        return -1;
    }
    a->m = (float)m;
    GET(C, o_C, "C", 2);
    /* updated in place: a copy made for contiguity would silently drop the update */
    if ((PyObject *)a->C != o_C || !PyArray_ISWRITEABLE(a->C)) {
        PyErr_SetString(PyExc_ValueError, "C must be a writeable C-contiguous float32 array "
                        "(it is updated in place)");
        goto fail;
    }
    GET(src, o_src, "src", 3);
    CHECK(af_check_int_dims(a->src, "src"));
    CHECK(af_check_int_dims(a->C, "C"));
    DIM(src, "src", 1, PyArray_DIM(a->C, 0));
    DIM(src, "src", 2, PyArray_DIM(a->C, 1));
    a->B = D_(a->src, 0), a->L = D_(a->C, 0), a->K = D_(a->C, 1);
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_check_paper_loss(PyObject *o_s, PyObject *o_C, PyObject *o_abn, int probs,
                        af_paper_loss_args *a) {
    memset(a, 0, sizeof *a);
    GET(s, o_s, "s", 3);
    CHECK(af_check_int_dims(a->s, "s"));
    a->B = D_(a->s, 0), a->L = D_(a->s, 1), a->K = D_(a->s, 2);
    GET(C, o_C, "C", 2);
    DIM(C, "C", 0, a->L);
    DIM(C, "C", 1, a->K);
    if (probs) CHECK(check_probs(a->C));
    KEEP(abn, af_arg_abn(o_abn, a->B, a->L));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_check_w_abn(double w_abn) {
    if (isfinite(w_abn) && w_abn >= 0.0) return 0;
    af_errorf(PyExc_ValueError, "w_abn must be finite and >= 0, got %g", w_abn);
    return -1;
}

int af_check_recon_loss(PyObject *o_y, PyObject *o_x, PyObject *o_abn, af_recon_loss_args *a) {
    memset(a, 0, sizeof *a);
    CHECK(arg_patches(&a->own, o_y, o_x, &a->y, &a->x));
    a->B = D_(a->y, 0), a->L = D_(a->y, 1), a->PPC = D_(a->y, 2);
    KEEP(abn, af_arg_abn(o_abn, a->B, a->L));
    ALLOC(dy, af_new_array(3, PyArray_DIMS(a->y), NPY_FLOAT32));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_check_released_loss(PyObject *o_s, PyObject *o_C, PyObject *o_abn, PyObject *o_y,
                           PyObject *o_x, double tau_s, double eps, int iters,
                           af_released_loss_args *a) {
    memset(a, 0, sizeof *a);
    if (af_check_positive_real(tau_s, "tau_s") < 0 || af_check_positive_real(eps, "eps") < 0 ||
        check_iters(iters) < 0)
        return -1;
    a->tau_s = (float)tau_s, a->eps = (float)eps, a->iters = iters;
    GET(s, o_s, "s", 3);
    CHECK(af_check_int_dims(a->s, "s"));
    a->B = D_(a->s, 0), a->L = D_(a->s, 1), a->K = D_(a->s, 2);
    GET(C, o_C, "C", 2);
    DIM(C, "C", 0, a->L);
    DIM(C, "C", 1, a->K);
    KEEP(abn, af_arg_abn(o_abn, a->B, a->L));
    CHECK(arg_patches(&a->own, o_y, o_x, &a->y, &a->x));
    DIM(y, "y", 0, a->B);
    DIM(y, "y", 1, a->L);
    a->PPC = D_(a->y, 2);
    ALLOC(ds, af_new_array(3, PyArray_DIMS(a->s), NPY_FLOAT32));
    ALLOC(dy, af_new_array(3, PyArray_DIMS(a->y), NPY_FLOAT32));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

int af_check_anomaly_score(PyObject *o_y, PyObject *o_x, af_anomaly_args *a) {
    memset(a, 0, sizeof *a);
    CHECK(arg_patches(&a->own, o_y, o_x, &a->y, &a->x));
    a->B = D_(a->y, 0), a->L = D_(a->y, 1), a->PPC = D_(a->y, 2);
    ALLOC(score, af_new_array(1, PyArray_DIMS(a->y), NPY_FLOAT64));
    ALLOC(log_score, af_new_array(1, PyArray_DIMS(a->y), NPY_FLOAT64));
    ALLOC(err, af_new_array(2, PyArray_DIMS(a->y), NPY_FLOAT64));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}

/* ------------------------------------------------------------------ SLM */

int af_conv_u64(PyObject *obj, void *out) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return 0;
    *(uint64_t *)out = (uint64_t)v;
    return 1;
}

int af_slm_config_finish(af_slm_config *c, const char *tok, const char *reg) {
    if (tok == NULL || strcmp(tok, "paper") == 0) c->token_rule = AF_SLM_TOKENS_MEAN;
    else if (strcmp(tok, "released") == 0) c->token_rule = AF_SLM_TOKENS_ANY;
    else {
        PyErr_Format(PyExc_ValueError, "token_rule must be 'paper' or 'released', got '%s'", tok);
        return -1;
    }
    if (reg == NULL || strcmp(reg, "random") == 0) c->region_rule = AF_SLM_REGION_RANDOM;
    else if (strcmp(reg, "largest") == 0) c->region_rule = AF_SLM_REGION_LARGEST;
    else {
        PyErr_Format(PyExc_ValueError, "region_rule must be 'random' or 'largest', got '%s'", reg);
        return -1;
    }
    af_status st = af_slm_config_check(c);
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    return 0;
}

int af_parse_slm_generate(PyObject *args, PyObject *kw, af_slm_generate_args *a) {
    static char *kwlist[] = {"images", "seed", "step", "first_index", "patch",
                             AF_SLM_CFG_KWLIST, NULL};
    PyObject *images_obj;
    const char *tok = NULL, *reg = NULL;
    memset(a, 0, sizeof *a);
    a->P = 16;
    a->cfg = af_slm_config_default();
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO&|O&O&i" AF_SLM_CFG_FORMAT ":slm_generate",
                                     kwlist, &images_obj, af_conv_u64, &a->seed, af_conv_u64,
                                     &a->step, af_conv_u64, &a->first, &a->P,
                                     AF_SLM_CFG_ARGS(a->cfg, tok, reg)))
        return -1;
    if (af_slm_config_finish(&a->cfg, tok, reg) < 0) return -1;
    KEEP(images, af_arg_array(images_obj, "images", NPY_UINT8, 3));
    npy_intp B = PyArray_DIM(a->images, 0), S = PyArray_DIM(a->images, 1);
    if (PyArray_DIM(a->images, 2) != S) {
        PyErr_Format(PyExc_ValueError, "images must be square [B, S, S], got [%zd, %zd, %zd]",
                     (Py_ssize_t)B, (Py_ssize_t)S, (Py_ssize_t)PyArray_DIM(a->images, 2));
        goto fail;
    }
    if (S < 1 || S > AF_SLM_MAX_SIDE || B > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "images: need 1 <= S <= %d and B < 2**31, got B=%zd S=%zd",
                     AF_SLM_MAX_SIDE, (Py_ssize_t)B, (Py_ssize_t)S);
        goto fail;
    }
    if (a->P < 1 || S % a->P != 0) {
        PyErr_Format(PyExc_ValueError, "patch must be >= 1 and divide the image side %zd, got %d",
                     (Py_ssize_t)S, a->P);
        goto fail;
    }
    a->B = (int)B, a->S = (int)S;
    npy_intp G = S / a->P;
    npy_intp img_shape[3] = {B, S, S}, lab_shape[2] = {B, G * G};
    ALLOC(xp, af_new_array(3, img_shape, NPY_UINT8));
    ALLOC(masks, af_new_array(3, img_shape, NPY_UINT8));
    ALLOC(labels, af_new_array(2, lab_shape, NPY_UINT8));
    return 0;
fail:
    af_owned_release(&a->own);
    return -1;
}
