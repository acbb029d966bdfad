/* afire._C.Tensor: construction from NumPy (zero-copy), buffer protocol,
 * __array_interface__, __dlpack__ / __dlpack_device__. */
#include "py_tensor.h"

#include "common.h"
#include "py_dlpack.h"

size_t af_dtype_size(af_dtype t) {
    switch (t) {
    case AF_FLOAT32:
    case AF_INT32: return 4;
    case AF_UINT8: return 1;
    case AF_BFLOAT16: return 2;
    }
    return 0;
}

static const char *dtype_name(af_dtype t) {
    switch (t) {
    case AF_FLOAT32: return "float32";
    case AF_INT32: return "int32";
    case AF_UINT8: return "uint8";
    case AF_BFLOAT16: return "bfloat16";
    }
    return "?";
}

static int dtype_from_name(const char *s, af_dtype *out) {
    static const af_dtype all[] = {AF_FLOAT32, AF_INT32, AF_UINT8};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (strcmp(s, dtype_name(all[i])) == 0) { *out = all[i]; return 0; }
    return -1;
}

static void set_contiguous_strides(AfTensor *t) {
    int64_t s = (int64_t)af_dtype_size(t->dtype);
    for (int i = t->ndim - 1; i >= 0; i--) {
        t->strides[i] = s;
        s *= t->shape[i];
    }
    for (int i = 0; i < t->ndim; i++) {
        t->shape_ss[i] = (Py_ssize_t)t->shape[i];
        t->strides_ss[i] = (Py_ssize_t)t->strides[i];
    }
}

static int64_t numel(const AfTensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

AfTensor *af_tensor_new(af_dtype dtype, int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > AF_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "shape must have at most %d dimensions", AF_MAX_DIMS);
        return NULL;
    }
    size_t n;
    af_status st = af_numel(shape, ndim, &n);
    if (st != AF_OK) return (AfTensor *)af_raise(st);
    void *data = af_calloc(n, af_dtype_size(dtype));
    if (data == NULL) return (AfTensor *)af_raise(AF_ENOMEM);
    AfTensor *t = PyObject_New(AfTensor, &AfTensor_Type);
    if (t == NULL) { af_free(data); return NULL; }
    t->data = data;
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    set_contiguous_strides(t);
    t->device = AF_DEVICE_CPU;
    t->device_id = 0;
    t->readonly = 0;
    t->owner = NULL;
    t->free_fn = af_free;
    return t;
}

static void tensor_dealloc(AfTensor *t) {
    if (t->owner != NULL) Py_DECREF(t->owner);
    else if (t->data != NULL && t->free_fn != NULL) t->free_fn(t->data);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* Tensor(array): wrap a C-contiguous NumPy array of float32/int32/uint8 without copying. */
static PyObject *tensor_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"array", NULL};
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Tensor", kwlist, &obj)) return NULL;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "Tensor(array): array must be a numpy.ndarray, got %s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    af_dtype dt;
    switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32: dt = AF_FLOAT32; break;
    case NPY_INT32: dt = AF_INT32; break;
    case NPY_UINT8: dt = AF_UINT8; break;
    default:
        PyErr_Format(PyExc_TypeError,
                     "Tensor(array): array dtype must be float32, int32 or uint8, got %s",
                     PyArray_DESCR(a)->typeobj->tp_name);
        return NULL;
    }
    if (PyArray_NDIM(a) > AF_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "Tensor(array): array has %d dimensions, at most %d allowed",
                     PyArray_NDIM(a), AF_MAX_DIMS);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_SetString(PyExc_ValueError,
                        "Tensor(array): array must be C-contiguous, aligned and native byte "
                        "order (use numpy.ascontiguousarray)");
        return NULL;
    }
    AfTensor *t = (AfTensor *)type->tp_alloc(type, 0);
    if (t == NULL) return NULL;
    t->data = PyArray_DATA(a);
    t->dtype = dt;
    t->ndim = PyArray_NDIM(a);
    for (int i = 0; i < t->ndim; i++) t->shape[i] = PyArray_DIM(a, i);
    set_contiguous_strides(t);
    t->device = AF_DEVICE_CPU;
    t->device_id = 0;
    t->readonly = !PyArray_ISWRITEABLE(a);
    Py_INCREF(obj);
    t->owner = obj;
    t->free_fn = NULL;
    return (PyObject *)t;
}

