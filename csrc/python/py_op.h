/* Op-level bindings generated from one table (py_op_table.c). Every kernel that tests and
 * benchmarks call from Python -- the layer ops, the objective, slm_generate -- is one row
 *
 *     X(module, name, signature, check, cpu_call, cuda_call)
 *
 * and py_op_table.c is compiled into both extensions: afire._C registers each row as
 * afire._C.<module>.<name> running cpu_call; afire._C_cuda registers it as
 * afire._C_cuda.cuda.<name> running cuda_call on device copies of the arrays (one shared
 * context, device 0, exact fp32 GEMMs; every call uploads, runs and downloads: for tests and
 * small jobs). One checker reads the Python arguments against the signature, so the twins
 * take the same arguments and raise the same exception with the same message for the same
 * bad input: TypeError for a dtype, ValueError naming the argument for a shape or value.
 *
 * Signature language (the docstring shows it; `params -> results using scratch`):
 *   inp[N,C]            a float32 array of rank 2, copied when not C-contiguous; every use
 *                       of a letter must agree. A dimension may be a product of letters and
 *                       integers: qkv[B,T,3*D] binds D to a third of the last dimension.
 *   x[...]  dout[inp]   any rank / exactly the shape of array `inp`
 *   bias[OC]=None       an optional array (None passes NULL to the kernel)
 *   params[...]!        updated in place: must already be a float32, C-contiguous, aligned,
 *                       writeable ndarray (a copy would lose the update)
 *   :u8  :labels  :f64  uint8 (may be empty) / uint8 or bool holding 0 and 1 / float64
 *   H:int>0  iters:int>=0=3  order:int=0  has_bias:bool=True  seed:u64  eps:float>=0=1e-6
 *   tau:float>0=0.1  m:float[0,1]=0.75  beta1:float[0,1)=0.9  w:float=1 (finite)
 *                       scalars with their range and default; an int scalar named like a
 *                       letter binds it (the patch sizes C, S, P, the heads H)
 *   *                   the rest are keyword-only; a keyword-only scalar with no default is
 *                       required
 *   **config            the SLM config keywords (AF_SLM_CFG_*, defaults from slm.h)
 *   @x                  only in the GPU twin (its extra keywords, its scratch); the CPU twin
 *                       acts as if x had its default
 * Results, zero-filled (a kernel that accumulates gives the plain gradient): `out[N,OC]` is
 * returned alone, `(a, b)` as a tuple (even of one), `None` for in-place ops; `loss:float` is one
 * float returned as a Python float; `dbias[OC] if has_bias`, `ds_cate[s] unless combined`
 * are None when the bool says so; `ds_stru[s] from ds` starts as a copy of ds when given.
 * `using datt[att]`: zero-filled scratch, not returned.
 *
 * Order of the checks: the Python arguments, scalars, every array's dtype and rank (and its
 * values: finite floats in afire._C.objective, 0/1 labels), then the sizes: arrays in
 * signature order, except gradients (inputs named d*), which are checked last against the
 * sizes the other inputs fix; then the row's `check` hook (value checks, derived letters such
 * as L = (S/P)^2, scratch sizes), then the outputs are allocated.
 */
#ifndef AFIRE_PY_OP_H
#define AFIRE_PY_OP_H

#include "py_util.h" /* Python.h first */
#include "slm.h"

#ifdef AFIRE_HAVE_CUDA
#include "cuda_api.h"
#define AF_BACKEND(cpu, cuda) cuda
#else
#define AF_BACKEND(cpu, cuda) cpu
#endif

#define AF_OP_MAX_PARAMS 16  /* Python arguments of one function */
#define AF_OP_MAX_SLOTS 12   /* arrays: inputs, outputs, scratch (AF_CUDA_MAX_ARGS) */
#define AF_OP_MAX_LETTERS 12
#define AF_OP_MAX_DIMS 4
#define AF_OP_MAX_FACTORS 4

/* One dimension: coef * letter[0] * letter[1] ... (letter: an index into af_op_sig.letter). */
typedef struct {
    int64_t coef;
    int8_t n, letter[AF_OP_MAX_FACTORS];
} af_op_dim;

/* One parameter or result of a signature. */
typedef struct {
    char name[24];
    char kind;         /* 'a' array, 'i' int, 'f' float, 'b' bool, 'u' u64, 's' str;
                          results: 'o' array, 'l' loss; 't' scratch */
    char dtype;        /* arrays: 'f' float32, 'u' uint8, 'l' labels, 'd' float64 */
    char range;        /* scalars: '+' > 0, '0' >= 0, ']' [0,1], ')' [0,1), 0 none */
    uint8_t flags;     /* AF_OP_* below */
    int8_t ndim;       /* arrays: -1 any rank */
    int8_t same_as;    /* arrays: index (in af_op_sig.p) of the array whose shape it has */
    int8_t from, cond; /* results: the array it starts as / the bool that decides it, or -1 */
    int8_t slot;       /* arrays: index into the pointer list an adapter reads */
    int8_t cfg;        /* **config keywords: index in AF_SLM_CFG_KWLIST, else -1 */
    af_op_dim dim[AF_OP_MAX_DIMS];
    double def;        /* scalar default */
} af_op_param;

enum {
    AF_OP_OPTIONAL = 1, /* has a default (arrays: None) */
    AF_OP_INPLACE = 2,
    AF_OP_GPU = 4,      /* @: only in the GPU twin */
    AF_OP_KWONLY = 8,
    AF_OP_UNLESS = 16,  /* results: `unless` instead of `if` */
    AF_OP_ACTIVE = 32,  /* a Python argument of this build */
};

