/* Fine-tuning augmentation (METHOD §6): random resized crop, horizontal flip, small
 * rotation, one geometry per image from the counter-based RNG so a step is reproducible
 * on resume and masks move exactly with their images. */
#include <math.h>

#include "common.h"
#include "downstream.h"
#include "rng.h"

#define CROP_TRIES 10 /* torchvision RandomResizedCrop: 10 tries, then a central crop */

/* Element indices inside an image's stream: try a uses 4a .. 4a+3, then flip and angle. */
enum { IDX_FLIP = 4 * CROP_TRIES, IDX_ANGLE = IDX_FLIP + 1 };

af_augment_config af_augment_default(void) {
    af_augment_config a = {0.8f, 1.0f, 0.75f, 4.0f / 3.0f, 1, 10.0f};
    return a;
}

af_status af_augment_check(const af_augment_config *a) {
    AF_CHECK(a != NULL, AF_EINVAL, "augment: config is NULL");
    AF_CHECK(a->scale_lo > 0.0f && a->scale_lo <= a->scale_hi && a->scale_hi <= 1.0f, AF_EINVAL,
             "crop_scale must satisfy 0 < lo <= hi <= 1, got (%g, %g)", (double)a->scale_lo,
             (double)a->scale_hi);
    AF_CHECK(a->ratio_lo > 0.0f && a->ratio_lo <= a->ratio_hi && isfinite(a->ratio_hi), AF_EINVAL,
             "crop_ratio must satisfy 0 < lo <= hi, got (%g, %g)", (double)a->ratio_lo,
             (double)a->ratio_hi);
    AF_CHECK(a->max_rotation >= 0.0f && a->max_rotation < 180.0f, AF_EINVAL,
             "max_rotation must be in [0, 180) degrees, got %g", (double)a->max_rotation);
    return AF_OK;
}

typedef struct {
    int top, left, h, w; /* crop box inside the source image */
    int flip;
    double cos_t, sin_t;
} geometry;

/* torchvision's RandomResizedCrop.get_params with our draws: area fraction uniform in
 * scale, log aspect ratio uniform, integer box; after 10 misses the whole image (its
 * aspect ratio clamped to the range) centred. */
static geometry draw_geometry(uint64_t seed, uint64_t stream, int S, const af_augment_config *a) {
    geometry g = {0, 0, S, S, 0, 1.0, 0.0};
    double area = (double)S * S, lr0 = log((double)a->ratio_lo), lr1 = log((double)a->ratio_hi);
    int found = 0;
    for (int t = 0; t < CROP_TRIES && !found; t++) {
        double u0 = af_rand_uniform(seed, stream, 4 * t), u1 = af_rand_uniform(seed, stream, 4 * t + 1);
        double target = area * (a->scale_lo + u0 * (a->scale_hi - a->scale_lo));
        double ratio = exp(lr0 + u1 * (lr1 - lr0));
        int w = (int)lround(sqrt(target * ratio)), h = (int)lround(sqrt(target / ratio));
        if (w > 0 && w <= S && h > 0 && h <= S) {
            g.h = h, g.w = w;
            g.top = (int)af_rand_int(seed, stream, 4 * t + 2, 0, S - h);
            g.left = (int)af_rand_int(seed, stream, 4 * t + 3, 0, S - w);
            found = 1;
        }
    }
    if (!found) { /* square source: in_ratio = 1 */
        if (1.0 < a->ratio_lo) g.w = S, g.h = (int)lround(S / (double)a->ratio_lo);
        else if (1.0 > a->ratio_hi) g.h = S, g.w = (int)lround(S * (double)a->ratio_hi);
        g.top = (S - g.h) / 2, g.left = (S - g.w) / 2;
    }
    g.flip = a->flip && af_rand_uniform(seed, stream, IDX_FLIP) < 0.5f;
    if (a->max_rotation > 0.0f) {
        double deg = (2.0 * af_rand_uniform(seed, stream, IDX_ANGLE) - 1.0) * a->max_rotation;
        double rad = deg * 3.14159265358979323846 / 180.0;
        g.cos_t = cos(rad), g.sin_t = sin(rad);
    }
    return g;
}

