/* The checks of af_trainer_create, one copy for both backends (the CPU trainer and the CUDA
 * one). Reading a configuration from Python is python/py_trainer_config.c. */
#include "common.h"
#include "trainer.h"

/* One copy of the argument checks of af_trainer_create, for both backends. */
af_status af_trainer_config_check(const af_trainer_config *cfg, int batch) {
    AF_CHECK(batch >= 1, AF_EINVAL, "batch size must be >= 1, got %d", batch);
    AF_TRY(af_config_validate(&cfg->net));
    AF_TRY(af_slm_config_check(&cfg->slm));
    AF_CHECK(cfg->objective == AF_OBJECTIVE_PAPER || cfg->objective == AF_OBJECTIVE_RELEASED,
             AF_EINVAL, "objective must be 'paper' or 'released'");
    AF_CHECK(cfg->stru_target == AF_STRU_PROTOTYPE || cfg->stru_target == AF_STRU_TEACHER_TOKEN,
             AF_EINVAL, "stru_target must be 'prototype' or 'teacher_token'");
    AF_CHECK(cfg->stru_target == AF_STRU_PROTOTYPE || cfg->objective == AF_OBJECTIVE_PAPER,
             AF_EINVAL, "stru_target 'teacher_token' replaces Eq. 12 of the paper objective; "
             "the released objective has no such term (use stru_target 'prototype')");
    AF_CHECK(cfg->tau_s > 0 && cfg->tau > 0 && cfg->sinkhorn_eps > 0, AF_EINVAL,
             "temperatures must be > 0");
    AF_CHECK(cfg->sinkhorn_iters >= 0, AF_EINVAL, "sinkhorn_iters must be >= 0");
    AF_CHECK(cfg->sched.total_steps >= 1 && cfg->sched.steps_per_epoch >= 1, AF_EINVAL,
             "total_steps and steps_per_epoch must be >= 1");
    return AF_OK;
}
