/* Synthetic Lesion Masks on the CPU. The rules are stated once in slm.h.
 *
 * Random draws of image i, all from stream af_stream(AF_RNG_SLM, step, i) (the stream keeps
 * the low 32 bits of step and the low 24 bits of i):
 *   slot 0            R, the number of lesions
 *   slot 1 + 8r + 0   LW of lesion r         slot 1 + 8r + 2   x0 of lesion r
 *   slot 1 + 8r + 1   LH of lesion r         slot 1 + 8r + 3   y0 of lesion r
 *   slot 1 + 8r + 4   the foreground pixel the texture crop of lesion r is centred on
 * Fixed slots: lesion r draws the same numbers whatever R is, and the slots 5..7 of each
 * lesion are left free for later additions without changing existing masks.
 */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "fp_exact.h"
#include "rng.h"
#include "slm.h"

#define SLOT_R 0
#define SLOT_LESION(r, k) (1u + 8u * (uint64_t)(r) + (k))

af_slm_config af_slm_config_default(void) {
    af_slm_config c;
    c.lesions_min = 1;
    c.lesions_max = 4;
    c.size_min = 16; /* paper; the released code uses [16, 128] */
    c.size_max = 64;
    c.crop_max = 60;
    c.gamma2 = 0.5f;
    c.strength = 0.5f;
    c.token_rule = AF_SLM_TOKENS_MEAN;
    c.region_rule = AF_SLM_REGION_RANDOM;
    return c;
}

af_status af_slm_config_check(const af_slm_config *c) {
    AF_CHECK(c != NULL, AF_EINVAL, "slm: config is NULL");
    AF_CHECK(c->lesions_min >= 0 && c->lesions_min <= c->lesions_max &&
                 c->lesions_max <= AF_SLM_MAX_LESIONS,
             AF_EINVAL, "slm: need 0 <= lesions_min <= lesions_max <= %d, got [%d, %d]",
             AF_SLM_MAX_LESIONS, c->lesions_min, c->lesions_max);
    AF_CHECK(c->size_min >= 1 && c->size_min <= c->size_max, AF_EINVAL,
             "slm: need 1 <= size_min <= size_max, got [%d, %d]", c->size_min, c->size_max);
    AF_CHECK(c->crop_max >= 1, AF_EINVAL, "slm: crop_max must be >= 1, got %d", c->crop_max);
    AF_CHECK(isfinite(c->gamma2) && c->gamma2 > 0.0f, AF_EINVAL,
             "slm: gamma2 must be finite and > 0, got %g", (double)c->gamma2);
    AF_CHECK(c->strength >= 0.0f && c->strength <= 1.0f, AF_EINVAL,
             "slm: strength must be in [0, 1], got %g", (double)c->strength);
    AF_CHECK(c->token_rule == AF_SLM_TOKENS_MEAN || c->token_rule == AF_SLM_TOKENS_ANY,
             AF_EINVAL, "slm: unknown token_rule %d", c->token_rule);
    AF_CHECK(c->region_rule == AF_SLM_REGION_RANDOM || c->region_rule == AF_SLM_REGION_LARGEST,
             AF_EINVAL, "slm: unknown region_rule %d", c->region_rule);
    return AF_OK;
}

void af_slm_size_range(int S, const af_slm_config *cfg, int *lo, int *hi) {
    int h = cfg->size_max < S ? cfg->size_max : S;
    int half = S / 2 > 1 ? S / 2 : 1;
    int l = cfg->size_min < half ? cfg->size_min : half;
    if (l > h) l = h;
    *lo = l;
    *hi = h;
}

size_t af_slm_workspace_ints(int S, const af_slm_config *cfg) {
    if (cfg->region_rule != AF_SLM_REGION_LARGEST || S <= 0) return 0;
    return 2 * (size_t)S * (size_t)S;
}

/* ------------------------------------------------------------------------------------ */
/* Otsu (1979): maximise w0 w1 (mu0 - mu1)^2. With n0, n1 the class counts and s0, s1 the
 * class sums, n^2 w0 w1 (mu0 - mu1)^2 = (s0 n1 - s1 n0)^2 / (n0 n1); the difference is
 * exact in int64 and the score is computed in double in this fixed order, so a NumPy
 * float64 re-implementation reproduces ties exactly. */

