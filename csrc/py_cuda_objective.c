/* afire._C_cuda.cuda: host-level entry points of the GPU SLM and objective (cuda/slm.cu,
 * cuda/objective.cu), registered into the afire._C_cuda.cuda submodule.
 *
 * Each function takes exactly the arguments of its CPU twin (afire._C.slm.slm_generate,
 * afire._C.objective.*), with the same checks and messages, so a test feeds both the same
 * inputs. The data checks the device code leaves to its caller (finite values, C >= 0 with
 * positive row sums) are made here. Every call uploads, runs on one context of this file
 * (device 0, exact fp32) and downloads: for tests and small jobs, not for training. */
#include "py_util.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common.h"
#include "cuda_api.h"
#include "objective.h"
#include "slm.h"
#include "../cuda/objective.cuh"

/* ------------------------------------------------------------------ context and jobs */

static af_cuda_context *g_ctx = NULL;
static int g_busy = 0;

static af_cuda_context *get_ctx(void) {
    if (g_ctx == NULL) {
        af_status st = af_cuda_context_create(&g_ctx, 0, 0);
        if (st != AF_OK) {
            g_ctx = NULL;
            af_raise(st);
            return NULL;
        }
    }
    return g_ctx;
}

typedef struct {
    af_cuda_buf b[AF_CUDA_MAX_ARGS];
    int n;
} job_t;

/* Sizes, scalars and the SLM config handed to an adapter. */
typedef struct {
    int i[6];
    float f[6];
    uint64_t u[3];
    af_slm_config cfg;
} args_t;

static void add_host(job_t *j, void *host, size_t bytes, int role) {
    j->b[j->n].host = host;
    j->b[j->n].bytes = bytes;
    j->b[j->n].role = role;
    j->n++;
}

static void add_arr(job_t *j, PyArrayObject *a, int role) {
    add_host(j, a ? PyArray_DATA(a) : NULL, a ? (size_t)PyArray_NBYTES(a) : 0, role);
}

/* Uploads, runs fn, downloads, with the GIL released. 0, or -1 with an exception set. */
static int job_run(job_t *j, af_cuda_bytes_fn fn, const args_t *a) {
    af_cuda_context *ctx = get_ctx();
    if (ctx == NULL) return -1;
    if (g_busy) {
        af_raise(af_error(AF_EBUSY, "the CUDA objective test context is in use by another thread"));
        return -1;
    }
    g_busy = 1;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_run_host_bytes(ctx, j->n, j->b, fn, a);
    Py_END_ALLOW_THREADS
    g_busy = 0;
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    return 0;
}

#define ADAPTER(name) static af_status k_##name(af_cuda_context *c, void *const *d, const void *u)
#define A ((const args_t *)u)
#define F32(k) ((float *)d[k])
#define U8(k) ((uint8_t *)d[k])
#define F64(k) ((double *)d[k])

/* ------------------------------------------------------------------ argument checks
 * The rules and messages of csrc/py_objective.c and csrc/py_slm.c. */

