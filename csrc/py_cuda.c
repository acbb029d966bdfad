/* afire._C.cuda: whether this build and machine can run the CUDA backend, and host-level
 * test entry points for every GPU op. Builds without CUDA answer compiled() == False and
 * raise a clear RuntimeError on use.
 *
 * Each op function takes exactly the arguments of its CPU twin in afire._C.ops (same names,
 * checks and messages, same return convention), uploads the arrays, runs the kernel on one
 * shared context (device 0, exact fp32 GEMMs), and returns new numpy arrays. They are for
 * tests and small jobs: every call allocates and copies. time_linear / time_attention
 * measure GPU milliseconds of the kernels on device-resident buffers (CUDA events). */
#include <limits.h>
#include <math.h>

#include "py_util.h"
#ifdef AFIRE_HAVE_CUDA
#include "cuda_api.h"
#endif

#ifndef AFIRE_HAVE_CUDA
static PyObject *no_cuda_build(void) {
    PyErr_SetString(PyExc_RuntimeError,
                    "device='cuda' was requested but this build of afire has no CUDA backend "
                    "(nvcc was not found when it was built; reinstall with the CUDA toolkit on "
                    "PATH or AFIRE_CUDA=1)");
    return NULL;
}
#endif

static PyObject *py_device_count(PyObject *self, PyObject *unused) {
#ifdef AFIRE_HAVE_CUDA
    int n = 0;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_device_count(&n);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) return af_raise(st);
    return PyLong_FromLong(n);
#else
    return PyLong_FromLong(0);
#endif
}

static PyObject *py_compiled(PyObject *self, PyObject *unused) {
#ifdef AFIRE_HAVE_CUDA
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_versions(PyObject *self, PyObject *unused) {
#ifdef AFIRE_HAVE_CUDA
    int cudart = 0, nccl = 0;
    size_t lt = 0, dnn = 0;
    af_status st = af_cuda_versions(&cudart, &lt, &dnn, &nccl);
    if (st != AF_OK) return af_raise(st);
    return Py_BuildValue("{s:i,s:n,s:n,s:i}", "cudart", cudart, "cublaslt", (Py_ssize_t)lt,
                         "cudnn", (Py_ssize_t)dnn, "nccl", nccl);
#else
    return no_cuda_build();
#endif
}

/* rand_uniform(n, seed=0, stream=0, offset=0): the GPU draw of afire._C.rng.uniform. */
static PyObject *py_rand_uniform(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"n", "seed", "stream", "offset", NULL};
    Py_ssize_t n;
    unsigned long long seed = 0, stream = 0, offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n|KKK", kwlist, &n, &seed, &stream, &offset))
        return NULL;
#ifdef AFIRE_HAVE_CUDA
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    npy_intp shape[1] = {n};
    PyArrayObject *out = af_new_array(1, shape, NPY_FLOAT32);
    if (out == NULL) return NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_rand_uniform(AF_F32(out), n, seed, stream, offset);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        Py_DECREF(out);
        return af_raise(st);
    }
    return (PyObject *)out;
#else
    return no_cuda_build();
#endif
}

#ifdef AFIRE_HAVE_CUDA
/* ------------------------------------------------------------------ shared context */

/* One context (device 0, exact fp32 GEMMs) for the whole process, created on first use.
 * The test entry points use it one call at a time: a second thread gets AF_EBUSY. */
static af_cuda_context *g_ctx = NULL;
static int g_busy = 0;

static af_cuda_context *get_ctx(void) {
    if (g_ctx == NULL) {
        af_status st = af_cuda_context_create(&g_ctx, 0, 0);
        if (st != AF_OK) {
            g_ctx = NULL;
            af_raise(st);
            return NULL;
        }
    }
    return g_ctx;
}

static int acquire(void) {
    if (g_busy) {
        af_raise(af_error(AF_EBUSY, "the CUDA test context is in use by another thread"));
        return -1;
    }
    g_busy = 1;
    return 0;
}

