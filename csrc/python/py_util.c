/* Argument checking and exception mapping for the binding. */
#include "py_util.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

PyObject *af_exception_for(af_status status) {
    switch (status) {
    case AF_EINVAL:
    case AF_EFORMAT: return PyExc_ValueError;
    case AF_ETYPE: return PyExc_TypeError;
    case AF_ENOMEM: return PyExc_MemoryError;
    case AF_EIO: return PyExc_OSError;
    case AF_ENONFINITE: return PyExc_FloatingPointError;
    default: return PyExc_RuntimeError;
    }
}

PyObject *af_raise(af_status status) {
    const char *msg = af_last_error();
    if (msg == NULL || msg[0] == '\0') msg = "afire: unknown error";
    PyErr_SetString(af_exception_for(status), msg);
    return NULL;
}

static const char *npy_name(int t) {
    switch (t) {
    case NPY_FLOAT32: return "float32";
    case NPY_FLOAT64: return "float64";
    case NPY_INT32: return "int32";
    case NPY_INT64: return "int64";
    case NPY_UINT8: return "uint8";
    case NPY_BOOL: return "bool";
    default: return "another dtype";
    }
}

PyArrayObject *af_arg_array(PyObject *obj, const char *name, int npy_type, int ndim) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of %s, got %s", name,
                     npy_name(npy_type), Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != npy_type) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s, got %s", name, npy_name(npy_type),
                     npy_name(PyArray_TYPE(a)));
        return NULL;
    }
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", name, ndim,
                     PyArray_NDIM(a));
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROM_OTF(obj, npy_type, NPY_ARRAY_IN_ARRAY);
}

int af_check_dim(PyArrayObject *arr, const char *name, int axis, npy_intp expected) {
    if (PyArray_DIM(arr, axis) != expected) {
        PyErr_Format(PyExc_ValueError, "%s: dimension %d must be %zd, got %zd", name, axis,
                     (Py_ssize_t)expected, (Py_ssize_t)PyArray_DIM(arr, axis));
        return -1;
    }
    return 0;
}

int af_check_finite(PyArrayObject *arr, const char *name) {
    const float *p = (const float *)PyArray_DATA(arr);
    npy_intp n = PyArray_SIZE(arr);
    for (npy_intp i = 0; i < n; i++) {
        if (!isfinite(p[i])) {
            PyErr_Format(PyExc_ValueError, "%s contains a non-finite value (NaN or Inf) at flat "
                         "index %zd", name, (Py_ssize_t)i);
            return -1;
        }
    }
    return 0;
}

PyArrayObject *af_new_array(int ndim, const npy_intp *shape, int npy_type) {
    return (PyArrayObject *)PyArray_ZEROS(ndim, (npy_intp *)shape, npy_type, 0);
}

PyObject *af_view_f32(PyObject *owner, float *data, int ndim, const npy_intp *shape) {
    PyObject *arr = PyArray_SimpleNewFromData(ndim, (npy_intp *)shape, NPY_FLOAT32, data);
    if (arr == NULL) return NULL;
    Py_INCREF(owner);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, owner) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

PyObject *af_add_submodule(PyObject *parent, const char *name, PyMethodDef *methods,
                           const char *doc) {
    char full[128];
    const char *parent_name = PyModule_GetName(parent);
    if (parent_name == NULL) return NULL;
    snprintf(full, sizeof full, "%s.%s", parent_name, name);
    PyObject *sub = PyModule_New(full);
    if (sub == NULL) return NULL;
    if (doc != NULL && PyModule_SetDocString(sub, doc) < 0) goto fail;
    if (methods != NULL && PyModule_AddFunctions(sub, methods) < 0) goto fail;
    PyObject *modules = PyImport_GetModuleDict();
    if (PyDict_SetItemString(modules, full, sub) < 0) goto fail;
    if (PyModule_AddObject(parent, name, sub) < 0) goto fail; /* steals on success */
    return sub;
fail:
    Py_DECREF(sub);
    return NULL;
}

PyObject *af_errorf(PyObject *exc, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    PyErr_SetString(exc, buf);
    return NULL;
}
