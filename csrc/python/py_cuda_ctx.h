/* The lazily created CUDA contexts of the host-level test entry points (py_cuda.c,
 * py_cuda_objective.c): device 0, created with exact fp32 GEMMs on first use, used one call
 * at a time (a second thread gets AF_EBUSY). Each binding file keeps its own context, so a
 * TF32 switch on one (afire._C_cuda.cuda.set_tf32) never reaches the other. */
#ifndef AFIRE_PY_CUDA_CTX_H
#define AFIRE_PY_CUDA_CTX_H

#include "cuda_api.h"

typedef struct {
    af_cuda_context *ctx;
    int busy;
    const char *what; /* names it in the busy message, e.g. "CUDA test context" */
} af_test_ctx;

/* The context, created on first use; NULL with a Python exception set. */
af_cuda_context *af_test_ctx_get(af_test_ctx *t);
/* The context, marked busy until af_test_ctx_release; NULL with an exception set when it
 * cannot be created or another call holds it. */
af_cuda_context *af_test_ctx_acquire(af_test_ctx *t);
void af_test_ctx_release(af_test_ctx *t);

#endif