static int parse_shape(PyObject *shape, int64_t *dims, int *ndim) {
    PyObject *seq = PySequence_Fast(shape, "shape must be a sequence of ints");
    if (seq == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > AF_MAX_DIMS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "shape must have at most %d dimensions", AF_MAX_DIMS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) { Py_DECREF(seq); return -1; }
        if (v < 0) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "shape[%zd] must be >= 0, got %lld", i, v);
            return -1;
        }
        dims[i] = v;
    }
    *ndim = (int)n;
    Py_DECREF(seq);
    return 0;
}

/* Tensor.zeros(shape, dtype="float32") */
static PyObject *tensor_zeros(PyObject *cls, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"shape", "dtype", NULL};
    PyObject *shape;
    const char *dtname = "float32";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|s:zeros", kwlist, &shape, &dtname))
        return NULL;
    af_dtype dt;
    if (dtype_from_name(dtname, &dt) != 0) {
        PyErr_Format(PyExc_TypeError, "dtype must be 'float32', 'int32' or 'uint8', got '%s'",
                     dtname);
        return NULL;
    }
    int64_t dims[AF_MAX_DIMS];
    int ndim;
    if (parse_shape(shape, dims, &ndim) != 0) return NULL;
    return (PyObject *)af_tensor_new(dt, ndim, dims);
}

static PyObject *tuple_of(const int64_t *v, int n) {
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (int i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(v[i]));
    return t;
}

static PyObject *get_shape(AfTensor *t, void *c) { return tuple_of(t->shape, t->ndim); }
static PyObject *get_strides(AfTensor *t, void *c) { return tuple_of(t->strides, t->ndim); }
static PyObject *get_ndim(AfTensor *t, void *c) { return PyLong_FromLong(t->ndim); }
static PyObject *get_dtype(AfTensor *t, void *c) { return PyUnicode_FromString(dtype_name(t->dtype)); }
static PyObject *get_nbytes(AfTensor *t, void *c) {
    return PyLong_FromLongLong(numel(t) * (int64_t)af_dtype_size(t->dtype));
}
static PyObject *get_device(AfTensor *t, void *c) {
    if (t->device == AF_DEVICE_CPU) return PyUnicode_FromString("cpu");
    return PyUnicode_FromFormat("cuda:%d", t->device_id);
}

static const char *typestr(af_dtype t) {
    switch (t) {
    case AF_FLOAT32: return "<f4";
    case AF_INT32: return "<i4";
    case AF_UINT8: return "|u1";
    case AF_BFLOAT16: return "<V2";
    }
    return "|V1";
}

static int require_host(AfTensor *t, const char *what) {
    if (t->device != AF_DEVICE_CPU) {
        PyErr_Format(PyExc_TypeError, "%s is only available for CPU tensors; this tensor is on %s",
                     what, t->device == AF_DEVICE_CUDA ? "cuda" : "another device");
        return -1;
    }
    return 0;
}

static PyObject *get_array_interface(AfTensor *t, void *c) {
    if (require_host(t, "__array_interface__") != 0) return NULL;
    PyObject *shape = tuple_of(t->shape, t->ndim);
    if (shape == NULL) return NULL;
    return Py_BuildValue("{s:N,s:s,s:(N,O),s:O,s:i}", "shape", shape, "typestr",
                         typestr(t->dtype), "data", PyLong_FromVoidPtr(t->data),
                         t->readonly ? Py_True : Py_False, "strides", Py_None, "version", 3);
}

static int tensor_getbuffer(AfTensor *t, Py_buffer *view, int flags) {
    if (require_host(t, "the buffer protocol") != 0) return -1;
    if ((flags & PyBUF_WRITABLE) && t->readonly) {
        PyErr_SetString(PyExc_BufferError, "tensor is read-only");
        return -1;
    }
    if (t->dtype == AF_BFLOAT16 && (flags & PyBUF_FORMAT)) {
        PyErr_SetString(PyExc_BufferError, "bfloat16 has no buffer-protocol format; use __dlpack__");
        return -1;
    }
    view->obj = (PyObject *)t;
    Py_INCREF(t);
    view->buf = t->data;
    view->itemsize = (Py_ssize_t)af_dtype_size(t->dtype);
    view->len = (Py_ssize_t)numel(t) * view->itemsize;
    view->readonly = t->readonly;
    view->ndim = t->ndim;
    const char *fmt = t->dtype == AF_FLOAT32 ? "f" : t->dtype == AF_INT32 ? "i" : "B";
    view->format = (flags & PyBUF_FORMAT) ? (char *)fmt : NULL;
    view->shape = (flags & PyBUF_ND) ? t->shape_ss : NULL;
    view->strides = (flags & PyBUF_STRIDES) == PyBUF_STRIDES ? t->strides_ss : NULL;
    view->suboffsets = NULL;
    view->internal = NULL;
    return 0;
}

