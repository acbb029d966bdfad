/* afire._C.model: the three networks (encoder, head, decoder) with their optimiser state.
 *
 *   Networks(preset="test", **overrides)     config validated at construction
 *   .params(net, teacher=False) / .grads(net) / .moments(net)   zero-copy float32 views
 *   .named_parameters(net)                   [(name, offset, shape, decay, trainable)]
 *   .encoder_forward(images, branch) / .encoder_backward(dtokens)
 *   .head_forward(tokens, branch) / .head_backward(dlogits) -> dtokens
 *   .decoder_forward(tokens, token_mask) / .decoder_backward(dpred) -> dtokens
 *   .zero_grad() .adamw_step(...) .clip_grad(...) .ema_update(m) .sync_teacher()
 * `net` is "encoder", "head" or "decoder"; `branch` "student" or "teacher".
 */
#include "py_util.h"
#include "common.h"
#include "model.h"

typedef struct {
    PyObject_HEAD
    af_model *m;
    int busy; /* 1 while a call runs without the GIL */
} NetworksObject;

static int net_from(PyObject *o, af_net *net) {
    const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (s != NULL && strcmp(s, "encoder") == 0) *net = AF_NET_ENCODER;
    else if (s != NULL && strcmp(s, "head") == 0) *net = AF_NET_HEAD;
    else if (s != NULL && strcmp(s, "decoder") == 0) *net = AF_NET_DECODER;
    else {
        PyErr_SetString(PyExc_ValueError, "net must be 'encoder', 'head' or 'decoder'");
        return -1;
    }
    return 0;
}

static int branch_from(const char *s, af_branch *br) {
    if (strcmp(s, "student") == 0) *br = AF_STUDENT;
    else if (strcmp(s, "teacher") == 0) *br = AF_TEACHER;
    else {
        PyErr_Format(PyExc_ValueError, "branch must be 'student' or 'teacher', got '%s'", s);
        return -1;
    }
    return 0;
}

static int ready(NetworksObject *self) {
    if (self->m != NULL) return 1;
    PyErr_SetString(PyExc_RuntimeError, "Networks is not initialised (__init__ not called)");
    return 0;
}

static int enter(NetworksObject *self) {
    if (!ready(self)) return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Networks is in use by another thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

/* ------------------------------------------------------------------ construction */

static int Networks_init(NetworksObject *self, PyObject *args, PyObject *kw) {
    /* Re-running __init__ would free buffers that parameter views (and, with the GIL
     * released, another thread's forward pass) still point into. */
    if (self->m != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Networks is already initialised; create a new one");
        return -1;
    }
    static char *kwlist[] = {"preset", "image_size", "patch_size", "in_chans", "embed_dim",
                             "depth", "num_heads", "mlp_ratio", "decoder_embed_dim",
                             "decoder_depth", "decoder_num_heads", "out_dim", "head_hidden_dim",
                             "head_bottleneck_dim", "shared_last_layer", "shared_mask_token",
                             "learned_pos", "seed", NULL};
    const char *preset = "test";
    int v[13];
    for (int i = 0; i < 13; i++) v[i] = -1;
    int flags[3] = {-1, -1, -1};
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|s$iiiiiiiiiiiiipppK:Networks", kwlist, &preset,
                                     &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8],
                                     &v[9], &v[10], &v[11], &v[12], &flags[0], &flags[1],
                                     &flags[2], &seed))
        return -1;
    af_config c;
    af_status st = af_config_preset(&c, preset);
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    int *field[13] = {&c.S, &c.P, &c.C, &c.D, &c.depth, &c.H, &c.mlp_ratio, &c.Dd, &c.depth_d,
                      &c.Hd, &c.K, &c.head_hidden, &c.head_bottleneck};
    for (int i = 0; i < 13; i++) {
        if (v[i] == -1) continue;
        if (v[i] <= 0) {
            PyErr_Format(PyExc_ValueError, "%s must be > 0, got %d", kwlist[i + 1], v[i]);
            return -1;
        }
        *field[i] = v[i];
    }
    if (flags[0] != -1) c.shared_last_layer = flags[0];
    if (flags[1] != -1) c.shared_mask_token = flags[1];
    if (flags[2] != -1) c.learned_pos = flags[2];
    c.seed = seed;
    af_model *m = NULL;
    st = af_model_create(&m, &c);
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    self->m = m;
    return 0;
}

