/* safetensors reader and atomic writer (format in safetensors.h). */
#define _XOPEN_SOURCE 700 /* POSIX 2008 plus realpath */

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"
#include "json.h"
#include "safetensors.h"

static const struct {
    const char *name;
    size_t size;
} DTYPES[] = {{"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
              {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
              {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
#define N_DTYPES ((int)(sizeof DTYPES / sizeof DTYPES[0]))

/* The canonical static string for a dtype, or NULL. */
static const char *dtype_lookup(const char *s, size_t len, size_t *size) {
    for (int i = 0; i < N_DTYPES; i++) {
        if (strlen(DTYPES[i].name) == len && memcmp(DTYPES[i].name, s, len) == 0) {
            if (size) *size = DTYPES[i].size;
            return DTYPES[i].name;
        }
    }
    return NULL;
}

size_t af_st_dtype_size(const char *dtype) {
    size_t size = 0;
    if (dtype == NULL || dtype_lookup(dtype, strlen(dtype), &size) == NULL) return 0;
    return size;
}

/* The format is little-endian; we hand out raw bytes, so refuse other hosts. */
static int host_is_little_endian(void) {
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 1;
}

/* ==== reader ========================================================================= */

typedef struct {
    char *name;
    const char *dtype; /* static string from DTYPES */
    int ndim;
    int64_t shape[AF_ST_MAX_DIM];
    size_t begin, end; /* byte range in the data buffer */
} st_entry;

struct af_st_file {
    unsigned char *bytes; /* the whole file */
    size_t size;
    const unsigned char *buffer; /* bytes + 8 + header length */
    size_t buffer_size;
    int n;
    st_entry *t;
    int n_meta;
    char **meta_keys, **meta_vals;
};

void af_safetensors_close(af_st_file *f) {
    if (f == NULL) return;
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_vals[i]);
    }
    free(f->t);
    free(f->meta_keys);
    free(f->meta_vals);
    free(f->bytes);
    free(f);
}

static char *dup_str(const af_json *s) {
    char *c = malloc(s->len + 1);
    if (c) memcpy(c, s->str, s->len + 1);
    return c;
}

/* Reads a non-negative int64 JSON integer into *out; 0 if it is anything else. */
static int json_nonneg(const af_json *v, int64_t *out) {
    if (v->type != AF_JSON_INT || v->integer < 0) return 0;
    *out = v->integer;
    return 1;
}

static af_status parse_metadata(af_st_file *f, const af_json *meta) {
    if (meta->type != AF_JSON_OBJ)
        return af_error(AF_EFORMAT, "safetensors: __metadata__ is a JSON %s, not an object",
                        af_json_type_name(meta->type));
    f->meta_keys = calloc(meta->n + 1, sizeof(char *));
    f->meta_vals = calloc(meta->n + 1, sizeof(char *));
    if (!f->meta_keys || !f->meta_vals) return af_error(AF_ENOMEM, "safetensors: out of memory");
    for (size_t i = 0; i < meta->n; i++) {
        const af_json *k = &meta->keys[i], *v = &meta->items[i];
        if (v->type != AF_JSON_STR)
            return af_error(AF_EFORMAT, "safetensors: __metadata__ value of \"%.200s\" is a JSON %s, "
                            "not a string", k->str, af_json_type_name(v->type));
        if (strlen(k->str) != k->len || strlen(v->str) != v->len)
            return af_error(AF_EFORMAT, "safetensors: __metadata__ entry \"%.200s\" contains a NUL "
                            "character", k->str);
        f->meta_keys[f->n_meta] = dup_str(k);
        f->meta_vals[f->n_meta] = dup_str(v);
        f->n_meta++;
        if (!f->meta_keys[f->n_meta - 1] || !f->meta_vals[f->n_meta - 1])
            return af_error(AF_ENOMEM, "safetensors: out of memory");
    }
    return AF_OK;
}

static af_status parse_entry(const af_st_file *f, const af_json *key, const af_json *v,
                             st_entry *e) {
    const char *nm = key->str;
    if (strlen(nm) != key->len)
        return af_error(AF_EFORMAT, "safetensors: tensor name \"%.200s\" contains a NUL character", nm);
    if (v->type != AF_JSON_OBJ)
        return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\" is a JSON %s, not an object", nm,
                        af_json_type_name(v->type));
    for (size_t i = 0; i < v->n; i++) {
        const char *k = v->keys[i].str;
        if (strcmp(k, "dtype") != 0 && strcmp(k, "shape") != 0 && strcmp(k, "data_offsets") != 0)
            return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\" has unexpected key \"%.100s\"",
                            nm, k);
    }
    const af_json *dt = af_json_get(v, "dtype"), *sh = af_json_get(v, "shape"),
                  *of = af_json_get(v, "data_offsets");
    if (!dt || !sh || !of)
        return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\" is missing \"%s\"", nm,
                        !dt ? "dtype" : !sh ? "shape" : "data_offsets");

    size_t itemsize = 0;
    if (dt->type != AF_JSON_STR || (e->dtype = dtype_lookup(dt->str, dt->len, &itemsize)) == NULL)
        return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\" has unknown dtype %s%.40s%s", nm,
                        dt->type == AF_JSON_STR ? "\"" : "(a JSON ",
                        dt->type == AF_JSON_STR ? dt->str : af_json_type_name(dt->type),
                        dt->type == AF_JSON_STR ? "\"" : ")");

    if (sh->type != AF_JSON_ARR)
        return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\": shape is not a list", nm);
    if (sh->n > AF_ST_MAX_DIM)
        return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\" has %zu dimensions (at most %d "
                        "supported)", nm, sh->n, AF_ST_MAX_DIM);
    e->ndim = (int)sh->n;
    size_t nbytes = itemsize;
    for (size_t d = 0; d < sh->n; d++) {
        if (!json_nonneg(&sh->items[d], &e->shape[d]))
            return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\": shape[%zu] is not a "
                            "non-negative integer", nm, d);
        if (!af_mul_size(nbytes, (size_t)e->shape[d], &nbytes))
            return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\": size overflows", nm);
    }

    int64_t b, en;
    if (of->type != AF_JSON_ARR || of->n != 2 || !json_nonneg(&of->items[0], &b) ||
        !json_nonneg(&of->items[1], &en))
        return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\": data_offsets is not a list of "
                        "two non-negative integers", nm);
    if (b > en || (uint64_t)en > (uint64_t)f->buffer_size)
        return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\": data_offsets [%lld, %lld] out of "
                        "the %zu-byte data buffer", nm, (long long)b, (long long)en, f->buffer_size);
    e->begin = (size_t)b;
    e->end = (size_t)en;
    if (e->end - e->begin != nbytes)
        return af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\": shape and dtype %s need %zu bytes "
                        "but data_offsets span %zu", nm, e->dtype, nbytes, e->end - e->begin);
    e->name = dup_str(key);
    if (e->name == NULL) return af_error(AF_ENOMEM, "safetensors: out of memory");
    return AF_OK;
}

