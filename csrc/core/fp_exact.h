/* Float math that rounds identically on the CPU and on the GPU.
 *
 * The synthetic lesion masks must be bit-identical on both (cuda/slm.cu twins csrc/core/slm.c).
 * Basic IEEE operations (+ - * /, conversions) already agree when nothing contracts a*b+c
 * into an FMA: the C files are built with -std=c11 (GCC: -ffp-contract=off) and the device
 * code spells every such operation with a _rn intrinsic. Library functions do not agree:
 * glibc's expf and CUDA's expf differ in the last bit for a fraction of inputs, which can
 * move a rounded mask value. af_exp_exact is therefore built from basic double operations
 * only, the very same sequence on both sides:
 *   exp(x) = 2^k * e^r,  k = round(x / ln 2),  r = x - k ln2_hi - k ln2_lo,  |r| <= 0.35,
 *   e^r by its Taylor series to degree 13 (truncation < 1e-17 relative), 2^k by ldexp
 * (exact), then one rounding to float. The double result is within a few 1e-16 of exp(x),
 * so the float is the correctly rounded value except for astronomically rare inputs, and
 * always the same on both sides. */
#ifndef AFIRE_FP_EXACT_H
#define AFIRE_FP_EXACT_H

#include <math.h>

#include "rng.h" /* AF_HOSTDEV */

#if defined(__CUDA_ARCH__)
#define AF_DMUL(a, b) __dmul_rn((a), (b))
#define AF_DADD(a, b) __dadd_rn((a), (b))
#else
#define AF_DMUL(a, b) ((a) * (b))
#define AF_DADD(a, b) ((a) + (b))
#endif

/* exp(x) rounded to float; 0 below -110 (exp underflows float there), inf above 100. */
AF_HOSTDEV float af_exp_exact(float x) {
    double xd = (double)x;
    if (xd != xd) return x;
    if (xd < -110.0) return 0.0f;
    if (xd > 100.0) xd = 100.0; /* e^100 is finite in double and inf as a float */
    const double inv_ln2 = 1.4426950408889634;
    const double ln2_hi = 6.93147180369123816490e-01; /* low 32 bits zero: k*ln2_hi exact */
    const double ln2_lo = 1.90821492927058770002e-10;
    double kd = floor(AF_DADD(AF_DMUL(xd, inv_ln2), 0.5));
    double r = AF_DADD(AF_DADD(xd, -AF_DMUL(kd, ln2_hi)), -AF_DMUL(kd, ln2_lo));
    /* 1/n!, n = 13 down to 1 (Horner) */
    double p = 1.6059043836821613e-10;
    p = AF_DADD(AF_DMUL(p, r), 2.08767569878681e-09);
    p = AF_DADD(AF_DMUL(p, r), 2.505210838544172e-08);
    p = AF_DADD(AF_DMUL(p, r), 2.755731922398589e-07);
    p = AF_DADD(AF_DMUL(p, r), 2.7557319223985893e-06);
    p = AF_DADD(AF_DMUL(p, r), 2.48015873015873e-05);
    p = AF_DADD(AF_DMUL(p, r), 0.0001984126984126984);
    p = AF_DADD(AF_DMUL(p, r), 0.001388888888888889);
    p = AF_DADD(AF_DMUL(p, r), 0.008333333333333333);
    p = AF_DADD(AF_DMUL(p, r), 0.041666666666666664);
    p = AF_DADD(AF_DMUL(p, r), 0.16666666666666666);
    p = AF_DADD(AF_DMUL(p, r), 0.5);
    p = AF_DADD(AF_DMUL(p, r), 1.0);
    p = AF_DADD(AF_DMUL(p, r), 1.0);
    return (float)ldexp(p, (int)kd);
}

#endif
