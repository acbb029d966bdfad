/* afire._C.objective: bindings of objective.h (Sinkhorn, prototypes, the paper and released
 * losses, the anomaly score). Every array is checked here (dtype -> TypeError, shape or
 * value -> ValueError naming the argument); the C core then runs without the GIL. */
#include "py_util.h"

#include <math.h>

#include "common.h"
#include "objective.h"

/* A float32 array of rank `ndim`, all finite. New reference or NULL. */
static PyArrayObject *arg_f32(PyObject *obj, const char *name, int ndim) {
    PyArrayObject *a = af_arg_array(obj, name, NPY_FLOAT32, ndim);
    if (a == NULL) return NULL;
    if (af_check_finite(a, name) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* Token labels abn[B,L]: uint8 (or bool) holding only 0/1. New reference or NULL. */
static PyArrayObject *arg_abn(PyObject *obj, npy_intp B, npy_intp L) {
    int type = PyArray_Check(obj) && PyArray_TYPE((PyArrayObject *)obj) == NPY_BOOL
                   ? NPY_BOOL : NPY_UINT8;
    PyArrayObject *a = af_arg_array(obj, "abn", type, 2);
    if (a == NULL) return NULL;
    if (af_check_dim(a, "abn", 0, B) < 0 || af_check_dim(a, "abn", 1, L) < 0) goto fail;
    const uint8_t *p = AF_U8(a);
    for (npy_intp i = 0, n = PyArray_SIZE(a); i < n; i++) {
        if (p[i] > 1) {
            PyErr_Format(PyExc_ValueError, "abn must hold only 0 (normal) and 1 (abnormal), "
                         "got %d at flat index %zd", (int)p[i], (Py_ssize_t)i);
            goto fail;
        }
    }
    return a;
fail:
    Py_DECREF(a);
    return NULL;
}

static int check_int_dims(PyArrayObject *a, const char *name) {
    for (int d = 0; d < PyArray_NDIM(a); d++) {
        if (PyArray_DIM(a, d) <= 0 || PyArray_DIM(a, d) > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d must be in [1, 2^31), got %zd",
                         name, d, (Py_ssize_t)PyArray_DIM(a, d));
            return -1;
        }
    }
    return 0;
}

static int check_positive(double v, const char *name) {
    if (!(isfinite(v) && v > 0.0)) {
        af_errorf(PyExc_ValueError, "%s must be a finite number > 0, got %g", name, v);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------- */

static PyObject *py_sinkhorn_knopp(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "eps", "iters", NULL};
    PyObject *o_logits;
    double eps = AF_SINKHORN_EPS;
    int iters = AF_SINKHORN_ITERS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|di", kwlist, &o_logits, &eps, &iters))
        return NULL;
    PyArrayObject *logits = NULL, *q = NULL;
    PyObject *ret = NULL;
    if (check_positive(eps, "eps") < 0) return NULL;
    if (iters < 0) {
        PyErr_Format(PyExc_ValueError, "iters must be >= 0, got %d", iters);
        return NULL;
    }
    if (!(logits = arg_f32(o_logits, "logits", 2))) goto done;
    if (check_int_dims(logits, "logits") < 0) goto done;
    int N = (int)PyArray_DIM(logits, 0), K = (int)PyArray_DIM(logits, 1);
    if (!(q = af_new_array(2, PyArray_DIMS(logits), NPY_FLOAT32))) goto done;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sinkhorn_knopp(AF_F32(q), AF_F32(logits), N, K, (float)eps, iters);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    ret = (PyObject *)q;
    q = NULL;
done:
    Py_XDECREF(logits);
    Py_XDECREF(q);
    return ret;
}

static PyObject *py_prototypes_update(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"C", "src", "m", "overwrite", NULL};
    PyObject *o_C, *o_src;
    double m = AF_PROTO_M;
    int overwrite = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|dp", kwlist, &o_C, &o_src, &m, &overwrite))
        return NULL;
    if (!(isfinite(m) && m >= 0.0 && m <= 1.0)) {
        af_errorf(PyExc_ValueError, "m must be in [0, 1], got %g", m);
        return NULL;
    }
    PyArrayObject *C = NULL, *src = NULL;
    PyObject *ret = NULL;
    if (!(C = arg_f32(o_C, "C", 2))) goto done;
    /* updated in place: a copy made for contiguity would silently drop the update */
    if ((PyObject *)C != o_C || !PyArray_ISWRITEABLE(C)) {
        PyErr_SetString(PyExc_ValueError, "C must be a writeable C-contiguous float32 array "
                        "(it is updated in place)");
        goto done;
    }
    if (!(src = arg_f32(o_src, "src", 3))) goto done;
    if (check_int_dims(src, "src") < 0 || check_int_dims(C, "C") < 0) goto done;
    if (af_check_dim(src, "src", 1, PyArray_DIM(C, 0)) < 0 ||
        af_check_dim(src, "src", 2, PyArray_DIM(C, 1)) < 0)
        goto done;
    int B = (int)PyArray_DIM(src, 0), L = (int)PyArray_DIM(C, 0), K = (int)PyArray_DIM(C, 1);
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = prototypes_update(AF_F32(C), AF_F32(src), B, L, K, (float)m, overwrite);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    Py_XDECREF(C);
    Py_XDECREF(src);
    return ret;
}

static PyObject *py_paper_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"s", "C", "abn", "tau_s", "tau", NULL};
    PyObject *o_s, *o_C, *o_abn;
    double tau_s = AF_TAU_S, tau = AF_TAU;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|dd", kwlist, &o_s, &o_C, &o_abn, &tau_s,
                                     &tau))
        return NULL;
    if (check_positive(tau_s, "tau_s") < 0 || check_positive(tau, "tau") < 0) return NULL;
    PyArrayObject *s = NULL, *C = NULL, *abn = NULL, *ds_stru = NULL, *ds_cate = NULL;
    float *scratch = NULL;
    PyObject *ret = NULL;
    if (!(s = arg_f32(o_s, "s", 3)) || check_int_dims(s, "s") < 0) goto done;
    int B = (int)PyArray_DIM(s, 0), L = (int)PyArray_DIM(s, 1), K = (int)PyArray_DIM(s, 2);
    if (!(C = arg_f32(o_C, "C", 2))) goto done;
    if (af_check_dim(C, "C", 0, L) < 0 || af_check_dim(C, "C", 1, K) < 0) goto done;
    if (!(abn = arg_abn(o_abn, B, L))) goto done;
    if (!(ds_stru = af_new_array(3, PyArray_DIMS(s), NPY_FLOAT32))) goto done;
    if (!(ds_cate = af_new_array(3, PyArray_DIMS(s), NPY_FLOAT32))) goto done;
    size_t nscratch = paper_loss_scratch_floats(B, L, K);
    if (nscratch == 0 || !(scratch = af_calloc(nscratch, sizeof(float)))) {
        PyErr_Format(PyExc_MemoryError, "paper_loss: cannot allocate scratch for B=%d, L=%d, "
                     "K=%d", B, L, K);
        goto done;
    }
    float l_stru = 0.0f, l_cate = 0.0f;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = paper_loss(&l_stru, &l_cate, AF_F32(ds_stru), AF_F32(ds_cate), AF_F32(s), AF_F32(C),
                    AF_U8(abn), B, L, K, (float)tau_s, (float)tau, 1.0f, 1.0f, scratch);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    ret = Py_BuildValue("ddOO", (double)l_stru, (double)l_cate, ds_stru, ds_cate);
