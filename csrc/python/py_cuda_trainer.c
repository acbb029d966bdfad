/* afire._C_cuda.cuda.Trainer: the GPU twin of afire._C.trainer.Trainer (py_trainer.c), same
 * methods and properties. Differences: the state lives on the device, so buffers() returns
 * HOST COPIES (downloads) and load_buffers(dict) uploads; the constructor takes the device
 * index. Every call that computes releases the GIL and claims the trainer. */
#include "py_trainer_common.h"

#include <string.h>

#include "../cuda/trainer.cuh"
#include "py_cuda_nccl.h"
#include "py_cuda_tensor.h"

typedef af_py_trainer CudaTrainerObject; /* t: af_cuda_trainer * */

AF_PY_TRAINER_API(gpu_api, af_cuda_trainer, af_cuda_trainer);

static const char *prefixes[5] = {"student", "adam_m", "adam_v", "teacher", "grad"};

/* ---- lifetime ---- */

static int trainer_init(CudaTrainerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "batch", "steps_per_epoch", "device", "comm", NULL};
    PyObject *d, *comm = Py_None;
    int batch, device = 0;
    long long spe;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iL|iO:Trainer", kwlist, &PyDict_Type, &d, &batch,
                                     &spe, &device, &comm))
        return -1;
    af_nccl *nccl = NULL;
    if (comm != Py_None && (nccl = af_py_nccl_pointer(comm)) == NULL) return -1;
    if (spe < 1) {
        PyErr_SetString(PyExc_ValueError, "steps_per_epoch must be >= 1");
        return -1;
    }
    if (device < 0) {
        PyErr_SetString(PyExc_ValueError, "device must be >= 0");
        return -1;
    }
    af_trainer_config c;
    if (af_trainer_config_from_dict(d, &c, spe) < 0) return -1;
    af_cuda_trainer *t = NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_trainer_create(&t, &c, batch, device);
    if (st == AF_OK && nccl != NULL) st = af_cuda_trainer_set_comm(t, nccl); /* collective */
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_cuda_trainer_free(t);
        af_raise(st);
        return -1;
    }
    af_cuda_trainer_free(self->t);
    self->t = t;
    self->api = &gpu_api;
    Py_XDECREF(self->comm);
    self->comm = NULL;
    if (nccl != NULL) {
        Py_INCREF(comm);
        self->comm = comm;
    }
    return 0;
}

