/* afire._C.downstream: augmentation, linear probe, fine-tuning Classifier and Segmenter
 * (METHOD §6). Every argument is checked here (TypeError for a dtype, ValueError naming
 * the argument for a shape or value); the compute runs in C with the GIL released. */
#include "py_util.h"

#include <math.h>
#include <string.h>

#include "common.h"
#include "downstream.h"
#include "py_trainer_config.h"
#include "trainer.h"

#define BETA1 0.9f
#define BETA2 0.999f
#define ADAM_EPS 1e-8f

/* ------------------------------------------------------------------ argument helpers */

/* A pair of floats from any 2-sequence. */
static int parse_pair(PyObject *obj, const char *name, float *a, float *b) {
    PyObject *t = PySequence_Check(obj) ? PySequence_Tuple(obj) : NULL;
    double x, y;
    if (t == NULL || PyTuple_GET_SIZE(t) != 2 || !PyArg_ParseTuple(t, "dd", &x, &y)) {
        Py_XDECREF(t);
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a pair of numbers", name);
        return -1;
    }
    Py_DECREF(t);
    *a = (float)x, *b = (float)y;
    return 0;
}

static int parse_augment(af_augment_config *a, PyObject *scale, PyObject *ratio, int flip,
                         double max_rotation) {
    *a = af_augment_default();
    if (scale && parse_pair(scale, "crop_scale", &a->scale_lo, &a->scale_hi) < 0) return -1;
    if (ratio && parse_pair(ratio, "crop_ratio", &a->ratio_lo, &a->ratio_hi) < 0) return -1;
    a->flip = flip;
    a->max_rotation = (float)max_rotation;
    if (!isfinite(max_rotation)) {
        PyErr_SetString(PyExc_ValueError, "max_rotation must be finite");
        return -1;
    }
    af_status st = af_augment_check(a);
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    return 0;
}

/* uint8 [N,S,S] images (N >= min_n; N <= max_n when max_n > 0). */
static PyArrayObject *images_arg(PyObject *obj, const char *name, int S, npy_intp min_n,
                                 npy_intp max_n) {
    PyArrayObject *a = af_arg_array(obj, name, NPY_UINT8, 3);
    if (a == NULL) return NULL;
    if (af_check_dim(a, name, 1, S) < 0 || af_check_dim(a, name, 2, S) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    npy_intp n = PyArray_DIM(a, 0);
    if (n < min_n || (max_n > 0 && n > max_n)) {
        if (max_n > 0)
            PyErr_Format(PyExc_ValueError, "%s: batch of %zd, must be between %zd and the batch "
                         "capacity %zd", name, (Py_ssize_t)n, (Py_ssize_t)min_n, (Py_ssize_t)max_n);
        else
            PyErr_Format(PyExc_ValueError, "%s: need at least %zd images", name, (Py_ssize_t)min_n);
        Py_DECREF(a);
        return NULL;
    }
    if (n > 2147483647) {
        PyErr_Format(PyExc_ValueError, "%s: too many images", name);
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

static int check_seed_step(long long seed, long long step) {
    if (seed < 0) {
        PyErr_SetString(PyExc_ValueError, "seed must be >= 0");
        return -1;
    }
    if (step < 0 || step > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "step must be in [0, 2^32)");
        return -1;
    }
    return 0;
}

static PyObject *flat_view(PyObject *owner, float *data, size_t n) {
    npy_intp shape[1] = {(npy_intp)n};
    return af_view_f32(owner, data, 1, shape);
}

/* d[key] = value, stealing the value reference. */
static int set_steal(PyObject *d, const char *key, PyObject *v) {
    if (v == NULL) return -1;
    int r = PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
    return r;
}

static PyObject *encoder_table(const af_model *m) {
    int n = m->ntable[AF_NET_ENCODER];
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        const af_param_info *p = &m->table[AF_NET_ENCODER][i];
        PyObject *shape = PyTuple_New(p->ndim);
        if (shape == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        for (int k = 0; k < p->ndim; k++) PyTuple_SET_ITEM(shape, k, PyLong_FromLongLong(p->shape[k]));
        PyObject *row = Py_BuildValue("{s:s,s:n,s:N,s:O,s:O}", "name", p->name, "offset",
                                      (Py_ssize_t)p->offset, "shape", shape, "decay",
                                      p->decay ? Py_True : Py_False, "trainable",
                                      p->trainable ? Py_True : Py_False);
        if (row == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, row);
    }
    return list;
}

/* afire.Config.to_dict() -> the network configuration. */
static int config_arg(PyObject *d, af_config *out) {
    af_trainer_config tc;
    if (af_trainer_config_from_dict(d, &tc, 1) < 0) return -1;
    af_status st = af_config_validate(&tc.net);
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    *out = tc.net;
    return 0;
}

/* ------------------------------------------------------------------ augment */

static PyObject *py_augment(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "seed", "step", "masks", "crop_scale", "crop_ratio",
                             "flip", "max_rotation", NULL};
    PyObject *iobj, *mobj = Py_None, *scale = NULL, *ratio = NULL;
    long long seed, step;
    int flip = 1;
    double rot = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLL|$OOOpd:augment", kwlist, &iobj, &seed, &step,
                                     &mobj, &scale, &ratio, &flip, &rot))
        return NULL;
    af_augment_config ac;
    if (check_seed_step(seed, step) < 0 || parse_augment(&ac, scale, ratio, flip, rot) < 0)
        return NULL;
    PyArrayObject *img = af_arg_array(iobj, "images", NPY_UINT8, 3), *mask = NULL, *out = NULL,
                  *out_mask = NULL;
    if (img == NULL) return NULL;
    npy_intp B = PyArray_DIM(img, 0), S = PyArray_DIM(img, 1);
    if (S != PyArray_DIM(img, 2) || S < 1 || S > 65536 || B > 2147483647) {
        PyErr_SetString(PyExc_ValueError, "images must be [B, S, S] with square images");
        goto fail;
    }
    if (mobj != Py_None) {
        mask = af_arg_array(mobj, "masks", NPY_UINT8, 3);
        if (mask == NULL || af_check_dim(mask, "masks", 0, B) < 0 ||
            af_check_dim(mask, "masks", 1, S) < 0 || af_check_dim(mask, "masks", 2, S) < 0)
            goto fail;
    }
    npy_intp shape[3] = {B, S, S};
    out = af_new_array(3, shape, NPY_UINT8);
    if (out == NULL || (mask && (out_mask = af_new_array(3, shape, NPY_UINT8)) == NULL)) goto fail;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_augment(AF_U8(out), mask ? AF_U8(out_mask) : NULL, AF_U8(img), mask ? AF_U8(mask) : NULL,
                    (int)B, (int)S, (uint64_t)seed, step, &ac);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto fail;
    }
    Py_DECREF(img);
    Py_XDECREF(mask);
    if (out_mask) return Py_BuildValue("(NN)", out, out_mask);
    return (PyObject *)out;
