/* afire._C.trainer.Trainer: the C training state (networks, optimiser, teacher, prototypes)
 * behind afire.AFiRe. Python passes the validated Config as a dict; every call that computes
 * releases the GIL and claims the trainer so two threads cannot run it at once. */
#include "py_comm_common.h"
#include "py_trainer_common.h"

#include <string.h>

typedef af_py_trainer TrainerObject; /* t: af_trainer * */

AF_PY_TRAINER_API(cpu_api, af_trainer, af_trainer);

/* ---- lifetime ---- */

static int trainer_init(TrainerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "batch", "steps_per_epoch", "comm", "precision",
                             "inference", NULL};
    PyObject *d, *comm = Py_None;
    int batch, inference = 0;
    long long spe;
    const char *precision = "fp32";
    /* Re-running __init__ would free buffers that buffers() views (and, with the GIL
     * released, another thread's step) still point into. */
    if (self->t != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Trainer is already initialised; create a new one");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iL|O$sp:Trainer", kwlist, &PyDict_Type, &d,
                                     &batch, &spe, &comm, &precision, &inference))
        return -1;
    int prec;
    if (strcmp(precision, "fp32") == 0) prec = AF_PRECISION_FP32;
    else if (strcmp(precision, "bf16") == 0) prec = AF_PRECISION_BF16;
    else {
        PyErr_Format(PyExc_ValueError, "precision must be 'fp32' or 'bf16', got '%s'", precision);
        return -1;
    }
    af_comm *c_comm = NULL;
    if (comm != Py_None && (c_comm = af_py_comm_pointer(comm)) == NULL) return -1;
    if (c_comm != NULL && inference) {
        PyErr_SetString(PyExc_ValueError, "an inference trainer takes no communicator");
        return -1;
    }
    if (spe < 1) {
        PyErr_SetString(PyExc_ValueError, "steps_per_epoch must be >= 1");
        return -1;
    }
    af_trainer_config c;
    if (af_trainer_config_from_dict(d, &c, spe) < 0) return -1;
    /* the CPU's arithmetic is this argument, not Config.precision (the GPU's, bf16 by default) */
    c.precision = prec;
    c.inference = inference;
    af_trainer *t = NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_trainer_create(&t, &c, batch);
    if (st == AF_OK && c_comm != NULL) st = af_trainer_set_comm(t, c_comm); /* collective */
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_trainer_free(t);
        af_raise(st);
        return -1;
    }
    self->t = t;
    self->api = &cpu_api;
    if (c_comm != NULL) {
        Py_INCREF(comm);
        self->comm = comm;
    }
    return 0;
}

static void trainer_dealloc(TrainerObject *self) {
    af_trainer_free(self->t);
    Py_XDECREF(self->comm); /* after the trainer that used it */
    Py_TYPE(self)->tp_free((PyObject *)self);
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

static PyObject *trainer_buffers(TrainerObject *self, PyObject *unused) {
    af_trainer *t = af_py_trainer_ready(self);
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
            snprintf(key, sizeof key, "%s.%s", items[i].prefix, af_py_net_names[net]);
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

static PyMethodDef trainer_methods[] = {
    AF_PY_TRAINER_METHODS,
    {"buffers", (PyCFunction)trainer_buffers, METH_NOARGS,
     "buffers() -> dict of zero-copy float32 views of the whole training state"},
    {NULL}};

static PyTypeObject TrainerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.trainer.Trainer",
    .tp_basicsize = sizeof(TrainerObject),
    .tp_dealloc = (destructor)trainer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Trainer(config: dict, batch: int, steps_per_epoch: int, comm: Comm | None = None, "
              "*, precision='fp32', inference=False): the C training state; with `comm` one "
              "rank of a data-parallel run (every step is then collective); inference=True: "
              "only what encode, restore and anomaly need",
    .tp_methods = trainer_methods,
    .tp_getset = af_py_trainer_getset,
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
