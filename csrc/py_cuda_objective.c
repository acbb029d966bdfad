/* afire._C_cuda.cuda: cuda_objective entry points (filled in by the CUDA work items). Registered into the
 * existing afire._C_cuda.cuda submodule by af_register_cuda_objective(cuda_submodule). */
#include "py_util.h"

static PyMethodDef cuda_objective_methods[] = {{NULL}};

int af_register_cuda_objective(PyObject *cuda_submodule) {
    return PyModule_AddFunctions(cuda_submodule, cuda_objective_methods);
}