fail:
    Py_XDECREF(img);
    Py_XDECREF(mask);
    Py_XDECREF(out);
    Py_XDECREF(out_mask);
    return NULL;
}

/* ------------------------------------------------------------------ losses */

static PyObject *py_bce(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "targets", NULL};
    PyObject *lo, *to;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:bce_with_logits", kwlist, &lo, &to)) return NULL;
    PyArrayObject *z = af_arg_array(lo, "logits", NPY_FLOAT32, 2), *y = NULL, *g = NULL;
    if (z == NULL) return NULL;
    npy_intp N = PyArray_DIM(z, 0), NC = PyArray_DIM(z, 1);
    y = af_arg_array(to, "targets", NPY_FLOAT32, 2);
    if (y == NULL || af_check_dim(y, "targets", 0, N) < 0 || af_check_dim(y, "targets", 1, NC) < 0)
        goto fail;
    if (NC < 1 || N > 2147483647 || NC > 2147483647) {
        PyErr_SetString(PyExc_ValueError, "logits: need at least one class");
        goto fail;
    }
    g = af_new_array(2, PyArray_DIMS(z), NPY_FLOAT32);
    if (g == NULL) goto fail;
    double loss;
    int64_t cnt;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_bce_logits(&loss, AF_F32(g), &cnt, AF_F32(z), AF_F32(y), (int)N, (int)NC);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto fail;
    }
    Py_DECREF(z);
    Py_DECREF(y);
    return Py_BuildValue("(dN)", loss, g);
fail:
    Py_XDECREF(z);
    Py_XDECREF(y);
    Py_XDECREF(g);
    return NULL;
}

static PyObject *py_seg_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "masks", "smooth", NULL};
    PyObject *lo, *mo;
    double smooth = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|d:segmentation_loss", kwlist, &lo, &mo, &smooth))
        return NULL;
    PyArrayObject *z = af_arg_array(lo, "logits", NPY_FLOAT32, 3), *y = NULL, *g = NULL;
    if (z == NULL) return NULL;
    npy_intp B = PyArray_DIM(z, 0), H = PyArray_DIM(z, 1), W = PyArray_DIM(z, 2);
    y = af_arg_array(mo, "masks", NPY_UINT8, 3);
    if (y == NULL || af_check_dim(y, "masks", 0, B) < 0 || af_check_dim(y, "masks", 1, H) < 0 ||
        af_check_dim(y, "masks", 2, W) < 0)
        goto fail;
    if (B < 1 || H * W < 1 || (double)H * W > 2147483647.0 || B > 2147483647) {
        PyErr_SetString(PyExc_ValueError, "logits: need at least one image of at least one pixel");
        goto fail;
    }
    g = af_new_array(3, PyArray_DIMS(z), NPY_FLOAT32);
    if (g == NULL) goto fail;
    double loss, bce, dice;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_seg_loss(&loss, &bce, &dice, AF_F32(g), AF_F32(z), AF_U8(y), (int)B, (int)(H * W),
                     (float)smooth);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto fail;
    }
    Py_DECREF(z);
    Py_DECREF(y);
    return Py_BuildValue("(dddN)", loss, bce, dice, g);
fail:
    Py_XDECREF(z);
    Py_XDECREF(y);
    Py_XDECREF(g);
    return NULL;
}

/* ------------------------------------------------------------------ linear probe */

/* features f32[N,D] (finite), labels f32[N,C] or f32[N] (C = 1). */
static int probe_arrays(PyObject *fo, PyObject *lo, PyArrayObject **X, PyArrayObject **Y,
                        npy_intp min_n) {
    *X = af_arg_array(fo, "features", NPY_FLOAT32, 2);
    *Y = NULL;
    if (*X == NULL) return -1;
    npy_intp N = PyArray_DIM(*X, 0), D = PyArray_DIM(*X, 1);
    if (N < min_n || D < 1) {
        PyErr_Format(PyExc_ValueError, "features must be [N, D] with N >= %zd and D >= 1",
                     (Py_ssize_t)min_n);
        return -1;
    }
    if (af_check_finite(*X, "features") < 0) return -1;
    if (lo == NULL) return 0;
    *Y = af_arg_array(lo, "labels", NPY_FLOAT32, -1);
    if (*Y == NULL) return -1;
    int nd = PyArray_NDIM(*Y);
    if ((nd != 1 && nd != 2) || af_check_dim(*Y, "labels", 0, N) < 0 ||
        (nd == 2 && PyArray_DIM(*Y, 1) < 1)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "labels must be [N, C] (or [N] for one class)");
        return -1;
    }
    return 0;
}

