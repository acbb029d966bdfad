/* afire._C.comm: Comm, MPI for host buffers (csrc/core/comm.h), loaded at run time from the
 * library path afire.dist finds. Every collective releases the GIL. */
#include "py_comm_common.h" /* Python.h first */

#include <string.h>

typedef struct {
    PyObject_HEAD
    af_comm *c; /* NULL before __init__; stays allocated after close() (trainers may hold it) */
} CommObject;

static af_comm *ready(CommObject *self) {
    if (self->c == NULL) PyErr_SetString(PyExc_RuntimeError, "Comm is not initialised");
    return self->c;
}

static int comm_init(CommObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"library", "timeout", NULL};
    const char *library;
    double timeout = 0.0;
    if (self->c != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Comm is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|d:Comm", kwlist, &library, &timeout)) return -1;
    af_comm *c = NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_comm_mpi_open(&c, library, timeout);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    self->c = c;
    return 0;
}

static void comm_dealloc(CommObject *self) {
    if (self->c != NULL) {
        Py_BEGIN_ALLOW_THREADS
        af_comm_free(self->c);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *done(af_status st) {
    if (st != AF_OK) return af_raise(st);
    Py_RETURN_NONE;
}

/* The MPI communicator's host collectives, for the shared methods (py_comm_common.c). */
static int mpi_size(const void *h) { return af_comm_size(h); }
static af_status mpi_allreduce(void *h, void *buf, size_t count, af_comm_type type,
                               af_comm_op op, const char *what) {
    return af_comm_allreduce(h, buf, count, type, op, what);
}
static af_status mpi_allgather(void *h, const void *send, void *recv, size_t bytes,
                               const char *what) {
    return af_comm_allgather(h, send, recv, bytes, what);
}
static af_status mpi_broadcast(void *h, void *buf, size_t bytes, int root, const char *what) {
    return af_comm_broadcast(h, buf, bytes, root, what);
}
static af_status mpi_barrier(void *h, const char *what) { return af_comm_barrier(h, what); }
static const af_py_host_collectives MPI_OPS = {mpi_size, mpi_allreduce, mpi_allgather,
                                               mpi_broadcast, mpi_barrier};

static PyObject *comm_allreduce(CommObject *self, PyObject *args, PyObject *kw) {
    af_comm *c = ready(self);
    return c ? af_py_host_allreduce(&MPI_OPS, c, args, kw) : NULL;
}

static PyObject *comm_allgather(CommObject *self, PyObject *obj) {
    af_comm *c = ready(self);
    return c ? af_py_host_allgather(&MPI_OPS, c, obj) : NULL;
}

static PyObject *comm_broadcast(CommObject *self, PyObject *args, PyObject *kw) {
    af_comm *c = ready(self);
    return c ? af_py_host_broadcast(&MPI_OPS, c, args, kw) : NULL;
}

static PyObject *comm_barrier(CommObject *self, PyObject *unused) {
    af_comm *c = ready(self);
    return c ? af_py_host_barrier(&MPI_OPS, c) : NULL;
}

static PyObject *comm_abort(CommObject *self, PyObject *args) {
    int code = 1;
    af_comm *c = ready(self);
    if (c == NULL || !PyArg_ParseTuple(args, "|i:abort", &code)) return NULL;
    fflush(stdout);
    fflush(stderr);
    af_comm_abort(c, code);
    Py_RETURN_NONE; /* not reached with a working MPI */
}

static PyObject *comm_close(CommObject *self, PyObject *unused) {
    af_comm *c = ready(self);
    if (c == NULL) return NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_comm_close(c);
    Py_END_ALLOW_THREADS
    return done(st);
}

static PyObject *comm_capsule(CommObject *self, PyObject *unused) {
    af_comm *c = ready(self);
    return c ? PyCapsule_New(c, AF_PY_COMM_CAPSULE, NULL) : NULL;
}

static PyObject *get_int(CommObject *self, void *which) {
    af_comm *c = ready(self);
    if (c == NULL) return NULL;
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromLong(af_comm_rank(c));
    case 1: return PyLong_FromLong(af_comm_size(c));
    case 2: return PyLong_FromLong(af_comm_local_rank(c));
    case 3: return PyLong_FromLong(af_comm_local_size(c));
    default: return PyBool_FromLong(af_comm_broken(c));
    }
}

static PyObject *get_version(CommObject *self, void *unused) {
    af_comm *c = ready(self);
    return c ? PyUnicode_FromString(af_comm_library_version(c)) : NULL;
}

static PyObject *get_timeout(CommObject *self, void *unused) {
    af_comm *c = ready(self);
    return c ? PyFloat_FromDouble(af_comm_timeout(c)) : NULL;
}

static PyGetSetDef comm_getset[] = {
    {"rank", (getter)get_int, NULL, "this process's rank", (void *)0},
    {"size", (getter)get_int, NULL, "number of ranks", (void *)1},
    {"local_rank", (getter)get_int, NULL, "rank among the ranks of this node", (void *)2},
    {"local_size", (getter)get_int, NULL, "ranks on this node", (void *)3},
    {"broken", (getter)get_int, NULL, "a collective failed or timed out", (void *)4},
    {"library_version", (getter)get_version, NULL, "MPI_Get_library_version", NULL},
    {"timeout", (getter)get_timeout, NULL, "seconds a collective may take (0: no limit)", NULL},
    {NULL}};

static PyMethodDef comm_methods[] = {
    {"allreduce", (PyCFunction)(void (*)(void))comm_allreduce, METH_VARARGS | METH_KEYWORDS,
     "allreduce(array, op='sum'): in place over all ranks (float32/float64/int64; uint8 with "
     "max/min)"},
    {"allgather", (PyCFunction)comm_allgather, METH_O,
     "allgather(array) -> array of shape (size, *array.shape): every rank's array, in rank order"},
    {"broadcast", (PyCFunction)(void (*)(void))comm_broadcast, METH_VARARGS | METH_KEYWORDS,
     "broadcast(array, root=0): root's array into every rank's, in place"},
    {"barrier", (PyCFunction)comm_barrier, METH_NOARGS, "barrier()"},
    {"abort", (PyCFunction)comm_abort, METH_VARARGS,
     "abort(code=1): end every process of the job (MPI_Abort)"},
    {"close", (PyCFunction)comm_close, METH_NOARGS,
     "close(): MPI_Finalize (MPI_Abort when broken); later calls raise"},
    {"_capsule", (PyCFunction)comm_capsule, METH_NOARGS,
     "the C communicator, for the trainers (keep the Comm alive while they use it)"},
    {NULL}};

static PyTypeObject CommType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.comm.Comm",
    .tp_basicsize = sizeof(CommObject),
    .tp_dealloc = (destructor)comm_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Comm(library: str, timeout: float = 0): MPI (MPICH ABI) loaded from `library`; "
              "collectives on host numpy arrays, each bounded by `timeout` seconds",
    .tp_methods = comm_methods,
    .tp_getset = comm_getset,
    .tp_init = (initproc)comm_init,
    .tp_new = PyType_GenericNew,
};

