/* afire._C.cuda: whether this build and machine can run the CUDA backend, and host-level
 * test entry points for every GPU op. Builds without CUDA answer compiled() == False and
 * raise a clear RuntimeError on use.
 *
 * Each op function takes exactly the arguments of its CPU twin in afire._C.ops (same names,
 * checks and messages, same return convention), uploads the arrays, runs the kernel on one
 * shared context (device 0, exact fp32 GEMMs), and returns new numpy arrays. They are for
 * tests and small jobs: every call allocates and copies. time_linear / time_attention
 * measure GPU milliseconds of the kernels on device-resident buffers (CUDA events). */
#include "py_args.h" /* Python.h first, as CPython requires */

#include <limits.h>
#include <math.h>
#ifdef AFIRE_HAVE_CUDA
#include "py_cuda_ctx.h"
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

/* The op entry points' context (py_cuda_ctx.h); py_cuda_objective.c keeps its own. The
 * helpers are defined here, once, for both files. */
static af_test_ctx g_test = {NULL, 0, "CUDA test context"};

af_cuda_context *af_test_ctx_get(af_test_ctx *t) {
    if (t->ctx == NULL) {
        af_status st = af_cuda_context_create(&t->ctx, 0, 0);
        if (st != AF_OK) {
            t->ctx = NULL;
            af_raise(st);
            return NULL;
        }
    }
    return t->ctx;
}

af_cuda_context *af_test_ctx_acquire(af_test_ctx *t) {
    af_cuda_context *ctx = af_test_ctx_get(t);
    if (ctx == NULL) return NULL;
    if (t->busy) {
        af_raise(af_error(AF_EBUSY, "the %s is in use by another thread", t->what));
        return NULL;
    }
    t->busy = 1;
    return ctx;
}

void af_test_ctx_release(af_test_ctx *t) { t->busy = 0; }

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
    af_cuda_context *ctx = af_test_ctx_acquire(&g_test);
    if (ctx == NULL) return -1;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_run_host(ctx, j->n, j->host, j->count, j->role, fn, a);
    Py_END_ALLOW_THREADS
    af_test_ctx_release(&g_test);
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    return 0;
}

#define RUN(job, fn, a) \
    if (job_run((job), (fn), (a)) < 0) goto done
#define ADAPTER(name) static af_status k_##name(af_cuda_context *c, float *const *d, const void *u)
#define A ((const args_t *)u)
/* af_parse_<op> (py_args.h, shared with afire._C.ops) reads and checks the arguments, so one
 * test can feed both twins; a function here queues the arrays in the kernel's order, runs
 * it, builds the result and releases what the parser took. */
#define PARSE(op, a) \
    if (af_parse_##op(args, kw, &(a)) < 0) return NULL

/* ------------------------------------------------------------------ linear */

ADAPTER(linear_forward) {
    return af_cuda_linear_forward(c, d[0], d[1], d[2], d[3], A->i[0], A->i[1], A->i[2]);
}
ADAPTER(linear_backward) {
    return af_cuda_linear_backward(c, d[0], d[1], d[2], d[3], d[4], d[5], A->i[0], A->i[1],
                                   A->i[2]);
}

static PyObject *py_linear_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_linear_forward_args p;
    PARSE(linear_forward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.out, AF_CUDA_OUT);
    job_add(&j, p.inp, AF_CUDA_IN);
    job_add(&j, p.weight, AF_CUDA_IN);
    job_add(&j, p.bias, AF_CUDA_IN);
    args_t a = {{p.N, p.C, p.OC}};
    RUN(&j, k_linear_forward, &a);
    res = Py_NewRef(p.out);
done:
    af_owned_release(&p.own);
    return res;
}

static PyObject *py_linear_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_linear_backward_args p;
    PARSE(linear_backward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.dinp, AF_CUDA_OUT);
    job_add(&j, p.dweight, AF_CUDA_OUT);
    job_add(&j, p.dbias, AF_CUDA_OUT);
    job_add(&j, p.dout, AF_CUDA_IN);
    job_add(&j, p.inp, AF_CUDA_IN);
    job_add(&j, p.weight, AF_CUDA_IN);
    args_t a = {{p.N, p.C, p.OC}};
    RUN(&j, k_linear_backward, &a);
    res = PyTuple_Pack(3, p.dinp, p.dweight, p.dbias ? (PyObject *)p.dbias : Py_None);