static PyObject *py_probe_fit(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"features", "labels", "epochs", "lr", "weight_decay", "batch",
                             "seed", NULL};
    PyObject *fo, *lo;
    int epochs = 100, batch = 256;
    double lr = 1e-3, wd = 1e-4;
    long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$iddiL:linear_probe_fit", kwlist, &fo, &lo,
                                     &epochs, &lr, &wd, &batch, &seed))
        return NULL;
    if (epochs < 1 || batch < 1 || seed < 0 || !(lr > 0) || !isfinite(lr) || !(wd >= 0) ||
        !isfinite(wd)) {
        PyErr_Format(PyExc_ValueError, "%s", epochs < 1 ? "epochs must be >= 1"
                     : batch < 1 ? "batch must be >= 1" : seed < 0 ? "seed must be >= 0"
                     : !(lr > 0) || !isfinite(lr) ? "lr must be finite and > 0"
                     : "weight_decay must be finite and >= 0");
        return NULL;
    }
    PyArrayObject *X, *Y, *W = NULL, *b = NULL, *mean = NULL, *sd = NULL, *loss = NULL;
    if (probe_arrays(fo, lo, &X, &Y, 1) < 0) goto fail;
    npy_intp N = PyArray_DIM(X, 0), D = PyArray_DIM(X, 1);
    npy_intp NC = PyArray_NDIM(Y) == 2 ? PyArray_DIM(Y, 1) : 1;
    if (N > 2147483647 || D > 2147483647 || NC > 2147483647) {
        PyErr_SetString(PyExc_ValueError, "features: too large");
        goto fail;
    }
    npy_intp sw[2] = {NC, D}, sb[1] = {NC}, sd1[1] = {D}, sl[1] = {epochs};
    W = af_new_array(2, sw, NPY_FLOAT32), b = af_new_array(1, sb, NPY_FLOAT32);
    mean = af_new_array(1, sd1, NPY_FLOAT32), sd = af_new_array(1, sd1, NPY_FLOAT32);
    loss = af_new_array(1, sl, NPY_FLOAT32);
    if (!W || !b || !mean || !sd || !loss) goto fail;
    af_probe_config c = {epochs, batch, (float)lr, (float)wd, BETA1, BETA2, ADAM_EPS, (uint64_t)seed};
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_probe_fit(AF_F32(W), AF_F32(b), AF_F32(mean), AF_F32(sd), AF_F32(loss), AF_F32(X),
                      AF_F32(Y), (int)N, (int)D, (int)NC, &c);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto fail;
    }
    Py_DECREF(X);
    Py_DECREF(Y);
    return Py_BuildValue("{s:N,s:N,s:N,s:N,s:N}", "weight", W, "bias", b, "mean", mean, "std", sd,
                         "loss", loss);
fail:
    Py_XDECREF(X);
    Py_XDECREF(Y);
    Py_XDECREF(W);
    Py_XDECREF(b);
    Py_XDECREF(mean);
    Py_XDECREF(sd);
    Py_XDECREF(loss);
    return NULL;
}

/* weight [C,D], bias [C], mean [D], std [D] (std > 0) against D. */
static int probe_params(PyObject *wo, PyObject *bo, PyObject *mo, PyObject *so, npy_intp D,
                        PyArrayObject **W, PyArrayObject **b, PyArrayObject **m,
                        PyArrayObject **s) {
    *W = af_arg_array(wo, "weight", NPY_FLOAT32, 2);
    if (*W == NULL || af_check_dim(*W, "weight", 1, D) < 0) return -1;
    npy_intp NC = PyArray_DIM(*W, 0);
    if (NC < 1) {
        PyErr_SetString(PyExc_ValueError, "weight must have at least one row");
        return -1;
    }
    *b = af_arg_array(bo, "bias", NPY_FLOAT32, 1);
    if (*b == NULL || af_check_dim(*b, "bias", 0, NC) < 0) return -1;
    *m = af_arg_array(mo, "mean", NPY_FLOAT32, 1);
    if (*m == NULL || af_check_dim(*m, "mean", 0, D) < 0) return -1;
    *s = af_arg_array(so, "std", NPY_FLOAT32, 1);
    if (*s == NULL || af_check_dim(*s, "std", 0, D) < 0) return -1;
    if (af_check_finite(*W, "weight") < 0 || af_check_finite(*b, "bias") < 0 ||
        af_check_finite(*m, "mean") < 0 || af_check_finite(*s, "std") < 0)
        return -1;
    for (npy_intp d = 0; d < D; d++)
        if (!(AF_F32(*s)[d] > 0.0f)) {
            PyErr_Format(PyExc_ValueError, "std must be > 0 (index %zd)", (Py_ssize_t)d);
            return -1;
        }
    return 0;
}

