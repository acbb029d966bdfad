/* afire C API: status codes and the per-thread error message.
 *
 * Every public C function returns an af_status. On failure it has written a
 * message with af_error(); the Python binding turns (status, message) into the
 * matching exception (see py_util.c). Library code never calls exit/abort.
 */
#ifndef AFIRE_H
#define AFIRE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    AF_OK = 0,
    AF_EINVAL = 1,     /* bad value or shape            -> ValueError          */
    AF_ETYPE = 2,      /* bad dtype / kind of object    -> TypeError           */
    AF_ENOMEM = 3,     /* allocation failed or too big  -> MemoryError         */
    AF_EIO = 4,        /* file system error             -> OSError             */
    AF_EFORMAT = 5,    /* malformed file contents       -> ValueError          */
    AF_ENOTSUP = 6,    /* not available in this build   -> RuntimeError        */
    AF_ENONFINITE = 7, /* NaN/Inf met                   -> FloatingPointError  */
    AF_EBUSY = 8,      /* object in use by another call -> RuntimeError        */
    AF_ECUDA = 9,      /* CUDA / cuBLAS / cuDNN failure -> RuntimeError        */
    AF_EINTERNAL = 10  /* a bug in afire                -> RuntimeError        */
} af_status;

/* Records a message for this thread and returns `status` (printf format). */
af_status af_error(af_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* The message of the last af_error() on this thread ("" if none). */
const char *af_last_error(void);
void af_clear_error(void);

#ifdef __cplusplus
}
#endif
#endif