/* A parsed signature (af_op_register parses every row once). */
typedef struct {
    af_op_param p[AF_OP_MAX_PARAMS + AF_OP_MAX_SLOTS];
    int nparams, n;     /* parameters, then results and scratch up to n */
    int nslots, tuple;  /* tuple: results in parentheses */
    char letter[AF_OP_MAX_LETTERS][8];
    int nletters;
    int finite;         /* float inputs must be finite (afire._C.objective) */
    char format[AF_OP_MAX_PARAMS + 32];
    char *kwlist[AF_OP_MAX_PARAMS + 1];
    int8_t active[AF_OP_MAX_PARAMS]; /* kwlist position -> parameter */
    char doc[1200];
} af_op_sig;

/* One call: what the checker found, what the adapter reads. */
typedef struct af_op_call {
    const af_op_sig *sig;
    const char *name;
    PyArrayObject *arr[AF_OP_MAX_SLOTS]; /* owned; NULL: absent (None, `if`, @ on the CPU) */
    void *ptr[AF_OP_MAX_SLOTS];          /* host data of arr[] */
    size_t count[AF_OP_MAX_SLOTS];       /* elements */
    size_t bytes[AF_OP_MAX_SLOTS];
    int64_t let[AF_OP_MAX_LETTERS];
    uint32_t bound;                      /* bit i: letter i is known */
    int64_t iv[AF_OP_MAX_PARAMS];        /* int and bool scalars */
    double fv[AF_OP_MAX_PARAMS];
    uint64_t uv[AF_OP_MAX_PARAMS];
    af_slm_config cfg;
    int skip;                            /* set by a check hook: nothing to run */
} af_op_call;

/* An adapter runs the kernel: p[] holds host pointers (afire._C, ctx NULL) or device
 * pointers (afire._C_cuda, ctx the af_cuda_context), in slot order. */
typedef af_status (*af_op_fn)(void *ctx, void *const *p, const af_op_call *o);
/* A check hook: 0, or -1 with a Python exception set. */
typedef int (*af_op_check)(af_op_call *o);

typedef struct {
    const char *module, *name, *signature;
    af_op_check check;
    af_op_fn run;
    const char *run_text;  /* this build's call: af_op_register checks the names it uses */
    const char *cuda_call; /* "NONE": no GPU twin, afire._C only */
} af_op_row;

/* What an adapter or a hook reads, by the name the signature gives. */
int af_op_slot(const af_op_call *o, const char *name);     /* array slot */
int64_t af_op_int(const af_op_call *o, const char *name);  /* letter, int or bool */
double af_op_real(const af_op_call *o, const char *name);  /* float scalar */
uint64_t af_op_u64(const af_op_call *o, const char *name);
PyArrayObject *af_op_array(const af_op_call *o, const char *name); /* NULL: absent */
/* Binds letter `name` to v, or checks it against its value: ValueError "<arr>: dimension
 * <axis> must be <value>, got v" on a mismatch. 0/-1. */
int af_op_let(af_op_call *o, const char *name, int64_t v, const char *arr, int axis);

/* The table (py_op_table.c): rows, their parsed signatures and method definitions. */
extern const af_op_row af_op_rows[];
extern af_op_sig af_op_sigs[];
extern PyMethodDef af_op_defs[];
extern const int af_op_nrows;

/* Parses the signatures of the rows of `module` (NULL: every row with a GPU twin), checks the
 * names their calls use, and adds their functions to `m`. 0, or -1 with an exception. */
int af_op_register(PyObject *m, const char *module);
/* The Python entry point of every row. */
PyObject *af_op_call_py(const af_op_row *row, const af_op_sig *sig, PyObject *args,
                        PyObject *kw);

#ifdef AFIRE_HAVE_CUDA
/* The shared context of the host-level GPU entry points, created on first use (NULL with
 * an exception set). acquire marks it busy until release: a second thread gets AF_EBUSY. */
af_cuda_context *af_op_context(void);
af_cuda_context *af_op_context_acquire(void);
void af_op_context_release(void);
/* Mean GPU ms of `fwd` then `bwd` (rows of the table) on device buffers of the sizes that
 * the letters and scalars names[i] = values[i] give: inputs uniform in [-1, 1), outputs and
 * scratch zero. Returns {'forward_ms', 'backward_ms'}. */
PyObject *af_op_time_pair(const char *fwd, const char *bwd, const char *const *names,
                          const int64_t *values, int n, int warmup, int iters, int tf32);
#endif

/* ------------------------------------------------------------------ SLM config
 * The keyword-only config arguments of every SLM function (csrc/core/slm.h states the rules):
 * append AF_SLM_CFG_KWLIST to a kwlist, AF_SLM_CFG_FORMAT to the format and
 * AF_SLM_CFG_ARGS(c, tok, reg) to the outputs, then call af_slm_config_finish. */
#define AF_SLM_CFG_KWLIST "lesions_min", "lesions_max", "size_min", "size_max", "crop_max", \
                          "gamma2", "strength", "token_rule", "region_rule"
#define AF_SLM_CFG_FORMAT "$iiiiiffss"
#define AF_SLM_CFG_ARGS(c, tok, reg) &(c).lesions_min, &(c).lesions_max, &(c).size_min, \
                                     &(c).size_max, &(c).crop_max, &(c).gamma2, &(c).strength, \
                                     &(tok), &(reg)

/* "O&" converter: a Python int in [0, 2**64) into a uint64_t (OverflowError otherwise). */
int af_conv_u64(PyObject *obj, void *out);
/* Rule names (NULL: the default) -> enum values, then af_slm_config_check. 0/-1. */
int af_slm_config_finish(af_slm_config *c, const char *tok, const char *reg);

#endif
