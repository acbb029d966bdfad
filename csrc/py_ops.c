/* afire._C.ops: the CPU layer kernels of csrc/ops, one Python function per C function.
 *
 * float32 numpy arrays in (non-contiguous input is copied, other dtypes are a TypeError),
 * NEW arrays out. Forward functions return the output, or a tuple (output, saved
 * activations...) when the backward needs them. Backward functions always return a tuple
 * of freshly computed gradients (zeros + the kernel's accumulation). adamw_update works in
 * place. Every shape is checked here, because the kernels trust their sizes. */
#include <limits.h>
#include <math.h>

#include "ops/ops.h"
#include "ops/ops_internal.h"
#include "py_util.h"

/* ---------------------------------------------------------------- argument helpers */

/* A float32 C-contiguous array of rank `ndim` (-1: any rank >= 1), every dimension in
 * [1, INT_MAX] so the kernels can use int sizes. New reference or NULL. */
static PyArrayObject *f32_arg(PyObject *obj, const char *name, int ndim) {
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

/* Same shape as `ref` (ValueError naming both otherwise). */
static int same_shape(PyArrayObject *a, const char *name, PyArrayObject *ref, const char *ref_name) {
    if (PyArray_NDIM(a) == PyArray_NDIM(ref) &&
        PyArray_CompareLists(PyArray_DIMS(a), PyArray_DIMS(ref), PyArray_NDIM(a)))
        return 0;
    PyErr_Format(PyExc_ValueError, "%s must have the same shape as %s", name, ref_name);
    return -1;
}

static int positive(long v, const char *name) {
    if (v >= 1 && v <= INT_MAX) return 0;
    PyErr_Format(PyExc_ValueError, "%s must be a positive int, got %ld", name, v);
    return -1;
}

static int check_eps(double eps, const char *name) {
    if (isfinite(eps) && eps >= 0.0) return 0;
    af_errorf(PyExc_ValueError, "%s must be finite and >= 0, got %g", name, eps);
    return -1;
}

static int check_order(int order) {
    if (order == AF_PATCH_PQC || order == AF_PATCH_CPQ) return 0;
    PyErr_Format(PyExc_ValueError, "order must be PATCH_PQC (0) or PATCH_CPQ (1), got %d", order);
    return -1;
}

static PyArrayObject *zeros2(npy_intp a, npy_intp b) {
    npy_intp s[2] = {a, b};
    return af_new_array(2, s, NPY_FLOAT32);
}

static PyArrayObject *zeros_like(PyArrayObject *ref) {
    return af_new_array(PyArray_NDIM(ref), PyArray_DIMS(ref), NPY_FLOAT32);
}

#define D_(a, i) ((int)PyArray_DIM((a), (i)))
#define KW (PyCFunction)(void (*)(void))
#define GET(var, obj, name, nd) \
    if ((var = f32_arg((obj), (name), (nd))) == NULL) goto done
#define DIM(arr, name, axis, expected) \
    if (af_check_dim((arr), (name), (axis), (expected)) < 0) goto done
#define ALLOC(var, expr) \
    if ((var = (expr)) == NULL) goto done

/* ---------------------------------------------------------------- linear */

static PyObject *py_linear_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", "weight", "bias", NULL};
    PyObject *oi, *ow, *ob = Py_None, *res = NULL;
    PyArrayObject *inp = NULL, *w = NULL, *b = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:linear_forward", kwl, &oi, &ow, &ob))
        return NULL;
    GET(inp, oi, "inp", 2);
    GET(w, ow, "weight", 2);
    int N = D_(inp, 0), C = D_(inp, 1), OC = D_(w, 0);
    DIM(w, "weight", 1, C);
    if (ob != Py_None) {
        GET(b, ob, "bias", 1);
        DIM(b, "bias", 0, OC);
    }
    ALLOC(out, zeros2(N, OC));
    Py_BEGIN_ALLOW_THREADS
    linear_forward(AF_F32(out), AF_F32(inp), AF_F32(w), b ? AF_F32(b) : NULL, N, C, OC);
    Py_END_ALLOW_THREADS
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(inp); Py_XDECREF(w); Py_XDECREF(b); Py_XDECREF(out);
    return res;
}

