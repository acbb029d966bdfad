/* Shared helpers for the C core: checks, checked size arithmetic, allocation. */
#ifndef AFIRE_COMMON_H
#define AFIRE_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "afire.h"

/* Return early with a status and message when a condition fails. */
#define AF_CHECK(cond, status, ...)                      \
    do {                                                 \
        if (!(cond)) return af_error((status), __VA_ARGS__); \
    } while (0)

/* Propagate a non-OK status. */
#define AF_TRY(expr)                        \
    do {                                    \
        af_status af_try_s_ = (expr);       \
        if (af_try_s_ != AF_OK) return af_try_s_; \
    } while (0)

/* a*b without overflow; returns 0 and leaves *out untouched on overflow. */
static inline int af_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

#ifdef __cplusplus
extern "C" { /* the CUDA files (C++) call these too */
#endif

/* Product of n dims into *out; AF_EINVAL on a negative dim, AF_ENOMEM on overflow. */
af_status af_numel(const int64_t *dims, int n, size_t *out);

/* 64-byte aligned, zero-filled allocation of count*size bytes (checked). NULL on failure
 * with the error message set. Free with af_free. */
void *af_calloc(size_t count, size_t size);
void af_free(void *p);

#ifdef __cplusplus
}
#endif

#endif