static int otsu_from_hist(const int64_t hist[256], int64_t n) {
    int64_t total = 0;
    int vmax = 0;
    for (int v = 0; v < 256; v++) {
        total += (int64_t)v * hist[v];
        if (hist[v] > 0) vmax = v;
    }
    int best_t = -1;
    double best = -1.0;
    int64_t n0 = 0, s0 = 0;
    for (int t = 0; t < 255; t++) {
        n0 += hist[t];
        s0 += (int64_t)t * hist[t];
        int64_t n1 = n - n0, s1 = total - s0;
        if (n0 == 0 || n1 == 0) continue;
        double diff = (double)(s0 * n1 - s1 * n0);
        double score = diff * diff / ((double)n0 * (double)n1);
        if (score > best) { /* strict: ties keep the smallest t */
            best = score;
            best_t = t;
        }
    }
    return best_t < 0 ? vmax : best_t; /* no split: everything is background */
}

static void histogram(int64_t hist[256], const uint8_t *img, int64_t n) {
    memset(hist, 0, 256 * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) hist[img[i]]++;
}

int af_otsu_threshold(const uint8_t *img, int n) {
    if (img == NULL || n <= 0) return 255;
    int64_t hist[256];
    histogram(hist, img, n);
    return otsu_from_hist(hist, n);
}

/* ------------------------------------------------------------------------------------ */
/* Texture region eta. */

/* The box of side crop_max centred on (cx, cy), clipped to the image. */
static void crop_around(af_slm_lesion *ls, int cx, int cy, int S, int crop_max) {
    int x0 = cx - crop_max / 2, y0 = cy - crop_max / 2;
    int x1 = x0 + crop_max, y1 = y0 + crop_max;
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 > S) x1 = S;
    if (y1 > S) y1 = S;
    ls->crop_x0 = x0;
    ls->crop_y0 = y0;
    ls->crop_w = x1 - x0;
    ls->crop_h = y1 - y0;
}

/* Pixel number k (row-major) among those > t; t < 0 counts every pixel. */
static int64_t kth_above(const uint8_t *x, int64_t n, int t, int64_t k) {
    for (int64_t i = 0; i < n; i++) {
        if ((int)x[i] > t) {
            if (k == 0) return i;
            k--;
        }
    }
    return n - 1; /* not reached when k < count */
}

/* Largest 8-connected component of {x > t}: flood fill with an explicit stack. A pixel is
 * marked when pushed, so the stack never holds more than S*S entries. Returns 0 if the
 * foreground is empty, else 1 with the centre of the component's bounding box. */
static int largest_component(const uint8_t *x, int S, int t, int32_t *ws, int *cx, int *cy) {
    size_t n = (size_t)S * (size_t)S;
    int32_t *seen = ws, *stack = ws + n;
    memset(seen, 0, n * sizeof(int32_t));
    int64_t best = 0;
    for (size_t start = 0; start < n; start++) {
        if (seen[start] || (int)x[start] <= t) continue;
        int64_t count = 0, top = 0;
        int xmin = S, xmax = -1, ymin = S, ymax = -1;
        seen[start] = 1;
        stack[top++] = (int32_t)start;
        while (top > 0) {
            int32_t p = stack[--top];
            int px = p % S, py = p / S;
            count++;
            if (px < xmin) xmin = px;
            if (px > xmax) xmax = px;
            if (py < ymin) ymin = py;
            if (py > ymax) ymax = py;
            for (int dy = -1; dy <= 1; dy++) {
                for (int dx = -1; dx <= 1; dx++) {
                    int qx = px + dx, qy = py + dy;
                    if (qx < 0 || qy < 0 || qx >= S || qy >= S) continue;
                    size_t q = (size_t)qy * S + qx;
                    if (seen[q] || (int)x[q] <= t) continue;
                    seen[q] = 1;
                    stack[top++] = (int32_t)q;
                }
            }
        }
        if (count > best) { /* strict: ties keep the component met first */
            best = count;
            *cx = (xmin + xmax) / 2;
            *cy = (ymin + ymax) / 2;
        }
    }
    return best > 0;
}

