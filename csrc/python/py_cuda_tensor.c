/* afire._C_cuda.cuda.DeviceTensor (py_cuda_tensor.h): GPU memory that PyTorch and CuPy can
 * take without a copy.
 *
 *   torch.from_dlpack(t)   -> __dlpack_device__() == (kDLCUDA, id), __dlpack__(stream=...)
 *   cupy.asarray(t)        -> __cuda_array_interface__ (v3)
 *   t.numpy() / t.to_host() -> a host copy
 *
 * Exported memory stays alive while any consumer holds it: the DLPack capsule (and CuPy's
 * view through the interface) keeps a reference to the DeviceTensor, which owns the
 * allocation or references its owner. */
#include "py_cuda_tensor.h"

#include <stdlib.h>
#include <string.h>

#include "../cuda/device_tensor.cuh"
#include "common.h"
#include "cuda_api.h"
#include "py_dlpack.h"

#define DT_MAX_DIMS 8

typedef struct {
    PyObject_HEAD
    void *data;               /* device pointer; NULL when empty                        */
    af_dev_dtype dtype;
    int ndim;
    int device;               /* CUDA device index                                      */
    int64_t shape[DT_MAX_DIMS];
    PyObject *owner;          /* NULL: `data` is ours (af_cuda_bytes_free); else keeps it */
} DeviceTensorObject;

static PyTypeObject DeviceTensorType;

static size_t dtype_size(af_dev_dtype t) { return t == AF_DT_UINT8 ? 1 : 4; }

static const char *dtype_name(af_dev_dtype t) {
    return t == AF_DT_FLOAT32 ? "float32" : t == AF_DT_INT32 ? "int32" : "uint8";
}

static int npy_type(af_dev_dtype t) {
    return t == AF_DT_FLOAT32 ? NPY_FLOAT32 : t == AF_DT_INT32 ? NPY_INT32 : NPY_UINT8;
}

static int64_t numel(const DeviceTensorObject *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static size_t nbytes(const DeviceTensorObject *t) {
    return (size_t)numel(t) * dtype_size(t->dtype);
}

/* ---- creation ---- */

static DeviceTensorObject *alloc_object(af_dev_dtype dtype, int ndim, const int64_t *shape,
                                        int device) {
    DeviceTensorObject *t = PyObject_New(DeviceTensorObject, &DeviceTensorType);
    if (t == NULL) return NULL;
    t->data = NULL;
    t->dtype = dtype;
    t->ndim = ndim;
    t->device = device;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->owner = NULL;
    return t;
}

static int check_device(int device) {
    int count = 0;
    af_cuda_device_count(&count);
    if (device < 0 || device >= count) {
        PyErr_Format(PyExc_ValueError, "device %d out of range: %d CUDA device(s) visible",
                     device, count);
        return -1;
    }
    return 0;
}

PyObject *af_device_tensor_zeros(af_dev_dtype dtype, int ndim, const int64_t *shape, int device) {
    if (ndim < 0 || ndim > DT_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "shape must have at most %d dimensions", DT_MAX_DIMS);
        return NULL;
    }
    size_t n, bytes;
    af_status st = af_numel(shape, ndim, &n);
    if (st != AF_OK) return af_raise(st);
    if (!af_mul_size(n, dtype_size(dtype), &bytes)) return PyErr_NoMemory();
    void *data = NULL;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_bytes_alloc(&data, bytes, device);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) return af_raise(st);
    DeviceTensorObject *t = alloc_object(dtype, ndim, shape, device);
    if (t == NULL) {
        af_cuda_bytes_free(data, device);
        return NULL;
    }
    t->data = data;
    return (PyObject *)t;
}

void *af_device_tensor_data(PyObject *t) { return ((DeviceTensorObject *)t)->data; }

