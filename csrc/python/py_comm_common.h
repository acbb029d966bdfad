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

#endif
