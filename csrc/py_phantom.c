/* afire._C.phantom bindings (filled in by its own work item). */
#include "py_util.h"

static PyMethodDef phantom_methods[] = {{NULL}};

int af_register_phantom(PyObject *m) {
    return af_add_submodule(m, "phantom", phantom_methods, NULL) ? 0 : -1;
}
