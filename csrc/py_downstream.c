/* afire._C.downstream: augmentation, linear probe, fine-tuning Classifier and Segmenter
 * (METHOD §6). Every argument is checked here (TypeError for a dtype, ValueError naming
 * the argument for a shape or value); the compute runs in C with the GIL released. */
#include "py_util.h"

#include <math.h>
#include <string.h>

#include "common.h"
#include "downstream.h"
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

/* A zero-copy float32 view of `data` that keeps `owner` alive. */
static PyObject *view(PyObject *owner, float *data, int ndim, const npy_intp *shape) {
    PyObject *arr = PyArray_SimpleNewFromData(ndim, (npy_intp *)shape, NPY_FLOAT32, data);
    if (arr == NULL) return NULL;
    Py_INCREF(owner);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, owner) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static PyObject *flat_view(PyObject *owner, float *data, size_t n) {
    npy_intp shape[1] = {(npy_intp)n};
    return view(owner, data, 1, shape);
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

/* ------------------------------------------------------------------ Classifier */

typedef struct {
    PyObject_HEAD
    af_classifier *c;
} ClassifierObject;

static int classifier_init(ClassifierObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "num_classes", "batch", "seed", "freeze_encoder",
                             "crop_scale", "crop_ratio", "flip", "max_rotation", NULL};
    PyObject *d, *scale = NULL, *ratio = NULL;
    int NC, batch, freeze = 0, flip = 1;
    long long seed = 0;
    double rot = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!ii|Lp$OOpd:Classifier", kwlist, &PyDict_Type, &d,
                                     &NC, &batch, &seed, &freeze, &scale, &ratio, &flip, &rot))
        return -1;
    af_config cfg;
    af_augment_config ac;
    if (config_arg(d, &cfg) < 0 || check_seed_step(seed, 0) < 0 ||
        parse_augment(&ac, scale, ratio, flip, rot) < 0)
        return -1;
    if (NC < 1) {
        PyErr_SetString(PyExc_ValueError, "num_classes must be >= 1");
        return -1;
    }
    if (batch < 1) {
        PyErr_SetString(PyExc_ValueError, "batch must be >= 1");
        return -1;
    }
    af_classifier *c = NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_classifier_create(&c, &cfg, NC, batch, (uint64_t)seed, freeze);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    c->net.aug = ac;
    af_classifier_free(self->c);
    self->c = c;
    return 0;
}

