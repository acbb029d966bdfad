/* afire._C.rng: the counter-based generator exposed for tests and inspection. */
#include "py_util.h"
#include "rng.h"

/* philox4x32_10((c0,c1,c2,c3), (k0,k1)) -> (x0,x1,x2,x3): the raw block function. */
static PyObject *py_philox(PyObject *self, PyObject *args) {
    unsigned int c[4], k[2];
    if (!PyArg_ParseTuple(args, "(IIII)(II):philox4x32_10", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]))
        return NULL;
    af_u32x4 ctr = {{c[0], c[1], c[2], c[3]}};
    af_u32x4 r = philox4x32_10(ctr, k[0], k[1]);
    return Py_BuildValue("(IIII)", r.v[0], r.v[1], r.v[2], r.v[3]);
}

enum { KIND_U32, KIND_UNIFORM, KIND_NORMAL, KIND_INT };

static PyObject *draw(PyObject *args, PyObject *kw, int kind) {
    static char *kw_plain[] = {"n", "seed", "stream", "offset", NULL};
    static char *kw_int[] = {"n", "low", "high", "seed", "stream", "offset", NULL};
    Py_ssize_t n;
    unsigned long long seed = 0, stream = 0, offset = 0;
    long long lo = 0, hi = 0;
    int ok = kind == KIND_INT
                 ? PyArg_ParseTupleAndKeywords(args, kw, "nLL|KKK", kw_int, &n, &lo, &hi, &seed,
                                               &stream, &offset)
                 : PyArg_ParseTupleAndKeywords(args, kw, "n|KKK", kw_plain, &n, &seed, &stream,
                                               &offset);
    if (!ok) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    if (kind == KIND_INT && (lo > hi || (unsigned long long)(hi - lo) > 0xFFFFFFFFull)) {
        PyErr_Format(PyExc_ValueError, "need low <= high and high - low < 2**32, got [%lld, %lld]", lo, hi);
        return NULL;
    }
    npy_intp shape[1] = {n};
    int type = kind == KIND_U32 ? NPY_UINT32 : kind == KIND_INT ? NPY_INT64 : NPY_FLOAT32;
    PyArrayObject *out = af_new_array(1, shape, type);
    if (out == NULL) return NULL;
    void *p = PyArray_DATA(out);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t j = offset + (uint64_t)i;
        switch (kind) {
        case KIND_U32: ((uint32_t *)p)[i] = af_rand_u32(seed, stream, j); break;
        case KIND_UNIFORM: ((float *)p)[i] = af_rand_uniform(seed, stream, j); break;
        case KIND_NORMAL: ((float *)p)[i] = af_rand_normal(seed, stream, j); break;
        case KIND_INT: ((int64_t *)p)[i] = af_rand_int(seed, stream, j, lo, hi); break;
        }
    }
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

static PyObject *py_u32(PyObject *s, PyObject *a, PyObject *k) { return draw(a, k, KIND_U32); }
static PyObject *py_uniform(PyObject *s, PyObject *a, PyObject *k) { return draw(a, k, KIND_UNIFORM); }
static PyObject *py_normal(PyObject *s, PyObject *a, PyObject *k) { return draw(a, k, KIND_NORMAL); }
static PyObject *py_integers(PyObject *s, PyObject *a, PyObject *k) { return draw(a, k, KIND_INT); }

static PyObject *py_stream(PyObject *self, PyObject *args) {
    unsigned int purpose, item;
    unsigned long long step;
    if (!PyArg_ParseTuple(args, "IKI:stream", &purpose, &step, &item)) return NULL;
    return PyLong_FromUnsignedLongLong(af_stream(purpose, step, item));
}

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef rng_methods[] = {
    {"philox4x32_10", py_philox, METH_VARARGS, "philox4x32_10(counter4, key2) -> 4 uint32"},
    {"u32", KW py_u32, METH_VARARGS | METH_KEYWORDS, "u32(n, seed=0, stream=0, offset=0) -> uint32[n]"},
    {"uniform", KW py_uniform, METH_VARARGS | METH_KEYWORDS,
     "uniform(n, seed=0, stream=0, offset=0) -> float32[n] in [0, 1)"},
    {"normal", KW py_normal, METH_VARARGS | METH_KEYWORDS,
     "normal(n, seed=0, stream=0, offset=0) -> float32[n], standard normal (Box-Muller)"},
    {"integers", KW py_integers, METH_VARARGS | METH_KEYWORDS,
     "integers(n, low, high, seed=0, stream=0, offset=0) -> int64[n] in [low, high] inclusive"},
    {"stream", py_stream, METH_VARARGS, "stream(purpose, step, item) -> 64-bit stream id"},
    {NULL}};

int af_register_rng(PyObject *m) {
    return af_add_submodule(m, "rng", rng_methods, "Philox4x32-10 counter-based random numbers.")
               ? 0 : -1;
}