/* qsort has no context pointer; the sort inputs travel in thread-locals. */
static _Thread_local const st_entry *sort_base;
static int by_offset(const void *a, const void *b) {
    const st_entry *x = &sort_base[*(const int *)a], *y = &sort_base[*(const int *)b];
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Tensors must tile the buffer: sorted by offset, each starts where the previous ended. */
static af_status check_coverage(const af_st_file *f) {
    int *idx = malloc(((size_t)f->n + 1) * sizeof(int));
    if (idx == NULL) return af_error(AF_ENOMEM, "safetensors: out of memory");
    for (int i = 0; i < f->n; i++) idx[i] = i;
    sort_base = f->t;
    qsort(idx, (size_t)f->n, sizeof(int), by_offset);
    size_t pos = 0;
    af_status st = AF_OK;
    for (int k = 0; k < f->n && st == AF_OK; k++) {
        const st_entry *e = &f->t[idx[k]];
        if (e->begin < pos)
            st = af_error(AF_EFORMAT, "safetensors: tensor \"%.200s\" (bytes %zu..%zu) overlaps the "
                          "previous tensor, which ends at %zu", e->name, e->begin, e->end, pos);
        else if (e->begin > pos)
            st = af_error(AF_EFORMAT, "safetensors: hole in the data buffer: bytes %zu..%zu belong to "
                          "no tensor", pos, e->begin);
        pos = e->end;
    }
    if (st == AF_OK && pos != f->buffer_size)
        st = af_error(AF_EFORMAT, "safetensors: %zu trailing bytes after the last tensor (data "
                      "buffer is %zu bytes, tensors cover %zu)", f->buffer_size - pos,
                      f->buffer_size, pos);
    free(idx);
    return st;
}

/* Prepends `prefix` to the current error message (af_error cannot read its own buffer). */
static void prefix_error(af_status st, const char *prefix) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", af_last_error());
    af_error(st, "%s%s", prefix, msg);
}

