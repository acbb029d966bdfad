/* The machinery behind the op table (py_op.h states the signature language): a parser run
 * once per row at import, the argument checker, the result builder and the runner -- the
 * kernel on the host without the GIL (afire._C), or upload, run, download on the shared
 * context (afire._C_cuda). */
#include "py_op.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#ifdef AFIRE_HAVE_CUDA
static const int on_gpu = 1;
_Static_assert(AF_OP_MAX_SLOTS <= AF_CUDA_MAX_ARGS, "one CUDA buffer per array slot");
#else
static const int on_gpu = 0;
#endif

/* ------------------------------------------------------------------ signature parser */

typedef struct {
    const char *s, *op;
    af_op_sig *g;
    char ref[AF_OP_MAX_PARAMS + AF_OP_MAX_SLOTS][24]; /* x[other]: resolved at the end */
    size_t doc;                                       /* used length of g->doc */
} parser;

static int bad(parser *ps, const char *what) {
    PyErr_Format(PyExc_SystemError, "afire op table: %s: %s at \"%.30s\"", ps->op, what, ps->s);
    return -1;
}

static int is_id(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static void skip_ws(parser *ps) {
    while (*ps->s == ' ' || *ps->s == ',') ps->s++;
}

/* Consumes word `w` when it stands at the cursor as a whole word. */
static int word(parser *ps, const char *w) {
    size_t n = strlen(w);
    if (strncmp(ps->s, w, n) != 0 || (is_id(w[n - 1]) && is_id(ps->s[n]))) return 0;
    ps->s += n;
    return 1;
}

static int ident(parser *ps, char *out, size_t cap) {
    size_t n = 0;
    while (is_id(ps->s[n]) && n + 1 < cap) n++;
    if (n == 0 || is_id(ps->s[n]) || (ps->s[0] >= '0' && ps->s[0] <= '9'))
        return bad(ps, "expected a name");
    memcpy(out, ps->s, n);
    out[n] = '\0';
    ps->s += n;
    return 0;
}

static int find(const af_op_sig *g, const char *name, int upto) {
    for (int i = 0; i < upto; i++)
        if (strcmp(g->p[i].name, name) == 0) return i;
    return -1;
}

static int letter(parser *ps, const char *name) {
    af_op_sig *g = ps->g;
    for (int i = 0; i < g->nletters; i++)
        if (strcmp(g->letter[i], name) == 0) return i;
    if (g->nletters == AF_OP_MAX_LETTERS || strlen(name) >= sizeof g->letter[0])
        return bad(ps, "too many letters, or a long one");
    snprintf(g->letter[g->nletters], sizeof g->letter[0], "%s", name);
    return g->nletters++;
}

static void doc_add(parser *ps, const char *text, size_t n) {
    af_op_sig *g = ps->g;
    if (ps->doc + n + 1 > sizeof g->doc) n = sizeof g->doc - ps->doc - 1;
    memcpy(g->doc + ps->doc, text, n);
    ps->doc += n;
    g->doc[ps->doc] = '\0';
}

/* [N, 3*D] | [...] | [name]: fills q->ndim and q->dim; [name] is left in `ref` for finish()
 * to decide (the shape of array `name`, or one letter). */
static int shape(parser *ps, af_op_param *q, char *ref) {
    ps->s++; /* '[' */
    if (word(ps, "...]")) {
        q->ndim = -1;
        return 0;
    }
    size_t n = 0;
    while (is_id(ps->s[n])) n++;
    if (n > 0 && n < 24 && ps->s[n] == ']' && !(ps->s[0] >= '0' && ps->s[0] <= '9')) {
        memcpy(ref, ps->s, n);
        ref[n] = '\0';
        ps->s += n + 1;
        q->ndim = 1;
        return 0;
    }
    q->ndim = 0;
    for (;;) {
        if (q->ndim == AF_OP_MAX_DIMS) return bad(ps, "too many dimensions");
        af_op_dim *d = &q->dim[q->ndim++];
        d->coef = 1;
        for (;;) {
            if (*ps->s >= '0' && *ps->s <= '9') {
                d->coef *= strtol(ps->s, (char **)&ps->s, 10);
            } else {
                char name[24];
                if (ident(ps, name, sizeof name) < 0) return -1;
                int l = letter(ps, name);
                if (l < 0 || d->n == AF_OP_MAX_FACTORS) return l < 0 ? -1 : bad(ps, "long product");
                d->letter[d->n++] = (int8_t)l;
            }
            if (*ps->s != '*') break;
            ps->s++;
        }
        if (*ps->s == ']') break;
        if (*ps->s != ',') return bad(ps, "expected , or ]");
        ps->s++;
    }
    ps->s++;
    return 0;
}

/* :int>0 and friends; arrays: :u8 :labels :f64 :f32. */
static int type(parser *ps, af_op_param *q) {
    static const struct { const char *w; char kind, dtype; } types[] = {
        {"int", 'i', 0}, {"float", 'f', 0}, {"bool", 'b', 0}, {"u64", 'u', 0},
        {"u8", 0, 'u'},  {"labels", 0, 'l'}, {"f64", 0, 'd'}, {"f32", 0, 'f'}};
    static const struct { const char *w; char range; } ranges[] = {
        {">=0", '0'}, {">0", '+'}, {"[0,1]", ']'}, {"[0,1)", ')'}};
    ps->s++; /* ':' */
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        if (!word(ps, types[i].w)) continue;
        if (types[i].kind == 0 && q->kind != 'a' && q->kind != 'o') return bad(ps, "array type");
        if (types[i].kind == 'f' && q->kind == 'o') q->kind = 'l'; /* a loss */
        else if (types[i].kind) q->kind = types[i].kind;
        else q->dtype = types[i].dtype;
        for (size_t r = 0; r < sizeof ranges / sizeof ranges[0]; r++)
            if (word(ps, ranges[r].w)) q->range = ranges[r].range;
        return 0;
    }
    return bad(ps, "unknown type");
}