static PyObject *py_linear_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", "inp", "weight", "has_bias", NULL};
    PyObject *od, *oi, *ow, *res = NULL;
    int has_bias = 1;
    PyArrayObject *dout = NULL, *inp = NULL, *w = NULL, *dinp = NULL, *dw = NULL, *db = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|p:linear_backward", kwl, &od, &oi, &ow,
                                     &has_bias))
        return NULL;
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(w, ow, "weight", 2);
    int N = D_(inp, 0), C = D_(inp, 1), OC = D_(w, 0);
    DIM(w, "weight", 1, C);
    DIM(dout, "dout", 0, N);
    DIM(dout, "dout", 1, OC);
    ALLOC(dinp, zeros2(N, C));
    ALLOC(dw, zeros2(OC, C));
    if (has_bias) {
        npy_intp s[1] = {OC};
        ALLOC(db, af_new_array(1, s, NPY_FLOAT32));
    }
    Py_BEGIN_ALLOW_THREADS
    linear_backward(AF_F32(dinp), AF_F32(dw), db ? AF_F32(db) : NULL, AF_F32(dout), AF_F32(inp),
                    AF_F32(w), N, C, OC);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(3, dinp, dw, db ? (PyObject *)db : Py_None);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(w);
    Py_XDECREF(dinp); Py_XDECREF(dw); Py_XDECREF(db);
    return res;
}

/* ---------------------------------------------------------------- layernorm */

static PyObject *py_layernorm_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", "weight", "bias", "eps", NULL};
    PyObject *oi, *ow, *ob, *res = NULL;
    double eps = 1e-6;
    PyArrayObject *inp = NULL, *w = NULL, *b = NULL, *out = NULL, *mean = NULL, *rstd = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d:layernorm_forward", kwl, &oi, &ow, &ob,
                                     &eps))
        return NULL;
    if (check_eps(eps, "eps") < 0) return NULL;
    GET(inp, oi, "inp", 2);
    GET(w, ow, "weight", 1);
    GET(b, ob, "bias", 1);
    int N = D_(inp, 0), C = D_(inp, 1);
    DIM(w, "weight", 0, C);
    DIM(b, "bias", 0, C);
    npy_intp sn[1] = {N};
    ALLOC(out, zeros_like(inp));
    ALLOC(mean, af_new_array(1, sn, NPY_FLOAT32));
    ALLOC(rstd, af_new_array(1, sn, NPY_FLOAT32));
    Py_BEGIN_ALLOW_THREADS
    layernorm_forward(AF_F32(out), AF_F32(mean), AF_F32(rstd), AF_F32(inp), AF_F32(w), AF_F32(b),
                      N, C, (float)eps);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(3, out, mean, rstd);
done:
    Py_XDECREF(inp); Py_XDECREF(w); Py_XDECREF(b);
    Py_XDECREF(out); Py_XDECREF(mean); Py_XDECREF(rstd);
    return res;
}

static PyObject *py_layernorm_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", "inp", "weight", "mean", "rstd", NULL};
    PyObject *od, *oi, *ow, *om, *orr, *res = NULL;
    PyArrayObject *dout = NULL, *inp = NULL, *w = NULL, *mean = NULL, *rstd = NULL;
    PyArrayObject *dinp = NULL, *dw = NULL, *db = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:layernorm_backward", kwl, &od, &oi, &ow,
                                     &om, &orr))
        return NULL;
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(w, ow, "weight", 1);
    GET(mean, om, "mean", 1);
    GET(rstd, orr, "rstd", 1);
    int N = D_(inp, 0), C = D_(inp, 1);
    if (same_shape(dout, "dout", inp, "inp") < 0) goto done;
    DIM(w, "weight", 0, C);
    DIM(mean, "mean", 0, N);
    DIM(rstd, "rstd", 0, N);
    ALLOC(dinp, zeros_like(inp));
    ALLOC(dw, zeros_like(w));
    ALLOC(db, zeros_like(w));
    Py_BEGIN_ALLOW_THREADS
    layernorm_backward(AF_F32(dinp), AF_F32(dw), AF_F32(db), AF_F32(dout), AF_F32(inp), AF_F32(w),
                       AF_F32(mean), AF_F32(rstd), N, C);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(3, dinp, dw, db);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(w); Py_XDECREF(mean); Py_XDECREF(rstd);
    Py_XDECREF(dinp); Py_XDECREF(dw); Py_XDECREF(db);
    return res;
}

