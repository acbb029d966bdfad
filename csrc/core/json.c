/* Strict JSON parser; see json.h for what "strict" means.
 *
 * Recursive descent over [p, end). Every read goes through `peek`/bounds checks, so a
 * truncated document is an error, never an over-read. Containers collect their children in
 * a growing array; strings are decoded (escapes, surrogate pairs) into exact-size buffers.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

typedef struct {
    const char *start, *p, *end;
    int depth;
} parser;

static af_status fail(const parser *ps, const char *what) {
    return af_error(AF_EFORMAT, "invalid JSON: %s at byte %zu", what, (size_t)(ps->p - ps->start));
}

static af_status oom(void) { return af_error(AF_ENOMEM, "out of memory while parsing JSON"); }

static void skip_ws(parser *ps) {
    while (ps->p < ps->end &&
           (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static void free_value(af_json *v) {
    if (v->type == AF_JSON_STR) {
        free(v->str);
    } else if (v->type == AF_JSON_ARR || v->type == AF_JSON_OBJ) {
        for (size_t i = 0; i < v->n; i++) {
            free_value(&v->items[i]);
            if (v->keys) free_value(&v->keys[i]);
        }
        free(v->items);
        free(v->keys);
    }
    memset(v, 0, sizeof *v);
}

void af_json_free(af_json *root) {
    if (root == NULL) return;
    free_value(root);
    free(root);
}

static af_status parse_value(parser *ps, af_json *out);

/* ---- strings ---------------------------------------------------------------------- */

static int hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

static size_t put_utf8(char *dst, unsigned cp) {
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    } else if (cp < 0x800) {
        dst[0] = (char)(0xC0 | (cp >> 6));
        dst[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    } else if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12));
        dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        dst[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18));
    dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid UTF-8 sequence at s (n bytes available), 0 if invalid
 * (overlong forms, surrogates and code points above U+10FFFF are invalid). */
static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F; /* U+D800..U+DFFF are not characters */
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    if (n < need) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < need; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return need;
}

static af_status parse_string(parser *ps, af_json *out) {
    ps->p++; /* opening quote */
    /* Find the closing quote first: the decoded string is never longer than its source. */
    const char *q = ps->p;
    while (q < ps->end && *q != '"') {
        if (*q == '\\' && ps->end - q < 2) q = ps->end;
        else q += (*q == '\\') ? 2 : 1;
    }
    if (q >= ps->end) {
        ps->p = ps->end;
        return fail(ps, "unterminated string");
    }
    char *buf = malloc((size_t)(q - ps->p) + 1);
    if (buf == NULL) return oom();
    size_t n = 0;
    while (ps->p < q) {
        unsigned char c = (unsigned char)*ps->p;
        if (c < 0x20) {
            free(buf);
            return fail(ps, "raw control character in string");
        }
        if (c != '\\') {
            size_t k = utf8_len((const unsigned char *)ps->p, (size_t)(q - ps->p));
            if (k == 0) {
                free(buf);
                return fail(ps, "invalid UTF-8 in string");
            }
            memcpy(buf + n, ps->p, k);
            n += k;
            ps->p += k;
            continue;
        }
        char e = ps->p[1]; /* in bounds: the scan above stepped over it */
        ps->p += 2;
        switch (e) {
        case '"': buf[n++] = '"'; break;
        case '\\': buf[n++] = '\\'; break;
        case '/': buf[n++] = '/'; break;
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'n': buf[n++] = '\n'; break;
        case 'r': buf[n++] = '\r'; break;
        case 't': buf[n++] = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (q - ps->p < 4 || !hex4(ps->p, &cp)) {
                free(buf);
                return fail(ps, "bad \\u escape");
            }
            ps->p += 4;
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                free(buf);
                return fail(ps, "unpaired low surrogate in \\u escape");
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (q - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u' || !hex4(ps->p + 2, &lo) ||
                    lo < 0xDC00 || lo > 0xDFFF) {
                    free(buf);
                    return fail(ps, "unpaired high surrogate in \\u escape");
                }
                ps->p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            n += put_utf8(buf + n, cp);
            break;
        }
        default:
            ps->p -= 1;
            free(buf);
            return fail(ps, "unknown escape in string");
        }
    }
    ps->p = q + 1;
    buf[n] = '\0';
    out->type = AF_JSON_STR;
    out->str = buf;
    out->len = n;
    return AF_OK;
}