/* All draws of one image (inputs already validated). Never fails. */
static int plan_lesions(af_slm_lesion *out, const uint8_t *x, int S, const af_slm_config *cfg,
                        uint64_t seed, uint64_t step, uint64_t image_index, int32_t *ws) {
    uint64_t stream = af_stream(AF_RNG_SLM, step, (uint32_t)image_index);
    int64_t n = (int64_t)S * S;
    int R = (int)af_rand_int(seed, stream, SLOT_R, cfg->lesions_min, cfg->lesions_max);
    if (R == 0) return 0;

    int64_t hist[256];
    histogram(hist, x, n);
    int t = otsu_from_hist(hist, n);
    int64_t fg = 0;
    for (int v = t + 1; v < 256; v++) fg += hist[v];
    if (fg == 0) { /* constant image: the whole image is the texture source */
        t = -1;
        fg = n;
    }
    int lcx = 0, lcy = 0;
    if (cfg->region_rule == AF_SLM_REGION_LARGEST) largest_component(x, S, t, ws, &lcx, &lcy);

    int lo, hi;
    af_slm_size_range(S, cfg, &lo, &hi);
    for (int r = 0; r < R; r++) {
        af_slm_lesion *ls = &out[r];
        ls->w = (int)af_rand_int(seed, stream, SLOT_LESION(r, 0), lo, hi);
        ls->h = (int)af_rand_int(seed, stream, SLOT_LESION(r, 1), lo, hi);
        ls->x0 = (int)af_rand_int(seed, stream, SLOT_LESION(r, 2), 0, S - ls->w);
        ls->y0 = (int)af_rand_int(seed, stream, SLOT_LESION(r, 3), 0, S - ls->h);
        if (cfg->region_rule == AF_SLM_REGION_LARGEST) {
            crop_around(ls, lcx, lcy, S, cfg->crop_max);
        } else {
            int64_t k = af_rand_int(seed, stream, SLOT_LESION(r, 4), 0, fg - 1);
            int64_t p = kth_above(x, n, t, k);
            crop_around(ls, (int)(p % S), (int)(p / S), S, cfg->crop_max);
        }
    }
    return R;
}