static PyObject *py_rendezvous(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"data", "rank", "world", "addr", "port", "timeout", NULL};
    PyObject *obj;
    int rank, world, port;
    const char *addr;
    double timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oiisid:rendezvous_broadcast", kwlist, &obj,
                                     &rank, &world, &addr, &port, &timeout))
        return NULL;
    af_comm_type type;
    PyArrayObject *a = af_py_comm_array(obj, "data", 1, &type);
    if (a == NULL) return NULL;
    af_status st;
    void *data = PyArray_DATA(a);
    size_t bytes = (size_t)PyArray_NBYTES(a);
    Py_BEGIN_ALLOW_THREADS
    st = af_rendezvous_broadcast(data, bytes, rank, world, addr, port, timeout);
    Py_END_ALLOW_THREADS
    return done(st);
}

static PyMethodDef comm_module_methods[] = {
    {"rendezvous_broadcast", (PyCFunction)(void (*)(void))py_rendezvous,
     METH_VARARGS | METH_KEYWORDS,
     "rendezvous_broadcast(data, rank, world, addr, port, timeout): rank 0's array to every "
     "rank over TCP (the NCCL id exchange without MPI; exposed for tests)"},
    {NULL}};

int af_register_comm(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "comm", comm_module_methods,
                                     "Communication between the ranks of a data-parallel run.");
    if (sub == NULL || PyType_Ready(&CommType) < 0) return -1;
    Py_INCREF(&CommType);
    if (PyModule_AddObject(sub, "Comm", (PyObject *)&CommType) < 0) {
        Py_DECREF(&CommType);
        return -1;
    }
    return 0;
}