/* ---- numbers and literals ---------------------------------------------------------- */

static int is_digit(const parser *ps, const char *s) { return s < ps->end && *s >= '0' && *s <= '9'; }

static af_status parse_number(parser *ps, af_json *out) {
    const char *s = ps->p, *q = ps->p;
    int integral = 1;
    if (q < ps->end && *q == '-') q++;
    if (!is_digit(ps, q)) {
        ps->p = q;
        return fail(ps, "expected a digit");
    }
    if (*q == '0') {
        q++;
        if (is_digit(ps, q)) {
            ps->p = q;
            return fail(ps, "leading zero in number");
        }
    } else {
        while (is_digit(ps, q)) q++;
    }
    if (q < ps->end && *q == '.') {
        integral = 0;
        q++;
        if (!is_digit(ps, q)) {
            ps->p = q;
            return fail(ps, "expected a digit after '.'");
        }
        while (is_digit(ps, q)) q++;
    }
    if (q < ps->end && (*q == 'e' || *q == 'E')) {
        integral = 0;
        q++;
        if (q < ps->end && (*q == '+' || *q == '-')) q++;
        if (!is_digit(ps, q)) {
            ps->p = q;
            return fail(ps, "expected a digit in exponent");
        }
        while (is_digit(ps, q)) q++;
    }
    size_t len = (size_t)(q - s);
    char small[64];
    char *tok = len < sizeof small ? small : malloc(len + 1);
    if (tok == NULL) return oom();
    memcpy(tok, s, len);
    tok[len] = '\0';
    out->number = strtod(tok, NULL);
    if (tok != small) free(tok);
    out->type = AF_JSON_NUM;
    if (integral) {
        /* Exact int64 when it fits; larger integers stay AF_JSON_NUM. */
        int neg = *s == '-';
        uint64_t mag = 0, limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
        int fits = 1;
        for (const char *d = s + neg; d < q; d++) {
            uint64_t digit = (uint64_t)(*d - '0');
            if (mag > (limit - digit) / 10) {
                fits = 0;
                break;
            }
            mag = mag * 10 + digit;
        }
        if (fits) {
            out->type = AF_JSON_INT;
            out->integer = neg ? (mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag)
                               : (int64_t)mag;
        }
    }
    ps->p = q;
    return AF_OK;
}

static af_status parse_literal(parser *ps, const char *word, af_json *out) {
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) return fail(ps, "unexpected token");
    ps->p += n;
    if (word[0] == 'n') {
        out->type = AF_JSON_NULL;
    } else {
        out->type = AF_JSON_BOOL;
        out->boolean = word[0] == 't';
    }
    return AF_OK;
}

/* ---- containers ------------------------------------------------------------------- */

/* Grow items (and keys when non-NULL) to hold at least n+1 entries. */
static af_status reserve(af_json **items, af_json **keys, size_t n, size_t *cap) {
    if (n < *cap) return AF_OK;
    size_t nc = *cap ? *cap * 2 : 8;
    if (nc > SIZE_MAX / sizeof(af_json)) return oom();
    af_json *ni = realloc(*items, nc * sizeof(af_json));
    if (ni == NULL) return oom();
    *items = ni;
    if (keys) {
        af_json *nk = realloc(*keys, nc * sizeof(af_json));
        if (nk == NULL) return oom();
        *keys = nk;
    }
    *cap = nc;
    return AF_OK;
}

static int key_cmp(const void *a, const void *b) {
    const af_json *x = *(const af_json *const *)a, *y = *(const af_json *const *)b;
    size_t m = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->str, y->str, m);
    if (c != 0) return c;
    return (x->len > y->len) - (x->len < y->len);
}