static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* One image (and mask): for every output pixel, invert rotation -> flip -> resize. */
static void warp_one(uint8_t *out, uint8_t *out_mask, const uint8_t *img, const uint8_t *mask,
                     int S, const geometry *g) {
    double c = 0.5 * (S - 1), sx = (double)g->w / S, sy = (double)g->h / S;
    for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++) {
            size_t o = (size_t)y * S + x;
            /* rotation about the centre (inverse map) */
            double xr = g->cos_t * (x - c) + g->sin_t * (y - c) + c;
            double yr = -g->sin_t * (x - c) + g->cos_t * (y - c) + c;
            if (xr < -0.5 || xr > S - 0.5 || yr < -0.5 || yr > S - 0.5) {
                out[o] = 0;
                if (out_mask) out_mask[o] = 0;
                continue;
            }
            if (g->flip) xr = (S - 1) - xr;
            /* crop, then resize the box to S x S with half-pixel centres (align_corners=
             * False), the box's edge pixels repeated beyond it: torchvision's resized_crop */
            double xs = (xr + 0.5) * sx - 0.5, ys = (yr + 0.5) * sy - 0.5;
            double xc = xs < 0 ? 0 : xs > g->w - 1 ? g->w - 1 : xs;
            double yc = ys < 0 ? 0 : ys > g->h - 1 ? g->h - 1 : ys;
            int x0 = (int)xc, y0 = (int)yc;
            int x1 = x0 + 1 < g->w ? x0 + 1 : g->w - 1, y1 = y0 + 1 < g->h ? y0 + 1 : g->h - 1;
            double fx = xc - x0, fy = yc - y0;
            x0 += g->left, x1 += g->left, y0 += g->top, y1 += g->top;
            const uint8_t *r0 = img + (size_t)y0 * S, *r1 = img + (size_t)y1 * S;
            double v = (1 - fy) * ((1 - fx) * r0[x0] + fx * r0[x1]) +
                       fy * ((1 - fx) * r1[x0] + fx * r1[x1]);
            out[o] = (uint8_t)(v + 0.5);
            if (out_mask) {
                int xn = g->left + clampi((int)floor(xs + 0.5), 0, g->w - 1);
                int yn = g->top + clampi((int)floor(ys + 0.5), 0, g->h - 1);
                out_mask[o] = mask[(size_t)yn * S + xn];
            }
        }
}

af_status af_augment(uint8_t *out, uint8_t *out_mask, const uint8_t *img, const uint8_t *mask,
                     int B, int S, uint64_t seed, int64_t step, const af_augment_config *a) {
    AF_TRY(af_augment_check(a));
    AF_CHECK(out != NULL && img != NULL, AF_EINVAL, "augment: NULL image buffer");
    AF_CHECK((mask == NULL) == (out_mask == NULL), AF_EINVAL, "augment: mask and out_mask must "
             "both be given or both be NULL");
    AF_CHECK(B >= 0 && S >= 1, AF_EINVAL, "augment: bad sizes B=%d S=%d", B, S);
    AF_CHECK(step >= 0, AF_EINVAL, "augment: step must be >= 0");
    size_t SS = (size_t)S * S;
    #pragma omp parallel for schedule(static) if ((size_t)B * SS >= (1u << 16))
    for (int b = 0; b < B; b++) {
        uint64_t stream = af_stream(AF_RNG_AUGMENT, (uint64_t)step, (uint32_t)b);
        geometry g = draw_geometry(seed, stream, S, a);
        warp_one(out + b * SS, out_mask ? out_mask + b * SS : NULL, img + b * SS,
                 mask ? mask + b * SS : NULL, S, &g);
    }
    return AF_OK;
}
