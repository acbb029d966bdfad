/* afire._C_cuda.cuda.Nccl: NCCL between GPU ranks (cuda/comm.cuh) with the host collectives
 * of afire._C.comm.Comm (staged through the GPU), for runs without MPI. Calls release the
 * GIL. */
#include "py_cuda_nccl.h"

#include <string.h>

#include "py_comm_common.h"

typedef struct {
    PyObject_HEAD
    af_nccl *n;     /* NULL before __init__ (after close() it stays, closed) */
    PyObject *host; /* the MPI Comm that carried the id (kept alive), or NULL */
} NcclObject;

static PyTypeObject NcclType;

static af_nccl *ready(NcclObject *self) {
    if (self->n == NULL) PyErr_SetString(PyExc_RuntimeError, "Nccl is not initialised");
    return self->n;
}

static int nccl_init(NcclObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"rank", "world", "device", "host", "addr", "port", "timeout", NULL};
    int rank, world, device, port = 0;
    PyObject *host = Py_None;
    const char *addr = "";
    double timeout = 0.0;
    if (self->n != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Nccl is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iii|Osid:Nccl", kwlist, &rank, &world, &device,
                                     &host, &addr, &port, &timeout))
        return -1;
    af_comm *c = NULL;
    if (host != Py_None && (c = af_py_comm_pointer(host)) == NULL) return -1;
    af_nccl *n = NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_nccl_create(&n, rank, world, device, c, addr, port, timeout);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    self->n = n;
    if (c != NULL) {
        Py_INCREF(host);
        self->host = host;
    }
    return 0;
}

static void nccl_dealloc(NcclObject *self) {
    if (self->n != NULL) {
        Py_BEGIN_ALLOW_THREADS
        af_nccl_free(self->n);
        Py_END_ALLOW_THREADS
    }
    Py_XDECREF(self->host);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The NCCL communicator's host collectives (staged through the GPU), for the shared methods
 * (py_comm_common.c). */
static int nccl_size(const void *h) { return af_nccl_size(h); }
static af_status nccl_host_allreduce(void *h, void *buf, size_t count, af_comm_type type,
                                     af_comm_op op, const char *what) {
    return af_nccl_host_allreduce(h, buf, count, type, op, what);
}
static af_status nccl_host_allgather(void *h, const void *send, void *recv, size_t bytes,
                                     const char *what) {
    return af_nccl_host_allgather(h, send, recv, bytes, what);
}
static af_status nccl_host_broadcast(void *h, void *buf, size_t bytes, int root,
                                     const char *what) {
    return af_nccl_host_broadcast(h, buf, bytes, root, what);
}
static af_status nccl_host_barrier(void *h, const char *what) {
    return af_nccl_host_barrier(h, what);
}
static const af_py_host_collectives NCCL_OPS = {nccl_size, nccl_host_allreduce,
                                                nccl_host_allgather, nccl_host_broadcast,
                                                nccl_host_barrier};

static PyObject *nccl_allreduce(NcclObject *self, PyObject *args, PyObject *kw) {
    af_nccl *n = ready(self);
    return n ? af_py_host_allreduce(&NCCL_OPS, n, args, kw) : NULL;
}

static PyObject *nccl_allgather(NcclObject *self, PyObject *obj) {
    af_nccl *n = ready(self);
    return n ? af_py_host_allgather(&NCCL_OPS, n, obj) : NULL;
}

static PyObject *nccl_broadcast(NcclObject *self, PyObject *args, PyObject *kw) {
    af_nccl *n = ready(self);
    return n ? af_py_host_broadcast(&NCCL_OPS, n, args, kw) : NULL;
}

static PyObject *nccl_barrier(NcclObject *self, PyObject *unused) {
    af_nccl *n = ready(self);
    return n ? af_py_host_barrier(&NCCL_OPS, n) : NULL;
}

static PyObject *nccl_close(NcclObject *self, PyObject *unused) {
    af_nccl *n = ready(self);
    if (n == NULL) return NULL;
    /* the struct stays (a trainer may hold it): later calls raise */
    Py_BEGIN_ALLOW_THREADS
    af_nccl_close(n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *get_int(NcclObject *self, void *which) {
    af_nccl *n = ready(self);
    if (n == NULL) return NULL;
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromLong(af_nccl_rank(n));
    case 1: return PyLong_FromLong(af_nccl_size(n));
    case 2: return PyLong_FromLong(af_nccl_device(n));
    default: return PyBool_FromLong(af_nccl_broken(n));
    }
}

static PyObject *get_timeout(NcclObject *self, void *unused) {
    af_nccl *n = ready(self);
    return n ? PyFloat_FromDouble(af_nccl_timeout(n)) : NULL;
}

static PyGetSetDef nccl_getset[] = {
    {"rank", (getter)get_int, NULL, "this process's rank", (void *)0},
    {"size", (getter)get_int, NULL, "number of ranks", (void *)1},
    {"device", (getter)get_int, NULL, "the CUDA device of this rank", (void *)2},
    {"broken", (getter)get_int, NULL, "a collective failed or timed out", (void *)3},
    {"timeout", (getter)get_timeout, NULL, "seconds a collective may take (0: no limit)", NULL},
    {NULL}};

static PyMethodDef nccl_methods[] = {
    {"allreduce", (PyCFunction)(void (*)(void))nccl_allreduce, METH_VARARGS | METH_KEYWORDS,
     "allreduce(array, op='sum'): host array, in place over all ranks (staged on the GPU)"},
    {"allgather", (PyCFunction)nccl_allgather, METH_O,
     "allgather(array) -> array of shape (size, *array.shape)"},
    {"broadcast", (PyCFunction)(void (*)(void))nccl_broadcast, METH_VARARGS | METH_KEYWORDS,
     "broadcast(array, root=0): in place"},
    {"barrier", (PyCFunction)nccl_barrier, METH_NOARGS, "barrier()"},
    {"close", (PyCFunction)nccl_close, METH_NOARGS,
     "close(): finalise the communicator (abort it when broken)"},
    {NULL}};

static PyTypeObject NcclType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C_cuda.cuda.Nccl",
    .tp_basicsize = sizeof(NcclObject),
    .tp_dealloc = (destructor)nccl_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Nccl(rank, world, device, host=None, addr='', port=0, timeout=0): the NCCL "
              "communicator of one GPU rank; the id comes through `host` (an afire._C.comm.Comm) "
              "or the TCP rendezvous at addr:port",
    .tp_methods = nccl_methods,
    .tp_getset = nccl_getset,
    .tp_init = (initproc)nccl_init,
    .tp_new = PyType_GenericNew,
};

af_nccl *af_py_nccl_pointer(PyObject *obj) {
    if (!PyObject_TypeCheck(obj, &NcclType)) {
        PyErr_Format(PyExc_TypeError, "comm must be an afire._C_cuda.cuda.Nccl, got %s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return ready((NcclObject *)obj);
}

int af_register_cuda_nccl(PyObject *cuda_submodule) {
    if (PyType_Ready(&NcclType) < 0) return -1;
    Py_INCREF(&NcclType);
    if (PyModule_AddObject(cuda_submodule, "Nccl", (PyObject *)&NcclType) < 0) {
        Py_DECREF(&NcclType);
        return -1;
    }
    return 0;
}
