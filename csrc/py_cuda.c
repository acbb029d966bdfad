/* afire._C.cuda: whether this build and machine can run the CUDA backend. Builds without
 * CUDA answer is_available() == False and raise a clear RuntimeError on use. */
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

static PyMethodDef cuda_methods[] = {
    {"compiled", py_compiled, METH_NOARGS, "compiled() -> bool: the build contains cuda/"},
    {"device_count", py_device_count, METH_NOARGS, "device_count() -> int (0 without a GPU)"},
    {"versions", py_versions, METH_NOARGS, "versions() -> dict of linked CUDA library versions"},
    {"rand_uniform", (PyCFunction)(void (*)(void))py_rand_uniform, METH_VARARGS | METH_KEYWORDS,
     "rand_uniform(n, seed=0, stream=0, offset=0) -> float32[n], drawn on the GPU"},
    {NULL}};

int af_register_cuda(PyObject *m) {
    return af_add_submodule(m, "cuda", cuda_methods, "CUDA backend availability.") ? 0 : -1;
}
