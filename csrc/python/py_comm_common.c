/* Shared argument handling of the communicator types (py_comm_common.h). */
#include "py_comm_common.h"

#include <string.h>

PyArrayObject *af_py_comm_array(PyObject *obj, const char *name, int writable,
                                af_comm_type *type) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32: *type = AF_COMM_F32; break;
    case NPY_FLOAT64: *type = AF_COMM_F64; break;
    case NPY_INT64: *type = AF_COMM_I64; break;
    case NPY_UINT8: *type = AF_COMM_BYTE; break;
    default:
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32, float64, int64 or uint8",
                     name);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
        return NULL;
    }
    if (writable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writable (the result is written into it)",
                     name);
        return NULL;
    }
    return a;
}

int af_py_comm_op(const char *name, af_comm_op *op) {
    if (strcmp(name, "sum") == 0) *op = AF_COMM_SUM;
    else if (strcmp(name, "max") == 0) *op = AF_COMM_MAX;
    else if (strcmp(name, "min") == 0) *op = AF_COMM_MIN;
    else {
        PyErr_Format(PyExc_ValueError, "op must be 'sum', 'max' or 'min', got '%s'", name);
        return -1;
    }
    return 0;
}

af_comm *af_py_comm_pointer(PyObject *comm) {
    PyObject *cap = PyObject_CallMethod(comm, "_capsule", NULL);
    if (cap == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "comm must be an afire._C.comm.Comm, got %s",
                         Py_TYPE(comm)->tp_name);
        }
        return NULL;
    }
    af_comm *c = PyCapsule_GetPointer(cap, AF_PY_COMM_CAPSULE);
    Py_DECREF(cap);
    return c;
}

/* ---- the host collectives of both communicator types (af_py_host_collectives) ---- */

static PyObject *done(af_status st) {
    if (st != AF_OK) return af_raise(st);
    Py_RETURN_NONE;
}

PyObject *af_py_host_allreduce(const af_py_host_collectives *ops, void *h, PyObject *args,
                               PyObject *kw) {
    static char *kwlist[] = {"array", "op", NULL};
    PyObject *obj;
    const char *opname = "sum";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|s:allreduce", kwlist, &obj, &opname))
        return NULL;
    af_comm_type type;
    af_comm_op op;
    PyArrayObject *a = af_py_comm_array(obj, "array", 1, &type);
    if (a == NULL || af_py_comm_op(opname, &op) < 0) return NULL;
    if (type == AF_COMM_BYTE && op == AF_COMM_SUM) {
        PyErr_SetString(PyExc_TypeError, "a uint8 array can only be reduced with 'max' or 'min'");
        return NULL;
    }
    af_status st;
    void *data = PyArray_DATA(a);
    size_t n = (size_t)PyArray_SIZE(a);
    Py_BEGIN_ALLOW_THREADS
    st = ops->allreduce(h, data, n, type, op, "allreduce");
    Py_END_ALLOW_THREADS
    return done(st);
}

PyObject *af_py_host_allgather(const af_py_host_collectives *ops, void *h, PyObject *obj) {
    af_comm_type type;
    PyArrayObject *a = af_py_comm_array(obj, "array", 0, &type);
    if (a == NULL) return NULL;
    int nd = PyArray_NDIM(a);
    if (nd >= NPY_MAXDIMS) {
        PyErr_SetString(PyExc_ValueError, "array has too many dimensions");
        return NULL;
    }
    npy_intp shape[NPY_MAXDIMS];
    shape[0] = ops->size(h);
    memcpy(shape + 1, PyArray_DIMS(a), (size_t)nd * sizeof(npy_intp));
    PyArrayObject *out = af_new_array(nd + 1, shape, PyArray_TYPE(a));
    if (out == NULL) return NULL;
    af_status st;
    const void *send = PyArray_DATA(a);
    void *recv = PyArray_DATA(out);
    size_t bytes = (size_t)PyArray_NBYTES(a);
    Py_BEGIN_ALLOW_THREADS
    st = ops->allgather(h, send, recv, bytes, "allgather");
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        Py_DECREF(out);
        return af_raise(st);
    }
    return (PyObject *)out;
}

PyObject *af_py_host_broadcast(const af_py_host_collectives *ops, void *h, PyObject *args,
                               PyObject *kw) {
    static char *kwlist[] = {"array", "root", NULL};
    PyObject *obj;
    int root = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|i:broadcast", kwlist, &obj, &root))
        return NULL;
    af_comm_type type;
    PyArrayObject *a = af_py_comm_array(obj, "array", 1, &type);
    if (a == NULL) return NULL;
    af_status st;
    void *data = PyArray_DATA(a);
    size_t bytes = (size_t)PyArray_NBYTES(a);
    Py_BEGIN_ALLOW_THREADS
    st = ops->broadcast(h, data, bytes, root, "broadcast");
    Py_END_ALLOW_THREADS
    return done(st);
}

PyObject *af_py_host_barrier(const af_py_host_collectives *ops, void *h) {
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ops->barrier(h, "barrier");
    Py_END_ALLOW_THREADS
    return done(st);
}