done:
    af_free(scratch);
    Py_XDECREF(s);
    Py_XDECREF(C);
    Py_XDECREF(abn);
    Py_XDECREF(ds_stru);
    Py_XDECREF(ds_cate);
    return ret;
}

/* y and x: float32 [B,L,PPC] of the same shape. Returns 0/-1. */
static int arg_patches(PyObject *o_y, PyObject *o_x, PyArrayObject **y, PyArrayObject **x) {
    if (!(*y = arg_f32(o_y, "y", 3)) || check_int_dims(*y, "y") < 0) return -1;
    if (!(*x = arg_f32(o_x, "x", 3))) return -1;
    for (int d = 0; d < 3; d++)
        if (af_check_dim(*x, "x", d, PyArray_DIM(*y, d)) < 0) return -1;
    return 0;
}

static PyObject *py_recon_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"y", "x", "abn", "w_abn", NULL};
    PyObject *o_y, *o_x, *o_abn;
    double w_abn = AF_W_ABN;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d", kwlist, &o_y, &o_x, &o_abn, &w_abn))
        return NULL;
    if (!(isfinite(w_abn) && w_abn >= 0.0)) {
        af_errorf(PyExc_ValueError, "w_abn must be finite and >= 0, got %g", w_abn);
        return NULL;
    }
    PyArrayObject *y = NULL, *x = NULL, *abn = NULL, *dy = NULL;
    PyObject *ret = NULL;
    if (arg_patches(o_y, o_x, &y, &x) < 0) goto done;
    int B = (int)PyArray_DIM(y, 0), L = (int)PyArray_DIM(y, 1), PPC = (int)PyArray_DIM(y, 2);
    if (!(abn = arg_abn(o_abn, B, L))) goto done;
    if (!(dy = af_new_array(3, PyArray_DIMS(y), NPY_FLOAT32))) goto done;
    float loss = 0.0f;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = recon_loss(&loss, AF_F32(dy), AF_F32(y), AF_F32(x), AF_U8(abn), B, L, PPC,
                    (float)w_abn, 1.0f);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    ret = Py_BuildValue("dO", (double)loss, dy);