done:
    af_owned_release(&p.own);
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
    af_layernorm_forward_args p;
    PARSE(layernorm_forward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.out, AF_CUDA_OUT);
    job_add(&j, p.mean, AF_CUDA_OUT);
    job_add(&j, p.rstd, AF_CUDA_OUT);
    job_add(&j, p.inp, AF_CUDA_IN);
    job_add(&j, p.weight, AF_CUDA_IN);
    job_add(&j, p.bias, AF_CUDA_IN);
    args_t a = {{p.N, p.C}, {p.eps}};
    RUN(&j, k_layernorm_forward, &a);
    res = PyTuple_Pack(3, p.out, p.mean, p.rstd);
done:
    af_owned_release(&p.own);
    return res;
}

static PyObject *py_layernorm_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_layernorm_backward_args p;
    PARSE(layernorm_backward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.dinp, AF_CUDA_OUT);
    job_add(&j, p.dweight, AF_CUDA_OUT);
    job_add(&j, p.dbias, AF_CUDA_OUT);
    job_add(&j, p.dout, AF_CUDA_IN);
    job_add(&j, p.inp, AF_CUDA_IN);
    job_add(&j, p.weight, AF_CUDA_IN);
    job_add(&j, p.mean, AF_CUDA_IN);
    job_add(&j, p.rstd, AF_CUDA_IN);
    args_t a = {{p.N, p.C}};
    RUN(&j, k_layernorm_backward, &a);
    res = PyTuple_Pack(3, p.dinp, p.dweight, p.dbias);
done:
    af_owned_release(&p.own);
    return res;
}

/* ------------------------------------------------------------------ gelu, residual */

ADAPTER(gelu_forward) { return af_cuda_gelu_forward(c, d[0], d[1], A->n); }
ADAPTER(gelu_backward) { return af_cuda_gelu_backward(c, d[0], d[1], d[2], A->n); }
ADAPTER(residual_forward) { return af_cuda_residual_forward(c, d[0], d[1], d[2], A->n); }
ADAPTER(residual_backward) { return af_cuda_residual_backward(c, d[0], d[1], d[2], A->n); }

/* The element-wise ops: two outputs at most, then two inputs at most (NULL: absent), n
 * values each. `single` returns the first output alone instead of a tuple. */
static PyObject *run_elementwise(af_owned *own, af_cuda_fn fn, PyArrayObject *out0,
                                 PyArrayObject *out1, PyArrayObject *in0, PyArrayObject *in1,
                                 size_t n, int single) {
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, out0, AF_CUDA_OUT);
    if (out1) job_add(&j, out1, AF_CUDA_OUT);
    job_add(&j, in0, AF_CUDA_IN);
    if (in1) job_add(&j, in1, AF_CUDA_IN);
    args_t a = {.n = n};
    RUN(&j, fn, &a);
    if (single) res = Py_NewRef(out0);
    else if (out1) res = PyTuple_Pack(2, out0, out1);
    else res = PyTuple_Pack(1, out0);
done:
    af_owned_release(own);
    return res;
}

static PyObject *py_gelu_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_gelu_forward_args p;
    PARSE(gelu_forward, p);
    return run_elementwise(&p.own, k_gelu_forward, p.out, NULL, p.inp, NULL, p.n, 1);
}

static PyObject *py_gelu_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_gelu_backward_args p;
    PARSE(gelu_backward, p);
    return run_elementwise(&p.own, k_gelu_backward, p.dinp, NULL, p.dout, p.inp, p.n, 0);
}

static PyObject *py_residual_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_residual_forward_args p;
    PARSE(residual_forward, p);
    return run_elementwise(&p.own, k_residual_forward, p.out, NULL, p.a, p.b, p.n, 1);
}

static PyObject *py_residual_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_residual_backward_args p;
    PARSE(residual_backward, p);
    return run_elementwise(&p.own, k_residual_backward, p.da, p.db, p.dout, NULL, p.n, 0);
}

/* ------------------------------------------------------------------ softmax */

