/* afire._C_cuda.cuda.Nccl: the NCCL communicator of a GPU rank (cuda/comm.cuh). */
#ifndef AFIRE_PY_CUDA_NCCL_H
#define AFIRE_PY_CUDA_NCCL_H

#include "py_util.h" /* Python.h first */
#include "../cuda/comm.cuh"

/* Adds the Nccl type to the afire._C_cuda.cuda submodule. 0 or -1. */
int af_register_cuda_nccl(PyObject *cuda_submodule);
/* The af_nccl behind an Nccl object, or NULL with TypeError (not an Nccl) or RuntimeError
 * (not initialised). */
af_nccl *af_py_nccl_pointer(PyObject *obj);

#endif
