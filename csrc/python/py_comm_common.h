/* What the two communicator types share (compiled into both extensions): afire._C.comm.Comm
 * (MPI, py_comm.c) and afire._C_cuda.cuda.Nccl (py_cuda_nccl.c) take the same numpy
 * arguments for their host collectives, and the trainers find the C communicator behind a
 * Comm object through its capsule. */
#ifndef AFIRE_PY_COMM_COMMON_H
#define AFIRE_PY_COMM_COMMON_H

#include "py_util.h" /* Python.h first */
#include "comm.h"

/* The capsule name of Comm._capsule(). */
#define AF_PY_COMM_CAPSULE "afire._C.comm.Comm"

/* `obj` for a host collective: a C-contiguous ndarray of float32, float64, int64 or uint8
 * (writable when `writable`: the in-place calls). Sets *type. Borrowed reference or NULL
 * with TypeError/ValueError naming `name`. */
PyArrayObject *af_py_comm_array(PyObject *obj, const char *name, int writable,
                                af_comm_type *type);
/* "sum" | "max" | "min" -> *op; 0 or -1 with ValueError. */
int af_py_comm_op(const char *name, af_comm_op *op);
/* The af_comm behind an afire._C.comm.Comm (through its _capsule method), or NULL with
 * TypeError (not a Comm) or RuntimeError (closed). */
af_comm *af_py_comm_pointer(PyObject *comm);

/* The host collectives of one communicator type, on its handle `h` (an af_comm for Comm,
 * an af_nccl for Nccl: its af_nccl_host_* calls stage through the GPU). Both types' Python
 * methods are the af_py_host_* functions below, given their table and a ready handle. */
typedef struct {
    int (*size)(const void *h);
    af_status (*allreduce)(void *h, void *buf, size_t count, af_comm_type type, af_comm_op op,
                           const char *what);
    af_status (*allgather)(void *h, const void *send, void *recv, size_t bytes,
                           const char *what);
    af_status (*broadcast)(void *h, void *buf, size_t bytes, int root, const char *what);
    af_status (*barrier)(void *h, const char *what);
} af_py_host_collectives;

/* allreduce(array, op='sum'): in place (float32/float64/int64; uint8 with max/min). */
PyObject *af_py_host_allreduce(const af_py_host_collectives *ops, void *h, PyObject *args,
                               PyObject *kw);
/* allgather(array) -> array of shape (size, *array.shape), in rank order. */
PyObject *af_py_host_allgather(const af_py_host_collectives *ops, void *h, PyObject *obj);
/* broadcast(array, root=0): root's array into every rank's, in place. */
PyObject *af_py_host_broadcast(const af_py_host_collectives *ops, void *h, PyObject *args,
                               PyObject *kw);
/* barrier() */
PyObject *af_py_host_barrier(const af_py_host_collectives *ops, void *h);

#endif
