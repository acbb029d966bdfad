/* afire._C.trainer.Trainer: the C training state (networks, optimiser, teacher, prototypes)
 * behind afire.AFiRe. Python passes the validated Config as a dict; every call that computes
 * releases the GIL and claims the trainer so two threads cannot run it at once. */
#include "py_util.h"

#include <string.h>

#include "trainer.h"

typedef struct {
    PyObject_HEAD
    af_trainer *t;
} TrainerObject;

/* ---- lifetime ---- */

static int trainer_init(TrainerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "batch", "steps_per_epoch", NULL};
    PyObject *d;
    int batch;
    long long spe;
    /* Re-running __init__ would free buffers that buffers() views (and, with the GIL
     * released, another thread's step) still point into. */
    if (self->t != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Trainer is already initialised; create a new one");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iL:Trainer", kwlist, &PyDict_Type, &d, &batch,
                                     &spe))
        return -1;
    if (spe < 1) {
        PyErr_SetString(PyExc_ValueError, "steps_per_epoch must be >= 1");
        return -1;
    }
    af_trainer_config c;
    if (af_trainer_config_from_dict(d, &c, spe) < 0) return -1;
    af_trainer *t = NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_trainer_create(&t, &c, batch);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    self->t = t;
    return 0;
}

static void trainer_dealloc(TrainerObject *self) {
    af_trainer_free(self->t);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static af_trainer *ready(TrainerObject *self) {
    if (self->t == NULL) PyErr_SetString(PyExc_RuntimeError, "Trainer is not initialised");
    return self->t;
}

/* uint8 images [B,S,S] checked against the model. */
static PyArrayObject *images_arg(af_trainer *t, PyObject *obj) {
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
        st = af_trainer_acquire(t);              \
        if (st == AF_OK) {                       \
            st = (call);                         \
            af_trainer_release(t);               \
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

/* step(images) updates the model; gradients(images) only fills the gradient buffers. */
static PyObject *run_step(TrainerObject *self, PyObject *arg, int update) {
    af_trainer *t = ready(self);
    if (t == NULL) return NULL;
    PyArrayObject *a = images_arg(t, arg);
    if (a == NULL) return NULL;
    af_step_stats s;
    af_status st;
    int B = (int)PyArray_DIM(a, 0);
    RUN_LOCKED(t, st, update ? af_trainer_step(t, AF_U8(a), B, &s)
                             : af_trainer_grads(t, AF_U8(a), B, &s));
    Py_DECREF(a);
    if (st != AF_OK) return af_raise(st);
    return stats_dict(&s);
}

static PyObject *trainer_step(TrainerObject *self, PyObject *arg) { return run_step(self, arg, 1); }
static PyObject *trainer_gradients(TrainerObject *self, PyObject *arg) {
    return run_step(self, arg, 0);
}

static PyObject *trainer_encode(TrainerObject *self, PyObject *args, PyObject *kw) {
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
    af_trainer *t = ready(self);
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
    RUN_LOCKED(t, st, af_trainer_encode(t, AF_F32(out), AF_U8(a), (int)shape[0], br));
    Py_DECREF(a);
    if (st != AF_OK) {
        Py_DECREF(out);
        return af_raise(st);
    }
    return (PyObject *)out;
}

static PyObject *trainer_restore(TrainerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "token_mask", NULL};
    PyObject *obj, *mobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:restore", kwlist, &obj, &mobj)) return NULL;
    af_trainer *t = ready(self);
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
    RUN_LOCKED(t, st, af_trainer_restore(t, AF_F32(pred), AF_F32(target), AF_U8(a),
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

static PyObject *trainer_anomaly(TrainerObject *self, PyObject *arg) {
    af_trainer *t = ready(self);
    if (t == NULL) return NULL;
    PyArrayObject *a = images_arg(t, arg);
    if (a == NULL) return NULL;
    npy_intp B = PyArray_DIM(a, 0), s1[1] = {B}, s2[2] = {B, t->L};
    PyArrayObject *score = af_new_array(1, s1, NPY_FLOAT64), *logs = af_new_array(1, s1, NPY_FLOAT64),
                  *err = af_new_array(2, s2, NPY_FLOAT64);
    af_status st = AF_ENOMEM;
    if (score && logs && err)
        RUN_LOCKED(t, st, af_trainer_anomaly(t, (double *)PyArray_DATA(score),
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

/* ---- state views for checkpoints (zero-copy; the arrays keep the Trainer alive) ---- */

static PyObject *view(TrainerObject *self, void *data, npy_intp n) {
    npy_intp shape[1] = {n};
    PyObject *arr = PyArray_SimpleNewFromData(1, shape, NPY_FLOAT32, data);
    if (arr == NULL) return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)self) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static const char *net_names[AF_NET_COUNT] = {"encoder", "head", "decoder"};

static PyObject *trainer_buffers(TrainerObject *self, PyObject *unused) {
    af_trainer *t = ready(self);
    if (t == NULL) return NULL;
    af_model *m = t->model;
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    char key[64];
    for (int net = 0; net < AF_NET_COUNT; net++) {
        struct { const char *prefix; float *p; } items[5] = {
            {"student", m->params[net]}, {"adam_m", m->adam_m[net]}, {"adam_v", m->adam_v[net]},
            {"teacher", net < 2 ? m->teacher[net] : NULL}, {"grad", m->grads[net]}};
        for (int i = 0; i < 5; i++) {
            if (items[i].p == NULL) continue;
            snprintf(key, sizeof key, "%s.%s", items[i].prefix, net_names[net]);
            PyObject *v = view(self, items[i].p, (npy_intp)m->numel[net]);
            if (v == NULL || PyDict_SetItemString(d, key, v) < 0) {
                Py_XDECREF(v);
                Py_DECREF(d);
                return NULL;
            }
            Py_DECREF(v);
        }
    }
    PyObject *v = view(self, t->protos, (npy_intp)t->L * t->K);
    if (v == NULL || PyDict_SetItemString(d, "prototypes", v) < 0) {
        Py_XDECREF(v);
        Py_DECREF(d);
        return NULL;
    }
    Py_DECREF(v);
    return d;
}

static PyObject *trainer_param_table(TrainerObject *self, PyObject *arg) {
    af_trainer *t = ready(self);
    if (t == NULL) return NULL;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    int net = -1;
    for (int i = 0; name && i < AF_NET_COUNT; i++)
        if (strcmp(name, net_names[i]) == 0) net = i;
    if (net < 0) {
        PyErr_SetString(PyExc_ValueError, "network must be 'encoder', 'head' or 'decoder'");
        return NULL;
    }
    af_model *m = t->model;
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

static PyObject *get_step(TrainerObject *self, void *c) {
    return ready(self) ? PyLong_FromLongLong(self->t->step) : NULL;
}
static int set_step(TrainerObject *self, PyObject *v, void *c) {
    if (!ready(self)) return -1;
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "step cannot be deleted");
        return -1;
    }
    long long s = PyLong_AsLongLong(v);
    if (s == -1 && PyErr_Occurred()) return -1;
    if (s < 0) {
        PyErr_SetString(PyExc_ValueError, "step must be >= 0");
        return -1;
    }
    /* a step running in another thread (GIL released) reads t->step */
    if (af_trainer_acquire(self->t) != AF_OK) {
        af_raise(AF_EBUSY);
        return -1;
    }
    self->t->step = s;
    af_trainer_release(self->t);
    return 0;
}
static PyObject *get_protos_set(TrainerObject *self, void *c) {
    return ready(self) ? PyBool_FromLong(self->t->protos_set) : NULL;
}
static int set_protos_set(TrainerObject *self, PyObject *v, void *c) {
    if (!ready(self)) return -1;
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "prototypes_set cannot be deleted");
        return -1;
    }
    int r = PyObject_IsTrue(v);
    if (r < 0) return -1;
    if (af_trainer_acquire(self->t) != AF_OK) {
        af_raise(AF_EBUSY);
        return -1;
    }
    self->t->protos_set = r;
    af_trainer_release(self->t);
    return 0;
}
static PyObject *get_dims(TrainerObject *self, void *c) {
    af_trainer *t = ready(self);
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
    {"restore", (PyCFunction)(void (*)(void))trainer_restore, METH_VARARGS | METH_KEYWORDS,
     "restore(images, token_mask=None) -> (pred[B,L,Q], target[B,L,Q])"},
    {"anomaly", (PyCFunction)trainer_anomaly, METH_O,
     "anomaly(images) -> (score[B], log_score[B], err[B,L]) float64 (Eq. 51)"},
    {"buffers", (PyCFunction)trainer_buffers, METH_NOARGS,
     "buffers() -> dict of zero-copy float32 views of the whole training state"},
    {"param_table", (PyCFunction)trainer_param_table, METH_O,
     "param_table('encoder'|'head'|'decoder') -> list of named tensors in the flat buffer"},
    {NULL}};

static PyTypeObject TrainerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.trainer.Trainer",
    .tp_basicsize = sizeof(TrainerObject),
    .tp_dealloc = (destructor)trainer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Trainer(config: dict, batch: int, steps_per_epoch: int): the C training state",
    .tp_methods = trainer_methods,
    .tp_getset = trainer_getset,
    .tp_init = (initproc)trainer_init,
    .tp_new = PyType_GenericNew,
};

static PyObject *py_schedule(PyObject *self, PyObject *args) {
    double base, final, start;
    long long warmup, total, step;
    if (!PyArg_ParseTuple(args, "ddLdLL:cosine_schedule", &base, &final, &warmup, &start, &total, &step))
        return NULL;
    return PyFloat_FromDouble(af_cosine_schedule(base, final, warmup, start, total, step));
}

static PyMethodDef trainer_module_methods[] = {
    {"cosine_schedule", py_schedule, METH_VARARGS,
     "cosine_schedule(base, final, warmup, start, total, step) -> value at step"},
    {NULL}};

int af_register_trainer(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "trainer", trainer_module_methods,
                                     "The one-call AFiRe training step and inference passes.");
    if (sub == NULL || PyType_Ready(&TrainerType) < 0) return -1;
    Py_INCREF(&TrainerType);
    if (PyModule_AddObject(sub, "Trainer", (PyObject *)&TrainerType) < 0) {
        Py_DECREF(&TrainerType);
        return -1;
    }
    return 0;
}