/* **config: the SLM config keywords, typed by AF_SLM_CFG_FORMAT. */
static int config_params(parser *ps) {
    static const char *names[] = {AF_SLM_CFG_KWLIST};
    const char *kinds = AF_SLM_CFG_FORMAT + 1; /* past '$' */
    if (ps->g->n + (int)strlen(kinds) > AF_OP_MAX_PARAMS) return bad(ps, "too many parameters");
    for (int k = 0; kinds[k]; k++) {
        af_op_param *q = &ps->g->p[ps->g->n++];
        snprintf(q->name, sizeof q->name, "%s", names[k]);
        q->kind = kinds[k];
        q->range = 'x'; /* af_slm_config_check decides */
        q->same_as = q->from = q->cond = q->slot = -1;
        q->cfg = (int8_t)k;
        q->flags = AF_OP_OPTIONAL | AF_OP_KWONLY;
    }
    return 0;
}

/* One entry of any list: [@]name [shape] [:type] [!] [=default]. `kind`: '?' a parameter
 * (an array when it has a shape), 'o' a result, 't' scratch. Adds it to the docstring
 * (`sep` first) unless it is the GPU twin's only. */
static af_op_param *entry(parser *ps, char kind, const char *sep) {
    af_op_sig *g = ps->g;
    if (g->n == AF_OP_MAX_PARAMS + AF_OP_MAX_SLOTS) {
        bad(ps, "too many entries");
        return NULL;
    }
    af_op_param *q = &g->p[g->n++];
    memset(q, 0, sizeof *q);
    q->kind = kind, q->dtype = 'f';
    q->same_as = q->from = q->cond = q->slot = q->cfg = -1;
    if (*ps->s == '@') {
        q->flags |= AF_OP_GPU;
        ps->s++;
    }
    const char *start = ps->s;
    if (ident(ps, q->name, sizeof q->name) < 0) return NULL;
    if (*ps->s == '[') {
        if (q->kind == '?') q->kind = 'a';
        if (shape(ps, q, ps->ref[g->n - 1]) < 0) return NULL;
    }
    if (*ps->s == ':' && type(ps, q) < 0) return NULL;
    if (q->kind == '?') return bad(ps, "a scalar needs a type"), NULL;
    if (*ps->s == '!') {
        q->flags |= AF_OP_INPLACE;
        ps->s++;
    }
    size_t len = (size_t)(ps->s - start);
    if (*ps->s == '=') {
        ps->s++;
        q->flags |= AF_OP_OPTIONAL;
        if (word(ps, "True")) {
            q->def = 1;
        } else if (!word(ps, "None") && !word(ps, "False")) {
            char *end;
            q->def = strtod(ps->s, &end);
            if (end == ps->s) return bad(ps, "bad default"), NULL;
            ps->s = end + (*end == 'f'); /* a C float literal from STR() */
        }
        len = (size_t)(ps->s - start) - (ps->s[-1] == 'f'); /* the docstring shows 0.1 */
    }
    if (!(q->flags & AF_OP_GPU) || on_gpu) {
        doc_add(ps, sep, strlen(sep));
        doc_add(ps, start, len);
    }
    return q;
}

/* The parameters, up to "->" (returns 1) or the end (0). */
static int parse_params(parser *ps) {
    const char *sep = "";
    int kwonly = 0;
    for (;;) {
        skip_ws(ps);
        if (*ps->s == '\0' || *ps->s == '\n') return 0;
        if (word(ps, "->")) return 1;
        if (word(ps, "**config")) {
            doc_add(ps, sep, strlen(sep));
            doc_add(ps, "**config", 8);
            if (config_params(ps) < 0) return -1;
        } else if (*ps->s == '*') { /* shown before the next parameter this build has */
            ps->s++;
            kwonly = 1;
            sep = *sep ? ", *, " : "*, ";
            continue;
        } else {
            af_op_param *q = entry(ps, '?', sep);
            if (q == NULL) return -1;
            if (kwonly) q->flags |= AF_OP_KWONLY;
            if (*ps->s != ' ' && *ps->s != '\0' && *ps->s != '\n')
                return bad(ps, "unexpected text");
            if ((q->flags & AF_OP_GPU) && !on_gpu) continue;
        }
        sep = ", ";
    }
}

/* The results, then the scratch after "using"; the docstring leaves out the clauses on a
 * parameter this build lacks. */
static int parse_results(parser *ps) {
    af_op_sig *g = ps->g;
    skip_ws(ps);
    doc_add(ps, " -> ", 4);
    if (word(ps, "None")) doc_add(ps, "None", 4);
    g->tuple = *ps->s == '(';
    if (g->tuple) ps->s++, doc_add(ps, "(", 1);
    for (const char *sep = "";; sep = ", ") {
        skip_ws(ps);
        if (*ps->s == ')' || *ps->s == '\0' || *ps->s == '\n' || strncmp(ps->s, "using ", 6) == 0)
            break;
        af_op_param *q = entry(ps, 'o', sep);
        if (q == NULL) return -1;
        for (;;) { /* from x, if x, unless x */
            skip_ws(ps);
            const char *clause = ps->s;
            int unless = 0;
            int8_t *field = word(ps, "from ") ? &q->from
                            : word(ps, "if ") ? &q->cond
                            : (unless = word(ps, "unless ")) ? &q->cond : NULL;
            char name[24];
            if (field == NULL) break;
            if (ident(ps, name, sizeof name) < 0) return -1;
            if ((*field = (int8_t)find(g, name, g->nparams)) < 0) return bad(ps, "unknown name");
            if (unless) q->flags |= AF_OP_UNLESS;
            if (!(g->p[*field].flags & AF_OP_GPU) || on_gpu) {
                doc_add(ps, " ", 1);
                doc_add(ps, clause, (size_t)(ps->s - clause));
            }
        }
    }
    if (g->tuple && *ps->s++ != ')') return bad(ps, "expected )");
    if (g->tuple) doc_add(ps, ")", 1);
    size_t doc = ps->doc;
    skip_ws(ps);
    if (word(ps, "using")) {
        for (;;) {
            skip_ws(ps);
            if (*ps->s == '\0' || *ps->s == '\n') break;
            if (entry(ps, 't', "") == NULL) return -1;
        }
    }
    ps->doc = doc, g->doc[doc] = '\0'; /* scratch is not part of the docstring */
    return *ps->s == '\0' || *ps->s == '\n' ? 0 : bad(ps, "unexpected text");
}

