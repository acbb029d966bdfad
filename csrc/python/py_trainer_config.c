/* afire.Config (as a dict) -> af_trainer_config. Shared by the CPU trainer (afire._C) and the
 * CUDA one (afire._C_cuda), so both read a configuration the same way; the checks that need
 * no Python live in core/trainer_config.c. */
#include "py_util.h"
#include "py_trainer_config.h"

#include <math.h>
#include <string.h>

#include "common.h"
#include "trainer.h"

static int get_item(PyObject *d, const char *key, PyObject **out) {
    *out = PyDict_GetItemString(d, key); /* borrowed */
    if (*out == NULL) {
        PyErr_Format(PyExc_KeyError, "config is missing '%s'", key);
        return -1;
    }
    return 0;
}

static int get_int(PyObject *d, const char *key, int *out) {
    PyObject *v;
    if (get_item(d, key, &v) < 0) return -1;
    if (PyBool_Check(v) || !PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "config '%s' must be an int", key);
        return -1;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < -2147483647L || x > 2147483647L) {
        PyErr_Format(PyExc_ValueError, "config '%s' is out of range", key);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int get_bool(PyObject *d, const char *key, int *out) {
    PyObject *v;
    if (get_item(d, key, &v) < 0) return -1;
    int r = PyObject_IsTrue(v);
    if (r < 0) return -1;
    *out = r;
    return 0;
}

static int get_float(PyObject *d, const char *key, float *out) {
    PyObject *v;
    if (get_item(d, key, &v) < 0) return -1;
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    if (x != x) {
        PyErr_Format(PyExc_ValueError, "config '%s' is NaN", key);
        return -1;
    }
    *out = (float)x;
    return 0;
}

static int get_pair(PyObject *d, const char *key, double *a, double *b) {
    PyObject *v;
    if (get_item(d, key, &v) < 0) return -1;
    if (!PyArg_ParseTuple(v, "dd", a, b)) {
        PyErr_Clear();
        PyObject *t = PySequence_Tuple(v);
        if (t == NULL || !PyArg_ParseTuple(t, "dd", a, b)) {
            Py_XDECREF(t);
            PyErr_Format(PyExc_TypeError, "config '%s' must be a pair of numbers", key);
            return -1;
        }
        Py_DECREF(t);
    }
    return 0;
}

/* A get_pair result that must hold integers in [lo_min, INT_MAX] (the SLM ranges). */
static int int_pair(const char *key, double a, double b, int lo_min, int *x, int *y) {
    if (!(a >= lo_min && b >= a && b <= 2147483647.0) || a != (double)(long long)a ||
        b != (double)(long long)b) {
        af_errorf(PyExc_ValueError, "config '%s' must be two integers %d <= lo <= hi, got "
                     "(%g, %g)", key, lo_min, a, b);
        return -1;
    }
    *x = (int)a;
    *y = (int)b;
    return 0;
}

/* ValueError naming `key` unless lo <= v <= hi (NaN fails every comparison). */
static int in_range(const char *key, double v, double lo, double hi, int lo_open) {
    if (v != v || (lo_open ? !(v > lo) : !(v >= lo)) || !(v <= hi)) {
        af_errorf(PyExc_ValueError, "config '%s' must be in %s%g, %g], got %g", key,
                     lo_open ? "(" : "[", lo, hi, v);
        return -1;
    }
    return 0;
}

static int get_choice(PyObject *d, const char *key, const char *a, const char *b, int *out) {
    PyObject *v;
    if (get_item(d, key, &v) < 0) return -1;
    const char *s = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    if (s != NULL && strcmp(s, a) == 0) *out = 0;
    else if (s != NULL && strcmp(s, b) == 0) *out = 1;
    else {
        PyErr_Format(PyExc_ValueError, "config '%s' must be '%s' or '%s'", key, a, b);
        return -1;
    }
    return 0;
}

int af_trainer_config_from_dict(PyObject *d, af_trainer_config *c, int64_t steps_per_epoch) {
    memset(c, 0, sizeof *c);
    af_config *n = &c->net;
    int per_pos_last, per_pos_mask, seed, epochs, warmup, freeze, tt_warm;
    double lo, hi;
    if (get_int(d, "img_size", &n->S) || get_int(d, "patch_size", &n->P) ||
        get_int(d, "in_chans", &n->C) || get_int(d, "embed_dim", &n->D) ||
        get_int(d, "depth", &n->depth) || get_int(d, "num_heads", &n->H) ||
        get_int(d, "mlp_ratio", &n->mlp_ratio) || get_int(d, "decoder_dim", &n->Dd) ||
        get_int(d, "decoder_depth", &n->depth_d) || get_int(d, "decoder_heads", &n->Hd) ||
        get_int(d, "num_prototypes", &n->K) || get_int(d, "head_hidden", &n->head_hidden) ||
        get_int(d, "head_bottleneck", &n->head_bottleneck) ||
        get_bool(d, "per_position_last_layer", &per_pos_last) ||
        get_bool(d, "per_position_mask_token", &per_pos_mask) ||
        get_bool(d, "learned_pos_embed", &n->learned_pos) || get_int(d, "seed", &seed))
        return -1;
    n->shared_last_layer = !per_pos_last;
    n->shared_mask_token = !per_pos_mask;
    n->seed = (uint64_t)(uint32_t)seed;
    c->seed = n->seed;

    c->slm = af_slm_config_default();
    /* range-checked before the casts: a double outside int is undefined behaviour in C */
    if (get_pair(d, "slm_lesions", &lo, &hi) ||
        int_pair("slm_lesions", lo, hi, 0, &c->slm.lesions_min, &c->slm.lesions_max))
        return -1;
    if (get_pair(d, "slm_size", &lo, &hi) ||
        int_pair("slm_size", lo, hi, 1, &c->slm.size_min, &c->slm.size_max))
        return -1;
    if (get_int(d, "slm_crop", &c->slm.crop_max) || get_float(d, "slm_gamma2", &c->slm.gamma2) ||
        get_float(d, "slm_strength", &c->slm.strength))
        return -1;
    int rule;
    if (get_choice(d, "token_rule", "paper", "released", &rule)) return -1;
    c->slm.token_rule = rule ? AF_SLM_TOKENS_ANY : AF_SLM_TOKENS_MEAN;

    if (get_choice(d, "objective", "paper", "released", &c->objective) ||
        get_float(d, "tau_student", &c->tau_s) || get_float(d, "tau_similarity", &c->tau) ||
        get_float(d, "sinkhorn_eps", &c->sinkhorn_eps) ||
        get_int(d, "sinkhorn_iters", &c->sinkhorn_iters) ||
        get_float(d, "proto_momentum", &c->proto_m) || get_float(d, "w_stru", &c->w_stru) ||
        get_float(d, "w_cate", &c->w_cate) || get_float(d, "w_recon", &c->w_recon) ||
        get_float(d, "w_abnormal", &c->w_abn) || get_float(d, "clip_grad", &c->clip) ||
        get_choice(d, "clip_mode", "per_tensor", "global", &c->clip_global) ||
        get_float(d, "adam_eps", &c->adam_eps))
        return -1;
    /* not in the paper: the structure term's target (Config.stru_target). A dict without the
     * key (written before the field existed) means the paper's prototypes. */
    if (PyDict_GetItemString(d, "stru_target") == NULL) c->stru_target = AF_STRU_PROTOTYPE;
    else if (get_choice(d, "stru_target", "prototype", "teacher_token", &c->stru_target))
        return -1;
    /* bf16 (fast path) or fp32 on the GPU; the CPU trainer stores and ignores it */
    if (get_choice(d, "precision", "fp32", "bf16", &c->precision)) return -1;
    if (get_pair(d, "adam_betas", &lo, &hi) || in_range("adam_betas[0]", lo, 0.0, 1.0, 0) ||
        in_range("adam_betas[1]", hi, 0.0, 1.0, 0))
        return -1;
    if (lo >= 1.0 || hi >= 1.0) {
        af_errorf(PyExc_ValueError, "config 'adam_betas' must be < 1, got (%g, %g)", lo, hi);
        return -1;
    }
    c->beta1 = (float)lo;
    c->beta2 = (float)hi;

    float base_lr, min_lr, wd, wd_end, ema, tt, tt_end;
    int batch;
    if (get_float(d, "base_lr", &base_lr) || get_float(d, "min_lr", &min_lr) ||
        get_int(d, "batch_size", &batch) || get_int(d, "epochs", &epochs) ||
        get_int(d, "warmup_epochs", &warmup) || get_float(d, "weight_decay", &wd) ||
        get_float(d, "weight_decay_end", &wd_end) || get_float(d, "ema_momentum", &ema) ||
        get_float(d, "teacher_temp", &tt) || get_float(d, "teacher_temp_final", &tt_end) ||
        get_int(d, "teacher_temp_warmup_epochs", &tt_warm) ||
        get_int(d, "freeze_last_layer_epochs", &freeze))
        return -1;
    /* The ranges afire.Config.validate enforces, for callers that bypass it; inf passes
     * where Config lets it pass, NaN never (get_float). */
    if (batch < 1 || epochs < 1 || warmup < 0 || tt_warm < 0 || freeze < 0) {
        PyErr_SetString(PyExc_ValueError, "config: batch_size and epochs must be >= 1, the "
                        "*_epochs counts >= 0");
        return -1;
    }
    if (in_range("ema_momentum", ema, 0.0, 1.0, 0) ||
        in_range("proto_momentum", c->proto_m, 0.0, 1.0, 0) ||
        in_range("teacher_temp", tt, 0.0, INFINITY, 1) ||
        in_range("teacher_temp_final", tt_end, 0.0, INFINITY, 1) ||
        in_range("adam_eps", c->adam_eps, 0.0, INFINITY, 1) ||
        in_range("w_stru", c->w_stru, 0.0, INFINITY, 0) ||
        in_range("w_cate", c->w_cate, 0.0, INFINITY, 0) ||
        in_range("w_recon", c->w_recon, 0.0, INFINITY, 0) ||
        in_range("w_abnormal", c->w_abn, 0.0, INFINITY, 0) ||
        in_range("base_lr", base_lr, 0.0, INFINITY, 0) || in_range("min_lr", min_lr, 0.0, INFINITY, 0) ||
        in_range("weight_decay", wd, 0.0, INFINITY, 0) ||
        in_range("weight_decay_end", wd_end, 0.0, INFINITY, 0) ||
        in_range("clip_grad", c->clip, 0.0, INFINITY, 0))
        return -1;
    /* every epoch count is an int, so <= 2^31 steps per epoch keeps all products in int64 */
    if (steps_per_epoch < 1 || steps_per_epoch > 2147483647) {
        PyErr_Format(PyExc_ValueError, "steps_per_epoch must be in [1, 2^31), got %lld",
                     (long long)steps_per_epoch);
        return -1;
    }
    af_schedule *s = &c->sched;
    s->steps_per_epoch = steps_per_epoch;
    s->total_steps = (int64_t)epochs * steps_per_epoch;
    s->lr = (double)base_lr * batch / 256.0; /* METHOD §5: linear scaling with batch */
    s->min_lr = min_lr;
    s->warmup_steps = (int64_t)warmup * steps_per_epoch;
    s->wd = wd;
    s->wd_end = wd_end;
    s->ema = ema;
    s->ema_end = 1.0;
    s->tt = tt;
    s->tt_end = tt_end;
    s->tt_warmup_steps = (int64_t)tt_warm * steps_per_epoch;
    s->freeze_last_steps = (int64_t)freeze * steps_per_epoch;
    return 0;
}