static void dt_dealloc(DeviceTensorObject *t) {
    if (t->owner != NULL) {
        Py_DECREF(t->owner);
    } else if (t->data != NULL) {
        void *data = t->data;
        int device = t->device;
        Py_BEGIN_ALLOW_THREADS  /* the free waits for the device */
        af_cuda_bytes_free(data, device);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* DeviceTensor.from_numpy(array, device=0): upload a float32/int32/uint8 ndarray. */
static PyObject *dt_from_numpy(PyObject *cls, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"array", "device", NULL};
    PyObject *obj;
    int device = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|i:from_numpy", kwlist, &obj, &device))
        return NULL;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "array must be a numpy.ndarray, got %s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    af_dev_dtype dt;
    switch (PyArray_TYPE((PyArrayObject *)obj)) {
    case NPY_FLOAT32: dt = AF_DT_FLOAT32; break;
    case NPY_INT32: dt = AF_DT_INT32; break;
    case NPY_UINT8: dt = AF_DT_UINT8; break;
    default:
        PyErr_Format(PyExc_TypeError, "array dtype must be float32, int32 or uint8, got %s",
                     PyArray_DESCR((PyArrayObject *)obj)->typeobj->tp_name);
        return NULL;
    }
    if (PyArray_NDIM((PyArrayObject *)obj) > DT_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "array has %d dimensions, at most %d allowed",
                     PyArray_NDIM((PyArrayObject *)obj), DT_MAX_DIMS);
        return NULL;
    }
    if (check_device(device) < 0) return NULL;
    PyArrayObject *a = (PyArrayObject *)PyArray_FromAny(
        obj, NULL, 0, 0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED, NULL);
    if (a == NULL) return NULL;
    int64_t shape[DT_MAX_DIMS];
    for (int i = 0; i < PyArray_NDIM(a); i++) shape[i] = PyArray_DIM(a, i);
    DeviceTensorObject *t =
        (DeviceTensorObject *)af_device_tensor_zeros(dt, PyArray_NDIM(a), shape, device);
    if (t != NULL) {
        af_status st;
        void *dst = t->data, *src = PyArray_DATA(a);
        size_t n = nbytes(t);
        Py_BEGIN_ALLOW_THREADS
        st = af_cuda_bytes_copy(dst, src, n, AF_COPY_H2D, device);
        Py_END_ALLOW_THREADS
        if (st != AF_OK) {
            Py_CLEAR(t);
            af_raise(st);
        }
    }
    Py_DECREF(a);
    return (PyObject *)t;
}

/* numpy() / to_host(): a host copy (waits for all work queued on the device). */
static PyObject *dt_numpy(DeviceTensorObject *t, PyObject *unused) {
    npy_intp shape[DT_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) shape[i] = (npy_intp)t->shape[i];
    PyArrayObject *out = af_new_array(t->ndim, shape, npy_type(t->dtype));
    if (out == NULL) return NULL;
    af_status st;
    void *dst = PyArray_DATA(out), *src = t->data;
    size_t n = nbytes(t);
    int device = t->device;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_bytes_copy(dst, src, n, AF_COPY_D2H, device);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        Py_DECREF(out);
        return af_raise(st);
    }
    return (PyObject *)out;
}

/* reshape(*shape) or reshape(shape): a view of the same memory (one -1 is inferred). */
static PyObject *dt_reshape(DeviceTensorObject *t, PyObject *args) {
    PyObject *seq = args;
    if (PyTuple_GET_SIZE(args) == 1 && !PyLong_Check(PyTuple_GET_ITEM(args, 0)))
        seq = PyTuple_GET_ITEM(args, 0);
    PyObject *fast = PySequence_Fast(seq, "reshape: shape must be ints or a sequence of ints");
    if (fast == NULL) return NULL;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(fast);
    if (nd > DT_MAX_DIMS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "reshape: at most %d dimensions", DT_MAX_DIMS);
        return NULL;
    }
    int64_t shape[DT_MAX_DIMS], known = 1;
    int infer = -1;
    for (Py_ssize_t i = 0; i < nd; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
        if (v == -1 && infer < 0) {
            infer = (int)i;
        } else if (v < 0) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError, "reshape: bad dimension %lld", v);
            return NULL;
        } else {
            known *= v;
        }
        shape[i] = v;
    }
    Py_DECREF(fast);
    int64_t n = numel(t);
    if (infer >= 0) {
        if (known == 0 || n % known != 0) {
            PyErr_Format(PyExc_ValueError, "reshape: cannot infer -1 for %lld elements",
                         (long long)n);
            return NULL;
        }
        shape[infer] = n / known;
        known = n;
    }
    if (known != n) {
        PyErr_Format(PyExc_ValueError, "reshape: the new shape has %lld elements, the tensor %lld",
                     (long long)known, (long long)n);
        return NULL;
    }
    DeviceTensorObject *v = alloc_object(t->dtype, (int)nd, shape, t->device);
    if (v == NULL) return NULL;
    v->data = t->data;
    v->owner = t->owner != NULL ? t->owner : (PyObject *)t;  /* the root owner: no chains */
    Py_INCREF(v->owner);
    return (PyObject *)v;
}