static PyBufferProcs tensor_as_buffer = {(getbufferproc)tensor_getbuffer, NULL};

/* ---- DLPack ---- */

static PyObject *tensor_dlpack(AfTensor *t, PyObject *args, PyObject *kwds) {
    PyObject *stream, *dl_device, *copy;
    if (af_dlpack_args(args, kwds, &stream, &dl_device, &copy) < 0 ||
        af_dlpack_refuse_copy(copy) < 0)
        return NULL;
    size_t isz = af_dtype_size(t->dtype);
    int64_t strides[AF_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) strides[i] = t->strides[i] / (int64_t)isz;
    DLDevice device = {t->device == AF_DEVICE_CUDA ? kDLCUDA : kDLCPU, t->device_id};
    DLDataType dtype = {t->dtype == AF_FLOAT32 ? kDLFloat
                        : t->dtype == AF_INT32 ? kDLInt
                        : t->dtype == AF_UINT8 ? kDLUInt : kDLBfloat,
                        (uint8_t)(8 * isz), 1};
    return af_dlpack_capsule((PyObject *)t, t->data, device, dtype, t->ndim, t->shape, strides);
}

static PyObject *tensor_dlpack_device(AfTensor *t, PyObject *unused) {
    return Py_BuildValue("(ii)", t->device == AF_DEVICE_CUDA ? kDLCUDA : kDLCPU, t->device_id);
}

static PyObject *tensor_numpy(AfTensor *t, PyObject *unused) {
    if (require_host(t, "numpy()") != 0) return NULL;
    return PyArray_FromAny((PyObject *)t, NULL, 0, 0, 0, NULL);
}

static PyObject *tensor_repr(AfTensor *t) {
    char buf[256];
    int k = snprintf(buf, sizeof buf, "Tensor(shape=(");
    for (int i = 0; i < t->ndim && k < 200; i++)
        k += snprintf(buf + k, sizeof buf - k, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (t->ndim == 1) k += snprintf(buf + k, sizeof buf - k, ",");
    snprintf(buf + k, sizeof buf - k, "), dtype=%s, device=%s)", dtype_name(t->dtype),
             t->device == AF_DEVICE_CPU ? "cpu" : "cuda");
    return PyUnicode_FromString(buf);
}

static PyGetSetDef tensor_getset[] = {
    {"shape", (getter)get_shape, NULL, "tuple of dimension sizes", NULL},
    {"strides", (getter)get_strides, NULL, "tuple of strides in bytes", NULL},
    {"ndim", (getter)get_ndim, NULL, "number of dimensions", NULL},
    {"dtype", (getter)get_dtype, NULL, "'float32', 'int32' or 'uint8'", NULL},
    {"nbytes", (getter)get_nbytes, NULL, "size of the data in bytes", NULL},
    {"device", (getter)get_device, NULL, "'cpu' or 'cuda:N'", NULL},
    {"__array_interface__", (getter)get_array_interface, NULL, "NumPy array interface v3", NULL},
    {NULL}};

static PyMethodDef tensor_methods[] = {
    {"zeros", (PyCFunction)(void (*)(void))tensor_zeros, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "Tensor.zeros(shape, dtype='float32') -> a new zero-filled CPU tensor"},
    {"__dlpack__", (PyCFunction)(void (*)(void))tensor_dlpack, METH_VARARGS | METH_KEYWORDS,
     "DLPack export (zero-copy)"},
    {"__dlpack_device__", (PyCFunction)tensor_dlpack_device, METH_NOARGS,
     "(device_type, device_id) as DLPack defines them"},
    {"numpy", (PyCFunction)tensor_numpy, METH_NOARGS, "a zero-copy numpy.ndarray view"},
    {NULL}};

PyTypeObject AfTensor_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.Tensor",
    .tp_basicsize = sizeof(AfTensor),
    .tp_dealloc = (destructor)tensor_dealloc,
    .tp_repr = (reprfunc)tensor_repr,
    .tp_as_buffer = &tensor_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tensor(array): a zero-copy view of a C-contiguous float32/int32/uint8 ndarray.\n"
              "Exports the buffer protocol, __array_interface__ and DLPack.",
    .tp_methods = tensor_methods,
    .tp_getset = tensor_getset,
    .tp_new = tensor_new,
};

int af_register_tensor(PyObject *m) {
    if (PyType_Ready(&AfTensor_Type) < 0) return -1;
    Py_INCREF(&AfTensor_Type);
    if (PyModule_AddObject(m, "Tensor", (PyObject *)&AfTensor_Type) < 0) {
        Py_DECREF(&AfTensor_Type);
        return -1;
    }
    return 0;
}