/* ---------------------------------------------------------------- gelu */

static PyObject *py_gelu_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", NULL};
    PyObject *oi, *res = NULL;
    PyArrayObject *inp = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:gelu_forward", kwl, &oi)) return NULL;
    GET(inp, oi, "inp", -1);
    ALLOC(out, zeros_like(inp));
    size_t n = (size_t)PyArray_SIZE(inp);
    Py_BEGIN_ALLOW_THREADS
    gelu_forward(AF_F32(out), AF_F32(inp), n);
    Py_END_ALLOW_THREADS
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(inp); Py_XDECREF(out);
    return res;
}

static PyObject *py_gelu_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", "inp", NULL};
    PyObject *od, *oi, *res = NULL;
    PyArrayObject *dout = NULL, *inp = NULL, *dinp = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:gelu_backward", kwl, &od, &oi)) return NULL;
    GET(dout, od, "dout", -1);
    GET(inp, oi, "inp", -1);
    if (same_shape(dout, "dout", inp, "inp") < 0) goto done;
    ALLOC(dinp, zeros_like(inp));
    size_t n = (size_t)PyArray_SIZE(inp);
    Py_BEGIN_ALLOW_THREADS
    gelu_backward(AF_F32(dinp), AF_F32(dout), AF_F32(inp), n);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(1, dinp);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(dinp);
    return res;
}

/* ---------------------------------------------------------------- softmax */

static PyObject *py_softmax_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", NULL};
    PyObject *oi, *res = NULL;
    PyArrayObject *inp = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:softmax_forward", kwl, &oi)) return NULL;
    GET(inp, oi, "inp", 2);
    ALLOC(out, zeros_like(inp));
    int N = D_(inp, 0), C = D_(inp, 1);
    Py_BEGIN_ALLOW_THREADS
    softmax_forward(AF_F32(out), AF_F32(inp), N, C);
    Py_END_ALLOW_THREADS
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(inp); Py_XDECREF(out);
    return res;
}

static PyObject *py_softmax_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", "out", NULL};
    PyObject *od, *oo, *res = NULL;
    PyArrayObject *dout = NULL, *out = NULL, *dinp = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:softmax_backward", kwl, &od, &oo)) return NULL;
    GET(dout, od, "dout", 2);
    GET(out, oo, "out", 2);
    if (same_shape(dout, "dout", out, "out") < 0) goto done;
    ALLOC(dinp, zeros_like(out));
    int N = D_(out, 0), C = D_(out, 1);
    Py_BEGIN_ALLOW_THREADS
    softmax_backward(AF_F32(dinp), AF_F32(dout), AF_F32(out), N, C);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(1, dinp);
done:
    Py_XDECREF(dout); Py_XDECREF(out); Py_XDECREF(dinp);
    return res;
}

/* ---------------------------------------------------------------- attention */

/* qkv[B,T,3D] with D % H == 0; fills B, T, D. */
static int attn_sizes(PyArrayObject *qkv, int H, int *B, int *T, int *D) {
    if (positive(H, "H") < 0) return -1;
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

static PyObject *py_attention_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"qkv", "H", NULL};
    PyObject *oq, *res = NULL;
    int H, B, T, D;
    PyArrayObject *qkv = NULL, *out = NULL, *att = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi:attention_forward", kwl, &oq, &H)) return NULL;
    GET(qkv, oq, "qkv", 3);
    if (attn_sizes(qkv, H, &B, &T, &D) < 0) goto done;
    npy_intp so[3] = {B, T, D}, sa[4] = {B, H, T, T};
    ALLOC(out, af_new_array(3, so, NPY_FLOAT32));
    ALLOC(att, af_new_array(4, sa, NPY_FLOAT32));
    Py_BEGIN_ALLOW_THREADS
    attention_forward(AF_F32(out), AF_F32(att), AF_F32(qkv), B, T, D, H);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(2, out, att);
