/* afire._C.io: safetensors save/load for dicts of numpy arrays. */
#include "py_util.h" /* Python.h first: it sets feature macros */

#include <errno.h>
#include <string.h>

#include "safetensors.h"

/* Raise for a failed C call; AF_EIO becomes OSError(errno, message, path) so that Python
 * picks the matching subclass (FileNotFoundError, NotADirectoryError, ...). */
static PyObject *raise_io(af_status st, int err, PyObject *path) {
    if (st != AF_EIO || err == 0) return af_raise(st);
    PyObject *args = Py_BuildValue("(isO)", err, af_last_error(), path);
    if (args != NULL) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* numpy dtype -> safetensors dtype (NULL when unsupported). */
static const char *st_dtype_of(PyArrayObject *a) {
    int size = (int)PyArray_ITEMSIZE(a);
    switch (PyArray_DESCR(a)->kind) {
    case 'b': return size == 1 ? "BOOL" : NULL;
    case 'f': return size == 4 ? "F32" : size == 8 ? "F64" : NULL;
    case 'i': return size == 1 ? "I8" : size == 2 ? "I16" : size == 4 ? "I32" : size == 8 ? "I64" : NULL;
    case 'u': return size == 1 ? "U8" : size == 2 ? "U16" : size == 4 ? "U32" : size == 8 ? "U64" : NULL;
    default: return NULL;
    }
}

/* UTF-8 of a str without embedded NUL (borrowed from the object), or NULL with an error. */
static const char *utf8_arg(PyObject *s, const char *what) {
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, got %s", what, Py_TYPE(s)->tp_name);
        return NULL;
    }
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u == NULL) return NULL;
    if ((Py_ssize_t)strlen(u) != n) {
        PyErr_Format(PyExc_ValueError, "%s %R contains a NUL character", what, s);
        return NULL;
    }
    return u;
}

PyDoc_STRVAR(save_doc,
"save_safetensors(path, tensors, metadata=None)\n--\n\n"
"Write a dict of numpy arrays to a safetensors file, atomically (temporary file in the\n"
"same directory, fsync, rename; an existing file survives any failure).\n\n"
"tensors: dict[str, np.ndarray] of float32, float64, int8/16/32/64, uint8/16/32/64 or bool\n"
"    arrays with at most 8 dimensions (non-contiguous or byte-swapped arrays are copied).\n"
"metadata: dict[str, str] or None, stored as \"__metadata__\".\n"
"Tensors are laid out by item size (largest first), then by name.\n"
"path must be missing, a regular file or a symbolic link to one (the file is replaced, the\n"
"link kept); a directory (IsADirectoryError), a device, FIFO or socket (FileExistsError) or\n"
"a dangling link (FileNotFoundError) is refused before anything is written.\n"
"Raises TypeError/ValueError for bad arguments and OSError (errno, message with the path\n"
"and the reason, filename) for file system errors, a full disk included.");