/* Resolves x[other], numbers the array slots, builds kwlist and format, checks the order of
 * the Python arguments. */
static int finish(parser *ps) {
    af_op_sig *g = ps->g;
    int k = 0, optional = 0, kwonly = 0, f = 0;
    for (int i = 0; i < g->n; i++) {
        af_op_param *q = &g->p[i];
        if (ps->ref[i][0]) { /* [name]: an array's shape, or one letter */
            int other = find(g, ps->ref[i], g->nparams), l;
            if (other >= 0 && g->p[other].kind == 'a') {
                q->same_as = (int8_t)other;
                q->ndim = 0;
            } else if ((l = letter(ps, ps->ref[i])) < 0) {
                return -1;
            } else {
                q->dim[0].coef = 1, q->dim[0].n = 1, q->dim[0].letter[0] = (int8_t)l;
            }
        }
        if (q->kind == 'a' || q->kind == 'o' || q->kind == 'l' || q->kind == 't') {
            if (g->nslots == AF_OP_MAX_SLOTS) return bad(ps, "too many arrays");
            q->slot = (int8_t)g->nslots++;
        }
        if (i >= g->nparams || ((q->flags & AF_OP_GPU) && !on_gpu)) continue;
        q->flags |= AF_OP_ACTIVE;
        if (!(q->flags & (AF_OP_OPTIONAL | AF_OP_KWONLY)) && optional)
            return bad(ps, "a required argument after an optional one");
        if (((q->flags & AF_OP_OPTIONAL) || (q->flags & AF_OP_KWONLY)) && !optional++)
            g->format[f++] = '|';
        if ((q->flags & AF_OP_KWONLY) && !kwonly++) g->format[f++] = '$';
        g->format[f++] = 'O';
        g->kwlist[k] = q->name;
        g->active[k++] = (int8_t)i;
    }
    g->kwlist[k] = NULL;
    snprintf(g->format + f, sizeof g->format - (size_t)f, ":%s", ps->op);
    return 0;
}

static int parse(af_op_sig *g, const af_op_row *row) {
    parser ps;
    memset(&ps, 0, sizeof ps);
    memset(g, 0, sizeof *g);
    ps.s = row->signature, ps.op = row->name, ps.g = g;
    g->finite = strcmp(row->module, "objective") == 0;
    doc_add(&ps, row->name, strlen(row->name));
    doc_add(&ps, "(", 1);
    int arrow = parse_params(&ps);
    if (arrow < 0) return -1;
    g->nparams = g->n;
    doc_add(&ps, ")", 1);
    if (arrow && parse_results(&ps) < 0) return -1;
    if (finish(&ps) < 0) return -1;
    if (*ps.s == '\n') doc_add(&ps, ps.s, strlen(ps.s)); /* the prose after the signature */
    if (on_gpu) {
        char twin[96];
        snprintf(twin, sizeof twin, "\n\nGPU twin of afire._C.%s.%s (host arrays in and out).",
                 row->module, row->name);
        doc_add(&ps, twin, strlen(twin));
    }
    return 0;
}

/* Every name an adapter reads -- F(x), I(N), ... in its source -- must be in the signature
 * with that kind: a typo fails at import, in both extensions, not inside a kernel. */
