/* The methods and properties the CPU and GPU Trainer types share (see py_trainer_common.h). */
#include "py_trainer_common.h"

#include <string.h>

const char *const af_py_net_names[AF_NET_COUNT] = {"encoder", "head", "decoder"};

void *af_py_trainer_ready(af_py_trainer *self) {
    if (self->t == NULL) PyErr_SetString(PyExc_RuntimeError, "Trainer is not initialised");
    return self->t;
}

/* The trainer behind self and its view, or NULL with an exception set. */
static void *ready_view(PyObject *self, af_py_trainer_view *v) {
    af_py_trainer *o = (af_py_trainer *)self;
    void *t = af_py_trainer_ready(o);
    if (t != NULL) o->api->view(t, v);
    return t;
}

PyArrayObject *af_py_trainer_images(PyObject *obj, int S, int max_batch) {
    PyArrayObject *a = af_arg_array(obj, "images", NPY_UINT8, 3);
    if (a == NULL) return NULL;
    if (af_check_dim(a, "images", 1, S) < 0 || af_check_dim(a, "images", 2, S) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    npy_intp B = PyArray_DIM(a, 0);
    if (max_batch == 0 && B < 1) {
        PyErr_SetString(PyExc_ValueError, "images: empty batch");
        Py_DECREF(a);
        return NULL;
    }
    if (max_batch > 0 && (B < 1 || B > max_batch)) {
        PyErr_Format(PyExc_ValueError, "images: batch of %zd, must be between 1 and the model's "
                     "batch capacity %d", (Py_ssize_t)B, max_batch);
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

int af_py_trainer_encode_args(PyObject *args, PyObject *kw, const char *fmt, PyObject **images,
                              af_branch *br) {
    static char *kwlist[] = {"images", "branch", NULL};
    const char *branch = "teacher";
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, images, &branch)) return -1;
    if (strcmp(branch, "teacher") == 0) *br = AF_TEACHER;
    else if (strcmp(branch, "student") == 0) *br = AF_STUDENT;
    else {
        PyErr_Format(PyExc_ValueError, "branch must be 'teacher' or 'student', got '%s'", branch);
        return -1;
    }
    return 0;
}

/* ---- computing methods ---- */

static PyObject *stats_dict(const af_step_stats *s) {
    return Py_BuildValue("{s:L,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:O}", "step",
                         (long long)s->step, "loss", s->loss, "l_stru", s->l_stru, "l_cate",
                         s->l_cate, "l_cst", s->l_cst, "l_recon", s->l_recon, "lr", s->lr,
                         "weight_decay", s->wd, "ema_momentum", s->ema, "teacher_temp",
                         s->teacher_temp, "grad_norm", s->grad_norm, "abnormal_fraction",
                         s->abnormal_fraction, "last_layer_frozen",
                         s->last_layer_frozen ? Py_True : Py_False);
}

/* step(images) updates the model; gradients(images) only fills the gradient buffers. */
static PyObject *run_step(PyObject *self, PyObject *arg, int update) {
    af_py_trainer_view v;
    void *t = ready_view(self, &v);
    if (t == NULL) return NULL;
    const af_py_trainer_api *api = ((af_py_trainer *)self)->api;
    PyArrayObject *a = af_py_trainer_images(arg, v.S, v.B);
    if (a == NULL) return NULL;
    af_step_stats s;
    af_status st;
    int B = (int)PyArray_DIM(a, 0);
    AF_PY_RUN_LOCKED(api, t, st, update ? api->step(t, AF_U8(a), B, &s)
                                        : api->grads(t, AF_U8(a), B, &s));
    Py_DECREF(a);
    if (st != AF_OK) return af_raise(st);
    return stats_dict(&s);
}

PyObject *af_py_trainer_step(PyObject *self, PyObject *images) { return run_step(self, images, 1); }
PyObject *af_py_trainer_gradients(PyObject *self, PyObject *images) {
    return run_step(self, images, 0);
}

PyObject *af_py_trainer_encode(PyObject *self, PyObject *args, PyObject *kw) {
    PyObject *obj;
    af_branch br;
    if (af_py_trainer_encode_args(args, kw, "O|s:encode", &obj, &br) < 0) return NULL;
    af_py_trainer_view v;
    void *t = ready_view(self, &v);
    if (t == NULL) return NULL;
    const af_py_trainer_api *api = ((af_py_trainer *)self)->api;
    PyArrayObject *a = af_py_trainer_images(obj, v.S, v.B);
    if (a == NULL) return NULL;
    npy_intp shape[3] = {PyArray_DIM(a, 0), v.T, v.D};
    PyArrayObject *out = af_new_array(3, shape, NPY_FLOAT32);
    if (out == NULL) {
        Py_DECREF(a);
        return NULL;
    }
    af_status st;
    AF_PY_RUN_LOCKED(api, t, st, api->encode(t, AF_F32(out), AF_U8(a), (int)shape[0], br));
    Py_DECREF(a);
    if (st != AF_OK) {
        Py_DECREF(out);
        return af_raise(st);
    }
    return (PyObject *)out;
}

PyObject *af_py_trainer_restore(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "token_mask", NULL};
    PyObject *obj, *mobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:restore", kwlist, &obj, &mobj)) return NULL;
    af_py_trainer_view v;
    void *t = ready_view(self, &v);
    if (t == NULL) return NULL;
    const af_py_trainer_api *api = ((af_py_trainer *)self)->api;
    PyArrayObject *a = af_py_trainer_images(obj, v.S, v.B), *mask = NULL, *pred = NULL,
                  *target = NULL;
    if (a == NULL) return NULL;
    npy_intp B = PyArray_DIM(a, 0);
    if (mobj != Py_None) {
        mask = af_arg_array(mobj, "token_mask", NPY_UINT8, 2);
        if (mask == NULL || af_check_dim(mask, "token_mask", 0, B) < 0 ||
            af_check_dim(mask, "token_mask", 1, v.L) < 0)
            goto fail;
    }
    npy_intp shape[3] = {B, v.L, v.Q};
    pred = af_new_array(3, shape, NPY_FLOAT32);
    target = af_new_array(3, shape, NPY_FLOAT32);
    if (pred == NULL || target == NULL) goto fail;
    af_status st;
    AF_PY_RUN_LOCKED(api, t, st, api->restore(t, AF_F32(pred), AF_F32(target), AF_U8(a),
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

PyObject *af_py_trainer_anomaly(PyObject *self, PyObject *arg) {
    af_py_trainer_view v;
    void *t = ready_view(self, &v);
    if (t == NULL) return NULL;
    const af_py_trainer_api *api = ((af_py_trainer *)self)->api;
    PyArrayObject *a = af_py_trainer_images(arg, v.S, v.B);
    if (a == NULL) return NULL;
    npy_intp B = PyArray_DIM(a, 0), s1[1] = {B}, s2[2] = {B, v.L};
    PyArrayObject *score = af_new_array(1, s1, NPY_FLOAT64), *logs = af_new_array(1, s1, NPY_FLOAT64),
                  *err = af_new_array(2, s2, NPY_FLOAT64);
    af_status st = AF_ENOMEM;
    if (score && logs && err)
        AF_PY_RUN_LOCKED(api, t, st, api->anomaly(t, (double *)PyArray_DATA(score),
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

PyObject *af_py_trainer_param_table(PyObject *self, PyObject *arg) {
    af_py_trainer_view v;
    if (ready_view(self, &v) == NULL) return NULL;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    int net = -1;
    for (int i = 0; name && i < AF_NET_COUNT; i++)
        if (strcmp(name, af_py_net_names[i]) == 0) net = i;
    if (net < 0) {
        PyErr_SetString(PyExc_ValueError, "network must be 'encoder', 'head' or 'decoder'");
        return NULL;
    }
    PyObject *list = PyList_New(v.ntable[net]);
    if (list == NULL) return NULL;
    for (int i = 0; i < v.ntable[net]; i++) {
        const af_param_info *p = &v.table[net][i];
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

/* ---- properties ---- */

/* Sets *field = value while holding the trainer: a call running in another thread (GIL
 * released) reads these fields. */
#define SET_HELD(self, t, field, value)                                  \
    do {                                                                 \
        const af_py_trainer_api *api_ = ((af_py_trainer *)(self))->api;  \
        if (api_->acquire(t) != AF_OK) {                                 \
            af_raise(AF_EBUSY);                                          \
            return -1;                                                   \
        }                                                                \
        *(field) = (value);                                              \
        api_->release(t);                                                \
    } while (0)

/* The trainer behind self for the setter of `name`, or NULL with an exception set (not
 * initialised; deletion). */
static void *setter_target(PyObject *self, PyObject *value, const char *name,
                           af_py_trainer_view *v) {
    void *t = ready_view(self, v);
    if (t != NULL && value == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s cannot be deleted", name);
        return NULL;
    }
    return t;
}

static PyObject *get_step(PyObject *self, void *c) {
    af_py_trainer_view v;
    return ready_view(self, &v) ? PyLong_FromLongLong(*v.step) : NULL;
}
static int set_step(PyObject *self, PyObject *value, void *c) {
    af_py_trainer_view v;
    void *t = setter_target(self, value, "step", &v);
    if (t == NULL) return -1;
    long long s = PyLong_AsLongLong(value);
    if (s == -1 && PyErr_Occurred()) return -1;
    if (s < 0) {
        PyErr_SetString(PyExc_ValueError, "step must be >= 0");
        return -1;
    }
    SET_HELD(self, t, v.step, s);
    return 0;
}
static PyObject *get_protos_set(PyObject *self, void *c) {
    af_py_trainer_view v;
    return ready_view(self, &v) ? PyBool_FromLong(*v.protos_set) : NULL;
}
static int set_protos_set(PyObject *self, PyObject *value, void *c) {
    af_py_trainer_view v;
    void *t = setter_target(self, value, "prototypes_set", &v);
    if (t == NULL) return -1;
    int r = PyObject_IsTrue(value);
    if (r < 0) return -1;
    SET_HELD(self, t, v.protos_set, r);
    return 0;
}
static PyObject *get_dims(PyObject *self, void *c) {
    af_py_trainer_view v;
    if (ready_view(self, &v) == NULL) return NULL;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "batch", v.B, "S", v.S, "C", v.C,
                         "L", v.L, "T", v.T, "D", v.D, "K", v.K, "Q", v.Q);
}

PyGetSetDef af_py_trainer_getset[] = {
    {"step", get_step, set_step, "completed training steps", NULL},
    {"prototypes_set", get_protos_set, set_protos_set, "whether the prototypes hold values yet",
     NULL},
    {"dims", get_dims, NULL, "batch capacity and the model's dimension letters", NULL},
    {NULL}};
