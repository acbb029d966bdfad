/* Helpers shared by the CPython binding files (py_*.c, tensor.c, module.c).
 *
 * Conventions: an argument helper returns a NEW reference or NULL with a Python exception
 * set whose message names the argument. C-core failures are raised with af_raise(status).
 */
#ifndef AFIRE_PY_UTIL_H
#define AFIRE_PY_UTIL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PY_ARRAY_UNIQUE_SYMBOL afire_ARRAY_API
#ifndef AF_IMPORT_ARRAY_HERE
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "afire.h"

/* Set `exc` with a printf-formatted message (PyErr_Format lacks %g/%f); returns NULL. */
PyObject *af_errorf(PyObject *exc, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Raise the Python exception matching `status` with the thread's C error message. */
PyObject *af_raise(af_status status);

/* The exception class used for a status (borrowed reference). */
PyObject *af_exception_for(af_status status);

/* `obj` as a C-contiguous, aligned ndarray of dtype `npy_type` with `ndim` dimensions
 * (ndim < 0: any rank). A wrong dtype is a TypeError (never a silent cast), a wrong rank a
 * ValueError; non-contiguous input is copied. `name` is used in messages. */
PyArrayObject *af_arg_array(PyObject *obj, const char *name, int npy_type, int ndim);

/* Same, but dimension `axis` must equal `expected` (ValueError otherwise). Returns 0/-1. */
int af_check_dim(PyArrayObject *arr, const char *name, int axis, npy_intp expected);

/* Reject NaN/Inf in a float32 array (ValueError naming the argument). Returns 0/-1. */
int af_check_finite(PyArrayObject *arr, const char *name);

/* A new zero-filled C-contiguous ndarray. */
PyArrayObject *af_new_array(int ndim, const npy_intp *shape, int npy_type);

/* A zero-copy float32 ndarray over `data` that keeps `owner` alive (its base). */
PyObject *af_view_f32(PyObject *owner, float *data, int ndim, const npy_intp *shape);

#define AF_F32(a) ((float *)PyArray_DATA(a))
#define AF_I32(a) ((int32_t *)PyArray_DATA(a))
#define AF_U8(a) ((uint8_t *)PyArray_DATA(a))

/* Create submodule afire._C.<name> with `methods`, attach it to `parent` and sys.modules.
 * Returns a borrowed reference or NULL. */
PyObject *af_add_submodule(PyObject *parent, const char *name, PyMethodDef *methods,
                           const char *doc);

/* Submodule registration, one per binding file. Each returns 0 or -1 with an exception. */
int af_register_tensor(PyObject *m);
int af_register_rng(PyObject *m);
int af_register_ops(PyObject *m);
int af_register_io(PyObject *m);
int af_register_model(PyObject *m);
int af_register_cuda(PyObject *m);
int af_register_slm(PyObject *m);
int af_register_objective(PyObject *m);
int af_register_phantom(PyObject *m);
int af_register_trainer(PyObject *m);
int af_register_downstream(PyObject *m);
int af_register_comm(PyObject *m);
/* CUDA extension only: add functions/types to the afire._C_cuda.cuda submodule. */
int af_register_cuda_trainer(PyObject *cuda_submodule);

#endif
