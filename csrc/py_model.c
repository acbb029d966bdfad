/* afire._C.model bindings (filled in by its own work item). */
#include "py_util.h"

static PyMethodDef model_methods[] = {{NULL}};

int af_register_model(PyObject *m) {
    return af_add_submodule(m, "model", model_methods, NULL) ? 0 : -1;
}