/* The arrays of one call, in the order the kernel adapter reads them from dev[]. */
typedef struct {
    float *host[AF_CUDA_MAX_ARGS];
    size_t count[AF_CUDA_MAX_ARGS];
    int role[AF_CUDA_MAX_ARGS];
    int n;
} job_t;

/* Sizes and scalars handed to a kernel adapter. */
typedef struct {
    int i[6];
    float f[6];
    size_t n;
} args_t;

static void job_add(job_t *j, PyArrayObject *a, int role) {
    j->host[j->n] = a ? AF_F32(a) : NULL;
    j->count[j->n] = a ? (size_t)PyArray_SIZE(a) : 0;
    j->role[j->n] = role;
    j->n++;
}

static void job_scratch(job_t *j, size_t count) {
    j->host[j->n] = NULL;
    j->count[j->n] = count;
    j->role[j->n] = AF_CUDA_SCRATCH;
    j->n++;
}

/* Uploads, runs fn, downloads, with the GIL released. 0, or -1 with an exception set. */
static int job_run(job_t *j, af_cuda_fn fn, const args_t *a) {
    af_cuda_context *ctx = get_ctx();
    if (ctx == NULL || acquire() < 0) return -1;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_run_host(ctx, j->n, j->host, j->count, j->role, fn, a);
    Py_END_ALLOW_THREADS
    g_busy = 0;
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ argument checks
 * The same rules and messages as afire._C.ops (csrc/py_ops.c), so one test can feed both. */

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

static PyArrayObject *zeros2(npy_intp a, npy_intp b) {
    npy_intp s[2] = {a, b};
    return af_new_array(2, s, NPY_FLOAT32);
}

static PyArrayObject *zeros1(npy_intp a) { return af_new_array(1, &a, NPY_FLOAT32); }

static PyArrayObject *zeros_like(PyArrayObject *ref) {
    return af_new_array(PyArray_NDIM(ref), PyArray_DIMS(ref), NPY_FLOAT32);
}

#define D_(a, i) ((int)PyArray_DIM((a), (i)))
#define GET(var, obj, name, nd) \
    if ((var = f32_arg((obj), (name), (nd))) == NULL) goto done
#define DIM(arr, name, axis, expected) \
    if (af_check_dim((arr), (name), (axis), (expected)) < 0) goto done
#define ALLOC(var, expr) \
    if ((var = (expr)) == NULL) goto done
#define RUN(job, fn, a) \
    if (job_run((job), (fn), (a)) < 0) goto done
#define ADAPTER(name) static af_status k_##name(af_cuda_context *c, float *const *d, const void *u)
#define A ((const args_t *)u)

/* ------------------------------------------------------------------ linear */

ADAPTER(linear_forward) {
    return af_cuda_linear_forward(c, d[0], d[1], d[2], d[3], A->i[0], A->i[1], A->i[2]);
}
ADAPTER(linear_backward) {
    return af_cuda_linear_backward(c, d[0], d[1], d[2], d[3], d[4], d[5], A->i[0], A->i[1],
                                   A->i[2]);
}

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
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, inp, AF_CUDA_IN);
    job_add(&j, w, AF_CUDA_IN);
    job_add(&j, b, AF_CUDA_IN);
    args_t a = {{N, C, OC}};
    RUN(&j, k_linear_forward, &a);
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
    if (has_bias) ALLOC(db, zeros1(OC));
    job_t j = {0};
    job_add(&j, dinp, AF_CUDA_OUT);
    job_add(&j, dw, AF_CUDA_OUT);
    job_add(&j, db, AF_CUDA_OUT);
    job_add(&j, dout, AF_CUDA_IN);
    job_add(&j, inp, AF_CUDA_IN);
    job_add(&j, w, AF_CUDA_IN);
    args_t a = {{N, C, OC}};
    RUN(&j, k_linear_backward, &a);
    res = PyTuple_Pack(3, dinp, dw, db ? (PyObject *)db : Py_None);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(w);
    Py_XDECREF(dinp); Py_XDECREF(dw); Py_XDECREF(db);
    return res;
}