static PyObject *py_probe_predict(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"features", "weight", "bias", "mean", "std", NULL};
    PyObject *fo, *wo, *bo, *mo, *so;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:linear_probe_predict", kwlist, &fo, &wo, &bo,
                                     &mo, &so))
        return NULL;
    PyArrayObject *X, *Y, *W = NULL, *b = NULL, *m = NULL, *s = NULL, *out = NULL;
    if (probe_arrays(fo, NULL, &X, &Y, 0) < 0) goto fail;
    npy_intp N = PyArray_DIM(X, 0), D = PyArray_DIM(X, 1);
    if (probe_params(wo, bo, mo, so, D, &W, &b, &m, &s) < 0) goto fail;
    npy_intp NC = PyArray_DIM(W, 0), shape[2] = {N, NC};
    if (N > 2147483647 || D > 2147483647 || NC > 2147483647) {
        PyErr_SetString(PyExc_ValueError, "features: too large");
        goto fail;
    }
    out = af_new_array(2, shape, NPY_FLOAT32);
    if (out == NULL) goto fail;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_probe_predict(AF_F32(out), AF_F32(X), AF_F32(W), AF_F32(b), AF_F32(m), AF_F32(s),
                          (int)N, (int)D, (int)NC);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto fail;
    }
    Py_DECREF(X); Py_DECREF(W); Py_DECREF(b); Py_DECREF(m); Py_DECREF(s);
    return (PyObject *)out;
fail:
    Py_XDECREF(X); Py_XDECREF(W); Py_XDECREF(b); Py_XDECREF(m); Py_XDECREF(s); Py_XDECREF(out);
    return NULL;
}

static PyObject *py_probe_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"features", "labels", "weight", "bias", "mean", "std", NULL};
    PyObject *fo, *lo, *wo, *bo, *mo, *so;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO:linear_probe_loss", kwlist, &fo, &lo, &wo,
                                     &bo, &mo, &so))
        return NULL;
    PyArrayObject *X, *Y, *W = NULL, *b = NULL, *m = NULL, *s = NULL, *dW = NULL, *db = NULL;
    float *scratch = NULL;
    if (probe_arrays(fo, lo, &X, &Y, 1) < 0) goto fail;
    npy_intp N = PyArray_DIM(X, 0), D = PyArray_DIM(X, 1);
    if (probe_params(wo, bo, mo, so, D, &W, &b, &m, &s) < 0) goto fail;
    npy_intp NC = PyArray_DIM(W, 0);
    if ((PyArray_NDIM(Y) == 2 ? PyArray_DIM(Y, 1) : 1) != NC) {
        PyErr_SetString(PyExc_ValueError, "labels: the class count differs from weight's rows");
        goto fail;
    }
    dW = af_new_array(2, PyArray_DIMS(W), NPY_FLOAT32);
    db = af_new_array(1, PyArray_DIMS(b), NPY_FLOAT32);
    scratch = af_calloc((size_t)N * (size_t)(D + 2 * NC), sizeof(float));
    if (!dW || !db || !scratch) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto fail;
    }
    double loss;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_probe_loss(&loss, AF_F32(dW), AF_F32(db), AF_F32(X), AF_F32(Y), AF_F32(W), AF_F32(b),
                       AF_F32(m), AF_F32(s), (int)N, (int)D, (int)NC, scratch);
    Py_END_ALLOW_THREADS
    af_free(scratch);
    scratch = NULL;
    if (st != AF_OK) {
        af_raise(st);
        goto fail;
    }
    Py_DECREF(X); Py_DECREF(Y); Py_DECREF(W); Py_DECREF(b); Py_DECREF(m); Py_DECREF(s);
    return Py_BuildValue("(dNN)", loss, dW, db);
fail:
    af_free(scratch);
    Py_XDECREF(X); Py_XDECREF(Y); Py_XDECREF(W); Py_XDECREF(b); Py_XDECREF(m); Py_XDECREF(s);
    Py_XDECREF(dW); Py_XDECREF(db);
    return NULL;
}

/* ------------------------------------------------------------------ Classifier, Segmenter */

/* What differs between the two networks where the shared methods below need it. */
typedef struct head_part head_part;
typedef struct {
    void (*free)(void *net);
    /* the named views of the flat head buffer, in layout order; returns how many (<= 4) */
    int (*head_parts)(const void *net, head_part *parts);
} ft_kind;

/* Both Python types hold their C network (af_classifier / af_segmenter), whose first member
 * is the shared af_ft_net, so the methods that only need that serve both types. */
typedef struct {
    PyObject_HEAD
    void *net;
    const ft_kind *kind;       /* set first thing in __init__ */
} FtObject;

/* "Classifier" / "Segmenter", for messages. */
static const char *ft_name(FtObject *self) {
    const char *n = Py_TYPE(self)->tp_name, *dot = strrchr(n, '.');
    return dot ? dot + 1 : n;
}

static af_ft_net *ft_ready(FtObject *self) {
    if (self->net == NULL)
        PyErr_Format(PyExc_RuntimeError, "%s is not initialised", ft_name(self));
    return self->net;
}