done:
    Py_XDECREF(qkv); Py_XDECREF(out); Py_XDECREF(att);
    return res;
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", "qkv", "att", "H", NULL};
    PyObject *od, *oq, *oa, *res = NULL;
    int H, B, T, D;
    PyArrayObject *dout = NULL, *qkv = NULL, *att = NULL, *dqkv = NULL, *scratch = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOi:attention_backward", kwl, &od, &oq, &oa, &H))
        return NULL;
    GET(dout, od, "dout", 3);
    GET(qkv, oq, "qkv", 3);
    GET(att, oa, "att", 4);
    if (attn_sizes(qkv, H, &B, &T, &D) < 0) goto done;
    DIM(dout, "dout", 0, B);
    DIM(dout, "dout", 1, T);
    DIM(dout, "dout", 2, D);
    DIM(att, "att", 0, B);
    DIM(att, "att", 1, H);
    DIM(att, "att", 2, T);
    DIM(att, "att", 3, T);
    ALLOC(dqkv, zeros_like(qkv));
    ALLOC(scratch, zeros_like(att));
    Py_BEGIN_ALLOW_THREADS
    attention_backward(AF_F32(dqkv), AF_F32(scratch), AF_F32(dout), AF_F32(qkv), AF_F32(att), B,
                       T, D, H);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(1, dqkv);
done:
    Py_XDECREF(dout); Py_XDECREF(qkv); Py_XDECREF(att); Py_XDECREF(dqkv); Py_XDECREF(scratch);
    return res;
}

/* ---------------------------------------------------------------- residual */

static PyObject *py_residual_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"a", "b", NULL};
    PyObject *oa, *ob, *res = NULL;
    PyArrayObject *a = NULL, *b = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:residual_forward", kwl, &oa, &ob)) return NULL;
    GET(a, oa, "a", -1);
    GET(b, ob, "b", -1);
    if (same_shape(b, "b", a, "a") < 0) goto done;
    ALLOC(out, zeros_like(a));
    size_t n = (size_t)PyArray_SIZE(a);
    Py_BEGIN_ALLOW_THREADS
    residual_forward(AF_F32(out), AF_F32(a), AF_F32(b), n);
    Py_END_ALLOW_THREADS
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(a); Py_XDECREF(b); Py_XDECREF(out);
    return res;
}

static PyObject *py_residual_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", NULL};
    PyObject *od, *res = NULL;
    PyArrayObject *dout = NULL, *da = NULL, *db = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:residual_backward", kwl, &od)) return NULL;
    GET(dout, od, "dout", -1);
    ALLOC(da, zeros_like(dout));
    ALLOC(db, zeros_like(dout));
    size_t n = (size_t)PyArray_SIZE(dout);
    Py_BEGIN_ALLOW_THREADS
    residual_backward(AF_F32(da), AF_F32(db), AF_F32(dout), n);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(2, da, db);
done:
    Py_XDECREF(dout); Py_XDECREF(da); Py_XDECREF(db);
    return res;
}

/* ---------------------------------------------------------------- patchify */

/* Checks C, S, P, order for an image side S cut into P x P patches. */
static int patch_sizes(int C, int S, int P, int order) {
    if (positive(C, "C") < 0 || positive(S, "S") < 0 || positive(P, "P") < 0) return -1;
    if (S % P != 0) {
        PyErr_Format(PyExc_ValueError, "patch side P=%d must divide the image side S=%d", P, S);
        return -1;
    }
    if ((long long)P * P * C > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "P*P*C is too large");
        return -1;
    }
    return check_order(order);
}

static PyObject *py_patchify_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"img", "P", "order", NULL};
    PyObject *oi, *res = NULL;
    int P, order = AF_PATCH_PQC;
    PyArrayObject *img = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi|i:patchify_forward", kwl, &oi, &P, &order))
        return NULL;
    GET(img, oi, "img", 4);
    int B = D_(img, 0), C = D_(img, 1), S = D_(img, 2);
    DIM(img, "img", 3, S); /* square images */
    if (patch_sizes(C, S, P, order) < 0) goto done;
    int G = S / P;
    npy_intp so[3] = {B, (npy_intp)G * G, (npy_intp)P * P * C};
    ALLOC(out, af_new_array(3, so, NPY_FLOAT32));
    Py_BEGIN_ALLOW_THREADS
    patchify_forward(AF_F32(out), AF_F32(img), B, C, S, P, order);
    Py_END_ALLOW_THREADS
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(img); Py_XDECREF(out);
    return res;
}