/* ------------------------------------------------------------------ layernorm */

ADAPTER(layernorm_forward) {
    return af_cuda_layernorm_forward(c, d[0], d[1], d[2], d[3], d[4], d[5], A->i[0], A->i[1],
                                     A->f[0]);
}
ADAPTER(layernorm_backward) {
    return af_cuda_layernorm_backward(c, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
                                      A->i[0], A->i[1]);
}

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
    ALLOC(out, zeros_like(inp));
    ALLOC(mean, zeros1(N));
    ALLOC(rstd, zeros1(N));
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, mean, AF_CUDA_OUT);
    job_add(&j, rstd, AF_CUDA_OUT);
    job_add(&j, inp, AF_CUDA_IN);
    job_add(&j, w, AF_CUDA_IN);
    job_add(&j, b, AF_CUDA_IN);
    args_t a = {{N, C}, {(float)eps}};
    RUN(&j, k_layernorm_forward, &a);
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
    job_t j = {0};
    job_add(&j, dinp, AF_CUDA_OUT);
    job_add(&j, dw, AF_CUDA_OUT);
    job_add(&j, db, AF_CUDA_OUT);
    job_add(&j, dout, AF_CUDA_IN);
    job_add(&j, inp, AF_CUDA_IN);
    job_add(&j, w, AF_CUDA_IN);
    job_add(&j, mean, AF_CUDA_IN);
    job_add(&j, rstd, AF_CUDA_IN);
    args_t a = {{N, C}};
    RUN(&j, k_layernorm_backward, &a);
    res = PyTuple_Pack(3, dinp, dw, db);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(w); Py_XDECREF(mean); Py_XDECREF(rstd);
    Py_XDECREF(dinp); Py_XDECREF(dw); Py_XDECREF(db);
    return res;
}

/* ------------------------------------------------------------------ gelu, residual */

ADAPTER(gelu_forward) { return af_cuda_gelu_forward(c, d[0], d[1], A->n); }
ADAPTER(gelu_backward) { return af_cuda_gelu_backward(c, d[0], d[1], d[2], A->n); }
ADAPTER(residual_forward) { return af_cuda_residual_forward(c, d[0], d[1], d[2], A->n); }
ADAPTER(residual_backward) { return af_cuda_residual_backward(c, d[0], d[1], d[2], A->n); }

static PyObject *py_gelu_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", NULL};
    PyObject *oi, *res = NULL;
    PyArrayObject *inp = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:gelu_forward", kwl, &oi)) return NULL;
    GET(inp, oi, "inp", -1);
    ALLOC(out, zeros_like(inp));
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, inp, AF_CUDA_IN);
    args_t a = {.n = (size_t)PyArray_SIZE(inp)};
    RUN(&j, k_gelu_forward, &a);
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
    job_t j = {0};
    job_add(&j, dinp, AF_CUDA_OUT);
    job_add(&j, dout, AF_CUDA_IN);
    job_add(&j, inp, AF_CUDA_IN);
    args_t a = {.n = (size_t)PyArray_SIZE(inp)};
    RUN(&j, k_gelu_backward, &a);
    res = PyTuple_Pack(1, dinp);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(dinp);
    return res;
}

static PyObject *py_residual_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"a", "b", NULL};
    PyObject *oa, *ob, *res = NULL;
    PyArrayObject *x = NULL, *y = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:residual_forward", kwl, &oa, &ob)) return NULL;
    GET(x, oa, "a", -1);
    GET(y, ob, "b", -1);
    if (same_shape(y, "b", x, "a") < 0) goto done;
    ALLOC(out, zeros_like(x));
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, x, AF_CUDA_IN);
    job_add(&j, y, AF_CUDA_IN);
    args_t a = {.n = (size_t)PyArray_SIZE(x)};
    RUN(&j, k_residual_forward, &a);
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(x); Py_XDECREF(y); Py_XDECREF(out);
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
    job_t j = {0};
    job_add(&j, da, AF_CUDA_OUT);
    job_add(&j, db, AF_CUDA_OUT);
    job_add(&j, dout, AF_CUDA_IN);
    args_t a = {.n = (size_t)PyArray_SIZE(dout)};
    RUN(&j, k_residual_backward, &a);
    res = PyTuple_Pack(2, da, db);