ADAPTER(softmax_forward) { return af_cuda_softmax_forward(c, d[0], d[1], A->i[0], A->i[1]); }
ADAPTER(softmax_backward) {
    return af_cuda_softmax_backward(c, d[0], d[1], d[2], A->i[0], A->i[1]);
}

static PyObject *py_softmax_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_softmax_forward_args p;
    PARSE(softmax_forward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.out, AF_CUDA_OUT);
    job_add(&j, p.inp, AF_CUDA_IN);
    args_t a = {{p.N, p.C}};
    RUN(&j, k_softmax_forward, &a);
    res = Py_NewRef(p.out);
done:
    af_owned_release(&p.own);
    return res;
}

static PyObject *py_softmax_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_softmax_backward_args p;
    PARSE(softmax_backward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.dinp, AF_CUDA_OUT);
    job_add(&j, p.dout, AF_CUDA_IN);
    job_add(&j, p.out, AF_CUDA_IN);
    args_t a = {{p.N, p.C}};
    RUN(&j, k_softmax_backward, &a);
    res = PyTuple_Pack(1, p.dinp);
done:
    af_owned_release(&p.own);
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

static PyObject *py_attention_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_attention_forward_args p;
    PARSE(attention_forward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.out, AF_CUDA_OUT);
    job_add(&j, p.att, AF_CUDA_OUT);
    job_add(&j, p.qkv, AF_CUDA_IN);
    args_t a = {{p.B, p.T, p.D, p.H}};
    RUN(&j, k_attention_forward, &a);
    res = PyTuple_Pack(2, p.out, p.att);
done:
    af_owned_release(&p.own);
    return res;
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_attention_backward_args p;
    PARSE(attention_backward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.dqkv, AF_CUDA_OUT);
    job_scratch(&j, (size_t)PyArray_SIZE(p.att));
    job_add(&j, p.dout, AF_CUDA_IN);
    job_add(&j, p.qkv, AF_CUDA_IN);
    job_add(&j, p.att, AF_CUDA_IN);
    args_t a = {{p.B, p.T, p.D, p.H}};
    RUN(&j, k_attention_backward, &a);
    res = PyTuple_Pack(1, p.dqkv);
done:
    af_owned_release(&p.own);
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

/* forward: img -> patches; backward / af_unpatchify: patches -> img. `tuple`: wrap the output
 * in a 1-tuple (the backward's convention). */
static PyObject *run_patchify(af_patchify_args *p, af_cuda_fn fn, int to_image, int tuple) {
    PyObject *res = NULL;
    PyArrayObject *out = to_image ? p->img : p->patches, *in = to_image ? p->patches : p->img;
    job_t j = {0};
    job_add(&j, out, AF_CUDA_OUT);
    job_add(&j, in, AF_CUDA_IN);
    args_t a = {{p->B, p->C, p->S, p->P, p->order}};
    RUN(&j, fn, &a);
    res = tuple ? PyTuple_Pack(1, out) : Py_NewRef(out);
done:
    af_owned_release(&p->own);
    return res;
}

static PyObject *py_patchify_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_patchify_args p;
    PARSE(patchify_forward, p);
    return run_patchify(&p, k_patchify_forward, 0, 0);
}

static PyObject *py_patchify_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_patchify_args p;
    if (af_parse_patches_to_image(args, kw, "Oiii|i:patchify_backward", &p) < 0) return NULL;
    return run_patchify(&p, k_patchify_backward, 1, 1);
}

static PyObject *py_unpatchify(PyObject *self, PyObject *args, PyObject *kw) {
    af_patchify_args p;
    if (af_parse_patches_to_image(args, kw, "Oiii|i:unpatchify", &p) < 0) return NULL;
    return run_patchify(&p, k_unpatchify, 1, 0);
}

/* ------------------------------------------------------------------ l2norm */

ADAPTER(l2norm_forward) {
    return af_cuda_l2norm_forward(c, d[0], d[1], d[2], A->i[0], A->i[1], A->f[0]);
}
ADAPTER(l2norm_backward) {
    return af_cuda_l2norm_backward(c, d[0], d[1], d[2], d[3], A->i[0], A->i[1], A->f[0]);
}