static PyArrayObject *arg_f32(PyObject *obj, const char *name, int ndim) {
    PyArrayObject *a = af_arg_array(obj, name, NPY_FLOAT32, ndim);
    if (a == NULL) return NULL;
    if (af_check_finite(a, name) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
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

/* Token labels abn[B,L]: uint8 (or bool) holding only 0/1. */
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

/* C[L,K] as the paper loss needs it (prototype_logs of objective.c): >= 0, rows > 0. */
static int check_protos(PyArrayObject *C) {
    int L = (int)PyArray_DIM(C, 0), K = (int)PyArray_DIM(C, 1);
    const float *c = AF_F32(C);
    for (int l = 0; l < L; l++) {
        double rs = 0.0;
        for (int k = 0; k < K; k++) {
            float v = c[(size_t)l * K + k];
            if (!(v >= 0.0f)) {
                af_errorf(PyExc_ValueError,
                             "C must be finite and >= 0 (probabilities), got %g at [%d, %d]",
                             (double)v, l, k);
                return -1;
            }
            rs += v;
        }
        if (!(rs > 0.0 && isfinite(rs))) {
            af_errorf(PyExc_ValueError, "C: row %d must have a positive finite sum, got %g",
                         l, rs);
            return -1;
        }
    }
    return 0;
}

/* y and x: float32 [B,L,PPC] of the same shape. */
static int arg_patches(PyObject *o_y, PyObject *o_x, PyArrayObject **y, PyArrayObject **x) {
    if (!(*y = arg_f32(o_y, "y", 3)) || check_int_dims(*y, "y") < 0) return -1;
    if (!(*x = arg_f32(o_x, "x", 3))) return -1;
    for (int d = 0; d < 3; d++)
        if (af_check_dim(*x, "x", d, PyArray_DIM(*y, d)) < 0) return -1;
    return 0;
}

/* ------------------------------------------------------------------ SLM */

#define CFG_KWLIST "lesions_min", "lesions_max", "size_min", "size_max", "crop_max", "gamma2", \
                   "strength", "token_rule", "region_rule"
#define CFG_FORMAT "$iiiiiffss"
#define CFG_ARGS(c, tok, reg) &(c).lesions_min, &(c).lesions_max, &(c).size_min, &(c).size_max, \
                              &(c).crop_max, &(c).gamma2, &(c).strength, &(tok), &(reg)

static int to_u64(PyObject *obj, void *out) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return 0;
    *(uint64_t *)out = (uint64_t)v;
    return 1;
}

static int finish_config(af_slm_config *c, const char *tok, const char *reg) {
    if (tok == NULL || strcmp(tok, "paper") == 0) c->token_rule = AF_SLM_TOKENS_MEAN;
    else if (strcmp(tok, "released") == 0) c->token_rule = AF_SLM_TOKENS_ANY;
    else {
        PyErr_Format(PyExc_ValueError, "token_rule must be 'paper' or 'released', got '%s'", tok);
        return -1;
    }
    if (reg == NULL || strcmp(reg, "random") == 0) c->region_rule = AF_SLM_REGION_RANDOM;
    else if (strcmp(reg, "largest") == 0) c->region_rule = AF_SLM_REGION_LARGEST;
    else {
        PyErr_Format(PyExc_ValueError, "region_rule must be 'random' or 'largest', got '%s'", reg);
        return -1;
    }
    af_status st = slm_config_check(c);
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    return 0;
}

ADAPTER(slm_generate) {
    return af_cuda_slm_generate(c, U8(0), U8(1), U8(2), U8(3), A->i[0], A->i[1], A->i[2], &A->cfg,
                                A->u[0], A->u[1], A->u[2]);
}

static PyObject *py_slm_generate(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "seed", "step", "first_index", "patch", CFG_KWLIST, NULL};
    PyObject *images_obj;
    uint64_t seed = 0, step = 0, first = 0;
    int P = 16;
    const char *tok = NULL, *reg = NULL;
    af_slm_config c = af_slm_config_default();
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO&|O&O&i" CFG_FORMAT ":slm_generate", kwlist,
                                     &images_obj, to_u64, &seed, to_u64, &step, to_u64, &first,
                                     &P, CFG_ARGS(c, tok, reg)))
        return NULL;
    if (finish_config(&c, tok, reg) < 0) return NULL;
    PyArrayObject *images = af_arg_array(images_obj, "images", NPY_UINT8, 3);
    if (images == NULL) return NULL;
    PyArrayObject *xp = NULL, *masks = NULL, *labels = NULL;
    PyObject *result = NULL;
    npy_intp B = PyArray_DIM(images, 0), S = PyArray_DIM(images, 1);
    if (PyArray_DIM(images, 2) != S) {
        PyErr_Format(PyExc_ValueError, "images must be square [B, S, S], got [%zd, %zd, %zd]",
                     (Py_ssize_t)B, (Py_ssize_t)S, (Py_ssize_t)PyArray_DIM(images, 2));
        goto done;
    }
    if (S < 1 || S > AF_SLM_MAX_SIDE || B > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "images: need 1 <= S <= %d and B < 2**31, got B=%zd S=%zd",
                     AF_SLM_MAX_SIDE, (Py_ssize_t)B, (Py_ssize_t)S);
        goto done;
    }
    if (P < 1 || S % P != 0) {
        PyErr_Format(PyExc_ValueError, "patch must be >= 1 and divide the image side %zd, got %d",
                     (Py_ssize_t)S, P);
        goto done;
    }
    npy_intp G = S / P;
    npy_intp img_shape[3] = {B, S, S}, lab_shape[2] = {B, G * G};
    xp = af_new_array(3, img_shape, NPY_UINT8);
    masks = af_new_array(3, img_shape, NPY_UINT8);
    labels = af_new_array(2, lab_shape, NPY_UINT8);
    if (xp == NULL || masks == NULL || labels == NULL) goto done;
    if (B > 0) {
        job_t j = {0};
        add_arr(&j, xp, AF_CUDA_OUT);
        add_arr(&j, masks, AF_CUDA_OUT);
        add_arr(&j, labels, AF_CUDA_OUT);
        add_arr(&j, images, AF_CUDA_IN);
        args_t a = {{(int)B, (int)S, P}, {0}, {seed, step, first}, c};
        if (job_run(&j, k_slm_generate, &a) < 0) goto done;
    }
    result = Py_BuildValue("(OOO)", xp, masks, labels);