done:
    Py_XDECREF(dout); Py_XDECREF(da); Py_XDECREF(db);
    return res;
}

/* ------------------------------------------------------------------ softmax */

ADAPTER(softmax_forward) { return af_cuda_softmax_forward(c, d[0], d[1], A->i[0], A->i[1]); }
ADAPTER(softmax_backward) {
    return af_cuda_softmax_backward(c, d[0], d[1], d[2], A->i[0], A->i[1]);
}

static PyObject *py_softmax_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", NULL};
    PyObject *oi, *res = NULL;
    PyArrayObject *inp = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:softmax_forward", kwl, &oi)) return NULL;
    GET(inp, oi, "inp", 2);
    ALLOC(out, zeros_like(inp));
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, inp, AF_CUDA_IN);
    args_t a = {{D_(inp, 0), D_(inp, 1)}};
    RUN(&j, k_softmax_forward, &a);
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
    job_t j = {0};
    job_add(&j, dinp, AF_CUDA_OUT);
    job_add(&j, dout, AF_CUDA_IN);
    job_add(&j, out, AF_CUDA_IN);
    args_t a = {{D_(out, 0), D_(out, 1)}};
    RUN(&j, k_softmax_backward, &a);
    res = PyTuple_Pack(1, dinp);
done:
    Py_XDECREF(dout); Py_XDECREF(out); Py_XDECREF(dinp);
    return res;
}

/* ------------------------------------------------------------------ attention */

ADAPTER(attention_forward) {
    return af_cuda_attention_forward(c, d[0], d[1], d[2], A->i[0], A->i[1], A->i[2], A->i[3]);
}
ADAPTER(attention_backward) {
    return af_cuda_attention_backward(c, d[0], d[1], d[2], d[3], d[4], A->i[0], A->i[1], A->i[2],
                                      A->i[3]);
}

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
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, att, AF_CUDA_OUT);
    job_add(&j, qkv, AF_CUDA_IN);
    args_t a = {{B, T, D, H}};
    RUN(&j, k_attention_forward, &a);
    res = PyTuple_Pack(2, out, att);
done:
    Py_XDECREF(qkv); Py_XDECREF(out); Py_XDECREF(att);
    return res;
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dout", "qkv", "att", "H", NULL};
    PyObject *od, *oq, *oa, *res = NULL;
    int H, B, T, D;
    PyArrayObject *dout = NULL, *qkv = NULL, *att = NULL, *dqkv = NULL;
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
    job_t j = {0};
    job_add(&j, dqkv, AF_CUDA_OUT);
    job_scratch(&j, (size_t)PyArray_SIZE(att));
    job_add(&j, dout, AF_CUDA_IN);
    job_add(&j, qkv, AF_CUDA_IN);
    job_add(&j, att, AF_CUDA_IN);
    args_t a = {{B, T, D, H}};
    RUN(&j, k_attention_backward, &a);
    res = PyTuple_Pack(1, dqkv);
done:
    Py_XDECREF(dout); Py_XDECREF(qkv); Py_XDECREF(att); Py_XDECREF(dqkv);
    return res;
}

/* ------------------------------------------------------------------ patchify */