/* Takes ownership of `bytes` (malloc'ed), also on failure. */
static af_status parse_owned(unsigned char *bytes, size_t size, af_st_file **out) {
    *out = NULL;
    if (!host_is_little_endian()) {
        free(bytes);
        return af_error(AF_ENOTSUP, "safetensors: big-endian hosts are not supported");
    }
    af_st_file *f = calloc(1, sizeof *f);
    if (f == NULL) {
        free(bytes);
        return af_error(AF_ENOMEM, "safetensors: out of memory");
    }
    f->bytes = bytes;
    f->size = size;
    af_json *root = NULL;
    af_status st = AF_OK;
    if (size < 8) {
        st = af_error(AF_EFORMAT, "safetensors: file is %zu bytes, shorter than the 8-byte header "
                      "length", size);
        goto done;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | bytes[i];
    if (hlen > AF_ST_MAX_HEADER) {
        st = af_error(AF_EFORMAT, "safetensors: header length %llu exceeds the 100 MiB limit",
                      (unsigned long long)hlen);
        goto done;
    }
    if (hlen > size - 8) {
        st = af_error(AF_EFORMAT, "safetensors: header length %llu exceeds the %zu bytes after the "
                      "length field (truncated file?)", (unsigned long long)hlen, size - 8);
        goto done;
    }
    const char *hdr = (const char *)bytes + 8;
    if (hlen == 0 || hdr[0] != '{') {
        st = af_error(AF_EFORMAT, "safetensors: header does not start with '{'");
        goto done;
    }
    f->buffer = bytes + 8 + hlen;
    f->buffer_size = size - 8 - (size_t)hlen;
    if ((st = af_json_parse(hdr, (size_t)hlen, &root)) != AF_OK) {
        prefix_error(st, "safetensors header: ");
        goto done;
    }
    if (root->type != AF_JSON_OBJ) {
        st = af_error(AF_EFORMAT, "safetensors: header is a JSON %s, not an object",
                      af_json_type_name(root->type));
        goto done;
    }
    f->t = calloc(root->n + 1, sizeof(st_entry));
    if (f->t == NULL) {
        st = af_error(AF_ENOMEM, "safetensors: out of memory");
        goto done;
    }
    for (size_t i = 0; i < root->n && st == AF_OK; i++) {
        const af_json *k = &root->keys[i];
        if (strcmp(k->str, "__metadata__") == 0 && k->len == 12) {
            st = parse_metadata(f, &root->items[i]);
        } else {
            st = parse_entry(f, k, &root->items[i], &f->t[f->n]);
            if (st == AF_OK) f->n++;
        }
    }
    if (st == AF_OK) st = check_coverage(f);
done:
    af_json_free(root);
    if (st != AF_OK) {
        af_safetensors_close(f);
        return st;
    }
    *out = f;
    return AF_OK;
}

af_status af_safetensors_parse(const void *bytes, size_t size, af_st_file **out) {
    *out = NULL;
    unsigned char *copy = malloc(size ? size : 1);
    if (copy == NULL) return af_error(AF_ENOMEM, "safetensors: out of memory (%zu bytes)", size);
    if (size) memcpy(copy, bytes, size);
    return parse_owned(copy, size, out);
}

/* An AF_EIO error that keeps errno for the binding (OSError subclass selection). */
static af_status io_error(const char *what, const char *path) {
    int e = errno;
    af_error(AF_EIO, "%s '%s': %s", what, path, strerror(e));
    errno = e;
    return AF_EIO;
}

af_status af_safetensors_open(const char *path, af_st_file **out) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return io_error("cannot open", path);
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        af_status st = io_error("cannot stat", path);
        close(fd);
        return st;
    }
    if (S_ISDIR(sb.st_mode)) {
        close(fd);
        errno = EISDIR;
        return io_error("cannot read", path);
    }
    size_t size = (size_t)sb.st_size;
    unsigned char *bytes = malloc(size ? size : 1);
    if (bytes == NULL) {
        close(fd);
        return af_error(AF_ENOMEM, "out of memory reading '%s' (%zu bytes)", path, size);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, bytes + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            if (r == 0) errno = EIO; /* the file shrank while we read it */
            af_status st = io_error("cannot read", path);
            int e = errno;
            free(bytes);
            close(fd);
            errno = e;
            return st;
        }
        got += (size_t)r;
    }
    close(fd);
    af_status st = parse_owned(bytes, size, out);
    if (st == AF_EFORMAT) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", af_last_error());
        af_error(st, "'%s': %s", path, msg);
    }
    return st;
}