/* ---- __cuda_array_interface__ (version 3) ---- */

static PyObject *shape_tuple(const DeviceTensorObject *t) {
    PyObject *s = PyTuple_New(t->ndim);
    if (s == NULL) return NULL;
    for (int i = 0; i < t->ndim; i++) {
        PyObject *d = PyLong_FromLongLong(t->shape[i]);
        if (d == NULL) {
            Py_DECREF(s);
            return NULL;
        }
        PyTuple_SET_ITEM(s, i, d);
    }
    return s;
}

static PyObject *dt_cai(DeviceTensorObject *t, void *c) {
    const char *typestr = t->dtype == AF_DT_FLOAT32 ? "<f4" : t->dtype == AF_DT_INT32 ? "<i4" : "|u1";
    PyObject *shape = shape_tuple(t);
    if (shape == NULL) return NULL;
    /* strides None: C-contiguous. stream None: the producer synchronised before handing the
     * tensor out, so the data is ready on every stream. An empty tensor has pointer 0. */
    return Py_BuildValue("{s:N,s:s,s:(NO),s:O,s:O,s:i}", "shape", shape, "typestr", typestr,
                         "data", PyLong_FromVoidPtr(t->data), Py_False, "strides", Py_None,
                         "stream", Py_None, "version", 3);
}

/* ---- DLPack (legacy "dltensor" capsule, which every consumer accepts: py_dlpack.c) ---- */

static PyObject *dt_dlpack(DeviceTensorObject *t, PyObject *args, PyObject *kw) {
    PyObject *stream, *dl_device, *copy;
    if (af_dlpack_args(args, kw, &stream, &dl_device, &copy) < 0) return NULL;
    /* stream: the consumer's stream (an int; -1: no synchronisation wanted; 1, 2: the legacy
     * and per-thread default streams; 0 is disallowed by the standard as ambiguous). The
     * data is complete before any export, so no stream needs to wait for anything. */
    if (stream != Py_None) {
        long long s = PyLong_Check(stream) ? PyLong_AsLongLong(stream) : -2;
        if (s == -1 && PyErr_Occurred()) return NULL;
        if (s == 0 || s < -1) {
            PyErr_SetString(PyExc_ValueError, "__dlpack__: stream must be None, -1, 1, 2 or a "
                                              "CUDA stream pointer (0 is ambiguous)");
            return NULL;
        }
    }
    if (dl_device != Py_None) {
        int dev_type, dev_id;
        if (!PyArg_ParseTuple(dl_device, "ii:dl_device", &dev_type, &dev_id)) return NULL;
        if (dev_type != kDLCUDA || dev_id != t->device) {
            PyErr_Format(PyExc_BufferError, "__dlpack__: cannot export to device (%d, %d); the "
                         "tensor is on (%d, %d)", dev_type, dev_id, kDLCUDA, t->device);
            return NULL;
        }
    }
    if (af_dlpack_refuse_copy(copy) < 0) return NULL;
    DLDevice device = {kDLCUDA, t->device};
    DLDataType dtype = {t->dtype == AF_DT_FLOAT32 ? kDLFloat : t->dtype == AF_DT_INT32 ? kDLInt : kDLUInt,
                        (uint8_t)(8 * dtype_size(t->dtype)), 1};
    return af_dlpack_capsule((PyObject *)t, t->data, device, dtype, t->ndim, t->shape, NULL);
}

static PyObject *dt_dlpack_device(DeviceTensorObject *t, PyObject *unused) {
    return Py_BuildValue("(ii)", kDLCUDA, t->device);
}

/* ---- attributes ---- */

static PyObject *dt_shape(DeviceTensorObject *t, void *c) { return shape_tuple(t); }
static PyObject *dt_dtype(DeviceTensorObject *t, void *c) {
    return PyUnicode_FromString(dtype_name(t->dtype));
}
static PyObject *dt_ndim(DeviceTensorObject *t, void *c) { return PyLong_FromLong(t->ndim); }
static PyObject *dt_size(DeviceTensorObject *t, void *c) { return PyLong_FromLongLong(numel(t)); }
static PyObject *dt_nbytes(DeviceTensorObject *t, void *c) {
    return PyLong_FromSize_t(nbytes(t));
}
static PyObject *dt_device(DeviceTensorObject *t, void *c) {
    return PyUnicode_FromFormat("cuda:%d", t->device);
}
static PyObject *dt_device_index(DeviceTensorObject *t, void *c) {
    return PyLong_FromLong(t->device);
}
static PyObject *dt_data_ptr(DeviceTensorObject *t, void *c) {
    return PyLong_FromVoidPtr(t->data);
}
static PyObject *dt_is_view(DeviceTensorObject *t, void *c) {
    return PyBool_FromLong(t->owner != NULL);
}