static void ft_dealloc(FtObject *self) {
    if (self->net) self->kind->free(self->net);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The constructors' first checks: config, seed, augmentation. */
static int ft_init_args(PyObject *d, long long seed, PyObject *scale, PyObject *ratio, int flip,
                        double rot, af_config *cfg, af_augment_config *ac) {
    if (config_arg(d, cfg) < 0 || check_seed_step(seed, 0) < 0 ||
        parse_augment(ac, scale, ratio, flip, rot) < 0)
        return -1;
    return 0;
}

static int check_batch_arg(int batch) {
    if (batch < 1) {
        PyErr_SetString(PyExc_ValueError, "batch must be >= 1");
        return -1;
    }
    return 0;
}

/* Replaces the network (a repeated __init__) by `net`, created with the defaults, now given
 * the parsed augmentation. */
static void ft_install(FtObject *self, af_ft_net *net, const af_augment_config *ac) {
    net->aug = *ac;
    if (self->net) self->kind->free(self->net);
    self->net = net;
}

#define RUN_LOCKED(n, st, call)      \
    do {                             \
        Py_BEGIN_ALLOW_THREADS       \
        st = af_ft_acquire(n);       \
        if (st == AF_OK) {           \
            st = (call);             \
            af_ft_release(n);        \
        }                            \
        Py_END_ALLOW_THREADS         \
    } while (0)

/* The arguments of train_step (update = 1) or gradients (update = 0), whose second
 * argument is `second` ("targets" / "masks"): *img = the checked images batch (a new
 * reference), *so = the second argument as given. */
static af_ft_net *ft_run_args(FtObject *self, PyObject *args, PyObject *kw, int update,
                              char *second, PyArrayObject **img, PyObject **so,
                              af_ft_step_args *a, int *augment) {
    char *kw_step[] = {"images", second, "lr", "weight_decay", "step", "augment", NULL};
    char *kw_grad[] = {"images", second, "augment", "step", NULL};
    PyObject *io;
    double lr = 0, wd = 0;
    long long step = 0;
    *augment = update;
    int ok = update ? PyArg_ParseTupleAndKeywords(args, kw, "OOddL|p:train_step", kw_step, &io,
                                                  so, &lr, &wd, &step, augment)
                    : PyArg_ParseTupleAndKeywords(args, kw, "OO|pL:gradients", kw_grad, &io, so,
                                                  augment, &step);
    if (!ok || check_seed_step(0, step) < 0) return NULL;
    af_ft_net *n = ft_ready(self);
    if (n == NULL) return NULL;
    *img = images_arg(io, "images", n->S, 1, n->B);
    if (*img == NULL) return NULL;
    *a = (af_ft_step_args){(float)lr, (float)wd, BETA1, BETA2, ADAM_EPS, step};
    return n;
}

/* Inference on images u8[N,S,S] (any N): a new f32 array [N, tail...] filled by
 * fn(net, out, images, N, k) while holding the network. */
typedef af_status (*ft_infer_fn)(void *net, float *out, const uint8_t *images, int N, int k);

static PyObject *ft_infer(FtObject *self, PyObject *io, int ndim, npy_intp t1, npy_intp t2,
                          ft_infer_fn fn, int k) {
    af_ft_net *n = ft_ready(self);
    if (n == NULL) return NULL;
    PyArrayObject *img = images_arg(io, "images", n->S, 0, 0);
    if (img == NULL) return NULL;
    npy_intp shape[3] = {PyArray_DIM(img, 0), t1, t2};
    PyArrayObject *out = af_new_array(ndim, shape, NPY_FLOAT32);
    af_status st = AF_ENOMEM;
    if (out) RUN_LOCKED(n, st, fn(self->net, AF_F32(out), AF_U8(img), (int)shape[0], k));
    Py_DECREF(img);
    if (st != AF_OK) {
        Py_XDECREF(out);
        return PyErr_Occurred() ? NULL : af_raise(st);
    }
    return (PyObject *)out;
}

static PyObject *ft_encoder_params(FtObject *self, PyObject *unused) {
    af_ft_net *n = ft_ready(self);
    return n ? flat_view((PyObject *)self, n->model->params[AF_NET_ENCODER],
                         n->model->numel[AF_NET_ENCODER]) : NULL;
}
static PyObject *ft_encoder_grads(FtObject *self, PyObject *unused) {
    af_ft_net *n = ft_ready(self);
    return n ? flat_view((PyObject *)self, n->model->grads[AF_NET_ENCODER],
                         n->model->numel[AF_NET_ENCODER]) : NULL;
}
static PyObject *ft_param_table(FtObject *self, PyObject *unused) {
    af_ft_net *n = ft_ready(self);
    return n ? encoder_table(n->model) : NULL;
}

/* One view of the flat head buffer: [rows, cols], or [rows] when cols == 0. */
struct head_part {
    const char *name;
    npy_intp rows, cols;
};

/* dict(name: view) of `base` (the head's params or grads). */
static PyObject *ft_head_dict(FtObject *self, float *base) {
    head_part parts[4];
    int np = self->kind->head_parts(self->net, parts);
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    for (int i = 0; i < np; i++) {
        npy_intp shape[2] = {parts[i].rows, parts[i].cols};
        if (set_steal(d, parts[i].name,
                      af_view_f32((PyObject *)self, base, parts[i].cols ? 2 : 1, shape)) < 0) {
            Py_DECREF(d);
            return NULL;
        }
        base += parts[i].rows * (parts[i].cols ? parts[i].cols : 1);
    }
    return d;
}
static PyObject *ft_head_params(FtObject *self, PyObject *unused) {
    af_ft_net *n = ft_ready(self);
    return n ? ft_head_dict(self, n->head) : NULL;
}
static PyObject *ft_head_grads(FtObject *self, PyObject *unused) {
    af_ft_net *n = ft_ready(self);
    return n ? ft_head_dict(self, n->head_grad) : NULL;
}

#define FT_SHARED_METHODS(head_doc)                                                              \
    {"encoder_params", (PyCFunction)ft_encoder_params, METH_NOARGS,                              \
     "encoder_params() -> writable float32 view of the flat encoder buffer"},                    \
    {"encoder_grads", (PyCFunction)ft_encoder_grads, METH_NOARGS,                                \
     "encoder_grads() -> float32 view of the encoder gradients (same layout)"},                  \
    {"param_table", (PyCFunction)ft_param_table, METH_NOARGS,                                    \
     "param_table() -> list of dict(name, offset, shape, decay, trainable) for the encoder"},    \
    {"head_params", (PyCFunction)ft_head_params, METH_NOARGS,                                    \
     "head_params() -> dict(" head_doc ") writable views"},                                      \
    {"head_grads", (PyCFunction)ft_head_grads, METH_NOARGS,                                      \
     "head_grads() -> dict(" head_doc ") gradient views"}

/* ------------------------------------------------------------------ Classifier */

static void cls_free(void *net) { af_classifier_free(net); }

/* norm_w [D], norm_b [D], fc_w [C,D], fc_b [C] */
static int cls_head_parts(const void *net, head_part *p) {
    const af_classifier *c = net;
    npy_intp D = c->net.D, NC = c->NC;
    p[0] = (head_part){"norm_w", D, 0}, p[1] = (head_part){"norm_b", D, 0};
    p[2] = (head_part){"fc_w", NC, D}, p[3] = (head_part){"fc_b", NC, 0};
    return 4;
}

static const ft_kind cls_kind = {cls_free, cls_head_parts};

static int classifier_init(FtObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "num_classes", "batch", "seed", "freeze_encoder",
                             "crop_scale", "crop_ratio", "flip", "max_rotation", NULL};
    self->kind = &cls_kind;
    PyObject *d, *scale = NULL, *ratio = NULL;
    int NC, batch, freeze = 0, flip = 1;
    long long seed = 0;
    double rot = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!ii|Lp$OOpd:Classifier", kwlist, &PyDict_Type, &d,
                                     &NC, &batch, &seed, &freeze, &scale, &ratio, &flip, &rot))
        return -1;
    af_config cfg;
    af_augment_config ac;
    if (ft_init_args(d, seed, scale, ratio, flip, rot, &cfg, &ac) < 0) return -1;
    if (NC < 1) {
        PyErr_SetString(PyExc_ValueError, "num_classes must be >= 1");
        return -1;
    }
    if (check_batch_arg(batch) < 0) return -1;
    af_classifier *c = NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_classifier_create(&c, &cfg, NC, batch, (uint64_t)seed, freeze);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    ft_install(self, &c->net, &ac);
    return 0;
}