static PyObject *py_save_safetensors(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "tensors", "metadata", NULL};
    PyObject *path_obj, *tensors, *metadata = Py_None, *path_bytes = NULL, *keep = NULL;
    PyObject *result = NULL;
    af_st_tensor *ts = NULL;
    const char **mk = NULL, **mv = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:save_safetensors", kwlist, &path_obj,
                                     &tensors, &metadata))
        return NULL;
    if (!PyUnicode_FSConverter(path_obj, &path_bytes)) return NULL;
    if (!PyDict_Check(tensors)) {
        PyErr_Format(PyExc_TypeError, "tensors must be a dict of str -> numpy.ndarray, got %s",
                     Py_TYPE(tensors)->tp_name);
        goto done;
    }
    if (metadata != Py_None && !PyDict_Check(metadata)) {
        PyErr_Format(PyExc_TypeError, "metadata must be a dict of str -> str or None, got %s",
                     Py_TYPE(metadata)->tp_name);
        goto done;
    }
    Py_ssize_t n = PyDict_Size(tensors), n_meta = metadata == Py_None ? 0 : PyDict_Size(metadata);
    if (n > INT32_MAX / 2 || n_meta > INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "too many tensors or metadata entries");
        goto done;
    }
    /* `keep` owns every key and converted array until the write has finished. */
    keep = PyList_New(0);
    ts = PyMem_Calloc((size_t)n + 1, sizeof *ts);
    mk = PyMem_Calloc((size_t)n_meta + 1, sizeof *mk);
    mv = PyMem_Calloc((size_t)n_meta + 1, sizeof *mv);
    if (keep == NULL || ts == NULL || mk == NULL || mv == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *val;
    while (PyDict_Next(tensors, &pos, &key, &val)) {
        if (PyList_Append(keep, key) < 0) goto done;
        const char *name = utf8_arg(key, "tensor name");
        if (name == NULL) goto done;
        if (!PyArray_Check(val)) {
            PyErr_Format(PyExc_TypeError, "tensors[%R] must be a numpy.ndarray, got %s", key,
                         Py_TYPE(val)->tp_name);
            goto done;
        }
        PyArray_Descr *d = PyArray_DESCR((PyArrayObject *)val);
        const char *dt = st_dtype_of((PyArrayObject *)val);
        if (dt == NULL) {
            PyErr_Format(PyExc_TypeError, "tensors[%R] has unsupported dtype %R (use float32, "
                         "float64, int8/16/32/64, uint8/16/32/64 or bool)", key, (PyObject *)d);
            goto done;
        }
        if (PyArray_NDIM((PyArrayObject *)val) > AF_ST_MAX_DIM) {
            PyErr_Format(PyExc_ValueError, "tensors[%R] has %d dimensions, at most %d are supported",
                         key, PyArray_NDIM((PyArrayObject *)val), AF_ST_MAX_DIM);
            goto done;
        }
        /* Native byte order, C-contiguous, aligned: copies only when needed. */
        PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(val, d->type_num, NPY_ARRAY_IN_ARRAY);
        if (a == NULL) goto done;
        int rc = PyList_Append(keep, (PyObject *)a);
        Py_DECREF(a);
        if (rc < 0) goto done;
        af_st_tensor *t = &ts[i++];
        t->name = name;
        t->dtype = dt;
        t->ndim = PyArray_NDIM(a);
        for (int k = 0; k < t->ndim; k++) t->shape[k] = (int64_t)PyArray_DIM(a, k);
        t->data = PyArray_DATA(a);
        t->nbytes = (size_t)PyArray_NBYTES(a);
    }
    if (n_meta > 0) {
        pos = 0;
        Py_ssize_t j = 0;
        while (PyDict_Next(metadata, &pos, &key, &val)) {
            if (PyList_Append(keep, key) < 0 || PyList_Append(keep, val) < 0) goto done;
            if ((mk[j] = utf8_arg(key, "metadata key")) == NULL) goto done;
            if ((mv[j] = utf8_arg(val, "metadata value")) == NULL) goto done;
            j++;
        }
    }
    const char *cpath = PyBytes_AS_STRING(path_bytes);
    af_status st;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    st = af_safetensors_write(cpath, ts, (int)n, mk, mv, (int)n_meta);
    err = errno;
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        raise_io(st, err, path_obj);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(ts);
    PyMem_Free(mk);
    PyMem_Free(mv);
    Py_XDECREF(keep);
    Py_XDECREF(path_bytes);
    return result;
}

/* IEEE half -> single, exact (subnormals, infinities and NaN payloads kept). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
    if (exp == 0 && mant == 0) {
        bits = sign;
    } else if (exp == 0) { /* subnormal: renormalise into the wider exponent range */
        exp = 127 - 15 + 1;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Copy (converting F16/BF16 to F32, normalising BOOL to 0/1) one tensor's bytes. */
static void copy_tensor(void *dst, const void *src, size_t nbytes, const char *dtype) {
    if (strcmp(dtype, "F16") == 0 || strcmp(dtype, "BF16") == 0) {
        int bf = dtype[0] == 'B';
        const unsigned char *s = src;
        float *o = dst;
        for (size_t k = 0; k < nbytes / 2; k++) {
            uint16_t h = (uint16_t)(s[2 * k] | (s[2 * k + 1] << 8));
            if (bf) {
                uint32_t bits = (uint32_t)h << 16;
                memcpy(&o[k], &bits, sizeof bits);
            } else {
                o[k] = half_to_float(h);
            }
        }
    } else if (strcmp(dtype, "BOOL") == 0) {
        const unsigned char *s = src;
        unsigned char *o = dst;
        for (size_t k = 0; k < nbytes; k++) o[k] = s[k] != 0;
    } else if (nbytes) {
        memcpy(dst, src, nbytes);
    }
}

