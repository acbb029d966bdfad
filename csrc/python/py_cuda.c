/* afire._C_cuda.cuda: what the CUDA backend can do on this machine, the GPU twins of every
 * op of the table (py_op_table.c: the arguments, checks and results of the CPU twins in
 * afire._C.ops / objective / slm), and GPU timing for the benchmarks. Compiled only into
 * afire._C_cuda; afire.cuda raises a clear RuntimeError when the build has no CUDA. */
#include "py_op.h" /* Python.h first, as CPython requires */

static PyObject *py_device_count(PyObject *self, PyObject *unused) {
    int n = 0;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_device_count(&n);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) return af_raise(st);
    return PyLong_FromLong(n);
}

static PyObject *py_compiled(PyObject *self, PyObject *unused) {
    Py_RETURN_TRUE;
}

static PyObject *py_versions(PyObject *self, PyObject *unused) {
    int cudart = 0, nccl = 0;
    size_t lt = 0, dnn = 0;
    af_status st = af_cuda_versions(&cudart, &lt, &dnn, &nccl);
    if (st != AF_OK) return af_raise(st);
    return Py_BuildValue("{s:i,s:n,s:n,s:i}", "cudart", cudart, "cublaslt", (Py_ssize_t)lt,
                         "cudnn", (Py_ssize_t)dnn, "nccl", nccl);
}

static PyObject *py_fast_path_status(PyObject *self, PyObject *unused) {
    char buf[1200];
    af_cuda_fast_status(buf, sizeof buf);
    return PyUnicode_FromString(buf);
}

static PyObject *py_memory_info(PyObject *self, PyObject *args) {
    int device = 0;
    if (!PyArg_ParseTuple(args, "|i", &device)) return NULL;
    size_t free_b = 0, total_b = 0;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_mem_info(device, &free_b, &total_b);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) return af_raise(st);
    return Py_BuildValue("(nn)", (Py_ssize_t)free_b, (Py_ssize_t)total_b);
}

/* rand_uniform(n, seed=0, stream=0, offset=0): the GPU draw of afire._C.rng.uniform. */
static PyObject *py_rand_uniform(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"n", "seed", "stream", "offset", NULL};
    Py_ssize_t n;
    unsigned long long seed = 0, stream = 0, offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n|KKK", kwlist, &n, &seed, &stream, &offset))
        return NULL;
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
}

/* ------------------------------------------------------------------ GPU timing */

static int positive(int v, const char *name) {
    if (v >= 1) return 0;
    PyErr_Format(PyExc_ValueError, "%s must be a positive int, got %d", name, v);
    return -1;
}

static int timing_args(int warmup, int iters) {
    if (positive(iters, "iters") < 0) return -1;
    if (warmup >= 0) return 0;
    PyErr_SetString(PyExc_ValueError, "warmup must be >= 0");
    return -1;
}

static PyObject *py_time_linear(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"N", "C", "OC", "warmup", "iters", "tf32", NULL};
    int N, C, OC, warmup = 3, iters = 20, tf32 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iii|iip:time_linear", kwl, &N, &C, &OC, &warmup,
                                     &iters, &tf32))
        return NULL;
    if (positive(N, "N") < 0 || positive(C, "C") < 0 ||
        positive(OC, "OC") < 0 || timing_args(warmup, iters) < 0)
        return NULL;
    const char *names[] = {"N", "C", "OC"};
    const int64_t values[] = {N, C, OC};
    return af_op_time_pair("linear_forward", "linear_backward", names, values, 3, warmup, iters,
                           tf32);
}

static PyObject *py_time_attention(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"B", "T", "D", "H", "warmup", "iters", "tf32", NULL};
    int B, T, D, H, warmup = 3, iters = 20, tf32 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiii|iip:time_attention", kwl, &B, &T, &D, &H,
                                     &warmup, &iters, &tf32))
        return NULL;
    if (positive(B, "B") < 0 || positive(T, "T") < 0 ||
        positive(D, "D") < 0 || positive(H, "H") < 0 ||
        timing_args(warmup, iters) < 0)
        return NULL;
    if (D % H != 0) {
        PyErr_Format(PyExc_ValueError, "need D %% H == 0 (D=%d H=%d)", D, H);
        return NULL;
    }
    const char *names[] = {"B", "T", "D", "H"};
    const int64_t values[] = {B, T, D, H};
    return af_op_time_pair("attention_forward", "attention_backward", names, values, 4, warmup,
                           iters, tf32);
}

static PyObject *py_set_tf32(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    af_cuda_context *ctx = af_op_context();
    if (ctx == NULL) return NULL;
    af_status st = af_cuda_context_set_tf32(ctx, on);
    if (st != AF_OK) return af_raise(st);
    Py_RETURN_NONE;
}

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS
static PyMethodDef cuda_methods[] = {
    {"compiled", py_compiled, METH_NOARGS, "compiled() -> bool: the build contains cuda/"},
    {"device_count", py_device_count, METH_NOARGS, "device_count() -> int (0 without a GPU)"},
    {"versions", py_versions, METH_NOARGS, "versions() -> dict of linked CUDA library versions"},
    {"fast_path_status", py_fast_path_status, METH_NOARGS,
     "fast_path_status() -> str: what the fast bf16 path (AFIRE_CUDA_FAST=1) used in this "
     "process: cuBLASLt plans and epilogues, cuDNN fused SDPA or our attention, and why"},
    {"memory_info", py_memory_info, METH_VARARGS,
     "memory_info(device=0) -> (free_bytes, total_bytes) of device memory (cudaMemGetInfo)"},
    {"rand_uniform", KW(py_rand_uniform),
     "rand_uniform(n, seed=0, stream=0, offset=0) -> float32[n], drawn on the GPU"},
    {"set_tf32", py_set_tf32, METH_O,
     "set_tf32(on): let the shared context's GEMMs use TF32 (off by default: exact fp32)"},
    {"time_linear", KW(py_time_linear),
     "time_linear(N, C, OC, warmup=3, iters=20, tf32=False) -> {'forward_ms', 'backward_ms'}: "
     "mean GPU ms per call (CUDA events)"},
    {"time_attention", KW(py_time_attention),
     "time_attention(B, T, D, H, warmup=3, iters=20, tf32=False) -> {'forward_ms', "
     "'backward_ms'}: mean GPU ms per call (CUDA events)"},
    {NULL}};
#undef KW

int af_register_cuda(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "cuda", cuda_methods,
                                     "CUDA backend: availability and GPU twins of afire._C.ops, "
                                     "afire._C.objective and afire._C.slm.slm_generate.");
    if (sub == NULL || af_op_register(sub, NULL) < 0) return -1;
    if (PyModule_AddIntConstant(sub, "PATCH_PQC", 0) < 0 ||
        PyModule_AddIntConstant(sub, "PATCH_CPQ", 1) < 0)
        return -1;
    return 0;
}
