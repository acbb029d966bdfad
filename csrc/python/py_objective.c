/* afire._C.objective: bindings of objective.h (Sinkhorn, prototypes, the paper and released
 * losses, the anomaly score). Every array is checked before the core runs (dtype ->
 * TypeError, shape or value -> ValueError naming the argument); the core then runs without
 * the GIL. */
#include "py_args.h"

#include "common.h"
#include "objective.h"

/* The arguments are checked by af_check_<fn> (py_args.h, shared with the GPU twins in
 * py_cuda_objective.c); each function here runs the C core and builds the result. The
 * keyword lists stay here because the GPU twins take extra keywords. */

static PyObject *py_sinkhorn_knopp(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "eps", "iters", NULL};
    PyObject *o_logits;
    double eps = AF_SINKHORN_EPS;
    int iters = AF_SINKHORN_ITERS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|di", kwlist, &o_logits, &eps, &iters))
        return NULL;
    af_sinkhorn_args a;
    if (af_check_sinkhorn(o_logits, eps, iters, &a) < 0) return NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_sinkhorn_knopp(AF_F32(a.q), AF_F32(a.logits), a.N, a.K, a.eps, a.iters);
    Py_END_ALLOW_THREADS
    PyObject *ret = st == AF_OK ? Py_NewRef(a.q) : af_raise(st);
    af_owned_release(&a.own);
    return ret;
}

static PyObject *py_prototypes_update(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"C", "src", "m", "overwrite", NULL};
    PyObject *o_C, *o_src;
    double m = AF_PROTO_M;
    int overwrite = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|dp", kwlist, &o_C, &o_src, &m, &overwrite))
        return NULL;
    af_prototypes_args a;
    if (af_check_prototypes_update(o_C, o_src, m, &a) < 0) return NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_prototypes_update(AF_F32(a.C), AF_F32(a.src), a.B, a.L, a.K, a.m, overwrite);
    Py_END_ALLOW_THREADS
    PyObject *ret = st == AF_OK ? Py_NewRef(Py_None) : af_raise(st);
    af_owned_release(&a.own);
    return ret;
}

static PyObject *py_paper_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"s", "C", "abn", "tau_s", "tau", NULL};
    PyObject *o_s, *o_C, *o_abn;
    double tau_s = AF_TAU_S, tau = AF_TAU;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|dd", kwlist, &o_s, &o_C, &o_abn, &tau_s,
                                     &tau))
        return NULL;
    if (af_check_positive_real(tau_s, "tau_s") < 0 || af_check_positive_real(tau, "tau") < 0)
        return NULL;
    af_paper_loss_args a;
    if (af_check_paper_loss(o_s, o_C, o_abn, 0, &a) < 0) return NULL; /* the core checks C */
    int B = a.B, L = a.L, K = a.K;
    PyArrayObject *ds_stru = NULL, *ds_cate = NULL;
    float *scratch = NULL;
    PyObject *ret = NULL;
    if (!(ds_stru = af_new_array(3, PyArray_DIMS(a.s), NPY_FLOAT32))) goto done;
    if (!(ds_cate = af_new_array(3, PyArray_DIMS(a.s), NPY_FLOAT32))) goto done;
    size_t nscratch = af_paper_loss_scratch_floats(B, L, K);
    if (nscratch == 0 || !(scratch = af_calloc(nscratch, sizeof(float)))) {
        PyErr_Format(PyExc_MemoryError, "paper_loss: cannot allocate scratch for B=%d, L=%d, "
                     "K=%d", B, L, K);
        goto done;
    }
    float l_stru = 0.0f, l_cate = 0.0f;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_paper_loss(&l_stru, &l_cate, AF_F32(ds_stru), AF_F32(ds_cate), AF_F32(a.s), AF_F32(a.C),
                    AF_U8(a.abn), B, L, K, (float)tau_s, (float)tau, 1.0f, 1.0f, scratch);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    ret = Py_BuildValue("ddOO", (double)l_stru, (double)l_cate, ds_stru, ds_cate);
done:
    af_free(scratch);
    af_owned_release(&a.own);
    Py_XDECREF(ds_stru);
    Py_XDECREF(ds_cate);
    return ret;
}

static PyObject *py_recon_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"y", "x", "abn", "w_abn", NULL};
    PyObject *o_y, *o_x, *o_abn;
    double w_abn = AF_W_ABN;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d", kwlist, &o_y, &o_x, &o_abn, &w_abn))
        return NULL;
    if (af_check_w_abn(w_abn) < 0) return NULL;
    af_recon_loss_args a;
    if (af_check_recon_loss(o_y, o_x, o_abn, &a) < 0) return NULL;
    float loss = 0.0f;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_recon_loss(&loss, AF_F32(a.dy), AF_F32(a.y), AF_F32(a.x), AF_U8(a.abn), a.B, a.L, a.PPC,
                    (float)w_abn, 1.0f);
    Py_END_ALLOW_THREADS
    PyObject *ret = st == AF_OK ? Py_BuildValue("dO", (double)loss, a.dy) : af_raise(st);
    af_owned_release(&a.own);
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
    af_released_loss_args a;
    if (af_check_released_loss(o_s, o_C, o_abn, o_y, o_x, tau_s, eps, iters, &a) < 0)
        return NULL;
    PyObject *ret = NULL;
    float *scratch = af_calloc(af_released_loss_scratch_floats(a.L, a.K), sizeof(float));
    if (scratch == NULL) {
        af_raise(AF_ENOMEM);
        goto done;
    }
    float l_cst = 0.0f, l_recon = 0.0f;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_released_loss(&l_cst, &l_recon, AF_F32(a.ds), AF_F32(a.dy), AF_F32(a.s), AF_F32(a.C),
                       AF_U8(a.abn), AF_F32(a.y), AF_F32(a.x), a.B, a.L, a.K, a.PPC, a.tau_s,
                       a.eps, a.iters, 1.0f, 1.0f, scratch);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    ret = Py_BuildValue("ddOO", (double)l_cst, (double)l_recon, a.ds, a.dy);
done:
    af_free(scratch);
    af_owned_release(&a.own);
    return ret;
}

static PyObject *py_anomaly_score(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"y", "x", NULL};
    PyObject *o_y, *o_x;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO", kwlist, &o_y, &o_x)) return NULL;
    af_anomaly_args a;
    if (af_check_anomaly_score(o_y, o_x, &a) < 0) return NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_anomaly_score((double *)PyArray_DATA(a.score), (double *)PyArray_DATA(a.log_score),
                       (double *)PyArray_DATA(a.err), AF_F32(a.y), AF_F32(a.x), a.B, a.L, a.PPC);
    Py_END_ALLOW_THREADS
    PyObject *ret = st == AF_OK ? Py_BuildValue("OOO", a.score, a.log_score, a.err)
                                : af_raise(st);
    af_owned_release(&a.own);
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
