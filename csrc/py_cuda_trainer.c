/* afire._C_cuda.cuda.Trainer: the GPU twin of afire._C.trainer.Trainer (py_trainer.c), same
 * methods and properties. Differences: the state lives on the device, so buffers() returns
 * HOST COPIES (downloads) and load_buffers(dict) uploads; the constructor takes the device
 * index. Every call that computes releases the GIL and claims the trainer. */
#include "py_util.h"

#include <string.h>

#include "../cuda/trainer.cuh"
#include "py_cuda_tensor.h"

typedef struct {
    PyObject_HEAD
    af_cuda_trainer *t;
} CudaTrainerObject;

static const char *net_names[AF_NET_COUNT] = {"encoder", "head", "decoder"};
static const char *prefixes[5] = {"student", "adam_m", "adam_v", "teacher", "grad"};

/* ---- lifetime ---- */

static int trainer_init(CudaTrainerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "batch", "steps_per_epoch", "device", NULL};
    PyObject *d;
    int batch, device = 0;
    long long spe;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iL|i:Trainer", kwlist, &PyDict_Type, &d, &batch,
                                     &spe, &device))
        return -1;
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
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    af_cuda_trainer_free(self->t);
    self->t = t;
    return 0;
}

static void trainer_dealloc(CudaTrainerObject *self) {
    af_cuda_trainer_free(self->t);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static af_cuda_trainer *ready(CudaTrainerObject *self) {
    if (self->t == NULL) PyErr_SetString(PyExc_RuntimeError, "Trainer is not initialised");
    return self->t;
}

/* uint8 images [B,S,S] checked against the model (messages as py_trainer.c). */
static PyArrayObject *images_arg(af_cuda_trainer *t, PyObject *obj) {
    PyArrayObject *a = af_arg_array(obj, "images", NPY_UINT8, 3);
    if (a == NULL) return NULL;
    if (af_check_dim(a, "images", 1, t->S) < 0 || af_check_dim(a, "images", 2, t->S) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    npy_intp B = PyArray_DIM(a, 0);
    if (B < 1 || B > t->B) {
        PyErr_Format(PyExc_ValueError, "images: batch of %zd, must be between 1 and the model's "
                     "batch capacity %d", (Py_ssize_t)B, t->B);
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

#define RUN_LOCKED(t, st, call)                  \
    do {                                         \
        Py_BEGIN_ALLOW_THREADS                   \
        st = af_cuda_trainer_acquire(t);         \
        if (st == AF_OK) {                       \
            st = (call);                         \
            af_cuda_trainer_release(t);          \
        }                                        \
        Py_END_ALLOW_THREADS                     \
    } while (0)

static PyObject *stats_dict(const af_step_stats *s) {
    return Py_BuildValue("{s:L,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:O}", "step",
                         (long long)s->step, "loss", s->loss, "l_stru", s->l_stru, "l_cate",
                         s->l_cate, "l_cst", s->l_cst, "l_recon", s->l_recon, "lr", s->lr,
                         "weight_decay", s->wd, "ema_momentum", s->ema, "teacher_temp",
                         s->teacher_temp, "grad_norm", s->grad_norm, "abnormal_fraction",
                         s->abnormal_fraction, "last_layer_frozen",
                         s->last_layer_frozen ? Py_True : Py_False);
}

static PyObject *run_step(CudaTrainerObject *self, PyObject *arg, int update) {
    af_cuda_trainer *t = ready(self);
    if (t == NULL) return NULL;
    PyArrayObject *a = images_arg(t, arg);
    if (a == NULL) return NULL;
    af_step_stats s;
    af_status st;
    int B = (int)PyArray_DIM(a, 0);
    RUN_LOCKED(t, st, update ? af_cuda_trainer_step(t, AF_U8(a), B, &s)
                             : af_cuda_trainer_grads(t, AF_U8(a), B, &s));
    Py_DECREF(a);
    if (st != AF_OK) return af_raise(st);
    return stats_dict(&s);
}

static PyObject *trainer_step(CudaTrainerObject *self, PyObject *arg) { return run_step(self, arg, 1); }
static PyObject *trainer_gradients(CudaTrainerObject *self, PyObject *arg) {
    return run_step(self, arg, 0);
}

static PyObject *trainer_encode(CudaTrainerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "branch", NULL};
    PyObject *obj;
    const char *branch = "teacher";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|s:encode", kwlist, &obj, &branch)) return NULL;
    af_branch br;
    if (strcmp(branch, "teacher") == 0) br = AF_TEACHER;
    else if (strcmp(branch, "student") == 0) br = AF_STUDENT;
    else {
        PyErr_Format(PyExc_ValueError, "branch must be 'teacher' or 'student', got '%s'", branch);
        return NULL;
    }
    af_cuda_trainer *t = ready(self);
    if (t == NULL) return NULL;
    PyArrayObject *a = images_arg(t, obj);
    if (a == NULL) return NULL;
    npy_intp shape[3] = {PyArray_DIM(a, 0), t->T, t->D};
    PyArrayObject *out = af_new_array(3, shape, NPY_FLOAT32);
    if (out == NULL) {
        Py_DECREF(a);
        return NULL;
    }
    af_status st;
    RUN_LOCKED(t, st, af_cuda_trainer_encode(t, AF_F32(out), AF_U8(a), (int)shape[0], br));
    Py_DECREF(a);
    if (st != AF_OK) {
        Py_DECREF(out);
        return af_raise(st);
    }
    return (PyObject *)out;
}

/* encode_device(images uint8[N,S,S], branch) -> DeviceTensor float32[N,T,D]: the tokens in a
 * fresh device buffer the caller owns (it outlives the trainer). Any N >= 1: batches of at
 * most the capacity are encoded one after another into it. */
static PyObject *trainer_encode_device(CudaTrainerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "branch", NULL};
    PyObject *obj;
    const char *branch = "teacher";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|s:encode_device", kwlist, &obj, &branch))
        return NULL;
    af_branch br;
    if (strcmp(branch, "teacher") == 0) br = AF_TEACHER;
    else if (strcmp(branch, "student") == 0) br = AF_STUDENT;
    else {
        PyErr_Format(PyExc_ValueError, "branch must be 'teacher' or 'student', got '%s'", branch);
        return NULL;
    }
    af_cuda_trainer *t = ready(self);
    if (t == NULL) return NULL;
    PyArrayObject *a = af_arg_array(obj, "images", NPY_UINT8, 3);
    if (a == NULL) return NULL;
    if (af_check_dim(a, "images", 1, t->S) < 0 || af_check_dim(a, "images", 2, t->S) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    npy_intp N = PyArray_DIM(a, 0);
    if (N < 1) {
        PyErr_SetString(PyExc_ValueError, "images: empty batch");
        Py_DECREF(a);
        return NULL;
    }
    int64_t shape[3] = {N, t->T, t->D};
    PyObject *out = af_device_tensor_zeros(AF_DT_FLOAT32, 3, shape, af_cuda_trainer_device(t));
    if (out == NULL) {
        Py_DECREF(a);
        return NULL;
    }
    float *dst = (float *)af_device_tensor_data(out);
    const uint8_t *img = AF_U8(a);
    size_t per_img = (size_t)t->S * t->S, per_out = (size_t)t->T * t->D;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_trainer_acquire(t);
    if (st == AF_OK) {
        for (npy_intp i = 0; st == AF_OK && i < N; i += t->B) {
            int b = (int)(N - i < t->B ? N - i : t->B);
            st = af_cuda_trainer_encode_device(t, dst + (size_t)i * per_out,
                                               img + (size_t)i * per_img, b, br);
        }
        af_cuda_trainer_release(t);
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(a);
    if (st != AF_OK) {
        Py_DECREF(out);
        return af_raise(st);
    }
    return out;
}

static PyObject *trainer_restore(CudaTrainerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "token_mask", NULL};
    PyObject *obj, *mobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:restore", kwlist, &obj, &mobj)) return NULL;
    af_cuda_trainer *t = ready(self);
    if (t == NULL) return NULL;
    PyArrayObject *a = images_arg(t, obj), *mask = NULL, *pred = NULL, *target = NULL;
    if (a == NULL) return NULL;
    npy_intp B = PyArray_DIM(a, 0);
    if (mobj != Py_None) {
        mask = af_arg_array(mobj, "token_mask", NPY_UINT8, 2);
        if (mask == NULL || af_check_dim(mask, "token_mask", 0, B) < 0 ||
            af_check_dim(mask, "token_mask", 1, t->L) < 0)
            goto fail;
    }
    npy_intp shape[3] = {B, t->L, t->Q};
    pred = af_new_array(3, shape, NPY_FLOAT32);
    target = af_new_array(3, shape, NPY_FLOAT32);
    if (pred == NULL || target == NULL) goto fail;
    af_status st;
    RUN_LOCKED(t, st, af_cuda_trainer_restore(t, AF_F32(pred), AF_F32(target), AF_U8(a),
                                              mask ? AF_U8(mask) : NULL, (int)B));
    if (st != AF_OK) {
        af_raise(st);
        goto fail;
    }
    Py_DECREF(a);
    Py_XDECREF(mask);
    return Py_BuildValue("(NN)", pred, target);
fail:
    Py_XDECREF(a);
    Py_XDECREF(mask);
    Py_XDECREF(pred);
    Py_XDECREF(target);
    return NULL;
}

static PyObject *trainer_anomaly(CudaTrainerObject *self, PyObject *arg) {
    af_cuda_trainer *t = ready(self);
    if (t == NULL) return NULL;
    PyArrayObject *a = images_arg(t, arg);
    if (a == NULL) return NULL;
    npy_intp B = PyArray_DIM(a, 0), s1[1] = {B}, s2[2] = {B, t->L};
    PyArrayObject *score = af_new_array(1, s1, NPY_FLOAT64), *logs = af_new_array(1, s1, NPY_FLOAT64),
                  *err = af_new_array(2, s2, NPY_FLOAT64);
    af_status st = AF_ENOMEM;
    if (score && logs && err)
        RUN_LOCKED(t, st, af_cuda_trainer_anomaly(t, (double *)PyArray_DATA(score),
                                                  (double *)PyArray_DATA(logs),
                                                  (double *)PyArray_DATA(err), AF_U8(a), (int)B));
    Py_DECREF(a);
    if (st != AF_OK) {
        Py_XDECREF(score);
        Py_XDECREF(logs);
        Py_XDECREF(err);
        return PyErr_Occurred() ? NULL : af_raise(st);
    }
    return Py_BuildValue("(NNN)", score, logs, err);
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
        if (strcmp(dot + 1, net_names[net]) == 0) return af_cuda_trainer_buffer(t, prefix, net, n);
    return NULL;
}

static int add_copy(CudaTrainerObject *self, PyObject *d, const char *key, const float *dev,
                    size_t n) {
    npy_intp shape[1] = {(npy_intp)n};
    PyArrayObject *arr = af_new_array(1, shape, NPY_FLOAT32);
    if (arr == NULL) return -1;
    af_status st;
    RUN_LOCKED(self->t, st, af_cuda_trainer_download(self->t, AF_F32(arr), dev, n));
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
    af_cuda_trainer *t = ready(self);
    if (t == NULL) return NULL;
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    char key[64];
    for (int net = 0; net < AF_NET_COUNT; net++)
        for (int i = 0; i < 5; i++) {
            size_t n;
            const float *p = af_cuda_trainer_buffer(t, prefixes[i], net, &n);
            if (p == NULL) continue;
            snprintf(key, sizeof key, "%s.%s", prefixes[i], net_names[net]);
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
    af_cuda_trainer *t = ready(self);
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
        RUN_LOCKED(t, st, af_cuda_trainer_upload(t, devs[i], AF_F32(arrs[i]),
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

static PyObject *trainer_param_table(CudaTrainerObject *self, PyObject *arg) {
    af_cuda_trainer *t = ready(self);
    if (t == NULL) return NULL;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    int net = -1;
    for (int i = 0; name && i < AF_NET_COUNT; i++)
        if (strcmp(name, net_names[i]) == 0) net = i;
    if (net < 0) {
        PyErr_SetString(PyExc_ValueError, "network must be 'encoder', 'head' or 'decoder'");
        return NULL;
    }
    af_cuda_model *m = t->model;
    PyObject *list = PyList_New(m->ntable[net]);
    if (list == NULL) return NULL;
    for (int i = 0; i < m->ntable[net]; i++) {
        const af_param_info *p = &m->table[net][i];
        PyObject *shape = PyTuple_New(p->ndim);
        if (shape == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        for (int k = 0; k < p->ndim; k++) PyTuple_SET_ITEM(shape, k, PyLong_FromLongLong(p->shape[k]));
        PyObject *row = Py_BuildValue("{s:s,s:n,s:N,s:O,s:O,s:O}", "name", p->name, "offset",
                                      (Py_ssize_t)p->offset, "shape", shape, "decay",
                                      p->decay ? Py_True : Py_False, "trainable",
                                      p->trainable ? Py_True : Py_False, "last_layer",
                                      p->last_layer ? Py_True : Py_False);
        if (row == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, row);
    }
    return list;
}

static PyObject *get_step(CudaTrainerObject *self, void *c) {
    return ready(self) ? PyLong_FromLongLong(self->t->step) : NULL;
}
static int set_step(CudaTrainerObject *self, PyObject *v, void *c) {
    if (!ready(self)) return -1;
    long long s = v ? PyLong_AsLongLong(v) : -1;
    if (s == -1 && PyErr_Occurred()) return -1;
    if (s < 0) {
        PyErr_SetString(PyExc_ValueError, "step must be >= 0");
        return -1;
    }
    self->t->step = s;
    return 0;
}
static PyObject *get_protos_set(CudaTrainerObject *self, void *c) {
    return ready(self) ? PyBool_FromLong(self->t->protos_set) : NULL;
}
static int set_protos_set(CudaTrainerObject *self, PyObject *v, void *c) {
    if (!ready(self) || v == NULL) return -1;
    int r = PyObject_IsTrue(v);
    if (r < 0) return -1;
    self->t->protos_set = r;
    return 0;
}
static PyObject *get_dims(CudaTrainerObject *self, void *c) {
    af_cuda_trainer *t = ready(self);
    if (t == NULL) return NULL;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "batch", t->B, "S", t->S, "C", t->C,
                         "L", t->L, "T", t->T, "D", t->D, "K", t->K, "Q", t->Q);
}

static PyGetSetDef trainer_getset[] = {
    {"step", (getter)get_step, (setter)set_step, "completed training steps", NULL},
    {"prototypes_set", (getter)get_protos_set, (setter)set_protos_set,
     "whether the prototypes hold values yet", NULL},
    {"dims", (getter)get_dims, NULL, "batch capacity and the model's dimension letters", NULL},
    {NULL}};

static PyMethodDef trainer_methods[] = {
    {"train_step", (PyCFunction)trainer_step, METH_O, "train_step(images uint8[B,S,S]) -> dict of losses and schedule values"},
    {"gradients", (PyCFunction)trainer_gradients, METH_O,
     "gradients(images) -> dict: the step's losses and gradients (in buffers()['grad.*']) "
     "without updating anything"},
    {"encode", (PyCFunction)(void (*)(void))trainer_encode, METH_VARARGS | METH_KEYWORDS,
     "encode(images, branch='teacher') -> float32[B,T,D]"},
    {"encode_device", (PyCFunction)(void (*)(void))trainer_encode_device,
     METH_VARARGS | METH_KEYWORDS,
     "encode_device(images uint8[N,S,S], branch='teacher') -> DeviceTensor float32[N,T,D] "
     "(any N; the tokens stay on the GPU, zero-copy to torch/cupy)"},
    {"restore", (PyCFunction)(void (*)(void))trainer_restore, METH_VARARGS | METH_KEYWORDS,
     "restore(images, token_mask=None) -> (pred[B,L,Q], target[B,L,Q])"},
    {"anomaly", (PyCFunction)trainer_anomaly, METH_O,
     "anomaly(images) -> (score[B], log_score[B], err[B,L]) float64 (Eq. 51)"},
    {"buffers", (PyCFunction)trainer_buffers, METH_NOARGS,
     "buffers() -> dict of float32 HOST COPIES of the whole training state (downloads)"},
    {"load_buffers", (PyCFunction)trainer_load_buffers, METH_O,
     "load_buffers({name: float32 array}) uploads state buffers (names as buffers())"},
    {"param_table", (PyCFunction)trainer_param_table, METH_O,
     "param_table('encoder'|'head'|'decoder') -> list of named tensors in the flat buffer"},
    {NULL}};

static PyTypeObject CudaTrainerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C_cuda.cuda.Trainer",
    .tp_basicsize = sizeof(CudaTrainerObject),
    .tp_dealloc = (destructor)trainer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Trainer(config: dict, batch: int, steps_per_epoch: int, device: int = 0): the "
              "AFiRe training state on one GPU",
    .tp_methods = trainer_methods,
    .tp_getset = trainer_getset,
    .tp_init = (initproc)trainer_init,
    .tp_new = PyType_GenericNew,
};

int af_register_cuda_trainer(PyObject *cuda_submodule) {
    if (af_register_cuda_tensor(cuda_submodule) < 0) return -1;  /* encode_device's type */
    if (PyType_Ready(&CudaTrainerType) < 0) return -1;
    Py_INCREF(&CudaTrainerType);
    if (PyModule_AddObject(cuda_submodule, "Trainer", (PyObject *)&CudaTrainerType) < 0) {
        Py_DECREF(&CudaTrainerType);
        return -1;
    }
    return 0;
}
