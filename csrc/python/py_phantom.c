/* afire._C.phantom: synthetic chest radiographs (csrc/core/phantom.c). */
#include "py_util.h" /* Python.h first */
#include "phantom.h"

static const char *kind_names[] = {"none", "nodule", "consolidation", "effusion"};

/* lesion argument -> kind (-1 random, 0..3); returns -2 with an exception set. */
static int parse_lesion(PyObject *obj) {
    if (obj == NULL || obj == Py_None) return PHANTOM_NONE;
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "lesion must be None or a str, got %s",
                     Py_TYPE(obj)->tp_name);
        return -2;
    }
    const char *s = PyUnicode_AsUTF8(obj);
    if (s == NULL) return -2;
    if (strcmp(s, "random") == 0) return -1;
    for (int k = 1; k < PHANTOM_NUM_KINDS; k++)
        if (strcmp(s, kind_names[k]) == 0) return k;
    PyErr_Format(PyExc_ValueError, "lesion must be None, 'nodule', 'consolidation', "
                 "'effusion' or 'random', got %R", obj);
    return -2;
}

static PyObject *py_generate(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"n", "size", "seed", "first_subject", "lesion", "p_abnormal", NULL};
    Py_ssize_t n;
    int size = 224;
    unsigned long long seed = 0, first = 0;
    PyObject *lesion = Py_None, *p_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n|iKKOO:generate", kwlist, &n, &size, &seed,
                                     &first, &lesion, &p_obj))
        return NULL;
    if (n < 0 || n > 0x7FFFFFFF) {
        PyErr_Format(PyExc_ValueError, "n must be in [0, 2**31), got %zd", n);
        return NULL;
    }
    if (size < PHANTOM_MIN_SIZE || size > PHANTOM_MAX_SIZE) {
        PyErr_Format(PyExc_ValueError, "size must be in [%d, %d], got %d", PHANTOM_MIN_SIZE,
                     PHANTOM_MAX_SIZE, size);
        return NULL;
    }
    int kind = parse_lesion(lesion);
    if (kind == -2) return NULL;
    /* p_abnormal=None: every image gets the requested lesion (none when lesion is None). */
    double p = kind == PHANTOM_NONE ? 0.0 : 1.0;
    if (p_obj != Py_None) {
        p = PyFloat_AsDouble(p_obj);
        if (p == -1.0 && PyErr_Occurred()) return NULL;
        if (!(p >= 0.0 && p <= 1.0)) {
            PyErr_Format(PyExc_ValueError, "p_abnormal must be in [0, 1], got %R", p_obj);
            return NULL;
        }
        if (kind == PHANTOM_NONE && p > 0.0) kind = -1; /* abnormal images of random kinds */
    }

    npy_intp shape3[3] = {n, size, size}, shape1[1] = {n};
    PyArrayObject *img = af_new_array(3, shape3, NPY_UINT8);
    PyArrayObject *mask = af_new_array(3, shape3, NPY_UINT8);
    PyArrayObject *organ = af_new_array(3, shape3, NPY_UINT8);
    PyArrayObject *labels = af_new_array(1, shape1, NPY_INT32);
    PyObject *out = NULL;
    if (!img || !mask || !organ || !labels) goto done;
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_phantom_generate_batch(AF_U8(img), AF_U8(mask), AF_U8(organ), AF_I32(labels), (int)n,
                                size, seed, first, kind, (float)p);
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        af_raise(st);
        goto done;
    }
    out = Py_BuildValue("{s:O,s:O,s:O,s:O}", "images", img, "lesion_masks", mask,
                        "organ_labels", organ, "labels", labels);
done:
    Py_XDECREF(img);
    Py_XDECREF(mask);
    Py_XDECREF(organ);
    Py_XDECREF(labels);
    return out;
}

static PyMethodDef phantom_methods[] = {
    {"generate", (PyCFunction)(void (*)(void))py_generate, METH_VARARGS | METH_KEYWORDS,
     "generate(n, size=224, seed=0, first_subject=0, lesion=None, p_abnormal=None) -> dict\n\n"
     "n synthetic frontal chest radiographs of subjects first_subject .. first_subject+n-1.\n"
     "lesion: None, 'nodule', 'consolidation', 'effusion' or 'random' (a kind per image).\n"
     "p_abnormal: probability that an image carries a lesion; None means 1 when lesion is\n"
     "given and 0 otherwise (p_abnormal > 0 with lesion=None draws random kinds).\n"
     "Returns images, lesion_masks, organ_labels: uint8[n, size, size]; labels: int32[n]\n"
     "(0 normal, 1 nodule, 2 consolidation, 3 effusion). Organ labels: 0 background,\n"
     "1 lungs, 2 heart, 3 mediastinum/spine, 4 below the diaphragm, 5 other soft tissue.\n"
     "Deterministic in (seed, subject)."},
    {NULL}};

int af_register_phantom(PyObject *m) {
    PyObject *sub = af_add_submodule(m, "phantom", phantom_methods,
                                     "Synthetic chest radiographs for demos and tests.");
    if (sub == NULL) return -1;
    if (PyModule_AddIntConstant(sub, "NONE", PHANTOM_NONE) < 0 ||
        PyModule_AddIntConstant(sub, "NODULE", PHANTOM_NODULE) < 0 ||
        PyModule_AddIntConstant(sub, "CONSOLIDATION", PHANTOM_CONSOLIDATION) < 0 ||
        PyModule_AddIntConstant(sub, "EFFUSION", PHANTOM_EFFUSION) < 0)
        return -1;
    return 0;
}