static void Networks_dealloc(NetworksObject *self) {
    af_model_free(self->m);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ------------------------------------------------------------------ state views */

static PyObject *view(NetworksObject *self, float *data, size_t n) {
    npy_intp shape[1] = {(npy_intp)n};
    return af_view_f32((PyObject *)self, data, 1, shape);
}

static PyObject *Networks_params(NetworksObject *self, PyObject *args, PyObject *kw) {
    if (!ready(self)) return NULL;
    static char *kwlist[] = {"net", "teacher", NULL};
    PyObject *o;
    int teacher = 0;
    af_net net;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|p:params", kwlist, &o, &teacher)) return NULL;
    if (net_from(o, &net) < 0) return NULL;
    if (teacher && net == AF_NET_DECODER) {
        PyErr_SetString(PyExc_ValueError, "the decoder has no teacher copy");
        return NULL;
    }
    return view(self, teacher ? self->m->teacher[net] : self->m->params[net], self->m->numel[net]);
}

static PyObject *Networks_grads(NetworksObject *self, PyObject *o) {
    if (!ready(self)) return NULL;
    af_net net;
    if (net_from(o, &net) < 0) return NULL;
    return view(self, self->m->grads[net], self->m->numel[net]);
}

static PyObject *Networks_moments(NetworksObject *self, PyObject *o) {
    if (!ready(self)) return NULL;
    af_net net;
    if (net_from(o, &net) < 0) return NULL;
    PyObject *a = view(self, self->m->adam_m[net], self->m->numel[net]);
    PyObject *b = view(self, self->m->adam_v[net], self->m->numel[net]);
    PyObject *r = (a && b) ? PyTuple_Pack(2, a, b) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(b);
    return r;
}

static PyObject *Networks_named_parameters(NetworksObject *self, PyObject *o) {
    if (!ready(self)) return NULL;
    af_net net;
    if (net_from(o, &net) < 0) return NULL;
    int n = self->m->ntable[net];
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        const af_param_info *e = &self->m->table[net][i];
        PyObject *shape = PyTuple_New(e->ndim);
        if (shape == NULL) goto fail;
        for (int d = 0; d < e->ndim; d++)
            PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong((long long)e->shape[d]));
        PyObject *item = Py_BuildValue("(snNOO)", e->name, (Py_ssize_t)e->offset, shape,
                                       e->decay ? Py_True : Py_False,
                                       e->trainable ? Py_True : Py_False);
        if (item == NULL) goto fail;
        PyList_SET_ITEM(list, i, item);
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

static PyObject *Networks_get_config(NetworksObject *self, void *unused) {
    if (!ready(self)) return NULL;
    const af_config *c = &self->m->cfg;
    return Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:O,s:O,s:O,s:K,s:i,s:i}",
        "image_size", c->S, "patch_size", c->P, "in_chans", c->C, "embed_dim", c->D, "depth",
        c->depth, "num_heads", c->H, "mlp_ratio", c->mlp_ratio, "decoder_embed_dim", c->Dd,
        "decoder_depth", c->depth_d, "decoder_num_heads", c->Hd, "out_dim", c->K,
        "head_hidden_dim", c->head_hidden, "head_bottleneck_dim", c->head_bottleneck,
        "shared_last_layer", c->shared_last_layer ? Py_True : Py_False, "shared_mask_token",
        c->shared_mask_token ? Py_True : Py_False, "learned_pos",
        c->learned_pos ? Py_True : Py_False, "seed", (unsigned long long)c->seed,
        "num_patches", self->m->L, "num_tokens", self->m->T);
}

/* ------------------------------------------------------------------ forward / backward */

static PyArrayObject *new_f32(int ndim, npy_intp d0, npy_intp d1, npy_intp d2) {
    npy_intp shape[3] = {d0, d1, d2};
    return af_new_array(ndim, shape, NPY_FLOAT32);
}

/* tokens-like argument: float32 [B, T, D] with B >= 1. */
static PyArrayObject *tokens_arg(NetworksObject *self, PyObject *o, const char *name) {
    PyArrayObject *a = af_arg_array(o, name, NPY_FLOAT32, 3);
    if (a == NULL) return NULL;
    if (PyArray_DIM(a, 0) < 1) {
        PyErr_Format(PyExc_ValueError, "%s: batch dimension must be >= 1", name);
    } else if (af_check_dim(a, name, 1, self->m->T) == 0 &&
               af_check_dim(a, name, 2, self->m->cfg.D) == 0) {
        return a;
    }
    Py_DECREF(a);
    return NULL;
}

