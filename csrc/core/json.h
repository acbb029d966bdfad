/* A minimal strict JSON parser (RFC 8259) for file headers such as safetensors.
 *
 * Strict means: exactly one value surrounded by optional whitespace, no comments, no
 * trailing commas, no leading zeros, no NaN/Infinity, strings must be valid UTF-8 without
 * raw control characters, lone surrogates in \u escapes are rejected, duplicate keys in an
 * object are rejected. Nesting depth is limited to AF_JSON_MAX_DEPTH. The parser never reads
 * past `len` bytes, so the text does not need a terminating NUL.
 */
#ifndef AFIRE_JSON_H
#define AFIRE_JSON_H

#include <stddef.h>
#include <stdint.h>

#include "afire.h"

#define AF_JSON_MAX_DEPTH 64

typedef enum {
    AF_JSON_NULL,
    AF_JSON_BOOL,
    AF_JSON_INT, /* an integer literal (no fraction/exponent) that fits int64_t */
    AF_JSON_NUM, /* any other number, as a double */
    AF_JSON_STR,
    AF_JSON_ARR,
    AF_JSON_OBJ
} af_json_type;

typedef struct af_json af_json;
struct af_json {
    af_json_type type;
    int boolean;       /* AF_JSON_BOOL */
    int64_t integer;   /* AF_JSON_INT */
    double number;     /* AF_JSON_INT and AF_JSON_NUM */
    char *str;         /* AF_JSON_STR: UTF-8, NUL-terminated (may also contain NULs) */
    size_t len;        /* AF_JSON_STR: bytes, without the terminator */
    size_t n;          /* AF_JSON_ARR / AF_JSON_OBJ: number of items */
    af_json *items;    /* AF_JSON_ARR elements / AF_JSON_OBJ values, in document order */
    af_json *keys;     /* AF_JSON_OBJ: keys (each an AF_JSON_STR), parallel to items */
};

/* Parse `len` bytes of `text` into a tree owned by *out (free with af_json_free).
 * AF_EFORMAT with a message giving the byte offset on malformed input, AF_ENOMEM. */
af_status af_json_parse(const char *text, size_t len, af_json **out);
void af_json_free(af_json *root);

/* Value of `key` in object `obj`, or NULL (also when obj is not an object). */
const af_json *af_json_get(const af_json *obj, const char *key);
/* 1 if s[0..n) is valid UTF-8 (no overlongs, surrogates or code points above U+10FFFF). */
int af_utf8_valid(const char *s, size_t n);
/* Printable name of a type ("object", "string", ...), for messages. */
const char *af_json_type_name(af_json_type t);

#endif
