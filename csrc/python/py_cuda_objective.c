/* afire._C_cuda.cuda: host-level entry points of the GPU SLM and objective (cuda/slm.cu,
 * cuda/objective.cu), registered into the afire._C_cuda.cuda submodule.
 *
 * Each function takes exactly the arguments of its CPU twin (afire._C.slm.slm_generate,
 * afire._C.objective.*), checked by the same code (csrc/python/py_args.c), so a test feeds both the
 * same inputs and gets the same errors. The data checks the device code leaves to its caller
 * (finite values, C >= 0 with positive row sums) are made there too. Every call uploads, runs on one context of this file
 * (device 0, exact fp32) and downloads: for tests and small jobs, not for training. */
#include "py_args.h"

#include <math.h>
#include <string.h>

#include "common.h"
#include "cuda_api.h"
#include "py_cuda_ctx.h"
#include "objective.h"
#include "slm.h"
#include "../cuda/objective.cuh"

/* ------------------------------------------------------------------ context and jobs */

static af_test_ctx g_test = {NULL, 0, "CUDA objective test context"};

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
    af_cuda_context *ctx = af_test_ctx_acquire(&g_test);
    if (ctx == NULL) return -1;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_run_host_bytes(ctx, j->n, j->b, fn, a);
    Py_END_ALLOW_THREADS
    af_test_ctx_release(&g_test);
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

/* The argument checks, shared with the CPU twins, are in py_args.c. */

/* ------------------------------------------------------------------ SLM */

ADAPTER(slm_generate) {
    return af_cuda_slm_generate(c, U8(0), U8(1), U8(2), U8(3), A->i[0], A->i[1], A->i[2], &A->cfg,
                                A->u[0], A->u[1], A->u[2]);
}

