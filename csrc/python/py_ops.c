/* afire._C.ops: the CPU layer kernels of csrc/ops, one Python function per C function.
 *
 * float32 numpy arrays in (non-contiguous input is copied, other dtypes are a TypeError),
 * NEW arrays out. Forward functions return the output, or a tuple (output, saved
 * activations...) when the backward needs them. Backward functions always return a tuple
 * of freshly computed gradients (zeros + the kernel's accumulation). af_adamw_update works in
 * place. Every shape is checked before a kernel runs (csrc/python/py_args.c, shared with the CUDA
 * twins), because the kernels trust their sizes. */
#include "py_args.h" /* Python.h first */
#include "ops/ops.h"
#include "ops/ops_internal.h"

#define KW (PyCFunction)(void (*)(void))
/* af_parse_<op> (py_args.h) reads and checks the arguments; a function here runs its kernel
 * without the GIL, builds the result, and releases what the parser took. */
#define PARSE(op, a) \
    if (af_parse_##op(args, kw, &(a)) < 0) return NULL

/* ---------------------------------------------------------------- linear */

static PyObject *py_linear_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_linear_forward_args a;
    PARSE(linear_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_linear_forward(AF_F32(a.out), AF_F32(a.inp), AF_F32(a.weight),
                   a.bias ? AF_F32(a.bias) : NULL, a.N, a.C, a.OC);
    Py_END_ALLOW_THREADS
    PyObject *res = Py_NewRef(a.out);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_linear_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_linear_backward_args a;
    PARSE(linear_backward, a);
    Py_BEGIN_ALLOW_THREADS
    af_linear_backward(AF_F32(a.dinp), AF_F32(a.dweight), a.dbias ? AF_F32(a.dbias) : NULL,
                    AF_F32(a.dout), AF_F32(a.inp), AF_F32(a.weight), a.N, a.C, a.OC);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(3, a.dinp, a.dweight, a.dbias ? (PyObject *)a.dbias : Py_None);
    af_owned_release(&a.own);
    return res;
}

/* ---------------------------------------------------------------- layernorm */

static PyObject *py_layernorm_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_layernorm_forward_args a;
    PARSE(layernorm_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_layernorm_forward(AF_F32(a.out), AF_F32(a.mean), AF_F32(a.rstd), AF_F32(a.inp),
                      AF_F32(a.weight), AF_F32(a.bias), a.N, a.C, a.eps);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(3, a.out, a.mean, a.rstd);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_layernorm_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_layernorm_backward_args a;
    PARSE(layernorm_backward, a);
    Py_BEGIN_ALLOW_THREADS
    af_layernorm_backward(AF_F32(a.dinp), AF_F32(a.dweight), AF_F32(a.dbias), AF_F32(a.dout),
                       AF_F32(a.inp), AF_F32(a.weight), AF_F32(a.mean), AF_F32(a.rstd), a.N,
                       a.C);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(3, a.dinp, a.dweight, a.dbias);
    af_owned_release(&a.own);
    return res;
}

/* ---------------------------------------------------------------- gelu */

static PyObject *py_gelu_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_gelu_forward_args a;
    PARSE(gelu_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_gelu_forward(AF_F32(a.out), AF_F32(a.inp), a.n);
    Py_END_ALLOW_THREADS
    PyObject *res = Py_NewRef(a.out);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_gelu_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_gelu_backward_args a;
    PARSE(gelu_backward, a);
    Py_BEGIN_ALLOW_THREADS
    af_gelu_backward(AF_F32(a.dinp), AF_F32(a.dout), AF_F32(a.inp), a.n);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(1, a.dinp);
    af_owned_release(&a.own);
    return res;
}

/* ---------------------------------------------------------------- softmax */

static PyObject *py_softmax_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_softmax_forward_args a;
    PARSE(softmax_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_softmax_forward(AF_F32(a.out), AF_F32(a.inp), a.N, a.C);
    Py_END_ALLOW_THREADS
    PyObject *res = Py_NewRef(a.out);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_softmax_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_softmax_backward_args a;
    PARSE(softmax_backward, a);
    Py_BEGIN_ALLOW_THREADS
    af_softmax_backward(AF_F32(a.dinp), AF_F32(a.dout), AF_F32(a.out), a.N, a.C);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(1, a.dinp);
    af_owned_release(&a.own);
    return res;
}

/* ---------------------------------------------------------------- attention */

static PyObject *py_attention_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_attention_forward_args a;
    PARSE(attention_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_attention_forward(AF_F32(a.out), AF_F32(a.att), AF_F32(a.qkv), a.B, a.T, a.D, a.H);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(2, a.out, a.att);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_attention_backward_args a;
    PARSE(attention_backward, a);
    PyObject *res = NULL;
    PyArrayObject *scratch = af_zeros_like(a.att); /* the kernel's datt buffer */
    if (scratch != NULL) {
        Py_BEGIN_ALLOW_THREADS
        af_attention_backward(AF_F32(a.dqkv), AF_F32(scratch), AF_F32(a.dout), AF_F32(a.qkv),
                           AF_F32(a.att), a.B, a.T, a.D, a.H);
        Py_END_ALLOW_THREADS
        res = PyTuple_Pack(1, a.dqkv);
        Py_DECREF(scratch);
    }
    af_owned_release(&a.own);
    return res;
}

/* ---------------------------------------------------------------- residual */

static PyObject *py_residual_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_residual_forward_args a;
    PARSE(residual_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_residual_forward(AF_F32(a.out), AF_F32(a.a), AF_F32(a.b), a.n);
    Py_END_ALLOW_THREADS
    PyObject *res = Py_NewRef(a.out);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_residual_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_residual_backward_args a;
    PARSE(residual_backward, a);
    Py_BEGIN_ALLOW_THREADS
    af_residual_backward(AF_F32(a.da), AF_F32(a.db), AF_F32(a.dout), a.n);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(2, a.da, a.db);
    af_owned_release(&a.own);
    return res;
}

/* ---------------------------------------------------------------- patchify */

static PyObject *py_patchify_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_patchify_args a;
    PARSE(patchify_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_patchify_forward(AF_F32(a.patches), AF_F32(a.img), a.B, a.C, a.S, a.P, a.order);
    Py_END_ALLOW_THREADS
    PyObject *res = Py_NewRef(a.patches);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_patchify_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_patchify_args a;
    if (af_parse_patches_to_image(args, kw, "Oiii|i:patchify_backward", &a) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    af_patchify_backward(AF_F32(a.img), AF_F32(a.patches), a.B, a.C, a.S, a.P, a.order);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(1, a.img);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_unpatchify(PyObject *self, PyObject *args, PyObject *kw) {
    af_patchify_args a;
    if (af_parse_patches_to_image(args, kw, "Oiii|i:unpatchify", &a) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    af_unpatchify(AF_F32(a.img), AF_F32(a.patches), a.B, a.C, a.S, a.P, a.order);
    Py_END_ALLOW_THREADS
    PyObject *res = Py_NewRef(a.img);
    af_owned_release(&a.own);
    return res;
}

/* ---------------------------------------------------------------- sincos */

static PyObject *py_sincos_2d_embed(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"D", "G", "cls", NULL};
    int D, G, cls = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|p:sincos_2d_embed", kwl, &D, &G, &cls))
        return NULL;
    if (af_check_positive_int(D, "D") < 0 || af_check_positive_int(G, "G") < 0) return NULL;
    if (D % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "D must be divisible by 4, got %d", D);
        return NULL;
    }
    npy_intp rows = (npy_intp)G * G + (cls ? 1 : 0);
    PyArrayObject *out = af_zeros2(rows, D);
    if (out == NULL) return NULL;
    Py_BEGIN_ALLOW_THREADS
    af_sincos_2d_embed(AF_F32(out), D, G, cls);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

/* ---------------------------------------------------------------- l2norm */

static PyObject *py_l2norm_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_l2norm_forward_args a;
    PARSE(l2norm_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_l2norm_forward(AF_F32(a.out), AF_F32(a.norm), AF_F32(a.inp), a.N, a.C, a.eps);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(2, a.out, a.norm);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_l2norm_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_l2norm_backward_args a;
    PARSE(l2norm_backward, a);
    Py_BEGIN_ALLOW_THREADS
    af_l2norm_backward(AF_F32(a.dinp), AF_F32(a.dout), AF_F32(a.inp), AF_F32(a.norm), a.N, a.C,
                    a.eps);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(1, a.dinp);
    af_owned_release(&a.own);
    return res;
}

/* ---------------------------------------------------------------- wn_linear */

static PyObject *py_wn_linear_forward(PyObject *self, PyObject *args, PyObject *kw) {
    af_wn_linear_forward_args a;
    PARSE(wn_linear_forward, a);
    Py_BEGIN_ALLOW_THREADS
    af_wn_linear_forward(AF_F32(a.out), AF_F32(a.w_eff), AF_F32(a.vnorm), AF_F32(a.inp),
                      AF_F32(a.v), a.N, a.C, a.K);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(3, a.out, a.w_eff, a.vnorm);
    af_owned_release(&a.own);
    return res;
}

static PyObject *py_wn_linear_backward(PyObject *self, PyObject *args, PyObject *kw) {
    af_wn_linear_backward_args a;
    PARSE(wn_linear_backward, a);
    Py_BEGIN_ALLOW_THREADS
    af_wn_linear_backward(AF_F32(a.dinp), AF_F32(a.dv), AF_F32(a.dout), AF_F32(a.inp),
                       AF_F32(a.w_eff), AF_F32(a.vnorm), a.N, a.C, a.K);
    Py_END_ALLOW_THREADS
    PyObject *res = PyTuple_Pack(2, a.dinp, a.dv);
    af_owned_release(&a.own);
    return res;
}

/* Test hook: the allocation-free dv path, accumulating into a copy of dv0. */
static PyObject *py__wn_linear_backward_dv_lowmem(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwl[] = {"dv0", "dout", "inp", "w_eff", "vnorm", NULL};
    PyObject *o0, *od, *oi, *ow, *on, *res = NULL;
    PyArrayObject *dv0 = NULL, *dout = NULL, *inp = NULL, *weff = NULL, *vnorm = NULL, *dv = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:_wn_linear_backward_dv_lowmem", kwl, &o0,
                                     &od, &oi, &ow, &on))
        return NULL;
    if (!(dv0 = af_arg_f32(o0, "dv0", 2)) || !(dout = af_arg_f32(od, "dout", 2)) ||
        !(inp = af_arg_f32(oi, "inp", 2)) || !(weff = af_arg_f32(ow, "w_eff", 2)) ||
        !(vnorm = af_arg_f32(on, "vnorm", 1)))
        goto done;
    int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1), K = (int)PyArray_DIM(weff, 0);
    if (af_check_same_shape(dv0, "dv0", weff, "w_eff") < 0 ||
        af_check_dim(vnorm, "vnorm", 0, K) < 0 || af_check_dim(dout, "dout", 0, N) < 0 ||
        af_check_dim(dout, "dout", 1, K) < 0)
        goto done;
    if (!(dv = (PyArrayObject *)PyArray_NewCopy(dv0, NPY_CORDER))) goto done;
    Py_BEGIN_ALLOW_THREADS
    af_wn_linear_backward_dv_lowmem(AF_F32(dv), AF_F32(dout), AF_F32(inp), AF_F32(weff),
                                 AF_F32(vnorm), N, C, K);
    Py_END_ALLOW_THREADS
    res = (PyObject *)dv;
    dv = NULL;
done:
    Py_XDECREF(dv0); Py_XDECREF(dout); Py_XDECREF(inp); Py_XDECREF(weff); Py_XDECREF(vnorm);
    Py_XDECREF(dv);
    return res;
}

