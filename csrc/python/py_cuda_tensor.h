/* afire._C_cuda.cuda.DeviceTensor: a C-contiguous tensor in GPU memory that PyTorch, CuPy and
 * other consumers read without a copy (__cuda_array_interface__ v3, DLPack).
 *
 * A DeviceTensor either OWNS its allocation (freed when the last reference goes, however
 * long after the producer, e.g. the trainer, is gone) or BORROWS memory kept alive by an
 * owner object it references (a view such as reshape()). Contents are always complete when
 * a DeviceTensor is handed out (its producer synchronised), so consumers need no stream
 * synchronisation: the interface reports "stream": None. CUDA extension only. */
#ifndef AFIRE_PY_CUDA_TENSOR_H
#define AFIRE_PY_CUDA_TENSOR_H

#include "py_util.h" /* Python.h first, before any system header */

#include <stdint.h>

typedef enum { AF_DT_FLOAT32 = 0, AF_DT_INT32 = 1, AF_DT_UINT8 = 2 } af_dev_dtype;

/* A new owning DeviceTensor of zeros on CUDA device `device` (new reference, or NULL with
 * an exception). */
PyObject *af_device_tensor_zeros(af_dev_dtype dtype, int ndim, const int64_t *shape, int device);
/* The device pointer of a DeviceTensor (NULL for an empty one). */
void *af_device_tensor_data(PyObject *t);

int af_register_cuda_tensor(PyObject *cuda_submodule);

#endif
