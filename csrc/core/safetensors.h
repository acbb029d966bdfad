/* safetensors files: an atomic writer and a fully validating reader.
 *
 * Layout: 8-byte little-endian u64 N, N bytes of UTF-8 JSON header
 *   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {"key": "value", ...}}
 * then the byte buffer; offsets are relative to the start of the buffer, tensors are
 * little-endian and row-major, and together they must cover the buffer exactly.
 */
#ifndef AFIRE_SAFETENSORS_H
#define AFIRE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "afire.h"

#define AF_ST_MAX_DIM 8
#define AF_ST_MAX_HEADER ((uint64_t)100 << 20) /* 100 MiB, as in the reference reader */

/* dtype strings known to the reader/writer and their item sizes in bytes:
 * BOOL U8 I8 F8_E4M3 F8_E5M2 (1), I16 U16 F16 BF16 (2), I32 U32 F32 (4), I64 U64 F64 (8).
 * Returns 0 for an unknown string. */
size_t af_st_dtype_size(const char *dtype);

typedef struct {
    const char *name;  /* UTF-8, no embedded NUL */
    const char *dtype; /* one of the strings above */
    int ndim;          /* 0..AF_ST_MAX_DIM; 0 is a scalar */
    int64_t shape[AF_ST_MAX_DIM];
    const void *data;  /* little-endian, row-major; may be NULL when nbytes == 0 */
    size_t nbytes;     /* must equal prod(shape) * itemsize */
} af_st_tensor;

/* Write `n` tensors and `n_meta` metadata pairs to `path` atomically: a temporary file in
 * the same directory is written, fsync'ed and renamed over `path`, then the directory is
 * fsync'ed. On failure the temporary file is removed and an existing `path` is untouched.
 * `path` must be missing, a regular file, or a symbolic link to a regular file (whose
 * contents are replaced; the link stays). A directory (errno EISDIR), a device, FIFO or
 * socket (EEXIST) and a dangling link (ENOENT) are refused with AF_EIO before anything is
 * written. Every write, fsync and close is checked: a full disk is AF_EIO (ENOSPC/EFBIG).
 * Deterministic layout: tensors ordered by item size (largest first, which keeps every
 * tensor aligned to its item size in the file) then by name (bytewise); "__metadata__"
 * first in the header (omitted when n_meta == 0); header padded with spaces so the data
 * starts at a multiple of 8. AF_EINVAL for bad arguments (duplicate names, unknown dtype,
 * size mismatch), AF_EIO (errno left set) for file system errors. */
af_status af_safetensors_write(const char *path, const af_st_tensor *tensors, int n,
                               const char *const *meta_keys, const char *const *meta_vals,
                               int n_meta);

/* A parsed file held in memory (one read of the whole file). */
typedef struct af_st_file af_st_file;

/* Read and validate `path`. AF_EIO (errno left set) if it cannot be read, AF_EFORMAT with
 * a precise message if it is not a valid safetensors file, AF_ENOMEM. */
af_status af_safetensors_open(const char *path, af_st_file **out);
/* Validate a file image already in memory (the bytes are copied). */
af_status af_safetensors_parse(const void *bytes, size_t size, af_st_file **out);
void af_safetensors_close(af_st_file *f);

/* Accessors; tensors are in header order, i indexes 0..count-1. */
int af_st_count(const af_st_file *f);
int af_st_find(const af_st_file *f, const char *name); /* index or -1 */
const char *af_st_name(const af_st_file *f, int i);
const char *af_st_dtype(const af_st_file *f, int i);
int af_st_ndim(const af_st_file *f, int i);
const int64_t *af_st_shape(const af_st_file *f, int i);
const void *af_st_data(const af_st_file *f, int i); /* valid until close */
size_t af_st_nbytes(const af_st_file *f, int i);
int af_st_meta_count(const af_st_file *f);
const char *af_st_meta_key(const af_st_file *f, int i);
const char *af_st_meta_value(const af_st_file *f, int i);

#endif
