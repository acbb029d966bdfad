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