/* patches[B, (S/P)^2, P*P*C] -> image shape; shared by the backward and unpatchify. */
static PyObject *patches_to_image(PyObject *args, PyObject *kw, const char *fmt, int backward) {
    static char *kwl[] = {"patches", "C", "S", "P", "order", NULL};
    PyObject *op, *res = NULL;
    int C, S, P, order = AF_PATCH_PQC;
    PyArrayObject *pt = NULL, *img = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwl, &op, &C, &S, &P, &order)) return NULL;
    if (patch_sizes(C, S, P, order) < 0) return NULL;
    GET(pt, op, "patches", 3);
    int B = D_(pt, 0), G = S / P;
    DIM(pt, "patches", 1, (npy_intp)G * G);
    DIM(pt, "patches", 2, (npy_intp)P * P * C);
    npy_intp si[4] = {B, C, S, S};
    ALLOC(img, af_new_array(4, si, NPY_FLOAT32));
    Py_BEGIN_ALLOW_THREADS
    if (backward) patchify_backward(AF_F32(img), AF_F32(pt), B, C, S, P, order);
    else unpatchify(AF_F32(img), AF_F32(pt), B, C, S, P, order);
    Py_END_ALLOW_THREADS
    if (backward) {
        res = PyTuple_Pack(1, img);
    } else {
        res = (PyObject *)img;
        img = NULL;
    }
done:
    Py_XDECREF(pt); Py_XDECREF(img);
    return res;
}

static PyObject *py_patchify_backward(PyObject *self, PyObject *args, PyObject *kw) {
    return patches_to_image(args, kw, "Oiii|i:patchify_backward", 1);
}

static PyObject *py_unpatchify(PyObject *self, PyObject *args, PyObject *kw) {
    return patches_to_image(args, kw, "Oiii|i:unpatchify", 0);
}

/* ---------------------------------------------------------------- sincos */

static PyObject *py_sincos_2d_embed(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"D", "G", "cls", NULL};
    int D, G, cls = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|p:sincos_2d_embed", kwl, &D, &G, &cls))
        return NULL;
    if (positive(D, "D") < 0 || positive(G, "G") < 0) return NULL;
    if (D % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "D must be divisible by 4, got %d", D);
        return NULL;
    }
    npy_intp rows = (npy_intp)G * G + (cls ? 1 : 0);
    PyArrayObject *out = zeros2(rows, D);
    if (out == NULL) return NULL;
    Py_BEGIN_ALLOW_THREADS
    sincos_2d_embed(AF_F32(out), D, G, cls);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

/* ---------------------------------------------------------------- l2norm */

static PyObject *py_l2norm_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", "eps", NULL};
    PyObject *oi, *res = NULL;
    double eps = 1e-12;
    PyArrayObject *inp = NULL, *out = NULL, *norm = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|d:l2norm_forward", kwl, &oi, &eps)) return NULL;
    if (check_eps(eps, "eps") < 0) return NULL;
    GET(inp, oi, "inp", 2);
    int N = D_(inp, 0), C = D_(inp, 1);
    npy_intp sn[1] = {N};
    ALLOC(out, zeros_like(inp));
    ALLOC(norm, af_new_array(1, sn, NPY_FLOAT32));
    Py_BEGIN_ALLOW_THREADS
    l2norm_forward(AF_F32(out), AF_F32(norm), AF_F32(inp), N, C, (float)eps);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(2, out, norm);
done:
    Py_XDECREF(inp); Py_XDECREF(out); Py_XDECREF(norm);
    return res;
}

