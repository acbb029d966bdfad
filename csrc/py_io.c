/* afire._C.io bindings (filled in by its own work item). */
#include "py_util.h"

static PyMethodDef io_methods[] = {{NULL}};

int af_register_io(PyObject *m) {
    return af_add_submodule(m, "io", io_methods, NULL) ? 0 : -1;
}