static af_status reserve(NetworksObject *self, npy_intp B) {
    if (B > 1 << 20) return af_error(AF_EINVAL, "batch size %zd too large", (Py_ssize_t)B);
    return af_model_reserve(self->m, (int)B);
}

/* The forward passes in one signature: x [B, ...] (mask only for the decoder) -> *out, the
 * network's output activation [B, d1, d2] (read after the call: reserve may move it). */
typedef af_status (*forward_fn)(af_model *m, af_branch br, const float *x, const uint8_t *mask,
                                int B, const float **out);

static af_status encoder_fwd(af_model *m, af_branch br, const float *x, const uint8_t *mask, int B,
                             const float **out) {
    AF_TRY(af_encoder_forward(m, br, x, B));
    *out = m->enc_acts[br].out;
    return AF_OK;
}
static af_status head_fwd(af_model *m, af_branch br, const float *x, const uint8_t *mask, int B,
                          const float **out) {
    AF_TRY(af_head_forward(m, br, x, B));
    *out = m->head_acts[br].logits;
    return AF_OK;
}
static af_status decoder_fwd(af_model *m, af_branch br, const float *x, const uint8_t *mask, int B,
                             const float **out) {
    AF_TRY(af_decoder_forward(m, x, mask, B));
    *out = m->dec_acts.pred;
    return AF_OK;
}

/* Holds the networks, reserves B images and runs fn without the GIL; returns a copy of its
 * output [B, d1, d2], or NULL with the exception set. */
static PyArrayObject *run_forward(NetworksObject *self, forward_fn fn, af_branch br, const float *x,
                                  const uint8_t *mask, npy_intp B, npy_intp d1, npy_intp d2) {
    if (enter(self) < 0) return NULL;
    const float *act = NULL;
    af_status st = reserve(self, B);
    if (st == AF_OK) {
        Py_BEGIN_ALLOW_THREADS
        st = fn(self->m, br, x, mask, (int)B, &act);
        Py_END_ALLOW_THREADS
    }
    self->busy = 0;
    if (st != AF_OK) return (PyArrayObject *)af_raise(st);
    PyArrayObject *out = new_f32(3, B, d1, d2);
    if (out) memcpy(PyArray_DATA(out), act, PyArray_NBYTES(out));
    return out;
}

/* The head and decoder backward: grad [B, L, n] of the last forward, whose batch is B
 * (0: no forward yet, ValueError `first`) -> a new dtokens [B, T, D]. */
static PyObject *run_backward(NetworksObject *self, PyObject *o, const char *name, int B,
                              npy_intp n, const char *first,
                              af_status (*fn)(af_model *, const float *, float *)) {
    PyArrayObject *d = af_arg_array(o, name, NPY_FLOAT32, 3);
    if (d == NULL) return NULL;
    PyArrayObject *out = NULL;
    if (B == 0) {
        PyErr_SetString(PyExc_ValueError, first);
        goto done;
    }
    if (af_check_dim(d, name, 0, B) < 0 || af_check_dim(d, name, 1, self->m->L) < 0 ||
        af_check_dim(d, name, 2, n) < 0)
        goto done;
    out = new_f32(3, B, self->m->T, self->m->cfg.D);
    if (out == NULL || enter(self) < 0) {
        Py_CLEAR(out);
        goto done;
    }
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fn(self->m, AF_F32(d), AF_F32(out));
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != AF_OK) {
        Py_CLEAR(out);
        af_raise(st);
    }
done:
    Py_DECREF(d);
    return (PyObject *)out;
}

static PyObject *Networks_encoder_forward(NetworksObject *self, PyObject *args, PyObject *kw) {
    if (!ready(self)) return NULL;
    static char *kwlist[] = {"images", "branch", NULL};
    PyObject *o;
    const char *bs = "student";
    af_branch br;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|s:encoder_forward", kwlist, &o, &bs)) return NULL;
    if (branch_from(bs, &br) < 0) return NULL;
    const af_config *c = &self->m->cfg;
    PyArrayObject *img = af_arg_array(o, "images", NPY_FLOAT32, 4);
    if (img == NULL) return NULL;
    PyArrayObject *out = NULL;
    npy_intp B = PyArray_DIM(img, 0);
    if (B < 1)
        PyErr_SetString(PyExc_ValueError, "images: batch dimension must be >= 1");
    else if (af_check_dim(img, "images", 1, c->C) == 0 && af_check_dim(img, "images", 2, c->S) == 0 &&
             af_check_dim(img, "images", 3, c->S) == 0)
        out = run_forward(self, encoder_fwd, br, AF_F32(img), NULL, B, self->m->T, c->D);
    Py_DECREF(img);
    return (PyObject *)out;
}