done:
    Py_XDECREF(xp);
    Py_XDECREF(masks);
    Py_XDECREF(labels);
    Py_DECREF(images);
    return result;
}

/* ------------------------------------------------------------------ Sinkhorn, prototypes */

ADAPTER(sinkhorn) {
    return af_cuda_sinkhorn_knopp(c, F32(0), F32(1), A->i[0], A->i[1], A->f[0], A->i[2]);
}

static PyObject *py_sinkhorn_knopp(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "eps", "iters", NULL};
    PyObject *o_logits;
    double eps = AF_SINKHORN_EPS;
    int iters = AF_SINKHORN_ITERS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|di:sinkhorn_knopp", kwlist, &o_logits, &eps,
                                     &iters))
        return NULL;
    if (check_positive(eps, "eps") < 0) return NULL;
    if (iters < 0) {
        PyErr_Format(PyExc_ValueError, "iters must be >= 0, got %d", iters);
        return NULL;
    }
    PyArrayObject *logits = NULL, *q = NULL;
    PyObject *ret = NULL;
    if (!(logits = arg_f32(o_logits, "logits", 2))) goto done;
    if (check_int_dims(logits, "logits") < 0) goto done;
    if (!(q = af_new_array(2, PyArray_DIMS(logits), NPY_FLOAT32))) goto done;
    job_t j = {0};
    add_arr(&j, q, AF_CUDA_OUT);
    add_arr(&j, logits, AF_CUDA_IN);
    args_t a = {{(int)PyArray_DIM(logits, 0), (int)PyArray_DIM(logits, 1), iters}, {(float)eps}};
    if (job_run(&j, k_sinkhorn, &a) < 0) goto done;
    ret = (PyObject *)q;
    q = NULL;
done:
    Py_XDECREF(logits);
    Py_XDECREF(q);
    return ret;
}

ADAPTER(prototypes) {
    return af_cuda_prototypes_update(c, F32(0), F32(1), A->i[0], A->i[1], A->i[2], A->f[0],
                                     A->i[3]);
}

static PyObject *py_prototypes_update(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"C", "src", "m", "overwrite", NULL};
    PyObject *o_C, *o_src;
    double m = AF_PROTO_M;
    int overwrite = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|dp:prototypes_update", kwlist, &o_C, &o_src,
                                     &m, &overwrite))
        return NULL;
    if (!(isfinite(m) && m >= 0.0 && m <= 1.0)) {
        af_errorf(PyExc_ValueError, "m must be in [0, 1], got %g", m);
        return NULL;
    }
    PyArrayObject *C = NULL, *src = NULL;
    PyObject *ret = NULL;
    if (!(C = arg_f32(o_C, "C", 2))) goto done;
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
    job_t j = {0};
    add_arr(&j, C, AF_CUDA_INOUT);
    add_arr(&j, src, AF_CUDA_IN);
    args_t a = {{(int)PyArray_DIM(src, 0), (int)PyArray_DIM(C, 0), (int)PyArray_DIM(C, 1),
                 overwrite}, {(float)m}};
    if (job_run(&j, k_prototypes, &a) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    Py_XDECREF(C);
    Py_XDECREF(src);
    return ret;
}

/* ------------------------------------------------------------------ paper loss */

/* d: losses[2], ds_stru, ds_cate (NULL in combined mode), scratch, s, C, abn */
ADAPTER(paper_loss) {
    float *ds_cate = A->i[3] ? F32(1) : F32(2);
    return af_cuda_paper_loss(c, F32(0), F32(0) + 1, F32(1), ds_cate, F32(4), F32(5), U8(6),
                              A->i[0], A->i[1], A->i[2], A->f[0], A->f[1], A->f[2], A->f[3],
                              F32(3));
}