static int check_names(const af_op_sig *g, const af_op_row *row) {
    static const struct { const char *macro; const char *kinds; char dtype; } uses[] = {
        {"F(", "aolt", 'f'}, {"U8(", "ao", 'u'}, {"F64(", "ao", 'd'}, {"COUNT(", "aolt", 0},
        {"I(", "ib", 0},     {"R(", "f", 0},     {"U64(", "u", 0}};
    for (const char *s = row->run_text; *s; s++) {
        if (s != row->run_text && is_id(s[-1])) continue;
        for (size_t u = 0; u < sizeof uses / sizeof uses[0]; u++) {
            size_t n = strlen(uses[u].macro);
            if (strncmp(s, uses[u].macro, n) != 0) continue;
            char name[24];
            size_t len = 0;
            while (is_id(s[n + len]) && len + 1 < sizeof name) len++;
            memcpy(name, s + n, len);
            name[len] = '\0';
            int i = find(g, name, g->n), ok = i >= 0 && strchr(uses[u].kinds, g->p[i].kind);
            if (ok && uses[u].dtype && g->p[i].kind != 'l' && g->p[i].kind != 't')
                ok = g->p[i].dtype == uses[u].dtype ||
                     (uses[u].dtype == 'u' && g->p[i].dtype == 'l');
            if (!ok && strcmp(uses[u].macro, "I(") == 0)
                for (int l = 0; l < g->nletters; l++) ok |= strcmp(g->letter[l], name) == 0;
            if (!ok) {
                PyErr_Format(PyExc_SystemError, "afire op table: %s: its call uses %s%s), which "
                             "its signature does not give", row->name, uses[u].macro, name);
                return -1;
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ lookups */

int af_op_slot(const af_op_call *o, const char *name) {
    int i = find(o->sig, name, o->sig->n);
    return i < 0 ? -1 : o->sig->p[i].slot;
}

static int letter_index(const af_op_sig *g, const char *name) {
    for (int l = 0; l < g->nletters; l++)
        if (strcmp(g->letter[l], name) == 0) return l;
    return -1;
}

int64_t af_op_int(const af_op_call *o, const char *name) {
    int l = letter_index(o->sig, name);
    if (l >= 0 && (o->bound >> l & 1)) return o->let[l];
    int i = find(o->sig, name, o->sig->nparams);
    return i < 0 ? 0 : o->iv[i];
}

double af_op_real(const af_op_call *o, const char *name) {
    int i = find(o->sig, name, o->sig->nparams);
    return i < 0 ? 0.0 : o->fv[i];
}

uint64_t af_op_u64(const af_op_call *o, const char *name) {
    int i = find(o->sig, name, o->sig->nparams);
    return i < 0 ? 0 : o->uv[i];
}

PyArrayObject *af_op_array(const af_op_call *o, const char *name) {
    int s = af_op_slot(o, name);
    return s < 0 ? NULL : o->arr[s];
}

int af_op_let(af_op_call *o, const char *name, int64_t v, const char *arr, int axis) {
    int l = letter_index(o->sig, name);
    if (l < 0) {
        PyErr_Format(PyExc_SystemError, "afire op table: %s has no letter %s", o->name, name);
        return -1;
    }
    if (!(o->bound >> l & 1)) {
        o->let[l] = v, o->bound |= 1u << l;
        return 0;
    }
    if (o->let[l] == v) return 0;
    PyErr_Format(PyExc_ValueError, "%s: dimension %d must be %lld, got %lld", arr, axis,
                 (long long)v, (long long)o->let[l]);
    return -1;
}

/* ------------------------------------------------------------------ arguments */

static int take_scalar(af_op_call *o, int i, PyObject *obj) {
    const af_op_param *q = &o->sig->p[i];
    if (q->kind == 'b') {
        int v = obj ? PyObject_IsTrue(obj) : (int)q->def;
        if (v < 0) return -1;
        o->iv[i] = v;
    } else if (q->kind == 'u') {
        if (obj && !af_conv_u64(obj, &o->uv[i])) return -1;
        if (!obj) o->uv[i] = (uint64_t)q->def;
    } else if (q->kind == 'i') {
        long v = (long)q->def;
        if (obj && (v = PyLong_AsLong(obj)) == -1 && PyErr_Occurred()) return -1;
        if (v > INT_MAX || v < INT_MIN) {
            PyErr_Format(PyExc_OverflowError, "%s=%ld does not fit a C int", q->name, v);
            return -1;
        }
        if (q->range == '+' && v < 1) {
            PyErr_Format(PyExc_ValueError, "%s must be a positive int, got %ld", q->name, v);
            return -1;
        }
        if (q->range == '0' && v < 0) {
            PyErr_Format(PyExc_ValueError, "%s must be >= 0, got %ld", q->name, v);
            return -1;
        }
        o->iv[i] = v;
    } else if (q->kind == 'f') {
        double v = obj ? PyFloat_AsDouble(obj) : q->def;
        if (v == -1.0 && PyErr_Occurred()) return -1;
        const char *want = NULL;
        if (q->range == 0 && !isfinite(v)) want = "be finite";
        if (q->range == '0' && !(isfinite(v) && v >= 0.0)) want = "be finite and >= 0";
        if (q->range == '+' && !(isfinite(v) && v > 0.0)) want = "be a finite number > 0";
        if (q->range == ']' && !(v >= 0.0 && v <= 1.0)) want = "be in [0, 1]";
        if (q->range == ')' && !(v >= 0.0 && v < 1.0)) want = "be in [0, 1)";
        if (want) {
            af_errorf(PyExc_ValueError, "%s must %s, got %g", q->name, want, v);
            return -1;
        }
        o->fv[i] = v;
    }
    return 0;
}

/* The **config keywords given by the caller, over af_slm_config_default(). */
static int take_config(af_op_call *o, PyObject *const *given) {
    const af_op_sig *g = o->sig;
    const char *tok = NULL, *reg = NULL;
    o->cfg = af_slm_config_default();
    void *field[] = {AF_SLM_CFG_ARGS(o->cfg, tok, reg)};
    for (int i = 0; i < g->nparams; i++) {
        const af_op_param *q = &g->p[i];
        if (q->cfg < 0 || given[i] == NULL) continue;
        if (q->kind == 's') {
            if (!PyUnicode_Check(given[i])) {
                PyErr_Format(PyExc_TypeError, "%s must be a str, not %s", q->name,
                             Py_TYPE(given[i])->tp_name);
                return -1;
            }
            if ((*(const char **)field[q->cfg] = PyUnicode_AsUTF8(given[i])) == NULL) return -1;
        } else {
            if (take_scalar(o, i, given[i]) < 0) return -1;
            if (q->kind == 'i') *(int *)field[q->cfg] = (int)o->iv[i];
            else *(float *)field[q->cfg] = (float)o->fv[i];
        }
    }
    return af_slm_config_finish(&o->cfg, tok, reg);
}

static int take_scalars(af_op_call *o, PyObject *const *given) {
    const af_op_sig *g = o->sig;
    int config = 0;
    for (int i = 0; i < g->nparams; i++) {
        const af_op_param *q = &g->p[i];
        if (q->kind == 'a') continue;
        if (q->cfg >= 0) {
            config = 1;
            continue;
        }
        if (given[i] == NULL && (q->flags & AF_OP_ACTIVE) && !(q->flags & AF_OP_OPTIONAL)) {
            PyErr_Format(PyExc_TypeError, "%s() missing required keyword argument '%s'", o->name,
                         q->name);
            return -1;
        }
        if (take_scalar(o, i, given[i]) < 0) return -1;
        int l = q->kind == 'i' ? letter_index(g, q->name) : -1;
        if (l >= 0) o->let[l] = o->iv[i], o->bound |= 1u << l; /* H, P, C, S */
    }
    return config ? take_config(o, given) : 0;
}

/* Every dimension in [1, INT_MAX] (u8 arrays: [0, INT_MAX]): the kernels use int sizes. */
static int check_extent(PyArrayObject *a, const char *name, int allow_empty) {
    for (int d = 0; d < PyArray_NDIM(a); d++) {
        npy_intp n = PyArray_DIM(a, d);
        if (n > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d is too large (%zd)", name, d,
                         (Py_ssize_t)n);
            return -1;
        }
        if (n < 1 && !allow_empty) {
            PyErr_Format(PyExc_ValueError, "%s must be non-empty, dimension %d is 0", name, d);
            return -1;
        }
    }
    if (PyArray_NDIM(a) > 0) return 0;
    PyErr_Format(PyExc_ValueError, "%s must have at least one dimension", name);
    return -1;
}

/* An array updated in place: the caller's own float32 C-contiguous writeable ndarray. */
static PyArrayObject *inplace_array(PyObject *obj, const char *name) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of float32", name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32 (it is updated in place)", name);
        return NULL;
    }
    if (!PyArray_ISCARRAY(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous, aligned and writeable (it is "
                     "updated in place)", name);
        return NULL;
    }
    return (PyArrayObject *)Py_NewRef(obj);
}

/* Labels: uint8 (or bool) holding only 0/1. */
static int check_labels(PyArrayObject *a, const char *name) {
    const uint8_t *p = AF_U8(a);
    for (npy_intp i = 0, n = PyArray_SIZE(a); i < n; i++) {
        if (p[i] > 1) {
            PyErr_Format(PyExc_ValueError, "%s must hold only 0 (normal) and 1 (abnormal), got %d "
                         "at flat index %zd", name, (int)p[i], (Py_ssize_t)i);
            return -1;
        }
    }
    return 0;
}

static PyArrayObject *take_array(const af_op_sig *g, const af_op_param *q, PyObject *obj) {
    PyArrayObject *a;
    int rank = q->same_as >= 0 ? -1 : q->ndim;
    if (q->flags & AF_OP_INPLACE) {
        a = inplace_array(obj, q->name);
        if (a && rank >= 0 && PyArray_NDIM(a) != rank) {
            PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", q->name, rank,
                         PyArray_NDIM(a));
            Py_CLEAR(a);
        }
    } else {
        int type = q->dtype == 'u' ? NPY_UINT8 : NPY_FLOAT32;
        if (q->dtype == 'l')
            type = PyArray_Check(obj) && PyArray_TYPE((PyArrayObject *)obj) == NPY_BOOL
                       ? NPY_BOOL : NPY_UINT8;
        a = af_arg_array(obj, q->name, type, rank);
    }
    if (a == NULL) return NULL;
    int ok = check_extent(a, q->name, q->dtype == 'u') == 0;
    if (ok && q->dtype == 'f' && g->finite) ok = af_check_finite(a, q->name) == 0;
    if (ok && q->dtype == 'l') ok = check_labels(a, q->name) == 0;
    if (!ok) Py_CLEAR(a);
    return a;
}