ADAPTER(patchify_forward) {
    return af_cuda_patchify_forward(c, d[0], d[1], A->i[0], A->i[1], A->i[2], A->i[3], A->i[4]);
}
ADAPTER(patchify_backward) {
    return af_cuda_patchify_backward(c, d[0], d[1], A->i[0], A->i[1], A->i[2], A->i[3], A->i[4]);
}
ADAPTER(unpatchify) {
    return af_cuda_unpatchify(c, d[0], d[1], A->i[0], A->i[1], A->i[2], A->i[3], A->i[4]);
}

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
    if (order != 0 && order != 1) {
        PyErr_Format(PyExc_ValueError, "order must be PATCH_PQC (0) or PATCH_CPQ (1), got %d",
                     order);
        return -1;
    }
    return 0;
}

static PyObject *py_patchify_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"img", "P", "order", NULL};
    PyObject *oi, *res = NULL;
    int P, order = 0;
    PyArrayObject *img = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi|i:patchify_forward", kwl, &oi, &P, &order))
        return NULL;
    GET(img, oi, "img", 4);
    int B = D_(img, 0), C = D_(img, 1), S = D_(img, 2);
    DIM(img, "img", 3, S);
    if (patch_sizes(C, S, P, order) < 0) goto done;
    int G = S / P;
    npy_intp so[3] = {B, (npy_intp)G * G, (npy_intp)P * P * C};
    ALLOC(out, af_new_array(3, so, NPY_FLOAT32));
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, img, AF_CUDA_IN);
    args_t a = {{B, C, S, P, order}};
    RUN(&j, k_patchify_forward, &a);
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(img); Py_XDECREF(out);
    return res;
}

static PyObject *patches_to_image(PyObject *args, PyObject *kw, const char *fmt, int backward) {
    static char *kwl[] = {"patches", "C", "S", "P", "order", NULL};
    PyObject *op, *res = NULL;
    int C, S, P, order = 0;
    PyArrayObject *pt = NULL, *img = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwl, &op, &C, &S, &P, &order)) return NULL;
    if (patch_sizes(C, S, P, order) < 0) return NULL;
    GET(pt, op, "patches", 3);
    int B = D_(pt, 0), G = S / P;
    DIM(pt, "patches", 1, (npy_intp)G * G);
    DIM(pt, "patches", 2, (npy_intp)P * P * C);
    npy_intp si[4] = {B, C, S, S};
    ALLOC(img, af_new_array(4, si, NPY_FLOAT32));
    job_t j = {0};
    job_add(&j, img, AF_CUDA_OUT);
    job_add(&j, pt, AF_CUDA_IN);
    args_t a = {{B, C, S, P, order}};
    RUN(&j, backward ? k_patchify_backward : k_unpatchify, &a);
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

/* ------------------------------------------------------------------ l2norm */

ADAPTER(l2norm_forward) {
    return af_cuda_l2norm_forward(c, d[0], d[1], d[2], A->i[0], A->i[1], A->f[0]);
}
ADAPTER(l2norm_backward) {
    return af_cuda_l2norm_backward(c, d[0], d[1], d[2], d[3], A->i[0], A->i[1], A->f[0]);
}

static PyObject *py_l2norm_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"inp", "eps", NULL};
    PyObject *oi, *res = NULL;
    double eps = 1e-12;
    PyArrayObject *inp = NULL, *out = NULL, *norm = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|d:l2norm_forward", kwl, &oi, &eps)) return NULL;
    if (check_eps(eps, "eps") < 0) return NULL;
    GET(inp, oi, "inp", 2);
    int N = D_(inp, 0), C = D_(inp, 1);
    ALLOC(out, zeros_like(inp));
    ALLOC(norm, zeros1(N));
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, norm, AF_CUDA_OUT);
    job_add(&j, inp, AF_CUDA_IN);
    args_t a = {{N, C}, {(float)eps}};
    RUN(&j, k_l2norm_forward, &a);
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
    if (eps == 0.0) {
        const float *pn = AF_F32(norm);
        for (int n = 0; n < N; n++) {
            if (!(pn[n] > 0.0f)) {
                PyErr_Format(PyExc_ValueError, "norm[%d] is 0 and eps is 0: gradient undefined", n);
                goto done;
            }
        }
    }
    ALLOC(dinp, zeros_like(inp));
    job_t j = {0};
    job_add(&j, dinp, AF_CUDA_OUT);
    job_add(&j, dout, AF_CUDA_IN);
    job_add(&j, inp, AF_CUDA_IN);
    job_add(&j, norm, AF_CUDA_IN);
    args_t a = {{N, C}, {(float)eps}};
    RUN(&j, k_l2norm_backward, &a);
    res = PyTuple_Pack(1, dinp);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(norm); Py_XDECREF(dinp);
    return res;
}