int af_st_count(const af_st_file *f) { return f->n; }
const char *af_st_name(const af_st_file *f, int i) { return f->t[i].name; }
const char *af_st_dtype(const af_st_file *f, int i) { return f->t[i].dtype; }
int af_st_ndim(const af_st_file *f, int i) { return f->t[i].ndim; }
const int64_t *af_st_shape(const af_st_file *f, int i) { return f->t[i].shape; }
const void *af_st_data(const af_st_file *f, int i) { return f->buffer + f->t[i].begin; }
size_t af_st_nbytes(const af_st_file *f, int i) { return f->t[i].end - f->t[i].begin; }
int af_st_meta_count(const af_st_file *f) { return f->n_meta; }
const char *af_st_meta_key(const af_st_file *f, int i) { return f->meta_keys[i]; }
const char *af_st_meta_value(const af_st_file *f, int i) { return f->meta_vals[i]; }

int af_st_find(const af_st_file *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->t[i].name, name) == 0) return i;
    return -1;
}

/* ==== writer ========================================================================= */

typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->n + n + 1) nc *= 2;
        char *np = realloc(b->p, nc);
        if (np == NULL) {
            b->oom = 1;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* A JSON string literal; the input is valid UTF-8 (checked by the caller). */
static void sb_json_string(sbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"') sb_put(b, "\\\"", 2);
        else if (c == '\\') sb_put(b, "\\\\", 2);
        else if (c == '\n') sb_put(b, "\\n", 2);
        else if (c == '\r') sb_put(b, "\\r", 2);
        else if (c == '\t') sb_put(b, "\\t", 2);
        else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            sb_put(b, esc, 6);
        } else sb_put(b, s, 1);
    }
    sb_put(b, "\"", 1);
}

