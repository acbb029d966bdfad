/* libFuzzer target: the safetensors reader on arbitrary bytes.
 *
 * Every input must either parse or fail with AF_EFORMAT / AF_ENOMEM and a message; on
 * success every accessor is exercised and each tensor's bytes are read, so ASan sees any
 * offset that escapes the buffer. Invariants the reader promises (tensors tile the data
 * buffer, nbytes = prod(shape) * itemsize) are re-checked here independently. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

#define REQUIRE(cond)                                                        \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                         \
        }                                                                    \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    af_st_file *f = NULL;
    af_status st = af_safetensors_parse(data, size, &f);
    if (st != AF_OK) {
        REQUIRE(f == NULL);
        REQUIRE(st == AF_EFORMAT || st == AF_ENOMEM);
        REQUIRE(af_last_error()[0] != '\0');
        return 0;
    }
    REQUIRE(f != NULL);
    size_t covered = 0;
    unsigned sum = 0;
    for (int i = 0; i < af_st_count(f); i++) {
        const char *name = af_st_name(f, i), *dt = af_st_dtype(f, i);
        size_t item = af_st_dtype_size(dt), n = item;
        REQUIRE(name != NULL && item != 0);
        REQUIRE(af_st_ndim(f, i) >= 0 && af_st_ndim(f, i) <= AF_ST_MAX_DIM);
        for (int d = 0; d < af_st_ndim(f, i); d++) {
            REQUIRE(af_st_shape(f, i)[d] >= 0);
            n *= (size_t)af_st_shape(f, i)[d];
        }
        REQUIRE(n == af_st_nbytes(f, i));
        REQUIRE(af_st_find(f, name) >= 0);
        const unsigned char *p = af_st_data(f, i);
        for (size_t k = 0; k < af_st_nbytes(f, i); k++) sum += p[k]; /* ASan checks bounds */
        covered += af_st_nbytes(f, i);
    }
    REQUIRE(covered <= size);
    for (int i = 0; i < af_st_meta_count(f); i++)
        REQUIRE(strlen(af_st_meta_key(f, i)) + strlen(af_st_meta_value(f, i)) < size);
    af_safetensors_close(f);
    return (int)(sum & 0u); /* keep `sum` live */
}
