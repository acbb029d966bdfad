/* afire._C_cuda: the CUDA backend as its own extension module, imported only when a CUDA
 * device is asked for, so `import afire` never loads CUDA libraries. Its functions live in
 * the submodule afire._C_cuda.cuda (py_cuda.c). */
#define AF_IMPORT_ARRAY_HERE
#include "py_util.h"

static struct PyModuleDef cuda_module = {PyModuleDef_HEAD_INIT, "afire._C_cuda",
                                         "afire's CUDA backend.", -1, NULL};

PyMODINIT_FUNC PyInit__C_cuda(void) {
    import_array();
    PyObject *m = PyModule_Create(&cuda_module);
    if (m == NULL) return NULL;
    if (af_register_cuda(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *sub = PyObject_GetAttrString(m, "cuda");
    int rc = sub == NULL ? -1 : af_register_cuda_trainer(sub) ? -1 : 0;
    Py_XDECREF(sub);
    if (rc < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
