/* afire._C.ops bindings (filled in by its own work item). */
#include "py_util.h"

static PyMethodDef ops_methods[] = {{NULL}};

int af_register_ops(PyObject *m) {
    return af_add_submodule(m, "ops", ops_methods, NULL) ? 0 : -1;
}