static int take_arrays(af_op_call *o, PyObject *const *given) {
    const af_op_sig *g = o->sig;
    for (int i = 0; i < g->nparams; i++) {
        const af_op_param *q = &g->p[i];
        if (q->kind != 'a' || given[i] == NULL) continue;
        if (given[i] == Py_None && (q->flags & AF_OP_OPTIONAL)) continue;
        PyArrayObject *a = take_array(g, q, given[i]);
        if (a == NULL) return -1;
        o->arr[q->slot] = a;
        o->ptr[q->slot] = PyArray_DATA(a);
        o->count[q->slot] = (size_t)PyArray_SIZE(a);
        o->bytes[q->slot] = (size_t)PyArray_NBYTES(a);
    }
    return 0;
}

/* ------------------------------------------------------------------ sizes */

static void dim_text(const af_op_sig *g, const af_op_dim *d, char *out, size_t cap) {
    int n = d->coef != 1 ? snprintf(out, cap, "%lld", (long long)d->coef) : 0;
    for (int f = 0; f < d->n && n >= 0 && (size_t)n < cap; f++)
        n += snprintf(out + n, cap - (size_t)n, "%s%s", n ? "*" : "", g->letter[d->letter[f]]);
}

/* The value of d with every letter known; -1 when a letter is unknown (*unknown: it),
 * -2 when it overflows. */
static int64_t dim_value(const af_op_call *o, const af_op_dim *d, int *unknown) {
    int64_t v = d->coef;
    *unknown = -1;
    for (int f = 0; f < d->n; f++) {
        int l = d->letter[f];
        if (!(o->bound >> l & 1)) {
            if (*unknown >= 0) return -3; /* two unknown letters */
            *unknown = l;
            continue;
        }
        if (__builtin_mul_overflow(v, o->let[l], &v)) return -2;
    }
    return *unknown >= 0 ? -1 : v;
}