static PyObject *Networks_encoder_backward(NetworksObject *self, PyObject *o) {
    if (!ready(self)) return NULL;
    PyArrayObject *d = tokens_arg(self, o, "dtokens");
    if (d == NULL) return NULL;
    PyObject *ret = NULL;
    if (PyArray_DIM(d, 0) != self->m->enc_B[AF_STUDENT]) {
        PyErr_Format(PyExc_ValueError, "dtokens: batch %zd does not match the last student "
                     "encoder_forward (%d)", (Py_ssize_t)PyArray_DIM(d, 0), self->m->enc_B[AF_STUDENT]);
        goto done;
    }
    if (enter(self) < 0) goto done;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_encoder_backward(self->m, AF_F32(d));
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != AF_OK) af_raise(st);
    else ret = Py_NewRef(Py_None);
done:
    Py_DECREF(d);
    return ret;
}

static PyObject *Networks_head_forward(NetworksObject *self, PyObject *args, PyObject *kw) {
    if (!ready(self)) return NULL;
    static char *kwlist[] = {"tokens", "branch", NULL};
    PyObject *o;
    const char *bs = "student";
    af_branch br;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|s:head_forward", kwlist, &o, &bs)) return NULL;
    if (branch_from(bs, &br) < 0) return NULL;
    PyArrayObject *t = tokens_arg(self, o, "tokens");
    if (t == NULL) return NULL;
    PyArrayObject *out = run_forward(self, head_fwd, br, AF_F32(t), NULL, PyArray_DIM(t, 0),
                                     self->m->L, self->m->cfg.K);
    Py_DECREF(t);
    return (PyObject *)out;
}

static PyObject *Networks_head_backward(NetworksObject *self, PyObject *o) {
    if (!ready(self)) return NULL;
    return run_backward(self, o, "dlogits", self->m->head_B[AF_STUDENT], self->m->cfg.K,
                        "head_backward: call head_forward(branch='student') first",
                        af_head_backward);
}

static PyObject *Networks_decoder_forward(NetworksObject *self, PyObject *args, PyObject *kw) {
    if (!ready(self)) return NULL;
    static char *kwlist[] = {"tokens", "token_mask", NULL};
    PyObject *o, *mo;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:decoder_forward", kwlist, &o, &mo)) return NULL;
    PyArrayObject *t = tokens_arg(self, o, "tokens");
    if (t == NULL) return NULL;
    PyArrayObject *mask = NULL, *out = NULL;
    if (PyArray_Check(mo) && PyArray_TYPE((PyArrayObject *)mo) == NPY_BOOL)
        mask = (PyArrayObject *)PyArray_FROM_OTF(mo, NPY_UINT8, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    else
        mask = af_arg_array(mo, "token_mask", NPY_UINT8, 2);
    if (mask == NULL) goto done;
    npy_intp B = PyArray_DIM(t, 0);
    if (PyArray_NDIM(mask) != 2) {
        PyErr_SetString(PyExc_ValueError, "token_mask must have 2 dimensions");
        goto done;
    }
    if (af_check_dim(mask, "token_mask", 0, B) == 0 &&
        af_check_dim(mask, "token_mask", 1, self->m->L) == 0)
        out = run_forward(self, decoder_fwd, AF_STUDENT, AF_F32(t), AF_U8(mask), B, self->m->L,
                          self->m->Q);
done:
    Py_DECREF(t);
    Py_XDECREF(mask);
    return (PyObject *)out;
}

static PyObject *Networks_decoder_backward(NetworksObject *self, PyObject *o) {
    if (!ready(self)) return NULL;
    return run_backward(self, o, "dpred", self->m->dec_B, self->m->Q,
                        "decoder_backward: call decoder_forward first", af_decoder_backward);
}

/* ------------------------------------------------------------------ optimisation */

static PyObject *Networks_zero_grad(NetworksObject *self, PyObject *unused) {
    if (enter(self) < 0) return NULL;
    af_model_zero_grad(self->m);
    self->busy = 0;
    Py_RETURN_NONE;
}

static PyObject *Networks_sync_teacher(NetworksObject *self, PyObject *unused) {
    if (enter(self) < 0) return NULL;
    af_model_sync_teacher(self->m);
    self->busy = 0;
    Py_RETURN_NONE;
}

static PyObject *Networks_adamw_step(NetworksObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"lr", "weight_decay", "t", "beta1", "beta2", "eps",
                             "freeze_last_layer", NULL};
    af_adamw_args a = {0};
    a.beta1 = 0.9f, a.beta2 = 0.999f, a.eps = 1e-8f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ffi|fffp:adamw_step", kwlist, &a.lr,
                                     &a.weight_decay, &a.t, &a.beta1, &a.beta2, &a.eps,
                                     &a.freeze_last_layer))
        return NULL;
    if (enter(self) < 0) return NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_adamw_step(self->m, &a);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != AF_OK) return af_raise(st);
    Py_RETURN_NONE;
}