static PyObject *py_paper_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"s", "C", "abn", "tau_s", "tau", "w_stru", "w_cate", "combined",
                             "ds", NULL};
    PyObject *o_s, *o_C, *o_abn, *o_ds = Py_None;
    double tau_s = AF_TAU_S, tau = AF_TAU, w_stru = 1.0, w_cate = 1.0;
    int combined = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|dd$ddpO:paper_loss", kwlist, &o_s, &o_C,
                                     &o_abn, &tau_s, &tau, &w_stru, &w_cate, &combined, &o_ds))
        return NULL;
    if (check_positive(tau_s, "tau_s") < 0 || check_positive(tau, "tau") < 0) return NULL;
    if (!isfinite(w_stru) || !isfinite(w_cate)) {
        PyErr_SetString(PyExc_ValueError, "w_stru and w_cate must be finite");
        return NULL;
    }
    if (o_ds != Py_None && !combined) {
        PyErr_SetString(PyExc_ValueError, "ds (a gradient to accumulate into) needs combined=True");
        return NULL;
    }
    PyArrayObject *s = NULL, *C = NULL, *abn = NULL, *ds_stru = NULL, *ds_cate = NULL, *ds0 = NULL;
    PyObject *ret = NULL;
    if (!(s = arg_f32(o_s, "s", 3)) || check_int_dims(s, "s") < 0) goto done;
    int B = (int)PyArray_DIM(s, 0), L = (int)PyArray_DIM(s, 1), K = (int)PyArray_DIM(s, 2);
    if (!(C = arg_f32(o_C, "C", 2))) goto done;
    if (af_check_dim(C, "C", 0, L) < 0 || af_check_dim(C, "C", 1, K) < 0) goto done;
    if (check_protos(C) < 0) goto done;
    if (!(abn = arg_abn(o_abn, B, L))) goto done;
    if (!(ds_stru = af_new_array(3, PyArray_DIMS(s), NPY_FLOAT32))) goto done;
    if (o_ds != Py_None) {
        if (!(ds0 = arg_f32(o_ds, "ds", 3))) goto done;
        for (int d = 0; d < 3; d++)
            if (af_check_dim(ds0, "ds", d, PyArray_DIM(s, d)) < 0) goto done;
        memcpy(PyArray_DATA(ds_stru), PyArray_DATA(ds0), (size_t)PyArray_NBYTES(s));
    }
    if (!combined && !(ds_cate = af_new_array(3, PyArray_DIMS(s), NPY_FLOAT32))) goto done;
    size_t nscratch = af_cuda_paper_loss_scratch_floats(B, L, K);
    if (nscratch == 0) {
        PyErr_Format(PyExc_MemoryError, "paper_loss: B=%d, L=%d, K=%d need too much scratch", B,
                     L, K);
        goto done;
    }
    float losses[2] = {0.0f, 0.0f};
    job_t j = {0};
    add_host(&j, losses, sizeof(losses), AF_CUDA_OUT);
    add_arr(&j, ds_stru, o_ds != Py_None ? AF_CUDA_INOUT : AF_CUDA_OUT);
    add_arr(&j, ds_cate, AF_CUDA_OUT);
    add_host(&j, NULL, nscratch * sizeof(float), AF_CUDA_SCRATCH);
    add_arr(&j, s, AF_CUDA_IN);
    add_arr(&j, C, AF_CUDA_IN);
    add_arr(&j, abn, AF_CUDA_IN);
    args_t a = {{B, L, K, combined}, {(float)tau_s, (float)tau, (float)w_stru, (float)w_cate}};
    if (job_run(&j, k_paper_loss, &a) < 0) goto done;
    ret = Py_BuildValue("ddOO", (double)losses[0], (double)losses[1], ds_stru,
                        combined ? Py_None : (PyObject *)ds_cate);
done:
    Py_XDECREF(s);
    Py_XDECREF(C);
    Py_XDECREF(abn);
    Py_XDECREF(ds_stru);
    Py_XDECREF(ds_cate);
    Py_XDECREF(ds0);
    return ret;
}

/* ------------------------------------------------------------------ recon loss */

/* d: loss, dy, y, x, abn */
ADAPTER(recon_loss) {
    return af_cuda_recon_loss(c, F32(0), F32(1), F32(2), F32(3), U8(4), A->i[0], A->i[1],
                              A->i[2], A->f[0], A->f[1]);
}

