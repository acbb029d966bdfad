/* DLPack export shared by afire._C.Tensor (tensor.c) and afire._C_cuda's DeviceTensor
 * (py_cuda_tensor.c): the __dlpack__ keywords and the legacy "dltensor" capsule, which every
 * consumer accepts. Compiled into both extensions. */
#ifndef AFIRE_PY_DLPACK_H
#define AFIRE_PY_DLPACK_H

#include "py_util.h"

#include "dlpack.h"

#define AF_DLPACK_MAX_DIMS 8

/* Parses __dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) into the
 * borrowed objects. 0/-1. */
int af_dlpack_args(PyObject *args, PyObject *kw, PyObject **stream, PyObject **dl_device,
                   PyObject **copy);

/* BufferError for copy=True: every export is zero-copy. 0/-1. */
int af_dlpack_refuse_copy(PyObject *copy);

/* A "dltensor" capsule for `data` (ndim <= AF_DLPACK_MAX_DIMS; strides in elements, NULL:
 * C-contiguous). It holds a reference to `owner`, which keeps the memory alive, until the
 * consumer (or the unconsumed capsule's destructor) deletes it. */
PyObject *af_dlpack_capsule(PyObject *owner, void *data, DLDevice device, DLDataType dtype,
                            int ndim, const int64_t *shape, const int64_t *strides);

#endif