static PyObject *Networks_clip_grad(NetworksObject *self, PyObject *args, PyObject *kw) {
    if (!ready(self)) return NULL;
    static char *kwlist[] = {"max_norm", "mode", NULL};
    float max_norm = 3.0f;
    const char *mode = "per_tensor";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|fs:clip_grad", kwlist, &max_norm, &mode))
        return NULL;
    int per_tensor = strcmp(mode, "per_tensor") == 0;
    if (!per_tensor && strcmp(mode, "global") != 0) {
        PyErr_Format(PyExc_ValueError, "mode must be 'per_tensor' or 'global', got '%s'", mode);
        return NULL;
    }
    PyArrayObject *norms = NULL;
    if (per_tensor) {
        npy_intp n = af_model_num_trainable(self->m);
        norms = af_new_array(1, &n, NPY_FLOAT32);
        if (norms == NULL) return NULL;
    }
    if (enter(self) < 0) {
        Py_XDECREF(norms);
        return NULL;
    }
    af_status st;
    double total = 0.0;
    Py_BEGIN_ALLOW_THREADS
    st = per_tensor ? af_clip_grad_per_tensor(self->m, max_norm, AF_F32(norms), &total)
                    : af_clip_grad_global(self->m, max_norm, &total);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != AF_OK) {
        Py_XDECREF(norms);
        return af_raise(st);
    }
    if (!per_tensor) return PyFloat_FromDouble(total);
    return Py_BuildValue("(dN)", total, norms);
}

static PyObject *Networks_ema_update(NetworksObject *self, PyObject *o) {
    double mom = PyFloat_AsDouble(o);
    if (mom == -1.0 && PyErr_Occurred()) return NULL;
    if (enter(self) < 0) return NULL;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_ema_update(self->m, (float)mom);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != AF_OK) return af_raise(st);
    Py_RETURN_NONE;
}

