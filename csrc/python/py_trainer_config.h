/* afire.Config (a dict of its fields) -> af_trainer_config, for both trainers' bindings. */
#ifndef AFIRE_PY_TRAINER_CONFIG_H
#define AFIRE_PY_TRAINER_CONFIG_H

#include "py_util.h"
#include "trainer.h"

/* Fill `c` from a dict with afire.Config's fields. 0, or -1 with a Python exception naming
 * the bad field. Schedules are expanded per step from steps_per_epoch. */
int af_trainer_config_from_dict(PyObject *d, af_trainer_config *c, int64_t steps_per_epoch);

#endif