static int check_dims(af_op_call *o, const af_op_param *q) {
    const af_op_sig *g = o->sig;
    PyArrayObject *a = o->arr[q->slot];
    if (q->same_as >= 0) {
        PyArrayObject *ref = o->arr[g->p[q->same_as].slot];
        int nd = PyArray_NDIM(a);
        if (ref == NULL || (nd == PyArray_NDIM(ref) &&
                            PyArray_CompareLists(PyArray_DIMS(a), PyArray_DIMS(ref), nd)))
            return 0;
        PyErr_Format(PyExc_ValueError, "%s must have the same shape as %s", q->name,
                     g->p[q->same_as].name);
        return -1;
    }
    for (int d = 0; d < q->ndim; d++) {
        int64_t have = PyArray_DIM(a, d), factor = q->dim[d].coef;
        int unknown;
        int64_t want = dim_value(o, &q->dim[d], &unknown);
        if (want == have) continue;
        if (want == -1) { /* bind the unknown letter: have / the rest of the product */
            for (int f = 0; f < q->dim[d].n; f++)
                if (q->dim[d].letter[f] != unknown) factor *= o->let[q->dim[d].letter[f]];
            if (factor >= 1 && have % factor == 0) {
                o->let[unknown] = have / factor, o->bound |= 1u << unknown;
                continue;
            }
        }
        char text[48];
        dim_text(g, &q->dim[d], text, sizeof text);
        if (want >= 0) /* a product names its letters: 12 (P*P*C) */
            PyErr_Format(PyExc_ValueError, "%s: dimension %d must be %lld%s%s%s, got %lld",
                         q->name, d, (long long)want, q->dim[d].n > 1 ? " (" : "",
                         q->dim[d].n > 1 ? text : "", q->dim[d].n > 1 ? ")" : "", (long long)have);
        else if (want == -1)
            PyErr_Format(PyExc_ValueError, "%s: dimension %d must be a multiple of %lld (%s), "
                         "got %lld", q->name, d, (long long)factor, text, (long long)have);
        else
            PyErr_Format(want == -2 ? PyExc_ValueError : PyExc_SystemError,
                         "%s: dimension %d must be %s, %s", q->name, d, text,
                         want == -2 ? "which is too large" : "which has two unknown letters");
        return -1;
    }
    return 0;
}