static PyObject *py_l2norm_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", "inp", "norm", "eps", NULL};
    PyObject *od, *oi, *on, *res = NULL;
    double eps = 1e-12;
    PyArrayObject *dout = NULL, *inp = NULL, *norm = NULL, *dinp = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d:l2norm_backward", kwl, &od, &oi, &on, &eps))
        return NULL;
    if (check_eps(eps, "eps") < 0) return NULL;
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(norm, on, "norm", 1);
    int N = D_(inp, 0), C = D_(inp, 1);
    if (same_shape(dout, "dout", inp, "inp") < 0) goto done;
    DIM(norm, "norm", 0, N);
    if (eps == 0.0) { /* the zero-norm branch would divide by eps */
        const float *pn = AF_F32(norm);
        for (int n = 0; n < N; n++) {
            if (!(pn[n] > 0.0f)) {
                PyErr_Format(PyExc_ValueError, "norm[%d] is 0 and eps is 0: gradient undefined", n);
                goto done;
            }
        }
    }
    ALLOC(dinp, zeros_like(inp));
    Py_BEGIN_ALLOW_THREADS
    l2norm_backward(AF_F32(dinp), AF_F32(dout), AF_F32(inp), AF_F32(norm), N, C, (float)eps);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(1, dinp);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(norm); Py_XDECREF(dinp);
    return res;
}

/* ---------------------------------------------------------------- wn_linear */

static PyObject *py_wn_linear_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", "v", NULL};
    PyObject *oi, *ov, *res = NULL;
    PyArrayObject *inp = NULL, *v = NULL, *out = NULL, *weff = NULL, *vnorm = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:wn_linear_forward", kwl, &oi, &ov))
        return NULL;
    GET(inp, oi, "inp", 2);
    GET(v, ov, "v", 2);
    int N = D_(inp, 0), C = D_(inp, 1), K = D_(v, 0);
    DIM(v, "v", 1, C);
    const float *pv = AF_F32(v);
    for (int k = 0; k < K; k++) { /* a zero row has no direction */
        int nz = 0;
        for (int c = 0; c < C && !nz; c++) nz = pv[(size_t)k * C + c] != 0.0f;
        if (!nz) {
            PyErr_Format(PyExc_ValueError, "v: row %d is all zeros (its norm is 0)", k);
            goto done;
        }
    }
    npy_intp sk[1] = {K};
    ALLOC(out, zeros2(N, K));
    ALLOC(weff, zeros_like(v));
    ALLOC(vnorm, af_new_array(1, sk, NPY_FLOAT32));
    Py_BEGIN_ALLOW_THREADS
    wn_linear_forward(AF_F32(out), AF_F32(weff), AF_F32(vnorm), AF_F32(inp), AF_F32(v), N, C, K);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(3, out, weff, vnorm);
done:
    Py_XDECREF(inp); Py_XDECREF(v); Py_XDECREF(out); Py_XDECREF(weff); Py_XDECREF(vnorm);
    return res;
}

static PyObject *py_wn_linear_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", "inp", "w_eff", "vnorm", NULL};
    PyObject *od, *oi, *ow, *on, *res = NULL;
    PyArrayObject *dout = NULL, *inp = NULL, *weff = NULL, *vnorm = NULL, *dinp = NULL, *dv = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO:wn_linear_backward", kwl, &od, &oi, &ow, &on))
        return NULL;
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(weff, ow, "w_eff", 2);
    GET(vnorm, on, "vnorm", 1);
    int N = D_(inp, 0), C = D_(inp, 1), K = D_(weff, 0);
    DIM(weff, "w_eff", 1, C);
    DIM(vnorm, "vnorm", 0, K);
    DIM(dout, "dout", 0, N);
    DIM(dout, "dout", 1, K);
    const float *pn = AF_F32(vnorm);
    for (int k = 0; k < K; k++) {
        if (!(pn[k] > 0.0f)) {
            PyErr_Format(PyExc_ValueError, "vnorm[%d] must be > 0", k);
            goto done;
        }
    }
    ALLOC(dinp, zeros_like(inp));
    ALLOC(dv, zeros_like(weff));
    Py_BEGIN_ALLOW_THREADS
    wn_linear_backward(AF_F32(dinp), AF_F32(dv), AF_F32(dout), AF_F32(inp), AF_F32(weff),
                       AF_F32(vnorm), N, C, K);
    Py_END_ALLOW_THREADS
    res = PyTuple_Pack(2, dinp, dv);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(weff); Py_XDECREF(vnorm);
    Py_XDECREF(dinp); Py_XDECREF(dv);
    return res;
}