static _Thread_local const af_st_tensor *order_base;
static int by_size_then_name(const void *a, const void *b) {
    const af_st_tensor *x = &order_base[*(const int *)a], *y = &order_base[*(const int *)b];
    size_t sx = af_st_dtype_size(x->dtype), sy = af_st_dtype_size(y->dtype);
    if (sx != sy) return sx > sy ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int by_name(const void *a, const void *b) {
    return strcmp(order_base[*(const int *)a].name, order_base[*(const int *)b].name);
}

static int by_string(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static af_status check_text(const char *s, const char *what) {
    if (s == NULL) return af_error(AF_EINVAL, "safetensors: %s is NULL", what);
    if (!af_utf8_valid(s, strlen(s)))
        return af_error(AF_EINVAL, "safetensors: %s \"%.200s\" is not valid UTF-8", what, s);
    return AF_OK;
}

static af_status check_tensor(const af_st_tensor *t) {
    AF_TRY(check_text(t->name, "tensor name"));
    AF_CHECK(strcmp(t->name, "__metadata__") != 0, AF_EINVAL,
             "safetensors: \"__metadata__\" is reserved and cannot name a tensor");
    size_t itemsize = af_st_dtype_size(t->dtype);
    AF_CHECK(itemsize != 0, AF_EINVAL, "safetensors: tensor \"%.200s\": unknown dtype \"%.40s\"",
             t->name, t->dtype ? t->dtype : "(null)");
    AF_CHECK(t->ndim >= 0 && t->ndim <= AF_ST_MAX_DIM, AF_EINVAL,
             "safetensors: tensor \"%.200s\": ndim %d not in [0, %d]", t->name, t->ndim, AF_ST_MAX_DIM);
    size_t nbytes = itemsize;
    for (int d = 0; d < t->ndim; d++) {
        AF_CHECK(t->shape[d] >= 0, AF_EINVAL, "safetensors: tensor \"%.200s\": negative shape[%d]",
                 t->name, d);
        AF_CHECK(af_mul_size(nbytes, (size_t)t->shape[d], &nbytes), AF_EINVAL,
                 "safetensors: tensor \"%.200s\": size overflows", t->name);
    }
    AF_CHECK(nbytes == t->nbytes, AF_EINVAL, "safetensors: tensor \"%.200s\": shape and dtype need "
             "%zu bytes, got nbytes=%zu", t->name, nbytes, t->nbytes);
    AF_CHECK(t->data != NULL || nbytes == 0, AF_EINVAL, "safetensors: tensor \"%.200s\": data is NULL",
             t->name);
    return AF_OK;
}

/* Header JSON (padded) for tensors in `order`; sets *data_bytes to the buffer size. */
static af_status build_header(sbuf *h, const af_st_tensor *tensors, const int *order, int n,
                              const char *const *mk, const char *const *mv, int n_meta,
                              size_t *data_bytes) {
    char num[64];
    sb_str(h, "{");
    int first = 1;
    if (n_meta > 0) {
        sb_str(h, "\"__metadata__\":{");
        for (int i = 0; i < n_meta; i++) {
            if (i) sb_str(h, ",");
            sb_json_string(h, mk[i]);
            sb_str(h, ":");
            sb_json_string(h, mv[i]);
        }
        sb_str(h, "}");
        first = 0;
    }
    size_t pos = 0;
    for (int k = 0; k < n; k++) {
        const af_st_tensor *t = &tensors[order[k]];
        if (!first) sb_str(h, ",");
        first = 0;
        sb_json_string(h, t->name);
        sb_str(h, ":{\"dtype\":\"");
        sb_str(h, t->dtype);
        sb_str(h, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            snprintf(num, sizeof num, d ? ",%lld" : "%lld", (long long)t->shape[d]);
            sb_str(h, num);
        }
        AF_CHECK(pos <= SIZE_MAX - t->nbytes, AF_EINVAL, "safetensors: total size overflows");
        snprintf(num, sizeof num, "],\"data_offsets\":[%zu,%zu]}", pos, pos + t->nbytes);
        sb_str(h, num);
        pos += t->nbytes;
    }
    sb_str(h, "}");
    while (h->n % 8 != 0) sb_str(h, " "); /* 8-byte length + header = multiple of 8 */
    AF_CHECK(!h->oom, AF_ENOMEM, "safetensors: out of memory building the header");
    *data_bytes = pos;
    return AF_OK;
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t w = write(fd, c, chunk);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = EIO;
            return 0;
        }
        c += w;
        n -= (size_t)w;
    }
    return 1;
}