static void classifier_dealloc(ClassifierObject *self) {
    af_classifier_free(self->c);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static af_classifier *cls_ready(ClassifierObject *self) {
    if (self->c == NULL) PyErr_SetString(PyExc_RuntimeError, "Classifier is not initialised");
    return self->c;
}

#define RUN_LOCKED(acq, rel, obj, st, call) \
    do {                                    \
        Py_BEGIN_ALLOW_THREADS              \
        st = acq(obj);                      \
        if (st == AF_OK) {                  \
            st = (call);                    \
            rel(obj);                       \
        }                                   \
        Py_END_ALLOW_THREADS                \
    } while (0)

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
static PyObject *cls_run(ClassifierObject *self, PyObject *args, PyObject *kw, int update) {
    static char *kw_step[] = {"images", "targets", "lr", "weight_decay", "step", "augment", NULL};
    static char *kw_grad[] = {"images", "targets", "augment", "step", NULL};
    PyObject *io, *to;
    double lr = 0, wd = 0;
    long long step = 0;
    int augment = update;
    int ok = update ? PyArg_ParseTupleAndKeywords(args, kw, "OOddL|p:train_step", kw_step, &io,
                                                  &to, &lr, &wd, &step, &augment)
                    : PyArg_ParseTupleAndKeywords(args, kw, "OO|pL:gradients", kw_grad, &io, &to,
                                                  &augment, &step);
    if (!ok || check_seed_step(0, step) < 0) return NULL;
    af_classifier *c = cls_ready(self);
    if (c == NULL) return NULL;
    PyArrayObject *img = images_arg(io, "images", c->net.S, 1, c->net.B), *tg = NULL;
    if (img == NULL) return NULL;
    tg = targets_arg(to, PyArray_DIM(img, 0), c->NC);
    if (tg == NULL) {
        Py_DECREF(img);
        return NULL;
    }
    int B = (int)PyArray_DIM(img, 0);
    af_ft_step_args a = {(float)lr, (float)wd, BETA1, BETA2, ADAM_EPS, step};
    double loss = 0;
    af_status st;
    RUN_LOCKED(af_ft_acquire, af_ft_release, &c->net, st,
               update ? af_classifier_step(c, &loss, AF_U8(img), AF_F32(tg), B, augment, &a)
                      : af_classifier_grads(c, &loss, AF_U8(img), AF_F32(tg), B, augment, step));
    Py_DECREF(img);
    Py_DECREF(tg);
    if (st != AF_OK) return af_raise(st);
    return PyFloat_FromDouble(loss);
}

static PyObject *cls_train_step(ClassifierObject *self, PyObject *args, PyObject *kw) {
    return cls_run(self, args, kw, 1);
}
static PyObject *cls_gradients(ClassifierObject *self, PyObject *args, PyObject *kw) {
    return cls_run(self, args, kw, 0);
}

static PyObject *cls_predict(ClassifierObject *self, PyObject *arg) {
    af_classifier *c = cls_ready(self);
    if (c == NULL) return NULL;
    PyArrayObject *img = images_arg(arg, "images", c->net.S, 0, 0);
    if (img == NULL) return NULL;
    npy_intp shape[2] = {PyArray_DIM(img, 0), c->NC};
    PyArrayObject *out = af_new_array(2, shape, NPY_FLOAT32);
    af_status st = AF_ENOMEM;
    if (out) RUN_LOCKED(af_ft_acquire, af_ft_release, &c->net, st,
                        af_classifier_predict(c, AF_F32(out), AF_U8(img), (int)shape[0]));
    Py_DECREF(img);
    if (st != AF_OK) {
        Py_XDECREF(out);
        return PyErr_Occurred() ? NULL : af_raise(st);
    }
    return (PyObject *)out;
}

static PyObject *cls_gradcam(ClassifierObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "class_index", NULL};
    PyObject *io;
    int k;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi:gradcam", kwlist, &io, &k)) return NULL;
    af_classifier *c = cls_ready(self);
    if (c == NULL) return NULL;
    if (k < 0 || k >= c->NC) {
        PyErr_Format(PyExc_ValueError, "class_index must be in [0, %d), got %d", c->NC, k);
        return NULL;
    }
    PyArrayObject *img = images_arg(io, "images", c->net.S, 0, 0);
    if (img == NULL) return NULL;
    npy_intp shape[3] = {PyArray_DIM(img, 0), c->net.G, c->net.G};
    PyArrayObject *out = af_new_array(3, shape, NPY_FLOAT32);
    af_status st = AF_ENOMEM;
    if (out) RUN_LOCKED(af_ft_acquire, af_ft_release, &c->net, st,
                        af_classifier_gradcam(c, AF_F32(out), AF_U8(img), (int)shape[0], k));
    Py_DECREF(img);
    if (st != AF_OK) {
        Py_XDECREF(out);
        return PyErr_Occurred() ? NULL : af_raise(st);
    }
    return (PyObject *)out;
}

static PyObject *cls_encoder_params(ClassifierObject *self, PyObject *unused) {
    af_classifier *c = cls_ready(self);
    return c ? flat_view((PyObject *)self, c->net.model->params[AF_NET_ENCODER],
                         c->net.model->numel[AF_NET_ENCODER]) : NULL;
}
static PyObject *cls_encoder_grads(ClassifierObject *self, PyObject *unused) {
    af_classifier *c = cls_ready(self);
    return c ? flat_view((PyObject *)self, c->net.model->grads[AF_NET_ENCODER],
                         c->net.model->numel[AF_NET_ENCODER]) : NULL;
}
static PyObject *cls_param_table(ClassifierObject *self, PyObject *unused) {
    af_classifier *c = cls_ready(self);
    return c ? encoder_table(c->net.model) : NULL;
}