static Py_ssize_t dt_len(DeviceTensorObject *t) {
    if (t->ndim == 0) {
        PyErr_SetString(PyExc_TypeError, "len() of a 0-d DeviceTensor");
        return -1;
    }
    return (Py_ssize_t)t->shape[0];
}

static PyObject *dt_repr(DeviceTensorObject *t) {
    char buf[256];
    int k = snprintf(buf, sizeof buf, "DeviceTensor(shape=(");
    for (int i = 0; i < t->ndim && k < 200; i++)
        k += snprintf(buf + k, sizeof buf - k, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (t->ndim == 1) k += snprintf(buf + k, sizeof buf - k, ",");
    snprintf(buf + k, sizeof buf - k, "), dtype=%s, device=cuda:%d)", dtype_name(t->dtype),
             t->device);
    return PyUnicode_FromString(buf);
}

static PyGetSetDef dt_getset[] = {
    {"shape", (getter)dt_shape, NULL, "tuple of dimension sizes", NULL},
    {"dtype", (getter)dt_dtype, NULL, "'float32', 'int32' or 'uint8'", NULL},
    {"ndim", (getter)dt_ndim, NULL, "number of dimensions", NULL},
    {"size", (getter)dt_size, NULL, "number of elements", NULL},
    {"nbytes", (getter)dt_nbytes, NULL, "size of the data in bytes", NULL},
    {"device", (getter)dt_device, NULL, "'cuda:N'", NULL},
    {"device_index", (getter)dt_device_index, NULL, "the CUDA device index N", NULL},
    {"data_ptr", (getter)dt_data_ptr, NULL, "the device address (int; 0 when empty)", NULL},
    {"is_view", (getter)dt_is_view, NULL, "True when the memory belongs to another tensor", NULL},
    {"__cuda_array_interface__", (getter)dt_cai, NULL, "CUDA array interface, version 3", NULL},
    {NULL}};

static PyMethodDef dt_methods[] = {
    {"from_numpy", (PyCFunction)(void (*)(void))dt_from_numpy,
     METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "DeviceTensor.from_numpy(array, device=0) -> a device copy of a float32/int32/uint8 ndarray"},
    {"numpy", (PyCFunction)dt_numpy, METH_NOARGS, "numpy() -> a host copy (numpy.ndarray)"},
    {"to_host", (PyCFunction)dt_numpy, METH_NOARGS, "to_host() -> a host copy, as numpy()"},
    {"reshape", (PyCFunction)dt_reshape, METH_VARARGS,
     "reshape(*shape) -> a view of the same device memory (one dimension may be -1)"},
    {"__dlpack__", (PyCFunction)(void (*)(void))dt_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) -> DLPack "
     "capsule (zero-copy)"},
    {"__dlpack_device__", (PyCFunction)dt_dlpack_device, METH_NOARGS,
     "(2, device index): kDLCUDA as DLPack defines it"},
    {NULL}};

static PySequenceMethods dt_as_sequence = {.sq_length = (lenfunc)dt_len};

static PyTypeObject DeviceTensorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C_cuda.cuda.DeviceTensor",
    .tp_basicsize = sizeof(DeviceTensorObject),
    .tp_dealloc = (destructor)dt_dealloc,
    .tp_repr = (reprfunc)dt_repr,
    .tp_as_sequence = &dt_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A C-contiguous float32/int32/uint8 tensor in GPU memory, readable without a copy "
              "through DLPack (torch.from_dlpack) and __cuda_array_interface__ "
              "(cupy.asarray). Made by the CUDA trainer (encode_device) or "
              "DeviceTensor.from_numpy; numpy() downloads.",
    .tp_methods = dt_methods,
    .tp_getset = dt_getset,
    /* no tp_new: instances come only from the factories above */
};

int af_register_cuda_tensor(PyObject *cuda_submodule) {
    if (PyType_Ready(&DeviceTensorType) < 0) return -1;
    Py_INCREF(&DeviceTensorType);
    if (PyModule_AddObject(cuda_submodule, "DeviceTensor", (PyObject *)&DeviceTensorType) < 0) {
        Py_DECREF(&DeviceTensorType);
        return -1;
    }
    return 0;
}
