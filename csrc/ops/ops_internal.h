/* Private helpers shared by the files of csrc/ops (not part of the kernel contract). */
#ifndef AFIRE_OPS_INTERNAL_H
#define AFIRE_OPS_INTERNAL_H

#include <stddef.h>

/* Elementwise loops below this many elements stay on one thread: forking costs more. */
#define AF_OMP_MIN_ELEMS ((size_t)1 << 15)
/* Row loops: parallel when rows * cols reaches the same amount of work. */
#define AF_OMP_ROWS(N, C) ((size_t)(N) * (size_t)(C) >= AF_OMP_MIN_ELEMS)

/* wn_linear_backward's dv without a K x C buffer (used when that allocation fails;
 * exposed to the binding as _wn_linear_backward_dv_lowmem so tests can reach it). */
void wn_linear_backward_dv_lowmem(float *dv, const float *dout, const float *inp,
                                  const float *w_eff, const float *vnorm, int N, int C, int K);

#endif
