/* afire._C_cuda.cuda: cuda_trainer entry points (filled in by the CUDA work items). Registered into the
 * existing afire._C_cuda.cuda submodule by af_register_cuda_trainer(cuda_submodule). */
#include "py_util.h"

static PyMethodDef cuda_trainer_methods[] = {{NULL}};

int af_register_cuda_trainer(PyObject *cuda_submodule) {
    return PyModule_AddFunctions(cuda_submodule, cuda_trainer_methods);
}