/* ------------------------------------------------------------------ wn_linear */

ADAPTER(wn_linear_forward) {
    return af_cuda_wn_linear_forward(c, d[0], d[1], d[2], d[3], d[4], A->i[0], A->i[1], A->i[2]);
}
ADAPTER(wn_linear_backward) {
    return af_cuda_wn_linear_backward(c, d[0], d[1], d[2], d[3], d[4], d[5], d[6], A->i[0],
                                      A->i[1], A->i[2]);
}

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
    ALLOC(out, zeros2(N, K));
    ALLOC(weff, zeros_like(v));
    ALLOC(vnorm, zeros1(K));
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, weff, AF_CUDA_OUT);
    job_add(&j, vnorm, AF_CUDA_OUT);
    job_add(&j, inp, AF_CUDA_IN);
    job_add(&j, v, AF_CUDA_IN);
    args_t a = {{N, C, K}};
    RUN(&j, k_wn_linear_forward, &a);
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
    job_t j = {0};
    job_add(&j, dinp, AF_CUDA_OUT);
    job_add(&j, dv, AF_CUDA_OUT);
    job_scratch(&j, (size_t)K * C);
    job_add(&j, dout, AF_CUDA_IN);
    job_add(&j, inp, AF_CUDA_IN);
    job_add(&j, weff, AF_CUDA_IN);
    job_add(&j, vnorm, AF_CUDA_IN);
    args_t a = {{N, C, K}};
    RUN(&j, k_wn_linear_backward, &a);
    res = PyTuple_Pack(2, dinp, dv);
done:
    Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(weff); Py_XDECREF(vnorm);
    Py_XDECREF(dinp); Py_XDECREF(dv);
    return res;
}

/* ------------------------------------------------------------------ adamw */

ADAPTER(adamw_update) {
    return af_cuda_adamw_update(c, d[0], d[1], d[2], d[3], A->n, A->f[0], A->f[1], A->f[2],
                                A->f[3], A->f[4], A->i[0]);
}

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
    job_t j = {0};
    job_add(&j, p, AF_CUDA_INOUT);
    job_add(&j, grads, AF_CUDA_IN);
    job_add(&j, m, AF_CUDA_INOUT);
    job_add(&j, v, AF_CUDA_INOUT);
    args_t a = {{t}, {(float)lr, (float)beta1, (float)beta2, (float)eps, (float)wd},
                (size_t)PyArray_SIZE(p)};
    RUN(&j, k_adamw_update, &a);
    res = Py_NewRef(Py_None);
done:
    Py_XDECREF(grads);
    return res;
}

/* ------------------------------------------------------------------ GPU timing */

/* Device buffers for a timing run, released on every path. */
typedef struct {
    float *p[AF_CUDA_MAX_ARGS];
    int n;
} bufs_t;

static af_status bufs_add(af_cuda_context *ctx, bufs_t *b, size_t count, int random) {
    af_status st = af_cuda_malloc(ctx, &b->p[b->n], count);
    if (st != AF_OK) return st;
    b->n++;
    return random ? af_cuda_fill_uniform(ctx, b->p[b->n - 1], count, (uint64_t)b->n)
                  : af_cuda_zero(ctx, b->p[b->n - 1], count);
}

static void bufs_free(bufs_t *b) {
    for (int i = 0; i < b->n; i++) af_cuda_free(b->p[i]);
    b->n = 0;
}