/* Test hook: the allocation-free dv path, accumulating into a copy of dv0. */
static PyObject *py__wn_linear_backward_dv_lowmem(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dv0", "dout", "inp", "w_eff", "vnorm", NULL};
    PyObject *o0, *od, *oi, *ow, *on, *res = NULL;
    PyArrayObject *dv0 = NULL, *dout = NULL, *inp = NULL, *weff = NULL, *vnorm = NULL, *dv = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:_wn_linear_backward_dv_lowmem", kwl, &o0,
                                     &od, &oi, &ow, &on))
        return NULL;
    GET(dv0, o0, "dv0", 2);
    GET(dout, od, "dout", 2);
    GET(inp, oi, "inp", 2);
    GET(weff, ow, "w_eff", 2);
    GET(vnorm, on, "vnorm", 1);
    int N = D_(inp, 0), C = D_(inp, 1), K = D_(weff, 0);
    if (same_shape(dv0, "dv0", weff, "w_eff") < 0) goto done;
    DIM(vnorm, "vnorm", 0, K);
    DIM(dout, "dout", 0, N);
    DIM(dout, "dout", 1, K);
    ALLOC(dv, (PyArrayObject *)PyArray_NewCopy(dv0, NPY_CORDER));
    Py_BEGIN_ALLOW_THREADS
    wn_linear_backward_dv_lowmem(AF_F32(dv), AF_F32(dout), AF_F32(inp), AF_F32(weff),
                                 AF_F32(vnorm), N, C, K);
    Py_END_ALLOW_THREADS
    res = (PyObject *)dv;
    dv = NULL;
done:
    Py_XDECREF(dv0); Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(weff); Py_XDECREF(vnorm);
    Py_XDECREF(dv);
    return res;
}

/* ---------------------------------------------------------------- adamw */

/* An array updated in place: must already be float32, C-contiguous, aligned, writeable. */
static int inplace_arg(PyObject *obj, const char *name) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of float32", name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32 (it is updated in place)", name);
        return -1;
    }
    if (!PyArray_ISCARRAY(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous, aligned and writeable (it is "
                     "updated in place)", name);
        return -1;
    }
    return 0;
}

static PyObject *py_adamw_update(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"params", "grads", "m", "v", "lr", "t", "beta1", "beta2", "eps",
                          "weight_decay", NULL};
    PyObject *op, *og, *om, *ov, *res = NULL;
    double lr = NAN, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.0;
    int t = 0; /* lr and t are required keywords: the sentinels are rejected below */
    PyArrayObject *grads = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|$didddd:adamw_update", kwl, &op, &og, &om,
                                     &ov, &lr, &t, &beta1, &beta2, &eps, &wd))
        return NULL;
    if (inplace_arg(op, "params") < 0 || inplace_arg(om, "m") < 0 || inplace_arg(ov, "v") < 0)
        return NULL;
    if (!(isfinite(lr) && lr >= 0.0)) {
        af_errorf(PyExc_ValueError, "lr (keyword, required) must be finite and >= 0, got %g",
                     lr);
        return NULL;
    }
    if (t < 1) {
        PyErr_Format(PyExc_ValueError, "t (keyword, required: the step count) must be >= 1, got %d", t);
        return NULL;
    }
    if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0)) {
        af_errorf(PyExc_ValueError, "beta1 and beta2 must be in [0, 1), got %g, %g", beta1,
                     beta2);
        return NULL;
    }
    if (check_eps(eps, "eps") < 0 || check_eps(wd, "weight_decay") < 0) return NULL;
    PyArrayObject *p = (PyArrayObject *)op, *m = (PyArrayObject *)om, *v = (PyArrayObject *)ov;
    GET(grads, og, "grads", -1);
    if (same_shape(grads, "grads", p, "params") < 0 || same_shape(m, "m", p, "params") < 0 ||
        same_shape(v, "v", p, "params") < 0)
        goto done;
    if (op == om || op == ov || om == ov) {
        PyErr_SetString(PyExc_ValueError, "params, m and v must be distinct arrays");
        goto done;
    }
    size_t n = (size_t)PyArray_SIZE(p);
    Py_BEGIN_ALLOW_THREADS
    adamw_update(AF_F32(p), AF_F32(grads), AF_F32(m), AF_F32(v), n, (float)lr, (float)beta1,
                 (float)beta2, (float)eps, (float)wd, t);
    Py_END_ALLOW_THREADS
    res = Py_NewRef(Py_None);
