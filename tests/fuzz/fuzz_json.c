/* libFuzzer target: the strict JSON parser (csrc/core/json.c) on arbitrary bytes.
 *
 * The input is copied into an exact-size heap buffer with no terminating NUL, so an
 * over-read by even one byte is an ASan error. Accepted documents are walked completely:
 * every string must be valid UTF-8 of the stated length, every object free of duplicate
 * keys (the parser promises both). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

#define REQUIRE(cond)                                                        \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                         \
        }                                                                    \
    } while (0)

static void walk(const af_json *v, int depth) {
    REQUIRE(depth <= AF_JSON_MAX_DEPTH);
    switch (v->type) {
    case AF_JSON_STR:
        REQUIRE(v->str != NULL && v->str[v->len] == '\0');
        REQUIRE(af_utf8_valid(v->str, v->len));
        break;
    case AF_JSON_OBJ:
        for (size_t i = 0; i < v->n; i++) {
            walk(&v->keys[i], depth + 1);
            walk(&v->items[i], depth + 1);
            for (size_t j = 0; j < i && j < 64; j++) /* bounded: quadratic on huge objects */
                REQUIRE(v->keys[i].len != v->keys[j].len ||
                        memcmp(v->keys[i].str, v->keys[j].str, v->keys[i].len) != 0);
        }
        break;
    case AF_JSON_ARR:
        for (size_t i = 0; i < v->n; i++) walk(&v->items[i], depth + 1);
        break;
    case AF_JSON_BOOL: REQUIRE(v->boolean == 0 || v->boolean == 1); break;
    case AF_JSON_INT: REQUIRE((double)v->integer == v->number || v->integer > (1LL << 53) ||
                              v->integer < -(1LL << 53)); break;
    default: break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size ? size : 1);
    if (text == NULL) return 0;
    if (size) memcpy(text, data, size);
    af_json *root = NULL;
    af_status st = af_json_parse(text, size, &root);
    if (st == AF_OK) {
        REQUIRE(root != NULL);
        walk(root, 0);
        if (root->type == AF_JSON_OBJ && root->n > 0) /* af_json_get finds the first key */
            REQUIRE(af_json_get(root, root->keys[0].str) != NULL ||
                    strlen(root->keys[0].str) != root->keys[0].len);
    } else {
        REQUIRE(root == NULL);
        REQUIRE(st == AF_EFORMAT || st == AF_ENOMEM);
    }
    af_json_free(root);
    free(text);
    return 0;
}