/* Times forward (fwd, on dev) and backward (bwd, on dev + nf) of one op. */
static PyObject *time_pair(const size_t *sizes, const int *random, int nbuf, af_cuda_fn fwd,
                           af_cuda_fn bwd, int nf, const args_t *a, int warmup, int iters,
                           int tf32) {
    af_cuda_context *ctx = get_ctx();
    if (ctx == NULL || acquire() < 0) return NULL;
    bufs_t b = {{NULL}, 0};
    float fms = 0.0f, bms = 0.0f;
    af_status st = AF_OK;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_context_set_tf32(ctx, tf32);
    for (int i = 0; st == AF_OK && i < nbuf; i++) st = bufs_add(ctx, &b, sizes[i], random[i]);
    if (st == AF_OK) st = af_cuda_time(ctx, fwd, b.p, a, warmup, iters, &fms);
    if (st == AF_OK) st = af_cuda_time(ctx, bwd, b.p + nf, a, warmup, iters, &bms);
    af_cuda_synchronize(ctx);
    bufs_free(&b);
    af_status st_reset = af_cuda_context_set_tf32(ctx, 0); /* back to the exact check path */
    if (st == AF_OK) st = st_reset;
    Py_END_ALLOW_THREADS
    g_busy = 0;
    if (st != AF_OK) return af_raise(st);
    return Py_BuildValue("{s:d,s:d}", "forward_ms", (double)fms, "backward_ms", (double)bms);
}

/* Timing layouts: linear  [out, inp, weight, bias | dinp, dweight, dbias, dout, inp, weight]
 *                 attention [out, att, qkv | dqkv, scratch, dout, qkv, att] */
static af_status k_time_linear_bwd(af_cuda_context *c, float *const *d, const void *u) {
    return af_cuda_linear_backward(c, d[0], d[1], d[2], d[3], d[4], d[5], A->i[0], A->i[1],
                                   A->i[2]);
}

static PyObject *py_time_linear(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"N", "C", "OC", "warmup", "iters", "tf32", NULL};
    int N, C, OC, warmup = 3, iters = 20, tf32 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iii|iip:time_linear", kwl, &N, &C, &OC, &warmup,
                                     &iters, &tf32))
        return NULL;
    if (positive(N, "N") < 0 || positive(C, "C") < 0 || positive(OC, "OC") < 0 ||
        positive(iters, "iters") < 0)
        return NULL;
    if (warmup < 0) {
        PyErr_SetString(PyExc_ValueError, "warmup must be >= 0");
        return NULL;
    }
    size_t n = (size_t)N, c = (size_t)C, oc = (size_t)OC;
    /* forward: out, inp, weight, bias; backward: dinp, dweight, dbias, dout, inp(=fwd inp),
     * weight(=fwd weight) -- the last two are separate copies to keep the layout flat. */
    size_t sizes[10] = {n * oc, n * c, oc * c, oc, n * c, oc * c, oc, n * oc, n * c, oc * c};
    int random[10] = {0, 1, 1, 1, 0, 0, 0, 1, 1, 1};
    args_t a = {{N, C, OC}};
    return time_pair(sizes, random, 10, k_linear_forward, k_time_linear_bwd, 4, &a, warmup, iters,
                     tf32);
}

static PyObject *py_time_attention(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"B", "T", "D", "H", "warmup", "iters", "tf32", NULL};
    int B, T, D, H, warmup = 3, iters = 20, tf32 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiii|iip:time_attention", kwl, &B, &T, &D, &H,
                                     &warmup, &iters, &tf32))
        return NULL;
    if (positive(B, "B") < 0 || positive(T, "T") < 0 || positive(D, "D") < 0 ||
        positive(H, "H") < 0 || positive(iters, "iters") < 0)
        return NULL;
    if (D % H != 0 || warmup < 0) {
        PyErr_Format(PyExc_ValueError, "need D %% H == 0 and warmup >= 0 (D=%d H=%d)", D, H);
        return NULL;
    }
    size_t b = (size_t)B, t = (size_t)T, d = (size_t)D, h = (size_t)H;
    /* forward: out, att, qkv; backward: dqkv, scratch, dout, qkv, att(softmax of random
     * scores is not needed for timing: any values give the same work) */
    size_t sizes[8] = {b * t * d, b * h * t * t, b * t * 3 * d, b * t * 3 * d, b * h * t * t,
                       b * t * d, b * t * 3 * d, b * h * t * t};
    int random[8] = {0, 0, 1, 0, 0, 1, 1, 1};
    args_t a = {{B, T, D, H}};
    return time_pair(sizes, random, 8, k_attention_forward, k_attention_backward, 3, &a, warmup,
                     iters, tf32);
}