static PyObject *py_slm_generate(PyObject *self, PyObject *args, PyObject *kw) {
    af_slm_generate_args p;
    if (af_parse_slm_generate(args, kw, &p) < 0) return NULL;
    PyObject *result = NULL;
    if (p.B > 0) {
        job_t j = {0};
        add_arr(&j, p.xp, AF_CUDA_OUT);
        add_arr(&j, p.masks, AF_CUDA_OUT);
        add_arr(&j, p.labels, AF_CUDA_OUT);
        add_arr(&j, p.images, AF_CUDA_IN);
        args_t a = {{p.B, p.S, p.P}, {0}, {p.seed, p.step, p.first}, p.cfg};
        if (job_run(&j, k_slm_generate, &a) < 0) goto done;
    }
    result = Py_BuildValue("(OOO)", p.xp, p.masks, p.labels);
done:
    af_owned_release(&p.own);
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
    af_sinkhorn_args p;
    if (af_check_sinkhorn(o_logits, eps, iters, &p) < 0) return NULL;
    PyObject *ret = NULL;
    job_t j = {0};
    add_arr(&j, p.q, AF_CUDA_OUT);
    add_arr(&j, p.logits, AF_CUDA_IN);
    args_t a = {{p.N, p.K, p.iters}, {p.eps}};
    if (job_run(&j, k_sinkhorn, &a) == 0) ret = Py_NewRef(p.q);
    af_owned_release(&p.own);
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
    af_prototypes_args p;
    if (af_check_prototypes_update(o_C, o_src, m, &p) < 0) return NULL;
    PyObject *ret = NULL;
    job_t j = {0};
    add_arr(&j, p.C, AF_CUDA_INOUT);
    add_arr(&j, p.src, AF_CUDA_IN);
    args_t a = {{p.B, p.L, p.K, overwrite}, {p.m}};
    if (job_run(&j, k_prototypes, &a) == 0) ret = Py_NewRef(Py_None);
    af_owned_release(&p.own);
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
    if (af_check_positive_real(tau_s, "tau_s") < 0 || af_check_positive_real(tau, "tau") < 0)
        return NULL;
    if (!isfinite(w_stru) || !isfinite(w_cate)) {
        PyErr_SetString(PyExc_ValueError, "w_stru and w_cate must be finite");
        return NULL;
    }
    if (o_ds != Py_None && !combined) {
        PyErr_SetString(PyExc_ValueError, "ds (a gradient to accumulate into) needs combined=True");
        return NULL;
    }
    af_paper_loss_args p;
    if (af_check_paper_loss(o_s, o_C, o_abn, 1, &p) < 0) return NULL; /* C checked here */
    int B = p.B, L = p.L, K = p.K;
    PyArrayObject *ds_stru = NULL, *ds_cate = NULL, *ds0 = NULL;
    PyObject *ret = NULL;
    if (!(ds_stru = af_new_array(3, PyArray_DIMS(p.s), NPY_FLOAT32))) goto done;
    if (o_ds != Py_None) {
        if (!(ds0 = af_arg_f32_finite(o_ds, "ds", 3))) goto done;
        for (int d = 0; d < 3; d++)
            if (af_check_dim(ds0, "ds", d, PyArray_DIM(p.s, d)) < 0) goto done;
        memcpy(PyArray_DATA(ds_stru), PyArray_DATA(ds0), (size_t)PyArray_NBYTES(p.s));
    }
    if (!combined && !(ds_cate = af_new_array(3, PyArray_DIMS(p.s), NPY_FLOAT32))) goto done;
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
    add_arr(&j, p.s, AF_CUDA_IN);
    add_arr(&j, p.C, AF_CUDA_IN);
    add_arr(&j, p.abn, AF_CUDA_IN);
    args_t a = {{B, L, K, combined}, {(float)tau_s, (float)tau, (float)w_stru, (float)w_cate}};
    if (job_run(&j, k_paper_loss, &a) < 0) goto done;
    ret = Py_BuildValue("ddOO", (double)losses[0], (double)losses[1], ds_stru,
                        combined ? Py_None : (PyObject *)ds_cate);
done:
    af_owned_release(&p.own);
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
    if (af_check_w_abn(w_abn) < 0) return NULL;
    if (!isfinite(weight)) {
        PyErr_SetString(PyExc_ValueError, "weight must be finite");
        return NULL;
    }
    af_recon_loss_args p;
    if (af_check_recon_loss(o_y, o_x, o_abn, &p) < 0) return NULL;
    PyObject *ret = NULL;
    float loss = 0.0f;
    job_t j = {0};
    add_host(&j, &loss, sizeof(float), AF_CUDA_OUT);
    add_arr(&j, p.dy, AF_CUDA_OUT);
    add_arr(&j, p.y, AF_CUDA_IN);
    add_arr(&j, p.x, AF_CUDA_IN);
    add_arr(&j, p.abn, AF_CUDA_IN);
    args_t a = {{p.B, p.L, p.PPC}, {(float)w_abn, (float)weight}};
    if (job_run(&j, k_recon_loss, &a) == 0) ret = Py_BuildValue("dO", (double)loss, p.dy);
    af_owned_release(&p.own);
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
    af_released_loss_args p;
    if (af_check_released_loss(o_s, o_C, o_abn, o_y, o_x, tau_s, eps, iters, &p) < 0)
        return NULL;
    PyObject *ret = NULL;
    float losses[2] = {0.0f, 0.0f};
    job_t j = {0};
    add_host(&j, losses, sizeof(losses), AF_CUDA_OUT);
    add_arr(&j, p.ds, AF_CUDA_OUT);
    add_arr(&j, p.dy, AF_CUDA_OUT);
    add_host(&j, NULL, af_cuda_released_loss_scratch_floats(p.L, p.K) * sizeof(float),
             AF_CUDA_SCRATCH);
    add_arr(&j, p.s, AF_CUDA_IN);
    add_arr(&j, p.C, AF_CUDA_IN);
    add_arr(&j, p.abn, AF_CUDA_IN);
    add_arr(&j, p.y, AF_CUDA_IN);
    add_arr(&j, p.x, AF_CUDA_IN);
    args_t a = {{p.B, p.L, p.K, p.PPC, p.iters}, {p.tau_s, p.eps}};
    if (job_run(&j, k_released_loss, &a) == 0)
        ret = Py_BuildValue("ddOO", (double)losses[0], (double)losses[1], p.ds, p.dy);
    af_owned_release(&p.own);
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
    af_anomaly_args p;
    if (af_check_anomaly_score(o_y, o_x, &p) < 0) return NULL;
    PyObject *ret = NULL;
    job_t j = {0};
    add_arr(&j, p.score, AF_CUDA_OUT);
    add_arr(&j, p.log_score, AF_CUDA_OUT);
    add_arr(&j, p.err, AF_CUDA_OUT);
    add_arr(&j, p.y, AF_CUDA_IN);
    add_arr(&j, p.x, AF_CUDA_IN);
    args_t a = {{p.B, p.L, p.PPC}};
    if (job_run(&j, k_anomaly, &a) == 0)
        ret = Py_BuildValue("OOO", p.score, p.log_score, p.err);
    af_owned_release(&p.own);
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