/* Sort pointers to the keys and compare neighbours: O(n log n) even for big headers. */
static af_status check_duplicates(const af_json *obj) {
    if (obj->n < 2) return AF_OK;
    const af_json **idx = malloc(obj->n * sizeof *idx);
    if (idx == NULL) return oom();
    for (size_t i = 0; i < obj->n; i++) idx[i] = &obj->keys[i];
    qsort(idx, obj->n, sizeof *idx, key_cmp);
    af_status st = AF_OK;
    for (size_t i = 1; i < obj->n; i++) {
        if (key_cmp(&idx[i - 1], &idx[i]) == 0) {
            st = af_error(AF_EFORMAT, "invalid JSON: duplicate key \"%.200s\"", idx[i]->str);
            break;
        }
    }
    free(idx);
    return st;
}

static af_status parse_container(parser *ps, af_json *out, int is_obj) {
    if (ps->depth >= AF_JSON_MAX_DEPTH) return fail(ps, "nesting too deep");
    ps->depth++;
    ps->p++; /* '{' or '[' */
    out->type = is_obj ? AF_JSON_OBJ : AF_JSON_ARR;
    size_t cap = 0;
    af_status st = AF_OK;
    char close = is_obj ? '}' : ']';
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        ps->depth--;
        return AF_OK;
    }
    for (;;) {
        st = reserve(&out->items, is_obj ? &out->keys : NULL, out->n, &cap);
        if (st != AF_OK) break;
        af_json *item = &out->items[out->n];
        memset(item, 0, sizeof *item);
        if (is_obj) {
            af_json *key = &out->keys[out->n];
            memset(key, 0, sizeof *key);
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != '"') {
                st = fail(ps, "expected a string key");
                break;
            }
            out->n++; /* counted now so that free_value releases a half-parsed entry */
            if ((st = parse_string(ps, key)) != AF_OK) break;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                st = fail(ps, "expected ':'");
                break;
            }
            ps->p++;
        } else {
            out->n++;
        }
        if ((st = parse_value(ps, item)) != AF_OK) break;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            break;
        }
        st = fail(ps, is_obj ? "expected ',' or '}'" : "expected ',' or ']'");
        break;
    }
    ps->depth--;
    if (st == AF_OK && is_obj) st = check_duplicates(out);
    return st;
}

static af_status parse_value(parser *ps, af_json *out) {
    skip_ws(ps);
    if (ps->p >= ps->end) return fail(ps, "unexpected end of input");
    switch (*ps->p) {
    case '{': return parse_container(ps, out, 1);
    case '[': return parse_container(ps, out, 0);
    case '"': return parse_string(ps, out);
    case 't': return parse_literal(ps, "true", out);
    case 'f': return parse_literal(ps, "false", out);
    case 'n': return parse_literal(ps, "null", out);
    default: return parse_number(ps, out);
    }
}

af_status af_json_parse(const char *text, size_t len, af_json **out) {
    *out = NULL;
    af_json *root = calloc(1, sizeof *root);
    if (root == NULL) return oom();
    parser ps = {text, text, text + len, 0};
    af_status st = parse_value(&ps, root);
    if (st == AF_OK) {
        skip_ws(&ps);
        if (ps.p != ps.end) st = fail(&ps, "trailing characters after the value");
    }
    if (st != AF_OK) {
        af_json_free(root);
        return st;
    }
    *out = root;
    return AF_OK;
}

const af_json *af_json_get(const af_json *obj, const char *key) {
    if (obj == NULL || obj->type != AF_JSON_OBJ) return NULL;
    size_t n = strlen(key);
    for (size_t i = 0; i < obj->n; i++)
        if (obj->keys[i].len == n && memcmp(obj->keys[i].str, key, n) == 0) return &obj->items[i];
    return NULL;
}

int af_utf8_valid(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_len(u + i, n - i);
        if (k == 0) return 0;
        i += k;
    }
    return 1;
}

const char *af_json_type_name(af_json_type t) {
    switch (t) {
    case AF_JSON_NULL: return "null";
    case AF_JSON_BOOL: return "boolean";
    case AF_JSON_INT: return "integer";
    case AF_JSON_NUM: return "number";
    case AF_JSON_STR: return "string";
    case AF_JSON_ARR: return "array";
    case AF_JSON_OBJ: return "object";
    }
    return "?";
}
