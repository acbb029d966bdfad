/* afire._C.objective bindings (filled in by its own work item). */
#include "py_util.h"

static PyMethodDef objective_methods[] = {{NULL}};

int af_register_objective(PyObject *m) {
    return af_add_submodule(m, "objective", objective_methods, NULL) ? 0 : -1;
}