static PyMethodDef Networks_methods[] = {
    {"params", (PyCFunction)(void (*)(void))Networks_params, METH_VARARGS | METH_KEYWORDS,
     "params(net, teacher=False) -> float32[numel] view of the network's flat buffer"},
    {"grads", (PyCFunction)Networks_grads, METH_O, "grads(net) -> float32[numel] view"},
    {"moments", (PyCFunction)Networks_moments, METH_O,
     "moments(net) -> (m, v) float32[numel] views of the AdamW moments"},
    {"named_parameters", (PyCFunction)Networks_named_parameters, METH_O,
     "named_parameters(net) -> [(name, offset, shape, decay, trainable)] in timm order; "
     "offset counts floats from the start of the flat buffer"},
    {"encoder_forward", (PyCFunction)(void (*)(void))Networks_encoder_forward,
     METH_VARARGS | METH_KEYWORDS,
     "encoder_forward(images float32[B,C,S,S], branch='student') -> tokens float32[B,T,D]"},
    {"encoder_backward", (PyCFunction)Networks_encoder_backward, METH_O,
     "encoder_backward(dtokens float32[B,T,D]): accumulate student encoder grads"},
    {"head_forward", (PyCFunction)(void (*)(void))Networks_head_forward,
     METH_VARARGS | METH_KEYWORDS,
     "head_forward(tokens float32[B,T,D], branch='student') -> logits float32[B,L,K]"},
    {"head_backward", (PyCFunction)Networks_head_backward, METH_O,
     "head_backward(dlogits float32[B,L,K]) -> dtokens float32[B,T,D] (cls row zero); "
     "accumulates head grads"},
    {"decoder_forward", (PyCFunction)(void (*)(void))Networks_decoder_forward,
     METH_VARARGS | METH_KEYWORDS,
     "decoder_forward(tokens float32[B,T,D], token_mask uint8|bool[B,L]) -> "
     "pred float32[B,L,P*P*C]"},
    {"decoder_backward", (PyCFunction)Networks_decoder_backward, METH_O,
     "decoder_backward(dpred float32[B,L,P*P*C]) -> dtokens float32[B,T,D]; accumulates "
     "decoder grads"},
    {"zero_grad", (PyCFunction)Networks_zero_grad, METH_NOARGS, "zero all gradients"},
    {"sync_teacher", (PyCFunction)Networks_sync_teacher, METH_NOARGS,
     "copy the student encoder and head into the teacher"},
    {"adamw_step", (PyCFunction)(void (*)(void))Networks_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(lr, weight_decay, t, beta1=0.9, beta2=0.999, eps=1e-8, "
     "freeze_last_layer=False)"},
    {"clip_grad", (PyCFunction)(void (*)(void))Networks_clip_grad, METH_VARARGS | METH_KEYWORDS,
     "clip_grad(max_norm=3.0, mode='per_tensor'|'global') -> per_tensor: (total_norm, "
     "norms float32[n_trainable]); global: total_norm (both before clipping)"},
    {"ema_update", (PyCFunction)Networks_ema_update, METH_O,
     "ema_update(momentum): teacher = momentum*teacher + (1-momentum)*student"},
    {NULL}};

static PyGetSetDef Networks_getset[] = {
    {"config", (getter)Networks_get_config, NULL, "the validated configuration (dict)", NULL},
    {NULL}};

static PyTypeObject NetworksType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "afire._C.model.Networks",
    .tp_basicsize = sizeof(NetworksObject),
    .tp_dealloc = (destructor)Networks_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Networks(preset='test', *, image_size, patch_size, in_chans, embed_dim, depth, "
              "num_heads, mlp_ratio, decoder_embed_dim, decoder_depth, decoder_num_heads, "
              "out_dim, head_hidden_dim, head_bottleneck_dim, shared_last_layer, "
              "shared_mask_token, learned_pos, seed): student encoder + head + decoder and "
              "the teacher encoder + head, CPU fp32.",
    .tp_methods = Networks_methods,
    .tp_getset = Networks_getset,
    .tp_init = (initproc)Networks_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ module functions */

static PyObject *py_normalize_images(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"images", "in_chans", NULL};
    PyObject *o;
    int C = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|i:normalize_images", kwlist, &o, &C)) return NULL;
    if (C != 1 && C != 3) {
        PyErr_Format(PyExc_ValueError, "in_chans must be 1 or 3, got %d", C);
        return NULL;
    }
    PyArrayObject *img = af_arg_array(o, "images", NPY_UINT8, 3);
    if (img == NULL) return NULL;
    npy_intp B = PyArray_DIM(img, 0), S = PyArray_DIM(img, 1);
    PyArrayObject *out = NULL;
    if (PyArray_DIM(img, 2) != S || B > INT32_MAX || S > 65536) {
        PyErr_SetString(PyExc_ValueError, "images must be [B, S, S] (square)");
        goto done;
    }
    npy_intp shape[4] = {B, C, S, S};
    out = af_new_array(4, shape, NPY_FLOAT32);
    if (out == NULL) goto done;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_normalize_images(AF_F32(out), AF_U8(img), (int)B, C, (int)S);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        Py_CLEAR(out);
        af_raise(st);
    }
done:
    Py_DECREF(img);
    return (PyObject *)out;
}

static PyMethodDef model_methods[] = {
    {"normalize_images", (PyCFunction)(void (*)(void))py_normalize_images,
     METH_VARARGS | METH_KEYWORDS,
     "normalize_images(images uint8[B,S,S], in_chans=1) -> float32[B,C,S,S] (C=1: mean 0.449 "
     "std 0.226; C=3: gray replicated, ImageNet mean/std)"},
    {NULL}};

int af_register_model(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "model", model_methods,
                                     "ViT encoder, projection head, restoration decoder, AdamW/EMA");
    /* PyModule_AddType readies the type and adds it under its short name */
    if (sub == NULL || PyModule_AddType(sub, &NetworksType) < 0) return -1;
    return 0;
}