static int npy_type_of(const char *dt) {
    static const struct {
        const char *st;
        int npy;
    } map[] = {{"F32", NPY_FLOAT32}, {"F64", NPY_FLOAT64}, {"F16", NPY_FLOAT32},
               {"BF16", NPY_FLOAT32}, {"I8", NPY_INT8},     {"I16", NPY_INT16},
               {"I32", NPY_INT32},    {"I64", NPY_INT64},   {"U8", NPY_UINT8},
               {"U16", NPY_UINT16},   {"U32", NPY_UINT32},  {"U64", NPY_UINT64},
               {"BOOL", NPY_BOOL}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strcmp(map[i].st, dt) == 0) return map[i].npy;
    return -1;
}

PyDoc_STRVAR(load_doc,
"load_safetensors(path) -> (tensors: dict[str, np.ndarray], metadata: dict[str, str])\n--\n\n"
"Read and fully validate a safetensors file; arrays are new copies in header order.\n"
"F16 and BF16 tensors are converted to float32 (so half-precision timm weights import\n"
"directly); F8 dtypes are not supported. Raises ValueError for a malformed file and\n"
"OSError (with the path) when it cannot be read.");

static PyObject *py_load_safetensors(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", NULL};
    PyObject *path_obj, *path_bytes = NULL, *arrays = NULL, *tensors = NULL, *meta = NULL;
    PyObject *result = NULL;
    af_st_file *f = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:load_safetensors", kwlist, &path_obj)) return NULL;
    if (!PyUnicode_FSConverter(path_obj, &path_bytes)) return NULL;
    const char *cpath = PyBytes_AS_STRING(path_bytes);
    af_status st;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    st = af_safetensors_open(cpath, &f);
    err = errno;
    Py_END_ALLOW_THREADS
    if (st != AF_OK) {
        raise_io(st, err, path_obj);
        goto done;
    }
    int n = af_st_count(f);
    arrays = PyList_New(n);
    if (arrays == NULL) goto done;
    for (int i = 0; i < n; i++) {
        int type = npy_type_of(af_st_dtype(f, i));
        if (type < 0) {
            PyErr_Format(PyExc_ValueError, "%R: tensor \"%s\" has dtype %s, which load_safetensors "
                         "does not support", path_obj, af_st_name(f, i), af_st_dtype(f, i));
            goto done;
        }
        npy_intp dims[AF_ST_MAX_DIM];
        for (int k = 0; k < af_st_ndim(f, i); k++) dims[k] = (npy_intp)af_st_shape(f, i)[k];
        PyObject *a = PyArray_EMPTY(af_st_ndim(f, i), dims, type, 0);
        if (a == NULL) goto done;
        PyList_SET_ITEM(arrays, i, a);
    }
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < n; i++)
        copy_tensor(PyArray_DATA((PyArrayObject *)PyList_GET_ITEM(arrays, i)), af_st_data(f, i),
                    af_st_nbytes(f, i), af_st_dtype(f, i));
    Py_END_ALLOW_THREADS
    tensors = PyDict_New();
    meta = PyDict_New();
    if (tensors == NULL || meta == NULL) goto done;
    for (int i = 0; i < n; i++)
        if (PyDict_SetItemString(tensors, af_st_name(f, i), PyList_GET_ITEM(arrays, i)) < 0) goto done;
    for (int i = 0; i < af_st_meta_count(f); i++) {
        PyObject *v = PyUnicode_FromString(af_st_meta_value(f, i));
        if (v == NULL) goto done;
        int rc = PyDict_SetItemString(meta, af_st_meta_key(f, i), v);
        Py_DECREF(v);
        if (rc < 0) goto done;
    }
    result = PyTuple_Pack(2, tensors, meta);
done:
    af_safetensors_close(f);
    Py_XDECREF(arrays);
    Py_XDECREF(tensors);
    Py_XDECREF(meta);
    Py_XDECREF(path_bytes);
    return result;
}

static PyMethodDef io_methods[] = {
    {"save_safetensors", (PyCFunction)(void (*)(void))py_save_safetensors,
     METH_VARARGS | METH_KEYWORDS, save_doc},
    {"load_safetensors", (PyCFunction)(void (*)(void))py_load_safetensors,
     METH_VARARGS | METH_KEYWORDS, load_doc},
    {NULL, NULL, 0, NULL}};

int af_register_io(PyObject *m) {
    return af_add_submodule(m, "io", io_methods, "Checkpoint I/O: safetensors read/write.") ? 0 : -1;
}