done:
    Py_XDECREF(grads);
    return res;
}

/* ---------------------------------------------------------------- table */

#define F(name, doc) {#name, KW py_##name, METH_VARARGS | METH_KEYWORDS, doc}
static PyMethodDef ops_methods[] = {
    F(linear_forward, "linear_forward(inp[N,C], weight[OC,C], bias[OC]=None) -> out[N,OC]"),
    F(linear_backward, "linear_backward(dout[N,OC], inp[N,C], weight[OC,C], has_bias=True) -> "
                       "(dinp[N,C], dweight[OC,C], dbias[OC] or None)"),
    F(layernorm_forward, "layernorm_forward(inp[N,C], weight[C], bias[C], eps=1e-6) -> "
                         "(out[N,C], mean[N], rstd[N])"),
    F(layernorm_backward, "layernorm_backward(dout, inp, weight, mean, rstd) -> "
                          "(dinp[N,C], dweight[C], dbias[C])"),
    F(gelu_forward, "gelu_forward(inp) -> out (exact erf GELU, any shape)"),
    F(gelu_backward, "gelu_backward(dout, inp) -> (dinp,)"),
    F(softmax_forward, "softmax_forward(inp[N,C]) -> out[N,C] (row softmax)"),
    F(softmax_backward, "softmax_backward(dout[N,C], out[N,C]) -> (dinp,)"),
    F(attention_forward, "attention_forward(qkv[B,T,3D], H) -> (out[B,T,D], att[B,H,T,T])"),
    F(attention_backward, "attention_backward(dout[B,T,D], qkv[B,T,3D], att[B,H,T,T], H) -> "
                          "(dqkv[B,T,3D],)"),
    F(residual_forward, "residual_forward(a, b) -> a + b"),
    F(residual_backward, "residual_backward(dout) -> (da, db)"),
    F(patchify_forward, "patchify_forward(img[B,C,S,S], P, order=PATCH_PQC) -> "
                        "patches[B,(S/P)^2,P*P*C]"),
    F(patchify_backward, "patchify_backward(dpatches[B,L,P*P*C], C, S, P, order=PATCH_PQC) -> "
                         "(dimg[B,C,S,S],)"),
    F(unpatchify, "unpatchify(patches[B,L,P*P*C], C, S, P, order=PATCH_PQC) -> img[B,C,S,S]"),
    F(sincos_2d_embed, "sincos_2d_embed(D, G, cls=False) -> out[(1 if cls) + G*G, D] (MAE)"),
    F(l2norm_forward, "l2norm_forward(inp[N,C], eps=1e-12) -> (out[N,C], norm[N])"),
    F(l2norm_backward, "l2norm_backward(dout, inp, norm, eps=1e-12) -> (dinp,)"),
    F(wn_linear_forward, "wn_linear_forward(inp[N,C], v[K,C]) -> (out[N,K], w_eff[K,C], "
                         "vnorm[K])"),
    F(wn_linear_backward, "wn_linear_backward(dout[N,K], inp, w_eff, vnorm) -> "
                          "(dinp[N,C], dv[K,C])"),
    F(_wn_linear_backward_dv_lowmem, "test hook: dv0 + the dv of wn_linear_backward, computed "
                                      "without a K x C buffer (the out-of-memory path)"),
    F(adamw_update, "adamw_update(params, grads, m, v, *, lr, t, beta1=0.9, beta2=0.999, "
                    "eps=1e-8, weight_decay=0.0) -> None; updates params, m, v in place"),
    {NULL}};
#undef F

int af_register_ops(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "ops", ops_methods,
                                     "CPU layer kernels (fp32): forward/backward pairs.");
    if (sub == NULL) return -1;
    if (PyModule_AddIntConstant(sub, "PATCH_PQC", AF_PATCH_PQC) < 0 ||
        PyModule_AddIntConstant(sub, "PATCH_CPQ", AF_PATCH_CPQ) < 0)
        return -1;
    return 0;
}
