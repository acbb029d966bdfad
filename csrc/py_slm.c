/* afire._C.slm bindings (filled in by its own work item). */
#include "py_util.h"

static PyMethodDef slm_methods[] = {{NULL}};

int af_register_slm(PyObject *m) {
    return af_add_submodule(m, "slm", slm_methods, NULL) ? 0 : -1;
}
