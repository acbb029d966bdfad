/* Per-thread error message and checked allocation. */
#include <stdarg.h>
#include <stdio.h>

#include "common.h"

static _Thread_local char af_errbuf[1024];

af_status af_error(af_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(af_errbuf, sizeof af_errbuf, fmt, ap);
    va_end(ap);
    return status;
}

const char *af_last_error(void) { return af_errbuf; }

void af_clear_error(void) { af_errbuf[0] = '\0'; }

af_status af_numel(const int64_t *dims, int n, size_t *out) {
    size_t total = 1;
    for (int i = 0; i < n; i++) {
        if (dims[i] < 0) return af_error(AF_EINVAL, "negative dimension %lld", (long long)dims[i]);
        if (!af_mul_size(total, (size_t)dims[i], &total))
            return af_error(AF_ENOMEM, "tensor size overflows size_t");
    }
    *out = total;
    return AF_OK;
}

void *af_calloc(size_t count, size_t size) {
    size_t bytes;
    if (!af_mul_size(count, size, &bytes) || bytes > SIZE_MAX - 64) {
        af_error(AF_ENOMEM, "allocation of %zu x %zu bytes overflows", count, size);
        return NULL;
    }
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded == 0) rounded = 64;
    void *p = aligned_alloc(64, rounded);
    if (p == NULL) {
        af_error(AF_ENOMEM, "out of memory allocating %zu bytes", bytes);
        return NULL;
    }
    memset(p, 0, rounded);
    return p;
}

void af_free(void *p) { free(p); }