/* dict(norm_w [D], norm_b [D], fc_w [C,D], fc_b [C]) views of `base` (params or grads). */
static PyObject *cls_head_dict(ClassifierObject *self, float *base) {
    af_classifier *c = self->c;
    npy_intp D = c->net.D, NC = c->NC, s1[1] = {D}, s2[2] = {NC, D}, s3[1] = {NC};
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    if (set_steal(d, "norm_w", view((PyObject *)self, base, 1, s1)) < 0 ||
        set_steal(d, "norm_b", view((PyObject *)self, base + D, 1, s1)) < 0 ||
        set_steal(d, "fc_w", view((PyObject *)self, base + 2 * D, 2, s2)) < 0 ||
        set_steal(d, "fc_b", view((PyObject *)self, base + 2 * D + NC * D, 1, s3)) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}
static PyObject *cls_head_params(ClassifierObject *self, PyObject *unused) {
    return cls_ready(self) ? cls_head_dict(self, self->c->net.head) : NULL;
}
static PyObject *cls_head_grads(ClassifierObject *self, PyObject *unused) {
    return cls_ready(self) ? cls_head_dict(self, self->c->net.head_grad) : NULL;
}

static PyObject *cls_dims(ClassifierObject *self, void *unused) {
    af_classifier *c = cls_ready(self);
    if (c == NULL) return NULL;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:O}", "batch", c->net.B, "S", c->net.S, "C",
                         c->net.C, "P", c->net.P, "L", c->net.L, "T", c->net.T, "D", c->net.D, "num_classes", c->NC,
                         "freeze_encoder", c->net.freeze_encoder ? Py_True : Py_False);
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
    {"encoder_params", (PyCFunction)cls_encoder_params, METH_NOARGS,
     "encoder_params() -> writable float32 view of the flat encoder buffer"},
    {"encoder_grads", (PyCFunction)cls_encoder_grads, METH_NOARGS,
     "encoder_grads() -> float32 view of the encoder gradients (same layout)"},
    {"param_table", (PyCFunction)cls_param_table, METH_NOARGS,
     "param_table() -> list of dict(name, offset, shape, decay, trainable) for the encoder"},
    {"head_params", (PyCFunction)cls_head_params, METH_NOARGS,
     "head_params() -> dict(norm_w, norm_b, fc_w, fc_b) writable views"},
    {"head_grads", (PyCFunction)cls_head_grads, METH_NOARGS,
     "head_grads() -> dict(norm_w, norm_b, fc_w, fc_b) gradient views"},
    {NULL}};

static PyTypeObject ClassifierType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.downstream.Classifier",
    .tp_basicsize = sizeof(ClassifierObject),
    .tp_dealloc = (destructor)classifier_dealloc,
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

typedef struct {
    PyObject_HEAD
    af_segmenter *s;
} SegmenterObject;

static int segmenter_init(SegmenterObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "batch", "seed", "freeze_encoder", "smooth", "crop_scale",
                             "crop_ratio", "flip", "max_rotation", NULL};
    PyObject *d, *scale = NULL, *ratio = NULL;
    int batch, freeze = 0, flip = 1;
    long long seed = 0;
    double smooth = 1.0, rot = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!i|Lp$dOOpd:Segmenter", kwlist, &PyDict_Type, &d,
                                     &batch, &seed, &freeze, &smooth, &scale, &ratio, &flip, &rot))
        return -1;
    af_config cfg;
    af_augment_config ac;
    if (config_arg(d, &cfg) < 0 || check_seed_step(seed, 0) < 0 ||
        parse_augment(&ac, scale, ratio, flip, rot) < 0)
        return -1;
    if (batch < 1) {
        PyErr_SetString(PyExc_ValueError, "batch must be >= 1");
        return -1;
    }
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
    s->net.aug = ac;
    s->smooth = (float)smooth;
    af_segmenter_free(self->s);
    self->s = s;
    return 0;
}