af_status af_slm_lesions(af_slm_lesion *out, int *count, const uint8_t *x, int S,
                      const af_slm_config *cfg, uint64_t seed, uint64_t step,
                      uint64_t image_index, int32_t *workspace) {
    AF_CHECK(out != NULL && count != NULL && x != NULL, AF_EINVAL, "slm_lesions: NULL pointer");
    AF_CHECK(S >= 1 && S <= AF_SLM_MAX_SIDE, AF_EINVAL, "slm_lesions: need 1 <= S <= %d, got %d",
             AF_SLM_MAX_SIDE, S);
    AF_TRY(af_slm_config_check(cfg));
    AF_CHECK(af_slm_workspace_ints(S, cfg) == 0 || workspace != NULL, AF_EINVAL,
             "slm_lesions: region_rule 'largest' needs a workspace of %zu ints",
             af_slm_workspace_ints(S, cfg));
    *count = plan_lesions(out, x, S, cfg, seed, step, image_index, workspace);
    return AF_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Drawing one lesion into M. */

/* Eq. 2-3 on the LW x LH box, radius normalised by the semi-axes, pixel centres. */
static inline float falloff(int w, int h, int LW, int LH, float gamma2) {
    float u = ((float)w + 0.5f - 0.5f * (float)LW) / (0.5f * (float)LW);
    float v = ((float)h + 0.5f - 0.5f * (float)LH) / (0.5f * (float)LH);
    /* af_exp_exact, not expf: cuda/slm.cu reproduces this bit for bit (fp_exact.h) */
    return af_exp_exact(-(u * u + v * v) / gamma2);
}

/* Half-pixel-centre bilinear source coordinate of output index i (out -> in samples). */
static inline void bilinear_src(int i, float ratio, int in, int *a, int *b, float *f) {
    float s = ((float)i + 0.5f) * ratio - 0.5f;
    if (s < 0.0f) s = 0.0f;
    if (s > (float)(in - 1)) s = (float)(in - 1);
    int a0 = (int)s;
    *a = a0;
    *b = a0 + 1 < in ? a0 + 1 : in - 1;
    *f = s - (float)a0;
}

static void lesion_draw(uint8_t *M, const uint8_t *x, int S, const af_slm_lesion *ls,
                        const af_slm_config *cfg) {
    int LW = ls->w, LH = ls->h;
    /* delta is a decreasing function of the normalised radius: its maximum is at the centre
     * pixel and its minimum at a corner, evaluated with the very same expression. */
    float dmax = falloff((LW - 1) / 2, (LH - 1) / 2, LW, LH, cfg->gamma2);
    float dmin = falloff(0, 0, LW, LH, cfg->gamma2);
    float range = dmax - dmin;
    float rx = (float)ls->crop_w / (float)LW, ry = (float)ls->crop_h / (float)LH;
    const uint8_t *crop = x + (size_t)ls->crop_y0 * S + ls->crop_x0;
    for (int h = 0; h < LH; h++) {
        int ya, yb;
        float fy;
        bilinear_src(h, ry, ls->crop_h, &ya, &yb, &fy);
        const uint8_t *ra = crop + (size_t)ya * S, *rb = crop + (size_t)yb * S;
        uint8_t *mrow = M + (size_t)(ls->y0 + h) * S + ls->x0;
        for (int w = 0; w < LW; w++) {
            int xa, xb;
            float fx;
            bilinear_src(w, rx, ls->crop_w, &xa, &xb, &fx);
            float eta = (1.0f - fy) * ((1.0f - fx) * (float)ra[xa] + fx * (float)ra[xb]) +
                        fy * ((1.0f - fx) * (float)rb[xa] + fx * (float)rb[xb]);
            float d = cfg->strength;
            if (range > 0.0f) {
                d = (falloff(w, h, LW, LH, cfg->gamma2) - dmin) / range * cfg->strength;
                if (d < 0.0f) d = 0.0f;
                if (d > cfg->strength) d = cfg->strength;
            }
            int v = (int)(eta * d + 0.5f); /* round half up; eta * d >= 0 */
            int s = (int)mrow[w] + (v > 255 ? 255 : v);
            mrow[w] = (uint8_t)(s > 255 ? 255 : s); /* overlaps saturate, never wrap */
        }
    }
}

/* Token labels of one image from its mask M[S,S]: L = (S/P)^2 patches, row-major. */
static void token_labels_one(uint8_t *labels, const uint8_t *M, int S, int P, int rule) {
    int G = S / P;
    uint64_t total = 0;
    for (size_t i = 0; i < (size_t)S * S; i++) total += M[i];
    for (int gy = 0; gy < G; gy++) {
        for (int gx = 0; gx < G; gx++) {
            uint64_t sum = 0;
            int any = 0;
            for (int py = 0; py < P; py++) {
                const uint8_t *row = M + (size_t)(gy * P + py) * S + (size_t)gx * P;
                for (int px = 0; px < P; px++) {
                    sum += row[px];
                    any |= row[px] != 0;
                }
            }
            /* mean over patch > mean over image  <=>  sum * S^2 > total * P^2 (exact) */
            int abnormal = rule == AF_SLM_TOKENS_ANY
                               ? any
                               : sum * (uint64_t)S * S > total * (uint64_t)P * P;
            labels[gy * G + gx] = (uint8_t)abnormal;
        }
    }
}

af_status af_slm_generate(uint8_t *x_prime, uint8_t *mask, uint8_t *token_labels, const uint8_t *x,
                       int B, int S, int P, const af_slm_config *cfg, uint64_t seed,
                       uint64_t step, uint64_t first_image_index) {
    AF_CHECK(B >= 0, AF_EINVAL, "slm_generate: B must be >= 0, got %d", B);
    AF_CHECK(S >= 1 && S <= AF_SLM_MAX_SIDE && P >= 1 && S % P == 0, AF_EINVAL,
             "slm_generate: need 1 <= S <= %d, P >= 1 and S %% P == 0, got S=%d P=%d",
             AF_SLM_MAX_SIDE, S, P);
    AF_TRY(af_slm_config_check(cfg));
    if (B == 0) return AF_OK;
    AF_CHECK(x_prime != NULL && mask != NULL && token_labels != NULL && x != NULL, AF_EINVAL,
             "slm_generate: NULL pointer");

    size_t SS = (size_t)S * S, L = (size_t)(S / P) * (S / P);
    size_t ws_ints = af_slm_workspace_ints(S, cfg);
    int nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_get_max_threads();
#endif
    int32_t *ws = NULL;
    if (ws_ints > 0) {
        size_t total;
        AF_CHECK(af_mul_size(ws_ints, (size_t)nthreads, &total), AF_ENOMEM,
                 "slm_generate: workspace size overflows");
        ws = (int32_t *)af_calloc(total, sizeof(int32_t));
        if (ws == NULL) return AF_ENOMEM;
    }

#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int b = 0; b < B; b++) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        const uint8_t *xb = x + (size_t)b * SS;
        uint8_t *mb = mask + (size_t)b * SS, *xpb = x_prime + (size_t)b * SS;
        af_slm_lesion lesions[AF_SLM_MAX_LESIONS];
        int R = plan_lesions(lesions, xb, S, cfg, seed, step, first_image_index + (uint64_t)b,
                             ws ? ws + (size_t)tid * ws_ints : NULL);
        memset(mb, 0, SS);
        for (int r = 0; r < R; r++) lesion_draw(mb, xb, S, &lesions[r], cfg);
        for (size_t i = 0; i < SS; i++) {
            int s = (int)xb[i] + (int)mb[i];
            xpb[i] = (uint8_t)(s > 255 ? 255 : s);
        }
        token_labels_one(token_labels + (size_t)b * L, mb, S, P, cfg->token_rule);
    }
    af_free(ws);
    return AF_OK;
}