/* targets f32[B,C]. */
static PyArrayObject *targets_arg(PyObject *obj, npy_intp B, int NC) {
    PyArrayObject *t = af_arg_array(obj, "targets", NPY_FLOAT32, 2);
    if (t == NULL) return NULL;
    if (af_check_dim(t, "targets", 0, B) < 0 || af_check_dim(t, "targets", 1, NC) < 0) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

/* train_step (update = 1) or gradients (update = 0). */
static PyObject *cls_run(FtObject *self, PyObject *args, PyObject *kw, int update) {
    PyArrayObject *img, *tg;
    PyObject *to;
    af_ft_step_args a;
    int augment;
    if (ft_run_args(self, args, kw, update, "targets", &img, &to, &a, &augment) == NULL)
        return NULL;
    af_classifier *c = self->net;
    tg = targets_arg(to, PyArray_DIM(img, 0), c->NC);
    if (tg == NULL) {
        Py_DECREF(img);
        return NULL;
    }
    int B = (int)PyArray_DIM(img, 0);
    double loss = 0;
    af_status st;
    RUN_LOCKED(&c->net, st,
               update ? af_classifier_step(c, &loss, AF_U8(img), AF_F32(tg), B, augment, &a)
                      : af_classifier_grads(c, &loss, AF_U8(img), AF_F32(tg), B, augment, a.step));
    Py_DECREF(img);
    Py_DECREF(tg);
    if (st != AF_OK) return af_raise(st);
    return PyFloat_FromDouble(loss);
}

static PyObject *cls_train_step(FtObject *self, PyObject *args, PyObject *kw) {
    return cls_run(self, args, kw, 1);
}
static PyObject *cls_gradients(FtObject *self, PyObject *args, PyObject *kw) {
    return cls_run(self, args, kw, 0);
}

static af_status cls_predict_fn(void *c, float *out, const uint8_t *images, int N, int k) {
    return af_classifier_predict(c, out, images, N);
}
static af_status cls_gradcam_fn(void *c, float *out, const uint8_t *images, int N, int k) {
    return af_classifier_gradcam(c, out, images, N, k);
}

static PyObject *cls_predict(FtObject *self, PyObject *arg) {
    af_classifier *c = (af_classifier *)ft_ready(self);
    return c ? ft_infer(self, arg, 2, c->NC, 0, cls_predict_fn, 0) : NULL;
}

static PyObject *cls_gradcam(FtObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "class_index", NULL};
    PyObject *io;
    int k;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi:gradcam", kwlist, &io, &k)) return NULL;
    af_classifier *c = (af_classifier *)ft_ready(self);
    if (c == NULL) return NULL;
    if (k < 0 || k >= c->NC) {
        PyErr_Format(PyExc_ValueError, "class_index must be in [0, %d), got %d", c->NC, k);
        return NULL;
    }
    return ft_infer(self, io, 3, c->net.G, c->net.G, cls_gradcam_fn, k);
}