static void segmenter_dealloc(SegmenterObject *self) {
    af_segmenter_free(self->s);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static af_segmenter *seg_ready(SegmenterObject *self) {
    if (self->s == NULL) PyErr_SetString(PyExc_RuntimeError, "Segmenter is not initialised");
    return self->s;
}

static PyObject *seg_run(SegmenterObject *self, PyObject *args, PyObject *kw, int update) {
    static char *kw_step[] = {"images", "masks", "lr", "weight_decay", "step", "augment", NULL};
    static char *kw_grad[] = {"images", "masks", "augment", "step", NULL};
    PyObject *io, *mo;
    double lr = 0, wd = 0;
    long long step = 0;
    int augment = update;
    int ok = update ? PyArg_ParseTupleAndKeywords(args, kw, "OOddL|p:train_step", kw_step, &io,
                                                  &mo, &lr, &wd, &step, &augment)
                    : PyArg_ParseTupleAndKeywords(args, kw, "OO|pL:gradients", kw_grad, &io, &mo,
                                                  &augment, &step);
    if (!ok || check_seed_step(0, step) < 0) return NULL;
    af_segmenter *s = seg_ready(self);
    if (s == NULL) return NULL;
    PyArrayObject *img = images_arg(io, "images", s->net.S, 1, s->net.B), *mask = NULL;
    if (img == NULL) return NULL;
    mask = images_arg(mo, "masks", s->net.S, 1, s->net.B);
    if (mask == NULL || af_check_dim(mask, "masks", 0, PyArray_DIM(img, 0)) < 0) {
        Py_DECREF(img);
        Py_XDECREF(mask);
        return NULL;
    }
    int B = (int)PyArray_DIM(img, 0);
    af_ft_step_args a = {(float)lr, (float)wd, BETA1, BETA2, ADAM_EPS, step};
    double loss = 0, bce = 0, dice = 0;
    af_status st;
    RUN_LOCKED(af_ft_acquire, af_ft_release, &s->net, st,
               update ? af_segmenter_step(s, &loss, &bce, &dice, AF_U8(img), AF_U8(mask), B,
                                          augment, &a)
                      : af_segmenter_grads(s, &loss, &bce, &dice, AF_U8(img), AF_U8(mask), B,
                                           augment, step));
    Py_DECREF(img);
    Py_DECREF(mask);
    if (st != AF_OK) return af_raise(st);
    return Py_BuildValue("{s:d,s:d,s:d}", "loss", loss, "bce", bce, "dice_loss", dice);
}

static PyObject *seg_train_step(SegmenterObject *self, PyObject *args, PyObject *kw) {
    return seg_run(self, args, kw, 1);
}
static PyObject *seg_gradients(SegmenterObject *self, PyObject *args, PyObject *kw) {
    return seg_run(self, args, kw, 0);
}

static PyObject *seg_predict(SegmenterObject *self, PyObject *arg) {
    af_segmenter *s = seg_ready(self);
    if (s == NULL) return NULL;
    PyArrayObject *img = images_arg(arg, "images", s->net.S, 0, 0);
    if (img == NULL) return NULL;
    npy_intp shape[3] = {PyArray_DIM(img, 0), s->net.S, s->net.S};
    PyArrayObject *out = af_new_array(3, shape, NPY_FLOAT32);
    af_status st = AF_ENOMEM;
    if (out) RUN_LOCKED(af_ft_acquire, af_ft_release, &s->net, st,
                        af_segmenter_predict(s, AF_F32(out), AF_U8(img), (int)shape[0]));
    Py_DECREF(img);
    if (st != AF_OK) {
        Py_XDECREF(out);
        return PyErr_Occurred() ? NULL : af_raise(st);
    }
    return (PyObject *)out;
}

static PyObject *seg_encoder_params(SegmenterObject *self, PyObject *unused) {
    af_segmenter *s = seg_ready(self);
    return s ? flat_view((PyObject *)self, s->net.model->params[AF_NET_ENCODER],
                         s->net.model->numel[AF_NET_ENCODER]) : NULL;
}
static PyObject *seg_encoder_grads(SegmenterObject *self, PyObject *unused) {
    af_segmenter *s = seg_ready(self);
    return s ? flat_view((PyObject *)self, s->net.model->grads[AF_NET_ENCODER],
                         s->net.model->numel[AF_NET_ENCODER]) : NULL;
}
static PyObject *seg_param_table(SegmenterObject *self, PyObject *unused) {
    af_segmenter *s = seg_ready(self);
    return s ? encoder_table(s->net.model) : NULL;
}

static PyObject *seg_head_dict(SegmenterObject *self, float *base) {
    af_segmenter *s = self->s;
    npy_intp PP = s->PP, sw[2] = {PP, s->net.D}, sb[1] = {PP};
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    if (set_steal(d, "weight", view((PyObject *)self, base, 2, sw)) < 0 ||
        set_steal(d, "bias", view((PyObject *)self, base + PP * s->net.D, 1, sb)) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}
static PyObject *seg_head_params(SegmenterObject *self, PyObject *unused) {
    return seg_ready(self) ? seg_head_dict(self, self->s->net.head) : NULL;
}
static PyObject *seg_head_grads(SegmenterObject *self, PyObject *unused) {
    return seg_ready(self) ? seg_head_dict(self, self->s->net.head_grad) : NULL;
}

static PyObject *seg_dims(SegmenterObject *self, void *unused) {
    af_segmenter *s = seg_ready(self);
    if (s == NULL) return NULL;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:d,s:O}", "batch", s->net.B, "S", s->net.S, "C",
                         s->net.C, "P", s->net.P, "L", s->net.L, "T", s->net.T, "D", s->net.D, "smooth",
                         (double)s->smooth, "freeze_encoder",
                         s->net.freeze_encoder ? Py_True : Py_False);
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
    {"encoder_params", (PyCFunction)seg_encoder_params, METH_NOARGS,
     "encoder_params() -> writable float32 view of the flat encoder buffer"},
    {"encoder_grads", (PyCFunction)seg_encoder_grads, METH_NOARGS,
     "encoder_grads() -> float32 view of the encoder gradients"},
    {"param_table", (PyCFunction)seg_param_table, METH_NOARGS,
     "param_table() -> list of dict(name, offset, shape, decay, trainable) for the encoder"},
    {"head_params", (PyCFunction)seg_head_params, METH_NOARGS,
     "head_params() -> dict(weight f32[P*P,D], bias f32[P*P]) writable views"},
    {"head_grads", (PyCFunction)seg_head_grads, METH_NOARGS,
     "head_grads() -> dict(weight, bias) gradient views"},
    {NULL}};

static PyTypeObject SegmenterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.downstream.Segmenter",
    .tp_basicsize = sizeof(SegmenterObject),
    .tp_dealloc = (destructor)segmenter_dealloc,
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
    if (sub == NULL || PyType_Ready(&ClassifierType) < 0 || PyType_Ready(&SegmenterType) < 0)
        return -1;
    Py_INCREF(&ClassifierType);
    if (PyModule_AddObject(sub, "Classifier", (PyObject *)&ClassifierType) < 0) {
        Py_DECREF(&ClassifierType);
        return -1;
    }
    Py_INCREF(&SegmenterType);
    if (PyModule_AddObject(sub, "Segmenter", (PyObject *)&SegmenterType) < 0) {
        Py_DECREF(&SegmenterType);
        return -1;
    }
    return 0;
}