static void trainer_dealloc(CudaTrainerObject *self) {
    af_cuda_trainer_free(self->t);
    Py_XDECREF(self->comm); /* after the trainer that used it */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Encodes N images in batches of at most the capacity into dst [N,T,D] (device). */
static af_status encode_batches(af_cuda_trainer *t, float *dst, const uint8_t *img, npy_intp N,
                                af_branch br) {
    size_t per_img = (size_t)t->S * t->S, per_out = (size_t)t->T * t->D;
    af_status st = AF_OK;
    for (npy_intp i = 0; st == AF_OK && i < N; i += t->B) {
        int b = (int)(N - i < t->B ? N - i : t->B);
        st = af_cuda_trainer_encode_device(t, dst + (size_t)i * per_out, img + (size_t)i * per_img,
                                           b, br);
    }
    return st;
}

/* encode_device(images uint8[N,S,S], branch) -> DeviceTensor float32[N,T,D]: the tokens in a
 * fresh device buffer the caller owns (it outlives the trainer). Any N >= 1: batches of at
 * most the capacity are encoded one after another into it. */
static PyObject *trainer_encode_device(CudaTrainerObject *self, PyObject *args, PyObject *kw) {
    PyObject *obj;
    af_branch br;
    if (af_py_trainer_encode_args(args, kw, "O|s:encode_device", &obj, &br) < 0) return NULL;
    af_cuda_trainer *t = af_py_trainer_ready(self);
    if (t == NULL) return NULL;
    PyArrayObject *a = af_py_trainer_images(obj, t->S, 0);
    if (a == NULL) return NULL;
    npy_intp N = PyArray_DIM(a, 0);
    int64_t shape[3] = {N, t->T, t->D};
    PyObject *out = af_device_tensor_zeros(AF_DT_FLOAT32, 3, shape, af_cuda_trainer_device(t));
    if (out == NULL) {
        Py_DECREF(a);
        return NULL;
    }
    af_status st;
    AF_PY_RUN_LOCKED(&gpu_api, t, st,
                     encode_batches(t, (float *)af_device_tensor_data(out), AF_U8(a), N, br));
    Py_DECREF(a);
    if (st != AF_OK) {
        Py_DECREF(out);
        return af_raise(st);
    }
    return out;
}

/* ---- state: host copies out, uploads in ---- */

/* The device buffer a buffers() key names ("student.encoder", "prototypes", ...), or NULL
 * (no exception) when there is none. */
static float *buffer_for_key(af_cuda_trainer *t, const char *key, size_t *n) {
    *n = 0;
    if (strcmp(key, "prototypes") == 0) return af_cuda_trainer_buffer(t, "prototypes", 0, n);
    const char *dot = strchr(key, '.');
    if (dot == NULL || (size_t)(dot - key) >= 16) return NULL;
    char prefix[16];
    memcpy(prefix, key, (size_t)(dot - key));
    prefix[dot - key] = '\0';
    for (int net = 0; net < AF_NET_COUNT; net++)
        if (strcmp(dot + 1, af_py_net_names[net]) == 0) return af_cuda_trainer_buffer(t, prefix, net, n);
    return NULL;
}

static int add_copy(CudaTrainerObject *self, PyObject *d, const char *key, const float *dev,
                    size_t n) {
    npy_intp shape[1] = {(npy_intp)n};
    PyArrayObject *arr = af_new_array(1, shape, NPY_FLOAT32);
    if (arr == NULL) return -1;
    af_status st;
    AF_PY_RUN_LOCKED(&gpu_api, self->t, st, af_cuda_trainer_download(self->t, AF_F32(arr), dev, n));
    if (st != AF_OK) {
        Py_DECREF(arr);
        af_raise(st);
        return -1;
    }
    int rc = PyDict_SetItemString(d, key, (PyObject *)arr);
    Py_DECREF(arr);
    return rc;
}

static PyObject *trainer_buffers(CudaTrainerObject *self, PyObject *unused) {
    af_cuda_trainer *t = af_py_trainer_ready(self);
    if (t == NULL) return NULL;
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    char key[64];
    for (int net = 0; net < AF_NET_COUNT; net++)
        for (int i = 0; i < 5; i++) {
            size_t n;
            const float *p = af_cuda_trainer_buffer(t, prefixes[i], net, &n);
            if (p == NULL) continue;
            snprintf(key, sizeof key, "%s.%s", prefixes[i], af_py_net_names[net]);
            if (add_copy(self, d, key, p, n) < 0) {
                Py_DECREF(d);
                return NULL;
            }
        }
    size_t n;
    const float *p = af_cuda_trainer_buffer(t, "prototypes", 0, &n);
    if (add_copy(self, d, "prototypes", p, n) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

/* load_buffers({key: float32 array}) uploads each named buffer (keys as buffers()). All keys
 * and sizes are checked before anything is uploaded. */
static PyObject *trainer_load_buffers(CudaTrainerObject *self, PyObject *arg) {
    af_cuda_trainer *t = af_py_trainer_ready(self);
    if (t == NULL) return NULL;
    if (!PyDict_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "load_buffers expects a dict name -> float32 array");
        return NULL;
    }
    Py_ssize_t count = PyDict_Size(arg), pos = 0, k = 0;
    PyArrayObject **arrs = PyMem_Calloc(count ? count : 1, sizeof(PyArrayObject *));
    float **devs = PyMem_Calloc(count ? count : 1, sizeof(float *));
    PyObject *key, *value, *result = NULL;
    if (arrs == NULL || devs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    while (PyDict_Next(arg, &pos, &key, &value)) {
        const char *name = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
        if (name == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "load_buffers: keys must be str");
            goto done;
        }
        size_t n;
        float *dev = buffer_for_key(t, name, &n);
        if (dev == NULL) {
            PyErr_Format(PyExc_KeyError, "load_buffers: unknown buffer '%s' (expected the keys of "
                         "buffers())", name);
            goto done;
        }
        PyArrayObject *a = af_arg_array(value, name, NPY_FLOAT32, -1);
        if (a == NULL) goto done;
        arrs[k] = a;
        devs[k] = dev;
        k++;
        if ((size_t)PyArray_SIZE(a) != n) {
            PyErr_Format(PyExc_ValueError, "load_buffers: '%s' has %zd values, expected %zu", name,
                         (Py_ssize_t)PyArray_SIZE(a), n);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        af_status st;
        AF_PY_RUN_LOCKED(&gpu_api, t, st, af_cuda_trainer_upload(t, devs[i], AF_F32(arrs[i]),
                                                 (size_t)PyArray_SIZE(arrs[i])));
        if (st != AF_OK) {
            af_raise(st);
            goto done;
        }
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    for (Py_ssize_t i = 0; arrs && i < k; i++) Py_XDECREF(arrs[i]);
    PyMem_Free(arrs);
    PyMem_Free(devs);
    return result;
}

static PyMethodDef trainer_methods[] = {
    AF_PY_TRAINER_METHODS,
    {"encode_device", (PyCFunction)(void (*)(void))trainer_encode_device,
     METH_VARARGS | METH_KEYWORDS,
     "encode_device(images uint8[N,S,S], branch='teacher') -> DeviceTensor float32[N,T,D] "
     "(any N; the tokens stay on the GPU, zero-copy to torch/cupy)"},
    {"buffers", (PyCFunction)trainer_buffers, METH_NOARGS,
     "buffers() -> dict of float32 HOST COPIES of the whole training state (downloads)"},
    {"load_buffers", (PyCFunction)trainer_load_buffers, METH_O,
     "load_buffers({name: float32 array}) uploads state buffers (names as buffers())"},
    {NULL}};

static PyTypeObject CudaTrainerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C_cuda.cuda.Trainer",
    .tp_basicsize = sizeof(CudaTrainerObject),
    .tp_dealloc = (destructor)trainer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Trainer(config: dict, batch: int, steps_per_epoch: int, device: int = 0, "
              "comm: Nccl | None = None): the AFiRe training state on one GPU; with `comm` one "
              "rank of a data-parallel run (every step is then collective)",
    .tp_methods = trainer_methods,
    .tp_getset = af_py_trainer_getset,
    .tp_init = (initproc)trainer_init,
    .tp_new = PyType_GenericNew,
};

int af_register_cuda_trainer(PyObject *cuda_submodule) {
    if (af_register_cuda_tensor(cuda_submodule) < 0) return -1;  /* encode_device's type */
    if (af_register_cuda_nccl(cuda_submodule) < 0) return -1;    /* the comm argument's type */
    if (PyType_Ready(&CudaTrainerType) < 0) return -1;
    Py_INCREF(&CudaTrainerType);
    if (PyModule_AddObject(cuda_submodule, "Trainer", (PyObject *)&CudaTrainerType) < 0) {
        Py_DECREF(&CudaTrainerType);
        return -1;
    }
    return 0;
}