static PyObject *py_recon_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"y", "x", "abn", "w_abn", "weight", NULL};
    PyObject *o_y, *o_x, *o_abn;
    double w_abn = AF_W_ABN, weight = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d$d:recon_loss", kwlist, &o_y, &o_x, &o_abn,
                                     &w_abn, &weight))
        return NULL;
    if (!(isfinite(w_abn) && w_abn >= 0.0)) {
        af_errorf(PyExc_ValueError, "w_abn must be finite and >= 0, got %g", w_abn);
        return NULL;
    }
    if (!isfinite(weight)) {
        PyErr_SetString(PyExc_ValueError, "weight must be finite");
        return NULL;
    }
    PyArrayObject *y = NULL, *x = NULL, *abn = NULL, *dy = NULL;
    PyObject *ret = NULL;
    if (arg_patches(o_y, o_x, &y, &x) < 0) goto done;
    int B = (int)PyArray_DIM(y, 0), L = (int)PyArray_DIM(y, 1), PPC = (int)PyArray_DIM(y, 2);
    if (!(abn = arg_abn(o_abn, B, L))) goto done;
    if (!(dy = af_new_array(3, PyArray_DIMS(y), NPY_FLOAT32))) goto done;
    float loss = 0.0f;
    job_t j = {0};
    add_host(&j, &loss, sizeof(float), AF_CUDA_OUT);
    add_arr(&j, dy, AF_CUDA_OUT);
    add_arr(&j, y, AF_CUDA_IN);
    add_arr(&j, x, AF_CUDA_IN);
    add_arr(&j, abn, AF_CUDA_IN);
    args_t a = {{B, L, PPC}, {(float)w_abn, (float)weight}};
    if (job_run(&j, k_recon_loss, &a) < 0) goto done;
    ret = Py_BuildValue("dO", (double)loss, dy);
done:
    Py_XDECREF(y);
    Py_XDECREF(x);
    Py_XDECREF(abn);
    Py_XDECREF(dy);
    return ret;
}

/* ------------------------------------------------------------------ released loss */

/* d: losses[2], ds, dy, scratch, s, C, abn, y, x */
ADAPTER(released_loss) {
    return af_cuda_released_loss(c, F32(0), F32(0) + 1, F32(1), F32(2), F32(4), F32(5), U8(6),
                                 F32(7), F32(8), A->i[0], A->i[1], A->i[2], A->i[3], A->f[0],
                                 A->f[1], A->i[4], 1.0f, 1.0f, F32(3));
}

static PyObject *py_released_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"s", "C", "abn", "y", "x", "tau_s", "eps", "iters", NULL};
    PyObject *o_s, *o_C, *o_abn, *o_y, *o_x;
    double tau_s = AF_TAU_S, eps = AF_SINKHORN_EPS;
    int iters = AF_SINKHORN_ITERS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|ddi:released_loss", kwlist, &o_s, &o_C,
                                     &o_abn, &o_y, &o_x, &tau_s, &eps, &iters))
        return NULL;
    if (check_positive(tau_s, "tau_s") < 0 || check_positive(eps, "eps") < 0) return NULL;
    if (iters < 0) {
        PyErr_Format(PyExc_ValueError, "iters must be >= 0, got %d", iters);
        return NULL;
    }
    PyArrayObject *s = NULL, *C = NULL, *abn = NULL, *y = NULL, *x = NULL, *ds = NULL, *dy = NULL;
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
    float losses[2] = {0.0f, 0.0f};
    job_t j = {0};
    add_host(&j, losses, sizeof(losses), AF_CUDA_OUT);
    add_arr(&j, ds, AF_CUDA_OUT);
    add_arr(&j, dy, AF_CUDA_OUT);
    add_host(&j, NULL, af_cuda_released_loss_scratch_floats(L, K) * sizeof(float),
             AF_CUDA_SCRATCH);
    add_arr(&j, s, AF_CUDA_IN);
    add_arr(&j, C, AF_CUDA_IN);
    add_arr(&j, abn, AF_CUDA_IN);
    add_arr(&j, y, AF_CUDA_IN);
    add_arr(&j, x, AF_CUDA_IN);
    args_t a = {{B, L, K, PPC, iters}, {(float)tau_s, (float)eps}};
    if (job_run(&j, k_released_loss, &a) < 0) goto done;
    ret = Py_BuildValue("ddOO", (double)losses[0], (double)losses[1], ds, dy);