static PyObject *cls_dims(FtObject *self, void *unused) {
    af_classifier *c = (af_classifier *)ft_ready(self);
    if (c == NULL) return NULL;
    const af_ft_net *n = &c->net;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:O}", "batch", n->B, "S", n->S, "C",
                         n->C, "P", n->P, "L", n->L, "T", n->T, "D", n->D, "num_classes", c->NC,
                         "freeze_encoder", n->freeze_encoder ? Py_True : Py_False);
}

static PyGetSetDef cls_getset[] = {
    {"dims", (getter)cls_dims, NULL, "batch capacity, sizes and num_classes", NULL}, {NULL}};

static PyMethodDef cls_methods[] = {
    {"train_step", (PyCFunction)(void (*)(void))cls_train_step, METH_VARARGS | METH_KEYWORDS,
     "train_step(images u8[B,S,S], targets f32[B,C], lr, weight_decay, step, augment=True) -> "
     "loss\n\nMean BCE-with-logits over valid targets (NaN = missing) before the update; "
     "AdamW with t = step + 1 over head (+ encoder unless frozen); decay on matrices only."},
    {"gradients", (PyCFunction)(void (*)(void))cls_gradients, METH_VARARGS | METH_KEYWORDS,
     "gradients(images, targets, augment=False, step=0) -> loss; fills encoder_grads() and "
     "head_grads() without updating anything"},
    {"predict", (PyCFunction)cls_predict, METH_O,
     "predict(images u8[N,S,S]) -> logits f32[N,C] (any N, no augmentation)"},
    {"gradcam", (PyCFunction)(void (*)(void))cls_gradcam, METH_VARARGS | METH_KEYWORDS,
     "gradcam(images u8[N,S,S], class_index) -> f32[N,S/P,S/P] in [0,1]"},
    FT_SHARED_METHODS("norm_w, norm_b, fc_w, fc_b"),
    {NULL}};

static PyTypeObject ClassifierType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.downstream.Classifier",
    .tp_basicsize = sizeof(FtObject),
    .tp_dealloc = (destructor)ft_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Classifier(config: dict, num_classes, batch, seed=0, freeze_encoder=False, *, "
              "crop_scale=(0.8, 1.0), crop_ratio=(0.75, 1.333), flip=True, max_rotation=10.0)"
              "\n\nEncoder + mean of patch tokens + LayerNorm + Linear; BCE-with-logits.",
    .tp_methods = cls_methods,
    .tp_getset = cls_getset,
    .tp_init = (initproc)classifier_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ Segmenter */

static void seg_free(void *net) { af_segmenter_free(net); }

/* weight [P*P, D], bias [P*P] */
static int seg_head_parts(const void *net, head_part *p) {
    const af_segmenter *s = net;
    p[0] = (head_part){"weight", s->PP, s->net.D}, p[1] = (head_part){"bias", s->PP, 0};
    return 2;
}

static const ft_kind seg_kind = {seg_free, seg_head_parts};

static int segmenter_init(FtObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "batch", "seed", "freeze_encoder", "smooth", "crop_scale",
                             "crop_ratio", "flip", "max_rotation", NULL};
    self->kind = &seg_kind;
    PyObject *d, *scale = NULL, *ratio = NULL;
    int batch, freeze = 0, flip = 1;
    long long seed = 0;
    double smooth = 1.0, rot = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!i|Lp$dOOpd:Segmenter", kwlist, &PyDict_Type, &d,
                                     &batch, &seed, &freeze, &smooth, &scale, &ratio, &flip, &rot))
        return -1;
    af_config cfg;
    af_augment_config ac;
    if (ft_init_args(d, seed, scale, ratio, flip, rot, &cfg, &ac) < 0 || check_batch_arg(batch) < 0)
        return -1;
    if (!(smooth > 0) || !isfinite(smooth)) {
        PyErr_SetString(PyExc_ValueError, "smooth must be finite and > 0");
        return -1;
    }
    af_segmenter *s = NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_segmenter_create(&s, &cfg, batch, (uint64_t)seed, freeze);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    s->smooth = (float)smooth;
    ft_install(self, &s->net, &ac);
    return 0;
}

static PyObject *seg_run(FtObject *self, PyObject *args, PyObject *kw, int update) {
    PyArrayObject *img, *mask;
    PyObject *mo;
    af_ft_step_args a;
    int augment;
    if (ft_run_args(self, args, kw, update, "masks", &img, &mo, &a, &augment) == NULL)
        return NULL;
    af_segmenter *s = self->net;
    mask = images_arg(mo, "masks", s->net.S, 1, s->net.B);
    if (mask == NULL || af_check_dim(mask, "masks", 0, PyArray_DIM(img, 0)) < 0) {
        Py_DECREF(img);
        Py_XDECREF(mask);
        return NULL;
    }
    int B = (int)PyArray_DIM(img, 0);
    double loss = 0, bce = 0, dice = 0;
    af_status st;
    RUN_LOCKED(&s->net, st,
               update ? af_segmenter_step(s, &loss, &bce, &dice, AF_U8(img), AF_U8(mask), B,
                                          augment, &a)
                      : af_segmenter_grads(s, &loss, &bce, &dice, AF_U8(img), AF_U8(mask), B,
                                           augment, a.step));
    Py_DECREF(img);
    Py_DECREF(mask);
    if (st != AF_OK) return af_raise(st);
    return Py_BuildValue("{s:d,s:d,s:d}", "loss", loss, "bce", bce, "dice_loss", dice);
}