static PyObject *py_set_tf32(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    af_cuda_context *ctx = get_ctx();
    if (ctx == NULL) return NULL;
    af_status st = af_cuda_context_set_tf32(ctx, on);
    if (st != AF_OK) return af_raise(st);
    Py_RETURN_NONE;
}

#undef A
#define OPFN(name) py_##name
#else
#define OPFN(name) py_no_cuda
static PyObject *py_no_cuda(PyObject *self, PyObject *args, PyObject *kw) { return no_cuda_build(); }
static PyObject *py_set_tf32(PyObject *self, PyObject *arg) { return no_cuda_build(); }
#endif /* AFIRE_HAVE_CUDA */

static PyMethodDef cuda_methods[] = {
    {"compiled", py_compiled, METH_NOARGS, "compiled() -> bool: the build contains cuda/"},
    {"device_count", py_device_count, METH_NOARGS, "device_count() -> int (0 without a GPU)"},
    {"versions", py_versions, METH_NOARGS, "versions() -> dict of linked CUDA library versions"},
    {"rand_uniform", (PyCFunction)(void (*)(void))py_rand_uniform, METH_VARARGS | METH_KEYWORDS,
     "rand_uniform(n, seed=0, stream=0, offset=0) -> float32[n], drawn on the GPU"},
    {"set_tf32", py_set_tf32, METH_O,
     "set_tf32(on): let the shared context's GEMMs use TF32 (off by default: exact fp32)"},
#define F(name, doc) {#name, (PyCFunction)(void (*)(void))OPFN(name), METH_VARARGS | METH_KEYWORDS, doc}
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
    F(l2norm_forward, "l2norm_forward(inp[N,C], eps=1e-12) -> (out[N,C], norm[N])"),
    F(l2norm_backward, "l2norm_backward(dout, inp, norm, eps=1e-12) -> (dinp,)"),
    F(wn_linear_forward, "wn_linear_forward(inp[N,C], v[K,C]) -> (out[N,K], w_eff[K,C], "
                         "vnorm[K])"),
    F(wn_linear_backward, "wn_linear_backward(dout[N,K], inp, w_eff, vnorm) -> "
                          "(dinp[N,C], dv[K,C])"),
    F(adamw_update, "adamw_update(params, grads, m, v, *, lr, t, beta1=0.9, beta2=0.999, "
                    "eps=1e-8, weight_decay=0.0) -> None; updates params, m, v in place"),
    F(time_linear, "time_linear(N, C, OC, warmup=3, iters=20, tf32=False) -> "
                   "{'forward_ms', 'backward_ms'}: mean GPU ms per call (CUDA events)"),
    F(time_attention, "time_attention(B, T, D, H, warmup=3, iters=20, tf32=False) -> "
                      "{'forward_ms', 'backward_ms'}: mean GPU ms per call (CUDA events)"),
#undef F
    {NULL}};

int af_register_cuda(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "cuda", cuda_methods,
                                     "CUDA backend: availability and GPU twins of afire._C.ops.");
    if (sub == NULL) return -1;
    if (PyModule_AddIntConstant(sub, "PATCH_PQC", 0) < 0 ||
        PyModule_AddIntConstant(sub, "PATCH_CPQ", 1) < 0)
        return -1;
    return 0;
}