/* ---------------------------------------------------------------- adamw */

static PyObject *py_adamw_update(PyObject *self, PyObject *args, PyObject *kw) {
    af_adamw_args a;
    PARSE(adamw_update, a);
    Py_BEGIN_ALLOW_THREADS
    af_adamw_update(AF_F32(a.params), AF_F32(a.grads), AF_F32(a.m), AF_F32(a.v), a.n, a.lr, a.beta1,
                 a.beta2, a.eps, a.weight_decay, a.t);
    Py_END_ALLOW_THREADS
    af_owned_release(&a.own);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- table */

#define F(name, doc) {#name, KW py_##name, METH_VARARGS | METH_KEYWORDS, doc}
static PyMethodDef ops_methods[] = {
    AF_OP_METHODS(F),
    F(sincos_2d_embed, "sincos_2d_embed(D, G, cls=False) -> out[(1 if cls) + G*G, D] (MAE)"),
    F(_wn_linear_backward_dv_lowmem, "test hook: dv0 + the dv of wn_linear_backward, computed "
                                      "without a K x C buffer (the out-of-memory path)"),
    {NULL}};
#undef F

int af_register_ops(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "ops", ops_methods,
                                     "CPU layer kernels (fp32): forward/backward pairs.");
    if (sub == NULL) return -1;
    if (PyModule_AddIntConstant(sub, "PATCH_PQC", AF_PATCH_PQC) < 0 ||
        PyModule_AddIntConstant(sub, "PATCH_CPQ", AF_PATCH_CPQ) < 0)
        return -1;
    return 0;
}