static PyObject *seg_train_step(FtObject *self, PyObject *args, PyObject *kw) {
    return seg_run(self, args, kw, 1);
}
static PyObject *seg_gradients(FtObject *self, PyObject *args, PyObject *kw) {
    return seg_run(self, args, kw, 0);
}

static af_status seg_predict_fn(void *s, float *out, const uint8_t *images, int N, int k) {
    return af_segmenter_predict(s, out, images, N);
}

static PyObject *seg_predict(FtObject *self, PyObject *arg) {
    af_ft_net *n = ft_ready(self);
    return n ? ft_infer(self, arg, 3, n->S, n->S, seg_predict_fn, 0) : NULL;
}

static PyObject *seg_dims(FtObject *self, void *unused) {
    af_segmenter *s = (af_segmenter *)ft_ready(self);
    if (s == NULL) return NULL;
    const af_ft_net *n = &s->net;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:d,s:O}", "batch", n->B, "S", n->S, "C",
                         n->C, "P", n->P, "L", n->L, "T", n->T, "D", n->D, "smooth",
                         (double)s->smooth, "freeze_encoder",
                         n->freeze_encoder ? Py_True : Py_False);
}

static PyGetSetDef seg_getset[] = {
    {"dims", (getter)seg_dims, NULL, "batch capacity, sizes and the Dice smoothing", NULL},
    {NULL}};

static PyMethodDef seg_methods[] = {
    {"train_step", (PyCFunction)(void (*)(void))seg_train_step, METH_VARARGS | METH_KEYWORDS,
     "train_step(images u8[B,S,S], masks u8[B,S,S] (0/1), lr, weight_decay, step, augment=True)"
     " -> dict(loss, bce, dice_loss)\n\nloss = mean pixel BCE + (1 - mean soft Dice), before "
     "the update; AdamW with t = step + 1."},
    {"gradients", (PyCFunction)(void (*)(void))seg_gradients, METH_VARARGS | METH_KEYWORDS,
     "gradients(images, masks, augment=False, step=0) -> dict; fills the gradient views"},
    {"predict", (PyCFunction)seg_predict, METH_O,
     "predict(images u8[N,S,S]) -> probabilities f32[N,S,S] (any N)"},
    FT_SHARED_METHODS("weight f32[P*P,D], bias f32[P*P]"),
    {NULL}};

static PyTypeObject SegmenterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.downstream.Segmenter",
    .tp_basicsize = sizeof(FtObject),
    .tp_dealloc = (destructor)ft_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Segmenter(config: dict, batch, seed=0, freeze_encoder=False, *, smooth=1.0, "
              "crop_scale=(0.8, 1.0), crop_ratio=(0.75, 1.333), flip=True, max_rotation=10.0)"
              "\n\nEncoder + per-token linear head D -> P*P mask logits; BCE + soft Dice.",
    .tp_methods = seg_methods,
    .tp_getset = seg_getset,
    .tp_init = (initproc)segmenter_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ module */

static PyMethodDef downstream_methods[] = {
    {"augment", (PyCFunction)(void (*)(void))py_augment, METH_VARARGS | METH_KEYWORDS,
     "augment(images u8[B,S,S], seed, step, *, masks=None, crop_scale=(0.8, 1.0), "
     "crop_ratio=(0.75, 1.333), flip=True, max_rotation=10.0) -> images or (images, masks)\n\n"
     "Random resized crop, horizontal flip, rotation (degrees); bilinear for images, nearest "
     "for masks, one geometry per (seed, step, image index)."},
    {"bce_with_logits", (PyCFunction)(void (*)(void))py_bce, METH_VARARGS | METH_KEYWORDS,
     "bce_with_logits(logits f32[N,C], targets f32[N,C]) -> (loss, dlogits): mean over valid "
     "(non-NaN) targets"},
    {"segmentation_loss", (PyCFunction)(void (*)(void))py_seg_loss, METH_VARARGS | METH_KEYWORDS,
     "segmentation_loss(logits f32[B,H,W], masks u8[B,H,W], smooth=1.0) -> (loss, bce, "
     "dice_loss, dlogits)"},
    {"linear_probe_fit", (PyCFunction)(void (*)(void))py_probe_fit, METH_VARARGS | METH_KEYWORDS,
     "linear_probe_fit(features f32[N,D], labels f32[N,C], *, epochs=100, lr=1e-3, "
     "weight_decay=1e-4, batch=256, seed=0) -> dict(weight, bias, mean, std, loss[epochs])"},
    {"linear_probe_predict", (PyCFunction)(void (*)(void))py_probe_predict,
     METH_VARARGS | METH_KEYWORDS,
     "linear_probe_predict(features, weight, bias, mean, std) -> logits f32[N,C]"},
    {"linear_probe_loss", (PyCFunction)(void (*)(void))py_probe_loss, METH_VARARGS | METH_KEYWORDS,
     "linear_probe_loss(features, labels, weight, bias, mean, std) -> (loss, dweight, dbias)"},
    {NULL}};

int af_register_downstream(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "downstream", downstream_methods,
                                     "Downstream compute: augmentation, linear probe, "
                                     "fine-tuning classifier and segmenter (METHOD §6).");
    /* PyModule_AddType readies each type and adds it under its short name */
    if (sub == NULL || PyModule_AddType(sub, &ClassifierType) < 0 ||
        PyModule_AddType(sub, &SegmenterType) < 0)
        return -1;
    return 0;
}
