/* DLPack export (see py_dlpack.h). */
#include "py_dlpack.h"

#include <stdlib.h>

typedef struct {
    DLManagedTensor managed;
    int64_t shape[AF_DLPACK_MAX_DIMS];
    int64_t strides[AF_DLPACK_MAX_DIMS];
    PyObject *owner; /* keeps the exported memory alive */
} dl_ctx;

static void dl_deleter(DLManagedTensor *m) {
    dl_ctx *ctx = (dl_ctx *)m->manager_ctx;
    PyGILState_STATE g = PyGILState_Ensure(); /* consumers may delete from any thread */
    Py_XDECREF(ctx->owner);
    PyGILState_Release(g);
    free(ctx);
}

static void dl_capsule_destructor(PyObject *cap) {
    /* a consumer renames the capsule when it takes ownership; otherwise it is still ours */
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
        if (m != NULL && m->deleter != NULL) m->deleter(m);
    }
}

int af_dlpack_args(PyObject *args, PyObject *kw, PyObject **stream, PyObject **dl_device,
                   PyObject **copy) {
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *max_version = Py_None;
    *stream = *dl_device = *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$OOOO:__dlpack__", kwlist, stream, &max_version,
                                     dl_device, copy))
        return -1;
    return 0;
}

int af_dlpack_refuse_copy(PyObject *copy) {
    if (copy != Py_True) return 0;
    PyErr_SetString(PyExc_BufferError, "__dlpack__(copy=True) is not supported; export is "
                                       "zero-copy");
    return -1;
}

PyObject *af_dlpack_capsule(PyObject *owner, void *data, DLDevice device, DLDataType dtype,
                            int ndim, const int64_t *shape, const int64_t *strides) {
    dl_ctx *ctx = (dl_ctx *)calloc(1, sizeof *ctx);
    if (ctx == NULL) return PyErr_NoMemory();
    for (int i = 0; i < ndim; i++) {
        ctx->shape[i] = shape[i];
        if (strides != NULL) ctx->strides[i] = strides[i];
    }
    DLTensor *d = &ctx->managed.dl_tensor;
    d->data = data;
    d->device = device;
    d->ndim = ndim;
    d->dtype = dtype;
    d->shape = ctx->shape;
    d->strides = strides != NULL ? ctx->strides : NULL;
    d->byte_offset = 0;
    ctx->managed.manager_ctx = ctx;
    ctx->managed.deleter = dl_deleter;
    Py_INCREF(owner);
    ctx->owner = owner;
    PyObject *cap = PyCapsule_New(&ctx->managed, "dltensor", dl_capsule_destructor);
    if (cap == NULL) dl_deleter(&ctx->managed);
    return cap;
}
