/* Private helpers shared by the files of csrc/ops (not part of the kernel contract). */
#ifndef AFIRE_OPS_INTERNAL_H
#define AFIRE_OPS_INTERNAL_H

#include <stddef.h>

#include "ops.h"

/* Elementwise loops below this many elements stay on one thread: forking costs more. */
#define AF_OMP_MIN_ELEMS ((size_t)1 << 15)
/* Row loops: parallel when rows * cols reaches the same amount of work. */
#define AF_OMP_ROWS(N, C) ((size_t)(N) * (size_t)(C) >= AF_OMP_MIN_ELEMS)
/* GEMMs below this many multiply-adds run on the calling thread. */
#define AF_GEMM_MIN_PAR_MACS (1 << 18)

/* Pin afire's private OpenBLAS to one thread (call outside parallel regions). */
void af_blas_single_thread(void);
/* [lo, hi) = part idx of `parts` of [0, n), boundaries on multiples of `align`. */
void af_chunk(int n, int parts, int idx, int align, int *lo, int *hi);

/* wn_linear_backward's dv without a K x C buffer (used when that allocation fails;
 * exposed to the binding as _wn_linear_backward_dv_lowmem so tests can reach it). */
void wn_linear_backward_dv_lowmem(float *dv, const float *dout, const float *inp,
                                  const float *w_eff, const float *vnorm, int N, int C, int K);

#endif
