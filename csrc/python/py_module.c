/* The afire._C extension module: creates the submodules registered by each binding file. */
#define AF_IMPORT_ARRAY_HERE
#include "py_util.h"
#include "ops/ops.h"

static PyObject *build_info(PyObject *self, PyObject *unused) {
    /* bf16: how precision="bf16" GEMMs run on this CPU ("amx": AMX tiles, "portable": loops);
     * sgemm: whether fp32 products with a reused B run on afire's packed AVX-512 kernel */
    return Py_BuildValue("{s:O,s:s,s:s,s:s}", "openmp",
#ifdef _OPENMP
                         Py_True,
#else
                         Py_False,
#endif
                         "blas", "scipy-openblas32", "bf16",
                         af_bf16_backend() == AF_BF16_AMX ? "amx" : "portable", "sgemm",
                         af_packed_gemm_available() ? "avx512-packed" : "openblas");
}

static PyMethodDef module_methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: how this build of afire._C was made (the CUDA backend is the "
     "separate extension afire._C_cuda)"},
    {NULL}};

static struct PyModuleDef afire_module = {
    PyModuleDef_HEAD_INIT, "afire._C", "afire's C/CUDA core.", -1, module_methods};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    PyObject *m = PyModule_Create(&afire_module);
    if (m == NULL) return NULL;
    if (af_register_tensor(m) < 0 || af_register_rng(m) < 0 || af_register_ops(m) < 0 ||
        af_register_io(m) < 0 || af_register_model(m) < 0 || af_register_slm(m) < 0 ||
        af_register_objective(m) < 0 || af_register_phantom(m) < 0 || af_register_trainer(m) < 0 ||
        af_register_downstream(m) < 0 || af_register_comm(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
