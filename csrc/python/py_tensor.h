/* afire._C.Tensor: a strided, typed view of memory (host now; device memory arrives with the
 * CUDA backend) that NumPy, CuPy and PyTorch can read without a copy. */
#ifndef AFIRE_TENSOR_H
#define AFIRE_TENSOR_H

#include "py_util.h"

#define AF_MAX_DIMS 8

typedef enum { AF_FLOAT32 = 0, AF_INT32 = 1, AF_UINT8 = 2, AF_BFLOAT16 = 3 } af_dtype;
typedef enum { AF_DEVICE_CPU = 0, AF_DEVICE_CUDA = 1 } af_device;

typedef struct {
    PyObject_HEAD
    void *data;
    af_dtype dtype;
    int ndim;
    int64_t shape[AF_MAX_DIMS];
    int64_t strides[AF_MAX_DIMS]; /* bytes */
    Py_ssize_t shape_ss[AF_MAX_DIMS], strides_ss[AF_MAX_DIMS]; /* for the buffer protocol */
    af_device device;
    int device_id;
    int readonly;
    PyObject *owner;  /* keeps `data` alive (e.g. the source ndarray); NULL: we own it */
    void (*free_fn)(void *); /* how to release owned data */
} AfTensor;

extern PyTypeObject AfTensor_Type;

size_t af_dtype_size(af_dtype t);

/* A new C-contiguous host tensor that owns zeroed memory. */
AfTensor *af_tensor_new(af_dtype dtype, int ndim, const int64_t *shape);

#endif