/* Inputs in order, then the gradients (d*) against the sizes the others fixed. */
static int check_sizes(af_op_call *o) {
    const af_op_sig *g = o->sig;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < g->nparams; i++) {
            const af_op_param *q = &g->p[i];
            if (q->kind != 'a' || o->arr[q->slot] == NULL || (q->name[0] == 'd') != pass) continue;
            if (check_dims(o, q) < 0) return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ results */

static int present(const af_op_call *o, const af_op_param *q) {
    if ((q->flags & AF_OP_GPU) && !on_gpu) return 0;
    if (q->cond < 0) return 1;
    return (o->iv[q->cond] != 0) != ((q->flags & AF_OP_UNLESS) != 0);
}

/* The shape of a result or scratch, from the letters or the array it copies. */
static int result_shape(const af_op_call *o, const af_op_param *q, npy_intp *shape, int *ndim) {
    const af_op_sig *g = o->sig;
    if (q->kind == 'l') {
        shape[0] = 1, *ndim = 1;
        return 0;
    }
    if (q->same_as >= 0) {
        const af_op_param *r = &g->p[q->same_as];
        if (o->arr[r->slot] != NULL) {
            *ndim = PyArray_NDIM(o->arr[r->slot]);
            memcpy(shape, PyArray_DIMS(o->arr[r->slot]), sizeof(npy_intp) * (size_t)*ndim);
            return 0;
        }
        q = r; /* not given (timing): the letters of the array it copies */
    }
    *ndim = q->ndim;
    for (int d = 0; d < q->ndim; d++) {
        int unknown;
        int64_t v = dim_value(o, &q->dim[d], &unknown);
        if (v < 0) {
            PyErr_Format(v == -2 ? PyExc_ValueError : PyExc_SystemError, "%s: the size of %s "
                         "(dimension %d) is %s", o->name, q->name, d,
                         v == -2 ? "too large" : "unknown");
            return -1;
        }
        shape[d] = (npy_intp)v;
    }
    return q->ndim >= 0 ? 0 : (PyErr_Format(PyExc_SystemError, "%s: %s has no shape", o->name,
                                            q->name), -1);
}

static int make_results(af_op_call *o) {
    const af_op_sig *g = o->sig;
    for (int i = g->nparams; i < g->n; i++) {
        const af_op_param *q = &g->p[i];
        if (!present(o, q)) continue;
        npy_intp shape[AF_OP_MAX_DIMS];
        int ndim;
        if (result_shape(o, q, shape, &ndim) < 0) return -1;
        int type = q->dtype == 'u' ? NPY_UINT8 : q->dtype == 'd' ? NPY_FLOAT64 : NPY_FLOAT32;
        PyArrayObject *a = NULL;
        size_t count = 1;
        for (int d = 0; d < ndim; d++) count *= (size_t)shape[d];
        if (q->kind != 't' || !on_gpu) { /* GPU scratch lives on the device only */
            if ((a = af_new_array(ndim, shape, type)) == NULL) return -1;
            o->arr[q->slot] = a;
            o->ptr[q->slot] = PyArray_DATA(a);
        }
        o->count[q->slot] = count;
        o->bytes[q->slot] = count * (type == NPY_UINT8 ? 1 : type == NPY_FLOAT64 ? 8 : 4);
        PyArrayObject *src = q->from >= 0 ? o->arr[g->p[q->from].slot] : NULL;
        if (src != NULL) memcpy(PyArray_DATA(a), PyArray_DATA(src), o->bytes[q->slot]);
    }
    return 0;
}

static PyObject *build_result(const af_op_call *o) {
    const af_op_sig *g = o->sig;
    PyObject *item[AF_OP_MAX_SLOTS];
    int n = 0;
    for (int i = g->nparams; i < g->n; i++) {
        const af_op_param *q = &g->p[i];
        if (q->kind == 't') continue;
        PyArrayObject *a = o->arr[q->slot];
        if (q->kind == 'l') item[n] = PyFloat_FromDouble((double)*(const float *)PyArray_DATA(a));
        else item[n] = Py_NewRef(a ? (PyObject *)a : Py_None);
        if (item[n] == NULL) {
            while (n-- > 0) Py_DECREF(item[n]);
            return NULL;
        }
        n++;
    }
    if (n == 0) Py_RETURN_NONE;
    if (n == 1 && !g->tuple) return item[0];
    PyObject *t = PyTuple_New(n);
    for (int k = 0; k < n; k++) {
        if (t) PyTuple_SET_ITEM(t, k, item[k]); /* steals */
        else Py_DECREF(item[k]);
    }
    return t;
}

/* ------------------------------------------------------------------ running */

#ifdef AFIRE_HAVE_CUDA
static af_cuda_context *g_ctx;
static int g_busy;

af_cuda_context *af_op_context(void) {
    if (g_ctx == NULL) {
        af_status st = af_cuda_context_create(&g_ctx, 0, 0);
        if (st != AF_OK) {
            g_ctx = NULL;
            af_raise(st);
        }
    }
    return g_ctx;
}

af_cuda_context *af_op_context_acquire(void) {
    af_cuda_context *ctx = af_op_context();
    if (ctx == NULL) return NULL;
    if (g_busy) {
        af_raise(af_error(AF_EBUSY, "the CUDA test context is in use by another thread"));
        return NULL;
    }
    g_busy = 1;
    return ctx;
}

void af_op_context_release(void) { g_busy = 0; }

typedef struct {
    af_op_fn fn;
    const af_op_call *o;
} job_t;

static af_status run_job(af_cuda_context *ctx, void *const *dev, const void *user) {
    const job_t *j = (const job_t *)user;
    return j->fn(ctx, dev, j->o);
}

/* Upload, run, download on the shared context. */
static af_status run(const af_op_row *row, const af_op_call *o) {
    const af_op_sig *g = o->sig;
    af_cuda_buf buf[AF_OP_MAX_SLOTS];
    for (int i = 0; i < g->n; i++) {
        const af_op_param *q = &g->p[i];
        if (q->slot < 0) continue;
        af_cuda_buf *b = &buf[q->slot];
        b->host = o->ptr[q->slot], b->bytes = o->bytes[q->slot];
        if (q->kind == 'a') b->role = q->flags & AF_OP_INPLACE ? AF_CUDA_INOUT : AF_CUDA_IN;
        else if (q->kind == 't') b->role = AF_CUDA_SCRATCH;
        else b->role = q->from >= 0 && o->arr[g->p[q->from].slot] ? AF_CUDA_INOUT : AF_CUDA_OUT;
    }
    af_cuda_context *ctx = af_op_context_acquire();
    if (ctx == NULL) return AF_EINTERNAL; /* exception set */
    job_t job = {row->run, o};
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_run_host(ctx, g->nslots, buf, run_job, &job);
    Py_END_ALLOW_THREADS
    af_op_context_release();
    return st == AF_OK ? AF_OK : (af_raise(st), st);
}
#else
static af_status run(const af_op_row *row, const af_op_call *o) {
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = row->run(NULL, o->ptr, o);
    Py_END_ALLOW_THREADS
    return st == AF_OK ? AF_OK : (af_raise(st), st);
}
#endif

PyObject *af_op_call_py(const af_op_row *row, const af_op_sig *g, PyObject *args, PyObject *kw) {
    af_op_call o;
    memset(&o, 0, sizeof o);
    o.sig = g, o.name = row->name;
    PyObject *obj[AF_OP_MAX_PARAMS] = {NULL}, *given[AF_OP_MAX_PARAMS] = {NULL}, *res = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, g->format, (char **)g->kwlist, &obj[0], &obj[1],
                                     &obj[2], &obj[3], &obj[4], &obj[5], &obj[6], &obj[7],
                                     &obj[8], &obj[9], &obj[10], &obj[11], &obj[12], &obj[13],
                                     &obj[14], &obj[15]))
        return NULL;
    for (int k = 0; g->kwlist[k] != NULL; k++) given[g->active[k]] = obj[k];
    if (take_scalars(&o, given) < 0 || take_arrays(&o, given) < 0 || check_sizes(&o) < 0)
        goto done;
    if ((row->check && row->check(&o) < 0) || make_results(&o) < 0) goto done;
    if (!o.skip && run(row, &o) != AF_OK) goto done;
    res = build_result(&o);
done:
    for (int s = 0; s < AF_OP_MAX_SLOTS; s++) Py_XDECREF(o.arr[s]);
    return res;
}

/* ------------------------------------------------------------------ registration */

static int has_twin(const af_op_row *row) { return strcmp(row->cuda_call, "NONE") != 0; }

int af_op_register(PyObject *m, const char *module) {
    PyObject *modname = PyModule_GetNameObject(m);
    if (modname == NULL) return -1;
    int rc = 0;
    for (int i = 0; i < af_op_nrows && rc == 0; i++) {
        const af_op_row *row = &af_op_rows[i];
        if (module ? strcmp(row->module, module) != 0 : !has_twin(row)) continue;
        rc = -1;
        if (parse(&af_op_sigs[i], row) < 0 || check_names(&af_op_sigs[i], row) < 0) break;
        af_op_defs[i].ml_doc = af_op_sigs[i].doc;
        PyObject *f = PyCFunction_NewEx(&af_op_defs[i], m, modname);
        if (f == NULL) break;
        rc = PyModule_AddObjectRef(m, row->name, f);
        Py_DECREF(f);
    }
    Py_DECREF(modname);
    return rc;
}

