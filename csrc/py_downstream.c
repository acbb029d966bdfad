/* afire._C.downstream bindings (filled in by the evaluation work item). */
#include "py_util.h"

static PyMethodDef downstream_methods[] = {{NULL}};

int af_register_downstream(PyObject *m) {
    return af_add_submodule(m, "downstream", downstream_methods, NULL) ? 0 : -1;
}
