/* The parts of the Python Trainer type that the CPU binding (py_trainer.c,
 * afire._C.trainer.Trainer) and its GPU twin (py_cuda_trainer.c, afire._C_cuda.cuda.Trainer)
 * have in common: the argument checks, the locked calls, the result dicts and tuples, the
 * properties. One implementation, compiled into both extensions, so both types raise the same
 * exception with the same message for the same bad input.
 *
 * A binding describes its C trainer with an af_py_trainer_api, made by AF_PY_TRAINER_API from
 * the C API's name prefix (af_trainer_*, af_cuda_trainer_*: the two have the same functions and
 * the same field names), and sets `api` together with `t` when __init__ succeeds. Every shared
 * method checks `t` first, so `api` is only read once it is set. */
#ifndef AFIRE_PY_TRAINER_COMMON_H
#define AFIRE_PY_TRAINER_COMMON_H

#include "py_util.h"
#include "py_trainer_config.h"
#include "trainer.h"

/* What the shared code reads from a trainer: its sizes and the fields it sets. */
typedef struct {
    int B, S, C, L, T, Q, K, D;
    int64_t *step;
    int *protos_set;
    af_param_info *const *table; /* [AF_NET_COUNT] host parameter tables */
    const int *ntable;
} af_py_trainer_view;

typedef struct {
    void (*view)(void *t, af_py_trainer_view *v);
    af_status (*acquire)(void *t);
    void (*release)(void *t);
    af_status (*step)(void *t, const uint8_t *images, int B, af_step_stats *s);
    af_status (*grads)(void *t, const uint8_t *images, int B, af_step_stats *s);
    af_status (*encode)(void *t, float *tokens, const uint8_t *images, int B, af_branch br);
    af_status (*restore)(void *t, float *pred, float *target, const uint8_t *images,
                         const uint8_t *token_mask, int B);
    af_status (*anomaly)(void *t, double *score, double *log_score, double *err,
                         const uint8_t *images, int B);
} af_py_trainer_api;

typedef struct {
    PyObject_HEAD
    void *t;                      /* af_trainer * / af_cuda_trainer *; NULL before __init__ */
    const af_py_trainer_api *api; /* set with t */
    PyObject *comm;               /* the communicator of a data-parallel run (kept alive), or NULL */
} af_py_trainer;

/* `static const af_py_trainer_api name_`: typed adapters from the C API `prefix_`_step, ...
 * (prefix_ = af_trainer or af_cuda_trainer) of the trainer struct `type_`. */
#define AF_PY_TRAINER_API(name_, type_, prefix_)                                                  \
    static void name_##_view(void *p, af_py_trainer_view *v) {                                    \
        type_ *t = p;                                                                             \
        *v = (af_py_trainer_view){t->B, t->S, t->C, t->L, t->T, t->Q, t->K, t->D,                \
                                  &t->step, &t->protos_set, t->model->table, t->model->ntable};   \
    }                                                                                             \
    static af_status name_##_acquire(void *t) { return prefix_##_acquire(t); }                   \
    static void name_##_release(void *t) { prefix_##_release(t); }                               \
    static af_status name_##_step(void *t, const uint8_t *x, int B, af_step_stats *s) {          \
        return prefix_##_step(t, x, B, s);                                                        \
    }                                                                                             \
    static af_status name_##_grads(void *t, const uint8_t *x, int B, af_step_stats *s) {         \
        return prefix_##_grads(t, x, B, s);                                                       \
    }                                                                                             \
    static af_status name_##_encode(void *t, float *tok, const uint8_t *x, int B, af_branch br) { \
        return prefix_##_encode(t, tok, x, B, br);                                                \
    }                                                                                             \
    static af_status name_##_restore(void *t, float *pred, float *target, const uint8_t *x,      \
                                     const uint8_t *mask, int B) {                                \
        return prefix_##_restore(t, pred, target, x, mask, B);                                    \
    }                                                                                             \
    static af_status name_##_anomaly(void *t, double *score, double *logs, double *err,          \
                                     const uint8_t *x, int B) {                                   \
        return prefix_##_anomaly(t, score, logs, err, x, B);                                      \
    }                                                                                             \
    static const af_py_trainer_api name_ = {name_##_view,  name_##_acquire, name_##_release,     \
                                            name_##_step,  name_##_grads,   name_##_encode,      \
                                            name_##_restore, name_##_anomaly}

/* Runs `call` (an af_status expression) with the GIL released while holding the trainer. */
#define AF_PY_RUN_LOCKED(api, t, st, call)       \
    do {                                         \
        Py_BEGIN_ALLOW_THREADS                   \
        st = (api)->acquire(t);                  \
        if (st == AF_OK) {                       \
            st = (call);                         \
            (api)->release(t);                   \
        }                                        \
        Py_END_ALLOW_THREADS                     \
    } while (0)

/* self->t, or NULL with RuntimeError when __init__ has not succeeded. */
void *af_py_trainer_ready(af_py_trainer *self);

/* uint8 images [N,S,S]; N in [1, max_batch] (max_batch 0: any N >= 1). New reference or NULL. */
PyArrayObject *af_py_trainer_images(PyObject *obj, int S, int max_batch);

/* Parses (images, branch='teacher') with PyArg format `fmt` ("O|s:<name>"). 0/-1. */
int af_py_trainer_encode_args(PyObject *args, PyObject *kw, const char *fmt, PyObject **images,
                              af_branch *br);

/* The methods (self is an af_py_trainer). */
PyObject *af_py_trainer_step(PyObject *self, PyObject *images);
PyObject *af_py_trainer_gradients(PyObject *self, PyObject *images);
PyObject *af_py_trainer_encode(PyObject *self, PyObject *args, PyObject *kw);
PyObject *af_py_trainer_restore(PyObject *self, PyObject *args, PyObject *kw);
PyObject *af_py_trainer_anomaly(PyObject *self, PyObject *images);
PyObject *af_py_trainer_param_table(PyObject *self, PyObject *network);

/* step, prototypes_set, dims. */
extern PyGetSetDef af_py_trainer_getset[];

/* "encoder", "head", "decoder" (the buffers() key suffixes). */
extern const char *const af_py_net_names[AF_NET_COUNT];

/* The method-table rows of the shared methods (buffers() and the extras are the binding's). */
#define AF_PY_TRAINER_METHODS                                                                     \
    {"train_step", (PyCFunction)af_py_trainer_step, METH_O,                                       \
     "train_step(images uint8[B,S,S]) -> dict of losses and schedule values"},                    \
    {"gradients", (PyCFunction)af_py_trainer_gradients, METH_O,                                   \
     "gradients(images) -> dict: the step's losses and gradients (in buffers()['grad.*']) "       \
     "without updating anything"},                                                                \
    {"encode", (PyCFunction)(void (*)(void))af_py_trainer_encode, METH_VARARGS | METH_KEYWORDS,   \
     "encode(images, branch='teacher') -> float32[B,T,D]"},                                       \
    {"restore", (PyCFunction)(void (*)(void))af_py_trainer_restore, METH_VARARGS | METH_KEYWORDS, \
     "restore(images, token_mask=None) -> (pred[B,L,Q], target[B,L,Q])"},                         \
    {"anomaly", (PyCFunction)af_py_trainer_anomaly, METH_O,                                       \
     "anomaly(images) -> (score[B], log_score[B], err[B,L]) float64 (Eq. 51)"},                   \
    {"param_table", (PyCFunction)af_py_trainer_param_table, METH_O,                               \
     "param_table('encoder'|'head'|'decoder') -> list of named tensors in the flat buffer"}

#endif