/* ------------------------------------------------------------------ GPU timing */

#ifdef AFIRE_HAVE_CUDA
/* A call of `row` whose sizes come from names[k] = values[k] (letters and scalars). 0, or -1
 * with an exception set. */
static int time_call(const af_op_row *row, const af_op_sig *g, af_op_call *o,
                     const char *const *names, const int64_t *values, int n) {
    memset(o, 0, sizeof *o);
    o->sig = g, o->name = row->name;
    for (int i = 0; i < g->nparams; i++) o->iv[i] = (int64_t)g->p[i].def, o->fv[i] = g->p[i].def;
    for (int k = 0; k < n; k++) {
        int l = letter_index(g, names[k]), i = find(g, names[k], g->nparams);
        if (l >= 0) o->let[l] = values[k], o->bound |= 1u << l;
        if (i >= 0) o->iv[i] = values[k];
    }
    for (int i = 0; i < g->n; i++) {
        const af_op_param *q = &g->p[i];
        if (q->slot < 0 || (i >= g->nparams && !present(o, q))) continue;
        npy_intp shape[AF_OP_MAX_DIMS];
        int ndim;
        if (result_shape(o, q, shape, &ndim) < 0) return -1;
        size_t count = 1;
        for (int d = 0; d < ndim; d++) count *= (size_t)shape[d];
        o->count[q->slot] = count, o->bytes[q->slot] = count * sizeof(float);
    }
    return 0;
}

/* Device buffers for every array of a timed call: inputs uniform in [-1, 1), the rest 0. */
static af_status time_buffers(af_cuda_context *ctx, const af_op_call *o, void **dev) {
    const af_op_sig *g = o->sig;
    for (int i = 0; i < g->n; i++) {
        const af_op_param *q = &g->p[i];
        if (q->slot < 0 || o->count[q->slot] == 0) continue;
        size_t count = o->count[q->slot];
        af_status st = af_cuda_malloc(ctx, (float **)&dev[q->slot], count);
        float *buf = (float *)dev[q->slot];
        if (st == AF_OK)
            st = q->kind == 'a' ? af_cuda_fill_uniform(ctx, buf, count, (uint64_t)i)
                                : af_cuda_zero(ctx, buf, count);
        if (st != AF_OK) return st;
    }
    return AF_OK;
}

static int row_index(const char *name) {
    for (int i = 0; i < af_op_nrows; i++)
        if (strcmp(af_op_rows[i].name, name) == 0 && has_twin(&af_op_rows[i])) return i;
    return -1;
}

PyObject *af_op_time_pair(const char *fwd, const char *bwd, const char *const *names,
                          const int64_t *values, int n, int warmup, int iters, int tf32) {
    int row[2] = {row_index(fwd), row_index(bwd)};
    af_op_call o[2];
    if (row[0] < 0 || row[1] < 0) {
        PyErr_Format(PyExc_SystemError, "time: no GPU op %s / %s", fwd, bwd);
        return NULL;
    }
    for (int k = 0; k < 2; k++)
        if (time_call(&af_op_rows[row[k]], &af_op_sigs[row[k]], &o[k], names, values, n) < 0)
            return NULL;
    af_cuda_context *ctx = af_op_context_acquire();
    if (ctx == NULL) return NULL;
    void *dev[2][AF_OP_MAX_SLOTS] = {{NULL}};
    float ms[2] = {0.0f, 0.0f};
    af_status st;
    Py_BEGIN_ALLOW_THREADS
    st = af_cuda_context_set_tf32(ctx, tf32);
    for (int k = 0; k < 2 && st == AF_OK; k++) {
        job_t job = {af_op_rows[row[k]].run, &o[k]};
        st = time_buffers(ctx, &o[k], dev[k]);
        if (st == AF_OK) st = af_cuda_time(ctx, run_job, dev[k], &job, warmup, iters, &ms[k]);
    }
    af_cuda_synchronize(ctx);
    for (int k = 0; k < 2; k++)
        for (int s = 0; s < AF_OP_MAX_SLOTS; s++) af_cuda_free((float *)dev[k][s]);
    af_status st_reset = af_cuda_context_set_tf32(ctx, 0); /* back to the exact check path */
    if (st == AF_OK) st = st_reset;
    Py_END_ALLOW_THREADS
    af_op_context_release();
    if (st != AF_OK) return af_raise(st);
    return Py_BuildValue("{s:d,s:d}", "forward_ms", (double)ms[0], "backward_ms", (double)ms[1]);
}
#endif

/* ------------------------------------------------------------------ SLM config */

int af_conv_u64(PyObject *obj, void *out) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return 0;
    *(uint64_t *)out = (uint64_t)v;
    return 1;
}

int af_slm_config_finish(af_slm_config *c, const char *tok, const char *reg) {
    if (tok == NULL || strcmp(tok, "paper") == 0) c->token_rule = AF_SLM_TOKENS_MEAN;
    else if (strcmp(tok, "released") == 0) c->token_rule = AF_SLM_TOKENS_ANY;
    else {
        PyErr_Format(PyExc_ValueError, "token_rule must be 'paper' or 'released', got '%s'", tok);
        return -1;
    }
    if (reg == NULL || strcmp(reg, "random") == 0) c->region_rule = AF_SLM_REGION_RANDOM;
    else if (strcmp(reg, "largest") == 0) c->region_rule = AF_SLM_REGION_LARGEST;
    else {
        PyErr_Format(PyExc_ValueError, "region_rule must be 'random' or 'largest', got '%s'", reg);
        return -1;
    }
    af_status st = af_slm_config_check(c);
    if (st != AF_OK) {
        af_raise(st);
        return -1;
    }
    return 0;
}