/* fsync the directory holding `path` so that the rename itself is durable. */
static int fsync_parent(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir;
    if (slash == NULL) dir = strdup(".");
    else if (slash == path) dir = strdup("/");
    else {
        dir = malloc((size_t)(slash - path) + 1);
        if (dir) {
            memcpy(dir, path, (size_t)(slash - path));
            dir[slash - path] = '\0';
        }
    }
    if (dir == NULL) {
        errno = ENOMEM;
        return 0;
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (fd < 0) return 0;
    int ok = fsync(fd) == 0 || errno == EINVAL || errno == EROFS; /* unsupported: nothing to do */
    int e = errno;
    close(fd);
    errno = e;
    return ok;
}

/* A file kind in words, for refusing it. */
static const char *kind_of(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISFIFO(m)) return "a FIFO (named pipe)";
    if (S_ISSOCK(m)) return "a socket";
    return "a special file";
}

/* What `path` names decides what a save may do: nothing there -> create it; a regular file
 * or a symbolic link to one -> replace the file's contents (the link stays); anything else
 * is refused, because rename() would swap out the node itself (/dev/full became a 1 MB
 * file) or turn a dangling link into a file. *target (malloc'ed) is the file to replace. */
static af_status check_target(const char *path, char **target) {
    *target = NULL;
    struct stat lsb, sb;
    if (lstat(path, &lsb) != 0) {
        if (errno != ENOENT) return io_error("cannot save to", path);
        *target = strdup(path); /* a new file; a missing directory fails at create */
        return *target ? AF_OK : af_error(AF_ENOMEM, "safetensors: out of memory");
    }
    sb = lsb;
    if (S_ISLNK(lsb.st_mode) && stat(path, &sb) != 0) {
        if (errno != ENOENT) return io_error("cannot save to", path);
        af_error(AF_EIO, "cannot save to '%s': it is a symbolic link to a missing file", path);
        errno = ENOENT;
        return AF_EIO;
    }
    if (!S_ISREG(sb.st_mode)) {
        af_error(AF_EIO, "cannot save to '%s': it is %s%s, not a regular file; refusing to "
                 "replace it", path, S_ISLNK(lsb.st_mode) ? "a symbolic link to " : "",
                 kind_of(sb.st_mode));
        errno = S_ISDIR(sb.st_mode) ? EISDIR : EEXIST;
        return AF_EIO;
    }
    *target = S_ISLNK(lsb.st_mode) ? realpath(path, NULL) : strdup(path);
    if (*target == NULL) return io_error("cannot resolve", path);
    return AF_OK;
}

/* A failed write/fsync/close: the temporary file is removed, so say that nothing changed. */
static af_status write_error(const char *what, const char *path) {
    int e = errno;
    af_error(AF_EIO, "%s '%s': %s (the temporary file was removed; an existing '%s' is "
             "unchanged)", what, path, strerror(e), path);
    errno = e;
    return AF_EIO;
}

static atomic_uint tmp_counter;