static PyObject *py_l2norm_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_l2norm_forward_args p;
    PARSE(l2norm_forward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.out, AF_CUDA_OUT);
    job_add(&j, p.norm, AF_CUDA_OUT);
    job_add(&j, p.inp, AF_CUDA_IN);
    args_t a = {{p.N, p.C}, {p.eps}};
    RUN(&j, k_l2norm_forward, &a);
    res = PyTuple_Pack(2, p.out, p.norm);
done:
    af_owned_release(&p.own);
    return res;
}

static PyObject *py_l2norm_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_l2norm_backward_args p;
    PARSE(l2norm_backward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.dinp, AF_CUDA_OUT);
    job_add(&j, p.dout, AF_CUDA_IN);
    job_add(&j, p.inp, AF_CUDA_IN);
    job_add(&j, p.norm, AF_CUDA_IN);
    args_t a = {{p.N, p.C}, {p.eps}};
    RUN(&j, k_l2norm_backward, &a);
    res = PyTuple_Pack(1, p.dinp);
done:
    af_owned_release(&p.own);
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
    af_wn_linear_forward_args p;
    PARSE(wn_linear_forward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.out, AF_CUDA_OUT);
    job_add(&j, p.w_eff, AF_CUDA_OUT);
    job_add(&j, p.vnorm, AF_CUDA_OUT);
    job_add(&j, p.inp, AF_CUDA_IN);
    job_add(&j, p.v, AF_CUDA_IN);
    args_t a = {{p.N, p.C, p.K}};
    RUN(&j, k_wn_linear_forward, &a);
    res = PyTuple_Pack(3, p.out, p.w_eff, p.vnorm);
done:
    af_owned_release(&p.own);
    return res;
}

static PyObject *py_wn_linear_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_wn_linear_backward_args p;
    PARSE(wn_linear_backward, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.dinp, AF_CUDA_OUT);
    job_add(&j, p.dv, AF_CUDA_OUT);
    job_scratch(&j, (size_t)p.K * p.C);
    job_add(&j, p.dout, AF_CUDA_IN);
    job_add(&j, p.inp, AF_CUDA_IN);
    job_add(&j, p.w_eff, AF_CUDA_IN);
    job_add(&j, p.vnorm, AF_CUDA_IN);
    args_t a = {{p.N, p.C, p.K}};
    RUN(&j, k_wn_linear_backward, &a);
    res = PyTuple_Pack(2, p.dinp, p.dv);
done:
    af_owned_release(&p.own);
    return res;
}

/* ------------------------------------------------------------------ adamw */

ADAPTER(adamw_update) {
    return af_cuda_adamw_update(c, d[0], d[1], d[2], d[3], A->n, A->f[0], A->f[1], A->f[2],
                                A->f[3], A->f[4], A->i[0]);
}

static PyObject *py_adamw_update(PyObject *self, PyObject *args, PyObject *kw) {
    af_adamw_args p;
    PARSE(adamw_update, p);
    PyObject *res = NULL;
    job_t j = {0};
    job_add(&j, p.params, AF_CUDA_INOUT);
    job_add(&j, p.grads, AF_CUDA_IN);
    job_add(&j, p.m, AF_CUDA_INOUT);
    job_add(&j, p.v, AF_CUDA_INOUT);
    args_t a = {{p.t}, {p.lr, p.beta1, p.beta2, p.eps, p.weight_decay}, p.n};
    RUN(&j, k_adamw_update, &a);
    res = Py_NewRef(Py_None);
done:
    af_owned_release(&p.own);
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
    af_cuda_context *ctx = af_test_ctx_acquire(&g_test);
    if (ctx == NULL) return NULL;
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
    af_test_ctx_release(&g_test);
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
    if (af_check_positive_int(N, "N") < 0 || af_check_positive_int(C, "C") < 0 ||
        af_check_positive_int(OC, "OC") < 0 || af_check_positive_int(iters, "iters") < 0)
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
    if (af_check_positive_int(B, "B") < 0 || af_check_positive_int(T, "T") < 0 ||
        af_check_positive_int(D, "D") < 0 || af_check_positive_int(H, "H") < 0 ||
        af_check_positive_int(iters, "iters") < 0)
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
    af_cuda_context *ctx = af_test_ctx_get(&g_test);
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
    AF_OP_METHODS(F),
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