done:
    Py_XDECREF(y);
    Py_XDECREF(x);
    Py_XDECREF(abn);
    Py_XDECREF(dy);
    return ret;
}

static PyObject *py_released_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"s", "C", "abn", "y", "x", "tau_s", "eps", "iters", NULL};
    PyObject *o_s, *o_C, *o_abn, *o_y, *o_x;
    double tau_s = AF_TAU_S, eps = AF_SINKHORN_EPS;
    int iters = AF_SINKHORN_ITERS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|ddi", kwlist, &o_s, &o_C, &o_abn, &o_y,
                                     &o_x, &tau_s, &eps, &iters))
        return NULL;
    if (check_positive(tau_s, "tau_s") < 0 || check_positive(eps, "eps") < 0) return NULL;
    if (iters < 0) {
        PyErr_Format(PyExc_ValueError, "iters must be >= 0, got %d", iters);
        return NULL;
    }
    PyArrayObject *s = NULL, *C = NULL, *abn = NULL, *y = NULL, *x = NULL, *ds = NULL, *dy = NULL;
    float *scratch = NULL;
    PyObject *ret = NULL;
    if (!(s = arg_f32(o_s, "s", 3)) || check_int_dims(s, "s") < 0) goto done;
    int B = (int)PyArray_DIM(s, 0), L = (int)PyArray_DIM(s, 1), K = (int)PyArray_DIM(s, 2);
    if (!(C = arg_f32(o_C, "C", 2))) goto done;
    if (af_check_dim(C, "C", 0, L) < 0 || af_check_dim(C, "C", 1, K) < 0) goto done;
    if (!(abn = arg_abn(o_abn, B, L))) goto done;
    if (arg_patches(o_y, o_x, &y, &x) < 0) goto done;
    if (af_check_dim(y, "y", 0, B) < 0 || af_check_dim(y, "y", 1, L) < 0) goto done;
    int PPC = (int)PyArray_DIM(y, 2);
    if (!(ds = af_new_array(3, PyArray_DIMS(s), NPY_FLOAT32))) goto done;
    if (!(dy = af_new_array(3, PyArray_DIMS(y), NPY_FLOAT32))) goto done;
    if (!(scratch = af_calloc(released_loss_scratch_floats(L, K), sizeof(float)))) {
        af_raise(AF_ENOMEM);
        goto done;
    }
    float l_cst = 0.0f, l_recon = 0.0f;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = released_loss(&l_cst, &l_recon, AF_F32(ds), AF_F32(dy), AF_F32(s), AF_F32(C),
                       AF_U8(abn), AF_F32(y), AF_F32(x), B, L, K, PPC, (float)tau_s,
                       (float)eps, iters, 1.0f, 1.0f, scratch);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    ret = Py_BuildValue("ddOO", (double)l_cst, (double)l_recon, ds, dy);
done:
    af_free(scratch);
    Py_XDECREF(s);
    Py_XDECREF(C);
    Py_XDECREF(abn);
    Py_XDECREF(y);
    Py_XDECREF(x);
    Py_XDECREF(ds);
    Py_XDECREF(dy);
    return ret;
}

static PyObject *py_anomaly_score(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"y", "x", NULL};
    PyObject *o_y, *o_x;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO", kwlist, &o_y, &o_x)) return NULL;
    PyArrayObject *y = NULL, *x = NULL, *score = NULL, *log_score = NULL, *err = NULL;
    PyObject *ret = NULL;
    if (arg_patches(o_y, o_x, &y, &x) < 0) goto done;
    int B = (int)PyArray_DIM(y, 0), L = (int)PyArray_DIM(y, 1), PPC = (int)PyArray_DIM(y, 2);
    if (!(score = af_new_array(1, PyArray_DIMS(y), NPY_FLOAT64))) goto done;
    if (!(log_score = af_new_array(1, PyArray_DIMS(y), NPY_FLOAT64))) goto done;
    if (!(err = af_new_array(2, PyArray_DIMS(y), NPY_FLOAT64))) goto done;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = anomaly_score((double *)PyArray_DATA(score), (double *)PyArray_DATA(log_score),
                       (double *)PyArray_DATA(err), AF_F32(y), AF_F32(x), B, L, PPC);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    ret = Py_BuildValue("OOO", score, log_score, err);
