/* Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11, "Random123").
 *
 * A draw is a pure function of (seed, stream, index), so any element of any stream can be
 * computed independently, in any order, on the CPU or on the GPU, and resuming a run at
 * step t reproduces exactly what an uninterrupted run draws. Everything here is
 * header-only and marked AF_HOSTDEV so cuda/ compiles the very same code.
 *
 *   key     = the 64-bit seed (two 32-bit words)
 *   counter = (index_lo, index_hi, stream_lo, stream_hi): element block `index` of `stream`
 *
 * One Philox call yields four 32-bit words; element i of a stream is lane i%4 of block i/4.
 * Callers build `stream` with af_stream(purpose, step, item) so different uses never overlap.
 */
#ifndef AFIRE_RNG_H
#define AFIRE_RNG_H

#include <stdint.h>

#if defined(__CUDACC__)
#define AF_HOSTDEV __host__ __device__ __forceinline__
#else
#define AF_HOSTDEV static inline
#endif

typedef struct {
    uint32_t v[4];
} af_u32x4;

#define AF_PHILOX_M0 0xD2511F53u
#define AF_PHILOX_M1 0xCD9E8D57u
#define AF_PHILOX_W0 0x9E3779B9u /* golden ratio */
#define AF_PHILOX_W1 0xBB67AE85u /* sqrt(3) - 1 */

AF_HOSTDEV af_u32x4 philox4x32_10(af_u32x4 ctr, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)AF_PHILOX_M0 * ctr.v[0];
        uint64_t p1 = (uint64_t)AF_PHILOX_M1 * ctr.v[2];
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        af_u32x4 next;
        next.v[0] = hi1 ^ ctr.v[1] ^ k0;
        next.v[1] = lo1;
        next.v[2] = hi0 ^ ctr.v[3] ^ k1;
        next.v[3] = lo0;
        ctr = next;
        k0 += AF_PHILOX_W0;
        k1 += AF_PHILOX_W1;
    }
    return ctr;
}

/* Purposes of the random streams used by afire (the top byte of a stream id). */
enum {
    AF_RNG_USER = 0,      /* draws requested from Python for testing              */
    AF_RNG_INIT = 1,      /* parameter initialisation (item = parameter tensor id) */
    AF_RNG_SLM = 2,       /* synthetic lesion masks (step, image)                  */
    AF_RNG_SHUFFLE = 3,   /* data order                                            */
    AF_RNG_PHANTOM = 4,   /* synthetic radiographs (subject)                       */
    AF_RNG_AUGMENT = 5    /* downstream augmentation (step, image)                 */
};

/* Stream id: purpose (8 bits) | item (24 bits) | step (32 bits). */
AF_HOSTDEV uint64_t af_stream(uint32_t purpose, uint64_t step, uint32_t item) {
    return ((uint64_t)(purpose & 0xFFu) << 56) | ((uint64_t)(item & 0xFFFFFFu) << 32) |
           (step & 0xFFFFFFFFull);
}

/* The four 32-bit words of block `block` of `stream` under `seed`. */
AF_HOSTDEV af_u32x4 af_rng_block(uint64_t seed, uint64_t stream, uint64_t block) {
    af_u32x4 c;
    c.v[0] = (uint32_t)block;
    c.v[1] = (uint32_t)(block >> 32);
    c.v[2] = (uint32_t)stream;
    c.v[3] = (uint32_t)(stream >> 32);
    return philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
}

/* Element i of a stream as a raw 32-bit word. */
AF_HOSTDEV uint32_t af_rand_u32(uint64_t seed, uint64_t stream, uint64_t i) {
    return af_rng_block(seed, stream, i >> 2).v[i & 3];
}

/* 24 random bits -> float in [0, 1), exactly representable, identical on CPU and GPU. */
AF_HOSTDEV float af_u32_to_unit(uint32_t x) { return (float)(x >> 8) * (1.0f / 16777216.0f); }

/* Element i of a stream, uniform in [0, 1). */
AF_HOSTDEV float af_rand_uniform(uint64_t seed, uint64_t stream, uint64_t i) {
    return af_u32_to_unit(af_rand_u32(seed, stream, i));
}

/* Element i of a stream, uniform integer in [lo, hi] (inclusive; requires lo <= hi).
 * Uses the high half of a 32x32->64 product: bias below 2^-32 * range, no loop, so the
 * GPU draws the same value. */
AF_HOSTDEV int64_t af_rand_int(uint64_t seed, uint64_t stream, uint64_t i, int64_t lo,
                               int64_t hi) {
    uint64_t range = (uint64_t)(hi - lo) + 1u;
    uint32_t x = af_rand_u32(seed, stream, i);
    if (range > 0xFFFFFFFFull) return lo + (int64_t)x; /* ranges wider than 2^32: not used */
    return lo + (int64_t)(((uint64_t)x * range) >> 32);
}

/* Element i of a stream, standard normal, by Box-Muller on lanes (0,1) and (2,3) of the
 * block: element i uses pair (i%4)/2 and takes the cos (even i) or sin (odd i) branch.
 * Computed in double so the CPU and GPU agree to float rounding. */
#if defined(__CUDACC__)
#define AF_LOG log
#define AF_SQRT sqrt
#define AF_COS cos
#define AF_SIN sin
#else
#include <math.h>
#define AF_LOG log
#define AF_SQRT sqrt
#define AF_COS cos
#define AF_SIN sin
#endif
AF_HOSTDEV float af_rand_normal(uint64_t seed, uint64_t stream, uint64_t i) {
    af_u32x4 b = af_rng_block(seed, stream, i >> 2);
    int pair = (int)((i & 3) >> 1);
    uint32_t a = b.v[2 * pair], c = b.v[2 * pair + 1];
    /* u1 in (0, 1] so the log is finite; u2 in [0, 1). */
    double u1 = ((double)(a >> 8) + 1.0) * (1.0 / 16777216.0);
    double u2 = (double)(c >> 8) * (1.0 / 16777216.0);
    double r = AF_SQRT(-2.0 * AF_LOG(u1));
    double t = 6.283185307179586 * u2;
    return (float)((i & 1) ? r * AF_SIN(t) : r * AF_COS(t));
}

#endif