af_status af_safetensors_write(const char *path, const af_st_tensor *tensors, int n,
                               const char *const *meta_keys, const char *const *meta_vals,
                               int n_meta) {
    AF_CHECK(path != NULL && path[0] != '\0', AF_EINVAL, "safetensors: empty path");
    AF_CHECK(n >= 0 && n_meta >= 0, AF_EINVAL, "safetensors: negative count");
    AF_CHECK(n == 0 || tensors != NULL, AF_EINVAL, "safetensors: tensors is NULL");
    AF_CHECK(n_meta == 0 || (meta_keys && meta_vals), AF_EINVAL, "safetensors: metadata is NULL");
    AF_CHECK(host_is_little_endian(), AF_ENOTSUP, "safetensors: big-endian hosts are not supported");
    for (int i = 0; i < n; i++) AF_TRY(check_tensor(&tensors[i]));
    for (int i = 0; i < n_meta; i++) {
        AF_TRY(check_text(meta_keys[i], "metadata key"));
        AF_TRY(check_text(meta_vals[i], "metadata value"));
    }

    char *target = NULL;
    AF_TRY(check_target(path, &target));
    af_status st = AF_OK;
    int *order = malloc(((size_t)n + 1) * sizeof(int));
    const char **mk_sorted = malloc(((size_t)n_meta + 1) * sizeof(char *));
    sbuf h = {0};
    char *tmp = NULL;
    int fd = -1;
    if (order == NULL || mk_sorted == NULL) {
        st = af_error(AF_ENOMEM, "safetensors: out of memory");
        goto fail;
    }
    for (int i = 0; i < n; i++) order[i] = i;
    order_base = tensors;
    qsort(order, (size_t)n, sizeof(int), by_name);
    for (int k = 1; k < n; k++) {
        if (strcmp(tensors[order[k]].name, tensors[order[k - 1]].name) == 0) {
            st = af_error(AF_EINVAL, "safetensors: duplicate tensor name \"%.200s\"",
                          tensors[order[k]].name);
            goto fail;
        }
    }
    qsort(order, (size_t)n, sizeof(int), by_size_then_name);
    for (int i = 0; i < n_meta; i++) mk_sorted[i] = meta_keys[i];
    qsort(mk_sorted, (size_t)n_meta, sizeof(char *), by_string);
    for (int i = 1; i < n_meta; i++) {
        if (strcmp(mk_sorted[i], mk_sorted[i - 1]) == 0) {
            st = af_error(AF_EINVAL, "safetensors: duplicate metadata key \"%.200s\"", mk_sorted[i]);
            goto fail;
        }
    }
    size_t data_bytes = 0;
    if ((st = build_header(&h, tensors, order, n, meta_keys, meta_vals, n_meta, &data_bytes)) != AF_OK)
        goto fail;

    /* Temporary file next to the target, so that rename() is atomic (same file system). */
    size_t tlen = strlen(target) + 64;
    tmp = malloc(tlen);
    if (tmp == NULL) {
        st = af_error(AF_ENOMEM, "safetensors: out of memory");
        goto fail;
    }
    for (int attempt = 0; attempt < 100 && fd < 0; attempt++) {
        snprintf(tmp, tlen, "%s.tmp.%ld.%u", target, (long)getpid(),
                 atomic_fetch_add(&tmp_counter, 1u));
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) {
        st = io_error("cannot create a temporary file in the directory of", path);
        free(tmp);
        tmp = NULL; /* nothing to remove */
        goto fail;
    }
    unsigned char len8[8];
    uint64_t hl = (uint64_t)h.n;
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(hl >> (8 * i));
    int ok = write_all(fd, len8, 8) && write_all(fd, h.p, h.n);
    for (int k = 0; k < n && ok; k++) {
        const af_st_tensor *t = &tensors[order[k]];
        if (t->nbytes) ok = write_all(fd, t->data, t->nbytes);
    }
    if (!ok) {
        st = write_error("cannot write", path);
        goto fail;
    }
    /* a full disk may only show at fsync or close (delayed allocation, NFS) */
    if (fsync(fd) != 0) {
        st = write_error("cannot fsync", path);
        goto fail;
    }
    int rc = close(fd);
    fd = -1;
    if (rc != 0) {
        st = write_error("cannot close", path);
        goto fail;
    }
    if (rename(tmp, target) != 0) {
        st = write_error("cannot rename the temporary file onto", path);
        goto fail;
    }
    free(tmp);
    tmp = NULL;
    if (!fsync_parent(target)) st = io_error("written, but cannot fsync the directory of", path);
    (void)data_bytes;
fail:
    if (fd >= 0 || tmp != NULL) {
        int e = errno;
        if (fd >= 0) close(fd);
        if (tmp != NULL) unlink(tmp);
        errno = e;
    }
    free(tmp);
    free(target);
    free(h.p);
    free(order);
    free(mk_sorted);
    return st;
}
