/* Synthetic Lesion Masks (METHOD.md section 1; paper Eq. 2-4).
 *
 * Dimension letters as afire.h; patch tokens in row-major grid order.
 * Images are uint8 grayscale x[B,S,S] (NORMAL images); outputs are
 *   x_prime[B,S,S] = clip(x + M, 0, 255)            (x' == x wherever M == 0)
 *   mask[B,S,S]    = M, the saturated sum of the lesions
 *   token_labels[B,L] in {0,1} (1 = abnormal token)
 *
 * A mask depends only on (seed, step, global image index) and the image itself: every draw
 * for image i comes from the Philox stream af_stream(AF_RNG_SLM, step, i), at fixed slots
 * (see slm.c), so it does not depend on the batch composition or the thread count.
 *
 * Rules this implementation defines (all documented here, tested in tests/test_slm.py):
 *  - Otsu: class 0 = values <= t, foreground = values > t; t maximises the between-class
 *    variance over the 256-bin histogram; ties go to the smallest t; an image with fewer
 *    than two distinct values (no split) gets t = its maximum value (empty foreground).
 *  - Texture eta (AF_SLM_REGION_RANDOM, default): a crop_max x crop_max box centred on a
 *    uniformly random foreground pixel (box [c - crop_max/2, c - crop_max/2 + crop_max)
 *    clipped to the image), a fresh one per lesion (Eq. 4 has one eta^r per lesion).
 *    Empty foreground (constant image): the whole image stands in for the foreground.
 *    AF_SLM_REGION_LARGEST (released code): the largest 8-connected foreground component
 *    (pixel count; ties: the one met first in row-major order), the box is centred on the
 *    centre of its bounding box; the same eta for every lesion of the image.
 *  - Lesion sizes: LW, LH ~ U{lo..hi} with hi = min(size_max, S), lo = min(size_min,
 *    max(1, S/2), hi): for S >= 2*size_min and S >= size_max the configured range is used
 *    unchanged (S = 224 with [16,64] or [16,128]); smaller images get a clamped range, so a
 *    lesion always fits inside the image. Top-left x0 ~ U{0..S-LW}, y0 ~ U{0..S-LH}.
 *  - Shape (Eq. 2-3): on the LW x LH box, with pixel centres u = (w + 0.5 - LW/2) / (LW/2),
 *    v = (h + 0.5 - LH/2) / (LH/2), delta = exp(-(u^2 + v^2) / gamma2), min-max rescaled over
 *    the box to [0, strength] (a constant box, LW = LH = 1, gets strength everywhere).
 *  - Lesion value = bilinear(eta -> LW x LH, half-pixel centres, edge clamped) * delta,
 *    rounded half up to an integer; lesions add into M with saturation at 255.
 *  - Token labels: AF_SLM_TOKENS_MEAN (paper, default) patch j is abnormal iff
 *    mean(M over patch j) > mean(M over the image), compared exactly in integers (an image
 *    with M == 0 has no abnormal token); AF_SLM_TOKENS_ANY (released) iff any pixel of the
 *    patch is nonzero.
 */
#ifndef AFIRE_SLM_H
#define AFIRE_SLM_H

#include <stddef.h>
#include <stdint.h>

#include "afire.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { AF_SLM_TOKENS_MEAN = 0, AF_SLM_TOKENS_ANY = 1 };
enum { AF_SLM_REGION_RANDOM = 0, AF_SLM_REGION_LARGEST = 1 };
#define AF_SLM_MAX_LESIONS 64
#define AF_SLM_MAX_SIDE 32768 /* pixel indices of an image fit in int32 */

typedef struct {
    int lesions_min, lesions_max; /* R ~ U{lesions_min..lesions_max}        (1, 4)    */
    int size_min, size_max;       /* LW, LH ~ U{size_min..size_max} at S=224 (16, 64) */
    int crop_max;                 /* side of the texture crop eta           (60)      */
    float gamma2;                 /* gamma^2 of Eq. 2                       (0.5)     */
    float strength;               /* max of the rescaled fall-off           (0.5)     */
    int token_rule;               /* AF_SLM_TOKENS_*                        (MEAN)    */
    int region_rule;              /* AF_SLM_REGION_*                        (RANDOM)  */
} af_slm_config;

/* One drawn lesion: the box [y0, y0+h) x [x0, x0+w) of M, and its texture crop of x. */
typedef struct {
    int x0, y0, w, h;
    int crop_x0, crop_y0, crop_w, crop_h;
} af_slm_lesion;

af_slm_config af_slm_config_default(void);

/* AF_EINVAL with a message naming the field when a config value is out of range:
 * 0 <= lesions_min <= lesions_max <= AF_SLM_MAX_LESIONS, 1 <= size_min <= size_max,
 * crop_max >= 1, gamma2 > 0 finite, 0 <= strength <= 1, known rules. */
af_status af_slm_config_check(const af_slm_config *cfg);

/* The effective lesion-size range for image side S (rule above). */
void af_slm_size_range(int S, const af_slm_config *cfg, int *lo, int *hi);

/* Otsu threshold of img[n] (rule above). n <= 0 gives 255. */
int af_otsu_threshold(const uint8_t *img, int n);

/* Ints of scratch af_slm_lesions needs for one image: 0 for AF_SLM_REGION_RANDOM,
 * 2*S*S for AF_SLM_REGION_LARGEST. */
size_t af_slm_workspace_ints(int S, const af_slm_config *cfg);

/* The lesions drawn for one image x[S,S] with global index image_index: writes *count
 * (<= AF_SLM_MAX_LESIONS) entries to out. `workspace` holds af_slm_workspace_ints() ints
 * (may be NULL when that is 0). */
af_status af_slm_lesions(af_slm_lesion *out, int *count, const uint8_t *x, int S,
                      const af_slm_config *cfg, uint64_t seed, uint64_t step,
                      uint64_t image_index, int32_t *workspace);

/* The full SLM for a batch; image b has global index first_image_index + b.
 * Requires S % P == 0. Parallel over images (OpenMP). Allocates nothing for
 * AF_SLM_REGION_RANDOM; AF_SLM_REGION_LARGEST allocates one workspace per thread per call. */
af_status af_slm_generate(uint8_t *x_prime, uint8_t *mask, uint8_t *token_labels, const uint8_t *x,
                       int B, int S, int P, const af_slm_config *cfg, uint64_t seed,
                       uint64_t step, uint64_t first_image_index);

#ifdef __cplusplus
}
#endif
#endif