done:
    Py_XDECREF(s);
    Py_XDECREF(C);
    Py_XDECREF(abn);
    Py_XDECREF(y);
    Py_XDECREF(x);
    Py_XDECREF(ds);
    Py_XDECREF(dy);
    return ret;
}

/* ------------------------------------------------------------------ anomaly score */

/* d: score, log_score, err, y, x */
ADAPTER(anomaly) {
    return af_cuda_anomaly_score(c, F64(0), F64(1), F64(2), F32(3), F32(4), A->i[0], A->i[1],
                                 A->i[2]);
}

static PyObject *py_anomaly_score(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"y", "x", NULL};
    PyObject *o_y, *o_x;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:anomaly_score", kwlist, &o_y, &o_x))
        return NULL;
    PyArrayObject *y = NULL, *x = NULL, *score = NULL, *log_score = NULL, *err = NULL;
    PyObject *ret = NULL;
    if (arg_patches(o_y, o_x, &y, &x) < 0) goto done;
    int B = (int)PyArray_DIM(y, 0), L = (int)PyArray_DIM(y, 1), PPC = (int)PyArray_DIM(y, 2);
    if (!(score = af_new_array(1, PyArray_DIMS(y), NPY_FLOAT64))) goto done;
    if (!(log_score = af_new_array(1, PyArray_DIMS(y), NPY_FLOAT64))) goto done;
    if (!(err = af_new_array(2, PyArray_DIMS(y), NPY_FLOAT64))) goto done;
    job_t j = {0};
    add_arr(&j, score, AF_CUDA_OUT);
    add_arr(&j, log_score, AF_CUDA_OUT);
    add_arr(&j, err, AF_CUDA_OUT);
    add_arr(&j, y, AF_CUDA_IN);
    add_arr(&j, x, AF_CUDA_IN);
    args_t a = {{B, L, PPC}};
    if (job_run(&j, k_anomaly, &a) < 0) goto done;
    ret = Py_BuildValue("OOO", score, log_score, err);
done:
    Py_XDECREF(y);
    Py_XDECREF(x);
    Py_XDECREF(score);
    Py_XDECREF(log_score);
    Py_XDECREF(err);
    return ret;
}

#undef A

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS
static PyMethodDef cuda_objective_methods[] = {
    {"slm_generate", KW(py_slm_generate),
     "slm_generate(images, seed, step=0, first_index=0, patch=16, **config)\n"
     "  -> (x_prime uint8[B,S,S], masks uint8[B,S,S], token_labels uint8[B,L]) on the GPU,\n"
     "bit-identical to afire._C.slm.slm_generate (same keyword config)."},
    {"sinkhorn_knopp", KW(py_sinkhorn_knopp),
     "sinkhorn_knopp(logits[N,K], eps=0.05, iters=3) -> q[N,K]: GPU twin of "
     "afire._C.objective.sinkhorn_knopp."},
    {"prototypes_update", KW(py_prototypes_update),
     "prototypes_update(C[L,K], src[B,L,K], m=0.75, overwrite=False) -> None: GPU twin, C "
     "updated in place."},
    {"paper_loss", KW(py_paper_loss),
     "paper_loss(s, C, abn, tau_s=0.1, tau=0.1, *, w_stru=1, w_cate=1, combined=False, "
     "ds=None)\n  -> (l_stru, l_cate, ds_stru, ds_cate): GPU twin of afire._C.objective."
     "paper_loss; ds_* are w_* times the gradients. combined=True accumulates both into one\n"
     "buffer (initially ds, or zeros) and returns (l_stru, l_cate, ds_total, None)."},
    {"recon_loss", KW(py_recon_loss),
     "recon_loss(y, x, abn, w_abn=2.0, *, weight=1.0) -> (loss, dy): GPU twin; dy is weight "
     "times the gradient."},
    {"released_loss", KW(py_released_loss),
     "released_loss(s, C, abn, y, x, tau_s=0.1, eps=0.05, iters=3) -> (l_cst, l_recon, ds, dy)"
     ": GPU twin of afire._C.objective.released_loss."},
    {"anomaly_score", KW(py_anomaly_score),
     "anomaly_score(y, x) -> (score float64[B], log_score float64[B], err float64[B,L]): GPU "
     "twin of afire._C.objective.anomaly_score."},
    {NULL}};
#undef KW

int af_register_cuda_objective(PyObject *cuda_submodule) {
    return PyModule_AddFunctions(cuda_submodule, cuda_objective_methods);
}
