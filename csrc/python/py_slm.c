/* afire._C.slm: Synthetic Lesion Masks (csrc/core/slm.h states the rules). */
#include "py_op.h" /* Python.h first; slm_generate is a row of the op table (py_op_table.c) */

static PyObject *py_slm_lesions(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"image", "seed", "step", "index", AF_SLM_CFG_KWLIST, NULL};
    PyObject *image_obj;
    uint64_t seed = 0, step = 0, index = 0;
    const char *tok = NULL, *reg = NULL;
    af_slm_config c = af_slm_config_default();
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO&|O&O&" AF_SLM_CFG_FORMAT ":slm_lesions",
                                     kwlist, &image_obj, af_conv_u64, &seed, af_conv_u64, &step,
                                     af_conv_u64, &index, AF_SLM_CFG_ARGS(c, tok, reg)))
        return NULL;
    if (af_slm_config_finish(&c, tok, reg) < 0) return NULL;
    PyArrayObject *image = af_arg_array(image_obj, "image", NPY_UINT8, 2);
    if (image == NULL) return NULL;
    PyObject *result = NULL;
    int32_t *ws = NULL;
    npy_intp S = PyArray_DIM(image, 0);
    if (PyArray_DIM(image, 1) != S || S < 1 || S > AF_SLM_MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "image must be square [S, S] with 1 <= S <= %d, got "
                     "[%zd, %zd]", AF_SLM_MAX_SIDE, (Py_ssize_t)S,
                     (Py_ssize_t)PyArray_DIM(image, 1));
        goto done;
    }
    size_t n_ws = af_slm_workspace_ints((int)S, &c);
    if (n_ws > 0 && (ws = (int32_t *)PyMem_Calloc(n_ws, sizeof(int32_t))) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    af_slm_lesion lesions[AF_SLM_MAX_LESIONS];
    int R = 0;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_slm_lesions(lesions, &R, AF_U8(image), (int)S, &c, seed, step, index, ws);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    result = PyList_New(R);
    if (result == NULL) goto done;
    for (int r = 0; r < R; r++) {
        const af_slm_lesion *l = &lesions[r];
        PyObject *t = Py_BuildValue("(iiiiiiii)", l->x0, l->y0, l->w, l->h, l->crop_x0,
                                    l->crop_y0, l->crop_w, l->crop_h);
        if (t == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, r, t);
    }
done:
    PyMem_Free(ws);
    Py_DECREF(image);
    return result;
}

static PyObject *py_otsu(PyObject *self, PyObject *args) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O:otsu_threshold", &obj)) return NULL;
    PyArrayObject *img = af_arg_array(obj, "image", NPY_UINT8, -1);
    if (img == NULL) return NULL;
    npy_intp n = PyArray_SIZE(img);
    if (n < 1 || n > INT32_MAX) {
        Py_DECREF(img);
        PyErr_Format(PyExc_ValueError, "image must have 1 to 2**31-1 pixels, got %zd",
                     (Py_ssize_t)n);
        return NULL;
    }
    int t;
    Py_BEGIN_ALLOW_THREADS
    t = af_otsu_threshold(AF_U8(img), (int)n);
    Py_END_ALLOW_THREADS
    Py_DECREF(img);
    return PyLong_FromLong(t);
}

static PyObject *py_size_range(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"S", AF_SLM_CFG_KWLIST, NULL};
    int S;
    const char *tok = NULL, *reg = NULL;
    af_slm_config c = af_slm_config_default();
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|" AF_SLM_CFG_FORMAT ":size_range", kwlist,
                                     &S, AF_SLM_CFG_ARGS(c, tok, reg)))
        return NULL;
    if (af_slm_config_finish(&c, tok, reg) < 0) return NULL;
    if (S < 1) {
        PyErr_Format(PyExc_ValueError, "S must be >= 1, got %d", S);
        return NULL;
    }
    int lo, hi;
    af_slm_size_range(S, &c, &lo, &hi);
    return Py_BuildValue("(ii)", lo, hi);
}

static PyObject *py_default_config(PyObject *self, PyObject *unused) {
    af_slm_config c = af_slm_config_default();
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:d,s:d,s:s,s:s}", "lesions_min", c.lesions_min,
                         "lesions_max", c.lesions_max, "size_min", c.size_min, "size_max",
                         c.size_max, "crop_max", c.crop_max, "gamma2", (double)c.gamma2,
                         "strength", (double)c.strength, "token_rule", "paper", "region_rule",
                         "random");
}

#define KW (PyCFunction)(void (*)(void))
#define CFG_DOC                                                                               \
    "Config (keyword-only): lesions_min=1, lesions_max=4, size_min=16, size_max=64, "        \
    "crop_max=60, gamma2=0.5, strength=0.5, token_rule='paper'|'released', "                 \
    "region_rule='random'|'largest'."
static PyMethodDef slm_methods[] = {
    {"slm_lesions", KW py_slm_lesions, METH_VARARGS | METH_KEYWORDS,
     "slm_lesions(image, seed, step=0, index=0, **config) -> list of\n"
     "  (x0, y0, W, H, crop_x0, crop_y0, crop_w, crop_h): the lesions slm_generate draws for\n"
     "  image uint8[S,S] at global index `index` (box [y0,y0+H) x [x0,x0+W)).\n" CFG_DOC},
    {"otsu_threshold", py_otsu, METH_VARARGS,
     "otsu_threshold(image uint8[...]) -> int t; foreground = pixels > t. Ties -> smallest t;"
     " fewer than two distinct values -> the maximum value (empty foreground)."},
    {"size_range", KW py_size_range, METH_VARARGS | METH_KEYWORDS,
     "size_range(S, **config) -> (lo, hi): lesion W, H range used for image side S."},
    {"default_config", py_default_config, METH_NOARGS, "default_config() -> dict"},
    {NULL}};

int af_register_slm(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "slm", slm_methods,
                                     "Synthetic Lesion Masks (METHOD.md section 1), CPU, OpenMP.");
    return sub == NULL ? -1 : af_op_register(sub, "slm");
}