done:
    Py_XDECREF(y);
    Py_XDECREF(x);
    Py_XDECREF(score);
    Py_XDECREF(log_score);
    Py_XDECREF(err);
    return ret;
}

static PyMethodDef objective_methods[] = {
    {"sinkhorn_knopp", (PyCFunction)(void (*)(void))py_sinkhorn_knopp,
     METH_VARARGS | METH_KEYWORDS,
     "sinkhorn_knopp(logits, eps=0.05, iters=3) -> q\n\n"
     "SwAV Sinkhorn-Knopp on logits float32 [N, K]: q = exp((logits - max) / eps), total 1,\n"
     "then `iters` times columns -> 1/K and rows -> 1/N; rows finally sum to 1.\n"
     "Returns float32 [N, K]."},
    {"prototypes_update", (PyCFunction)(void (*)(void))py_prototypes_update,
     METH_VARARGS | METH_KEYWORDS,
     "prototypes_update(C, src, m=0.75, overwrite=False) -> None\n\n"
     "In place on C float32 [L, K] (C-contiguous, writeable): qbar = src.mean(0) for src\n"
     "float32 [B, L, K]; C = qbar if overwrite else m * C + (1 - m) * qbar."},
    {"paper_loss", (PyCFunction)(void (*)(void))py_paper_loss, METH_VARARGS | METH_KEYWORDS,
     "paper_loss(s, C, abn, tau_s=0.1, tau=0.1) -> (l_stru, l_cate, ds_stru, ds_cate)\n\n"
     "The paper's L_stru (Eq. 12) and L_cate (Eq. 14-16, f = exp(-H/tau)) on student logits\n"
     "s float32 [B, L, K] with prototypes C float32 [L, K] (>= 0, rows renormalised) and\n"
     "token labels abn uint8/bool [B, L] (1 = abnormal). Losses are floats; ds_stru and\n"
     "ds_cate are float32 [B, L, K] gradients of each loss w.r.t. s."},
    {"recon_loss", (PyCFunction)(void (*)(void))py_recon_loss, METH_VARARGS | METH_KEYWORDS,
     "recon_loss(y, x, abn, w_abn=2.0) -> (loss, dy)\n\n"
     "Eq. 20: mean over tokens of w * ||y - x||^2 / PPC for y, x float32 [B, L, PPC] and\n"
     "abn [B, L] (w = w_abn on abnormal tokens, 1 elsewhere). dy float32 [B, L, PPC]."},
    {"released_loss", (PyCFunction)(void (*)(void))py_released_loss,
     METH_VARARGS | METH_KEYWORDS,
     "released_loss(s, C, abn, y, x, tau_s=0.1, eps=0.05, iters=3)\n"
     "    -> (l_cst, l_recon, ds, dy)\n\n"
     "The released code's objective: P = sinkhorn_knopp(C, eps, iters) over the L rows of\n"
     "C; l_cst = mean over normal tokens of -sum_k P_jk log softmax(s_ij / tau_s)_k;\n"
     "l_recon = MSE of y against x over all values. Shapes as paper_loss / recon_loss."},
    {"anomaly_score", (PyCFunction)(void (*)(void))py_anomaly_score,
     METH_VARARGS | METH_KEYWORDS,
     "anomaly_score(y, x) -> (score, log_score, err_map)\n\n"
     "Eq. 51 on restored patches y and input patches x, float32 [B, L, PPC]:\n"
     "err_map float64 [B, L] = ||y_ij - x_ij||^2; log_score float64 [B] =\n"
     "log(mean_j exp(err_ij)) (finite, use it for ranking); score = exp(log_score) = 1/A(x)\n"
     "(higher = more abnormal; inf only when it overflows float64)."},
    {NULL}};

int af_register_objective(PyObject *m) {
    return af_add_submodule(m, "objective", objective_methods,
                            "The AFiRe objective: Sinkhorn, prototypes, paper and released "
                            "losses, anomaly score.")
               ? 0 : -1;
}
