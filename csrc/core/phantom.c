/* Synthetic frontal chest radiographs; see phantom.h for the contract.
 *
 * The picture is a sum of "densities" (brighter = more attenuating) evaluated per pixel in
 * anatomical coordinates (u, v): u grows to the image right (the patient's left), v grows
 * downwards, the nominal thorax spans about [-0.9, 0.9] x [-1, 1]. A per-subject similarity
 * transform (scale, rotation, shift) maps anatomy into the image, a per-subject tone curve
 * (offset, contrast, gamma) and Gaussian noise make the pixel values.
 *
 * Shapes are implicit: each structure has a "margin", a signed distance-like value that is
 * positive inside, and coverage = smoothstep over about one pixel of margin, which keeps
 * edges anti-aliased at any S.
 *
 * Random draws (all from one Philox stream per subject) use fixed index slots, so adding a
 * lesion never changes the anatomy or the noise of a subject.
 */
#include <math.h>

#include "common.h"
#include "phantom.h"
#include "rng.h"

/* Index slots in the subject's stream. */
enum {
    SLOT_PARAM = 0,          /* anatomy and tone parameters: 0..63           */
    SLOT_ABNORMAL = 64,      /* batch: is this subject abnormal?             */
    SLOT_KIND = 65,          /* batch: which lesion kind                     */
    SLOT_LESION = 128,       /* lesion geometry: 128..511                    */
    SLOT_VESSEL_GRID = 1024, /* value-noise grid for lung markings           */
    SLOT_PATCH_GRID = 4096,  /* value-noise grid for consolidation patchiness */
    SLOT_PIXEL_NOISE = 1u << 20
};

#define VESSEL_G 26 /* value-noise grid sides (nodes over [-1.2, 1.2]) */
#define PATCH_G 22
#define NODULE_TRIES 64

typedef struct {
    /* anatomy -> image: X = shift + R(rot) * diag(scale) * (u, v) */
    float scale_u, scale_v, shift_x, shift_y, cos_r, sin_r;
    /* body outline: half-width of chest, neck and shoulders; shoulder line */
    float chest_hw, neck_hw, shoulder_hw, shoulder_v;
    /* lungs, [0] = image left (patient's right), [1] = image right */
    float lung_med[2], lung_lat[2], lung_top[2], lung_ry[2];
    /* diaphragm domes: v at the dome's peak, |u| of the peak, curvature */
    float dome_top[2], dome_peak[2], dome_curv[2];
    /* heart ellipse and aortic knob */
    float heart_u, heart_v, heart_ru, heart_rv, knob_u, knob_v, knob_r;
    /* ribs: first posterior rib, spacing, thickness, arc height, lateral droop */
    float rib_v0, rib_sp, rib_th, rib_arc, rib_droop, ant_v0;
    /* clavicles and spine */
    float clav_v, clav_th, spine_hw, vert_v0, vert_sp;
    /* tone */
    float tone_b0, tone_c, tone_gamma, noise_sigma, marking_gain;
    float pixel; /* one pixel in anatomical units, the anti-aliasing width */
    float vessel[VESSEL_G * VESSEL_G];
} subject_t;

typedef struct {
    int kind, side;
    float cu, cv, r, lobe_phase, ru, rv; /* nodule / consolidation */
    float level, meniscus;               /* effusion */
    float patch[PATCH_G * PATCH_G];
} lesion_t;

static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : x > hi ? hi : x; }

static inline float smoothstep(float e0, float e1, float x) {
    float t = clampf((x - e0) / (e1 - e0), 0.0f, 1.0f);
    return t * t * (3.0f - 2.0f * t);
}

/* Coverage of a shape from its margin (positive inside), anti-aliased over one pixel. */
static inline float cover(float margin, float pixel) {
    return smoothstep(-0.5f * pixel, 0.5f * pixel, margin);
}

static inline float uni(uint64_t seed, uint64_t stream, uint32_t slot, float lo, float hi) {
    return lo + (hi - lo) * af_rand_uniform(seed, stream, slot);
}

/* Smoothly interpolated value noise on a G x G grid spanning [-1.2, 1.2]^2, values in [0,1). */
static float value_noise(const float *grid, int G, float u, float v) {
    float gx = clampf((u + 1.2f) / 2.4f, 0.0f, 1.0f) * (float)(G - 1);
    float gy = clampf((v + 1.2f) / 2.4f, 0.0f, 1.0f) * (float)(G - 1);
    int x0 = (int)gx, y0 = (int)gy;
    if (x0 > G - 2) x0 = G - 2;
    if (y0 > G - 2) y0 = G - 2;
    float tx = smoothstep(0.0f, 1.0f, gx - (float)x0), ty = smoothstep(0.0f, 1.0f, gy - (float)y0);
    const float *r0 = grid + y0 * G + x0, *r1 = r0 + G;
    float top = r0[0] + tx * (r0[1] - r0[0]), bot = r1[0] + tx * (r1[1] - r1[0]);
    return top + ty * (bot - top);
}

static uint64_t subject_stream(uint64_t subject) {
    return af_stream(AF_RNG_PHANTOM, subject >> 24, (uint32_t)(subject & 0xFFFFFFu));
}

static void draw_subject(subject_t *p, int S, uint64_t seed, uint64_t st) {
    uint32_t k = SLOT_PARAM;
    p->scale_u = uni(seed, st, k++, 0.88f, 1.04f);
    p->scale_v = p->scale_u * uni(seed, st, k++, 0.93f, 1.05f);
    p->shift_x = uni(seed, st, k++, -0.05f, 0.05f);
    p->shift_y = uni(seed, st, k++, -0.03f, 0.07f);
    float rot = uni(seed, st, k++, -0.07f, 0.07f); /* about +-4 degrees */
    p->cos_r = cosf(rot);
    p->sin_r = sinf(rot);

    p->chest_hw = uni(seed, st, k++, 0.84f, 0.95f);
    p->neck_hw = uni(seed, st, k++, 0.17f, 0.24f);
    p->shoulder_hw = p->chest_hw + uni(seed, st, k++, 0.25f, 0.45f);
    p->shoulder_v = uni(seed, st, k++, -0.92f, -0.82f);

    float lat = uni(seed, st, k++, 0.72f, 0.8f), top = uni(seed, st, k++, -0.84f, -0.76f);
    float dome = uni(seed, st, k++, 0.28f, 0.42f);
    for (int s = 0; s < 2; s++) {
        p->lung_med[s] = uni(seed, st, k++, 0.1f, 0.14f) + 0.01f * (float)s;
        p->lung_lat[s] = lat + uni(seed, st, k++, -0.02f, 0.02f);
        p->lung_top[s] = top + uni(seed, st, k++, -0.02f, 0.02f);
        p->lung_ry[s] = uni(seed, st, k++, 1.0f, 1.15f);
        /* the left dome (image right) sits a little lower, under the heart */
        p->dome_top[s] = dome + 0.05f * (float)s + uni(seed, st, k++, -0.03f, 0.03f);
        p->dome_peak[s] = uni(seed, st, k++, 0.36f, 0.46f);
        p->dome_curv[s] = uni(seed, st, k++, 0.22f, 0.34f);
    }
    p->heart_u = uni(seed, st, k++, 0.1f, 0.16f);
    p->heart_v = p->dome_top[1] - uni(seed, st, k++, 0.12f, 0.2f);
    p->heart_ru = uni(seed, st, k++, 0.3f, 0.37f);
    p->heart_rv = uni(seed, st, k++, 0.24f, 0.3f);
    p->knob_u = uni(seed, st, k++, 0.11f, 0.15f);
    p->knob_v = uni(seed, st, k++, -0.42f, -0.34f);
    p->knob_r = uni(seed, st, k++, 0.05f, 0.07f);

    p->rib_sp = uni(seed, st, k++, 0.1f, 0.135f);
    p->rib_v0 = top - uni(seed, st, k++, 0.0f, 0.06f);
    p->rib_th = p->rib_sp * uni(seed, st, k++, 0.26f, 0.34f);
    p->rib_arc = uni(seed, st, k++, 0.1f, 0.16f);
    p->rib_droop = uni(seed, st, k++, 0.3f, 0.45f);
    p->ant_v0 = top + uni(seed, st, k++, 0.05f, 0.15f);
    p->clav_v = uni(seed, st, k++, -0.74f, -0.66f);
    p->clav_th = uni(seed, st, k++, 0.03f, 0.042f);
    p->spine_hw = uni(seed, st, k++, 0.055f, 0.07f);
    p->vert_sp = p->rib_sp * uni(seed, st, k++, 0.95f, 1.05f);
    p->vert_v0 = uni(seed, st, k++, 0.0f, 1.0f) * p->vert_sp;

    p->tone_b0 = uni(seed, st, k++, -0.02f, 0.06f);
    p->tone_c = uni(seed, st, k++, 1.15f, 1.45f);
    p->tone_gamma = uni(seed, st, k++, 0.8f, 1.25f);
    p->noise_sigma = uni(seed, st, k++, 0.006f, 0.025f);
    p->marking_gain = uni(seed, st, k++, 0.7f, 1.3f);

    float smin = p->scale_u < p->scale_v ? p->scale_u : p->scale_v;
    p->pixel = 2.0f / ((float)S * smin);
    for (int i = 0; i < VESSEL_G * VESSEL_G; i++)
        p->vessel[i] = af_rand_uniform(seed, st, SLOT_VESSEL_GRID + (uint32_t)i);
}

/* v of the diaphragm on side s at |u| = a. */
static inline float dome_v(const subject_t *p, int s, float a) {
    float d = (a - p->dome_peak[s]) / 0.45f;
    return p->dome_top[s] + p->dome_curv[s] * d * d;
}

static inline float ellipse_margin(float du, float dv, float ru, float rv) {
    float f = (du / ru) * (du / ru) + (dv / rv) * (dv / rv);
    return (1.0f - f) * 0.5f * (ru < rv ? ru : rv);
}

static inline float heart_margin(const subject_t *p, float u, float v) {
    return ellipse_margin(u - p->heart_u, v - p->heart_v, p->heart_ru, p->heart_rv);
}

/* Signed margin of the lung field at (u, v): an upper superellipse (rounded apex, nearly
 * vertical walls lower down) cut by the mediastinum, the diaphragm, the heart and the
 * aortic knob. */
static float lung_margin(const subject_t *p, float u, float v) {
    int s = u >= 0.0f;
    float a = fabsf(u);
    float med = p->lung_med[s], lat = p->lung_lat[s];
    float w = lat - med;
    float cu = med + 0.45f * w, ru = 0.62f * w;
    float cv = p->lung_top[s] + p->lung_ry[s];
    float x = fabsf(a - cu) / ru, y = (v - cv) / p->lung_ry[s];
    float m = (1.0f - (powf(x, 2.5f) + y * y)) * 0.3f * ru;
    float m2 = a - med;
    if (m2 < m) m = m2;
    m2 = dome_v(p, s, a) - v;
    if (m2 < m) m = m2;
    m2 = -heart_margin(p, u, v);
    if (m2 < m) m = m2;
    m2 = -ellipse_margin(u - p->knob_u, v - p->knob_v, p->knob_r, p->knob_r);
    if (m2 < m) m = m2;
    return m;
}

/* Half-width of the body at height v: neck, shoulders, then the chest wall. */
static inline float body_hw(const subject_t *p, float v) {
    float sh = smoothstep(p->shoulder_v - 0.2f, p->shoulder_v + 0.05f, v);
    float chest = smoothstep(p->shoulder_v + 0.05f, p->shoulder_v + 0.45f, v);
    float hw = p->neck_hw + (p->shoulder_hw - p->neck_hw) * sh;
    return hw + (p->chest_hw - p->shoulder_hw) * chest;
}

/* Bone band of half-thickness th around distance d: brighter cortex at the edges. */
static inline float bone_profile(float d, float th, float pixel) {
    float ad = fabsf(d);
    float t = clampf(ad / th, 0.0f, 1.0f);
    return cover(th - ad, pixel) * (0.55f + 0.45f * t * t * t * t);
}

static float ribs_density(const subject_t *p, float u, float v) {
    int s = u >= 0.0f;
    float a = fabsf(u), lat = p->lung_lat[s];
    float span = lat + 0.1f;
    float x = a / span;
    if (x > 1.05f) return 0.0f;
    float ends = smoothstep(0.02f, 0.06f, a) * (1.0f - smoothstep(0.92f, 1.05f, x));
    float total = 0.0f;
    /* posterior ribs: v = v0 + k*sp + g(a), rising a little then drooping laterally */
    float g = -p->rib_arc * sinf(3.14159265f * 0.8f * x) + p->rib_droop * x * x;
    float kf = (v - g - p->rib_v0) / p->rib_sp;
    int k0 = (int)floorf(kf);
    float th = p->rib_th * (0.8f + 0.4f * x);
    for (int k = k0; k <= k0 + 1; k++) {
        if (k < 0 || k > 11) continue;
        float d = v - (p->rib_v0 + (float)k * p->rib_sp + g);
        total += 0.11f * bone_profile(d, 0.5f * th, p->pixel);
    }
    /* anterior ribs: fainter, sloping down towards the midline, ending at the cartilage */
    float xl = clampf((lat - a) / lat, 0.0f, 1.0f);
    float ga = 0.45f * xl - 0.1f * xl * xl;
    kf = (v - ga - p->ant_v0) / (p->rib_sp * 1.1f);
    k0 = (int)floorf(kf);
    float fade = smoothstep(0.25f, 0.4f, a);
    for (int k = k0; k <= k0 + 1; k++) {
        if (k < 0 || k > 6) continue;
        float d = v - (p->ant_v0 + (float)k * p->rib_sp * 1.1f + ga);
        total += 0.05f * fade * bone_profile(d, 0.6f * p->rib_th, p->pixel);
    }
    return total * ends;
}

static float clavicle_density(const subject_t *p, float u, float v) {
    float a = fabsf(u);
    float t = (a - 0.05f) / 0.6f;
    if (t < -0.1f || t > 1.1f) return 0.0f;
    float c = p->clav_v - 0.13f * t + 0.035f * sinf(6.2831853f * t);
    float ends = smoothstep(-0.05f, 0.04f, t) * (1.0f - smoothstep(0.95f, 1.08f, t));
    return 0.2f * ends * bone_profile(v - c, p->clav_th * (1.0f + 0.3f * t), p->pixel);
}

static float spine_density(const subject_t *p, float u, float v) {
    float a = fabsf(u);
    if (a > p->spine_hw * 1.6f) return 0.0f;
    float body = cover(p->spine_hw - a, p->pixel);
    float ph = (v - p->vert_v0) / p->vert_sp;
    ph -= floorf(ph);
    float disc = smoothstep(0.0f, 0.08f, ph) * (1.0f - smoothstep(0.8f, 0.88f, ph));
    /* pedicles: small bright ovals at the lateral edges of each vertebral body */
    float pu = a - 0.7f * p->spine_hw, pv = (ph - 0.35f) * p->vert_sp;
    float ped = cover(ellipse_margin(pu, pv, 0.25f * p->spine_hw, 0.18f * p->vert_sp), p->pixel);
    return 0.045f * body * (0.45f + 0.55f * disc) + 0.04f * ped;
}

/* Lesion opacity alpha in [0, 1] at (u, v) (before restriction to the lung field). */
static float lesion_alpha(const subject_t *p, const lesion_t *L, float u, float v) {
    switch (L->kind) {
    case PHANTOM_NODULE: {
        float du = u - L->cu, dv = v - L->cv;
        float r = sqrtf(du * du + dv * dv);
        float th = atan2f(dv, du);
        float re = L->r * (1.0f + 0.12f * sinf(3.0f * th + L->lobe_phase));
        return cover(re - r, p->pixel) * (0.75f + 0.25f * clampf(1.0f - r / re, 0.0f, 1.0f));
    }
    case PHANTOM_CONSOLIDATION: {
        float m = ellipse_margin(u - L->cu, v - L->cv, L->ru, L->rv);
        if (m < -p->pixel) return 0.0f;
        float core = clampf(m / (0.5f * (L->ru < L->rv ? L->ru : L->rv)), 0.0f, 1.0f);
        float n = value_noise(L->patch, PATCH_G, u, v);
        return cover(m, p->pixel) * smoothstep(0.42f, 0.56f, n + 0.3f * core);
    }
    case PHANTOM_EFFUSION: {
        int s = u >= 0.0f;
        if (s != L->side) return 0.0f;
        float a = fabsf(u);
        float xl = clampf((a - p->lung_med[s]) / (p->lung_lat[s] - p->lung_med[s]), 0.0f, 1.0f);
        float top = L->level - L->meniscus * xl * xl;
        return cover(v - top, p->pixel) * (0.85f + 0.15f * smoothstep(top, top + 0.25f, v));
    }
    default: return 0.0f;
    }
}

static const float lesion_gain[PHANTOM_NUM_KINDS] = {0.0f, 0.3f, 0.24f, 0.36f};

static void draw_lesion(lesion_t *L, const subject_t *p, int kind, uint64_t seed, uint64_t st) {
    uint32_t k = SLOT_LESION;
    L->kind = kind;
    L->side = af_rand_uniform(seed, st, k++) < 0.5f;
    int s = L->side;
    float sign = s ? 1.0f : -1.0f;
    float med = p->lung_med[s], lat = p->lung_lat[s];
    /* a point that is inside every lung this parameter range produces */
    L->cu = sign * (med + 0.55f * (lat - med));
    L->cv = p->dome_top[s] - 0.35f;
    if (kind == PHANTOM_NODULE || kind == PHANTOM_CONSOLIDATION) {
        if (kind == PHANTOM_NODULE) {
            L->r = uni(seed, st, k++, 0.035f, 0.085f);
            L->lobe_phase = uni(seed, st, k++, 0.0f, 6.2831853f);
        } else {
            L->ru = uni(seed, st, k++, 0.14f, 0.26f);
            L->rv = uni(seed, st, k++, 0.12f, 0.22f);
            for (int i = 0; i < PATCH_G * PATCH_G; i++)
                L->patch[i] = af_rand_uniform(seed, st, SLOT_PATCH_GRID + (uint32_t)i);
        }
        float need = kind == PHANTOM_NODULE ? 1.2f * L->r : 0.05f;
        /* rejection sampling of the centre inside the lung, with a fixed number of tries */
        for (int t = 0; t < NODULE_TRIES; t++) {
            float cu = sign * uni(seed, st, SLOT_LESION + 64 + 2 * (uint32_t)t, med, lat);
            float cv = uni(seed, st, SLOT_LESION + 65 + 2 * (uint32_t)t, p->lung_top[s],
                           p->dome_top[s]);
            if (lung_margin(p, cu, cv) > need) {
                L->cu = cu;
                L->cv = cv;
                break;
            }
        }
    } else if (kind == PHANTOM_EFFUSION) {
        L->level = p->dome_top[s] - uni(seed, st, k++, 0.08f, 0.3f);
        L->meniscus = uni(seed, st, k++, 0.08f, 0.2f);
    }
}

static int lesion_kind_valid(int kind) { return kind >= PHANTOM_NONE && kind < PHANTOM_NUM_KINDS; }

/* The renderer; arguments already validated. Scratch structs live on the stack (~3 KB). */
static void render(uint8_t *img, uint8_t *mask, uint8_t *labels, int S, uint64_t seed,
                   uint64_t subject, int kind) {
    subject_t p;
    lesion_t L;
    uint64_t st = subject_stream(subject);
    draw_subject(&p, S, seed, st);
    L.kind = PHANTOM_NONE;
    if (kind != PHANTOM_NONE) draw_lesion(&L, &p, kind, seed, st);
    float inv_su = 1.0f / p.scale_u, inv_sv = 1.0f / p.scale_v;
    float px = p.pixel;

    for (int y = 0; y < S; y++) {
        for (int x = 0; x < S; x++) {
            size_t i = (size_t)y * (size_t)S + (size_t)x;
            float X = (2.0f * ((float)x + 0.5f) / (float)S - 1.0f) - p.shift_x;
            float Y = (2.0f * ((float)y + 0.5f) / (float)S - 1.0f) - p.shift_y;
            float u = (p.cos_r * X + p.sin_r * Y) * inv_su;
            float v = (-p.sin_r * X + p.cos_r * Y) * inv_sv;
            int s = u >= 0.0f;
            float a = fabsf(u);

            float hw = body_hw(&p, v);
            float body = cover(hw - a, px);
            float lung = cover(lung_margin(&p, u, v), px);
            float dome = dome_v(&p, s, a);
            float below = cover(v - dome, px);
            float heart = cover(heart_margin(&p, u, v), px) * (1.0f - below);
            float med = cover(p.lung_med[s] - a, px) * (1.0f - below) *
                        cover(v - (p.shoulder_v - 0.1f), px);

            /* soft tissue: thicker in the middle, thinner at the flanks */
            float thick = sqrtf(clampf(1.0f - (u / (hw + 0.05f)) * (u / (hw + 0.05f)), 0.0f, 1.0f));
            float d = body * (0.24f + 0.32f * thick);
            d += 0.05f * below * body;
            d += 0.03f * heart + 0.03f * med;
            /* trachea and main bronchi: an air column in the mediastinum */
            float tr = cover(0.035f - fabsf(u - 0.01f), px) *
                       (1.0f - smoothstep(-0.42f, -0.36f, v));
            d -= 0.07f * tr * body;
            /* aerated lung: much less dense, darkest apically and laterally */
            float basal = smoothstep(-0.4f, 0.5f, v);
            d -= lung * (0.31f - 0.07f * basal);
            /* lung markings: ridges of value noise, stronger towards the hila */
            float n = value_noise(p.vessel, VESSEL_G, u, v);
            float ridge = 1.0f - smoothstep(0.0f, 0.06f, fabsf(n - 0.5f));
            float hil = expf(-((a - 0.2f) * (a - 0.2f) + (v + 0.05f) * (v + 0.05f)) / 0.06f);
            d += lung * p.marking_gain * (0.08f * ridge * (0.35f + 0.65f * hil) + 0.08f * hil * n);
            /* bones */
            float bones = ribs_density(&p, u, v) * (1.0f - 0.6f * below);
            bones += clavicle_density(&p, u, v);
            bones += spine_density(&p, u, v) * cover(v + 0.98f, px);
            d += body * bones;

            /* lesions live on lung-labelled pixels only, so the mask and every changed
             * pixel stay inside the lung label (slivers in the costo- and cardiophrenic
             * angles have lung < 0.5) */
            int in_lung = lung >= 0.5f;
            float les = 0.0f;
            if (L.kind != PHANTOM_NONE && in_lung) les = lesion_alpha(&p, &L, u, v);
            d += lesion_gain[L.kind] * les * lung;

            float val = clampf(p.tone_b0 + p.tone_c * d, 0.0f, 1.0f);
            val = powf(val, p.tone_gamma);
            val += p.noise_sigma * af_rand_normal(seed, st, SLOT_PIXEL_NOISE + (uint64_t)i);
            img[i] = (uint8_t)lrintf(clampf(val, 0.0f, 1.0f) * 255.0f);

            if (mask) mask[i] = (uint8_t)(les >= 0.5f);
            if (labels) {
                uint8_t lab = PHANTOM_LABEL_BACKGROUND;
                if (body >= 0.5f) {
                    if (in_lung) lab = PHANTOM_LABEL_LUNG;
                    else if (heart >= 0.5f) lab = PHANTOM_LABEL_HEART;
                    else if (below >= 0.5f) lab = PHANTOM_LABEL_ABDOMEN;
                    else if (med >= 0.5f || (a < p.spine_hw && v > p.shoulder_v))
                        lab = PHANTOM_LABEL_MEDIASTINUM;
                    else lab = PHANTOM_LABEL_SOFT_TISSUE;
                }
                labels[i] = lab;
            }
        }
    }
}

static af_status check_args(int S, int kind) {
    AF_CHECK(S >= PHANTOM_MIN_SIZE && S <= PHANTOM_MAX_SIZE, AF_EINVAL,
             "phantom: size must be in [%d, %d], got %d", PHANTOM_MIN_SIZE, PHANTOM_MAX_SIZE, S);
    AF_CHECK(lesion_kind_valid(kind), AF_EINVAL,
             "phantom: lesion kind must be 0 (none), 1 (nodule), 2 (consolidation) or "
             "3 (effusion), got %d", kind);
    return AF_OK;
}

af_status af_phantom_generate(uint8_t *img, uint8_t *lesion_mask, uint8_t *organ_labels, int S,
                           uint64_t seed, uint64_t subject, int lesion_kind) {
    AF_CHECK(img != NULL, AF_EINVAL, "phantom_generate: img is NULL");
    AF_TRY(check_args(S, lesion_kind));
    render(img, lesion_mask, organ_labels, S, seed, subject, lesion_kind);
    return AF_OK;
}

af_status af_phantom_generate_batch(uint8_t *img, uint8_t *lesion_masks, uint8_t *organ_labels,
                                 int32_t *labels, int B, int S, uint64_t seed,
                                 uint64_t first_subject, int lesion_kind, float p_abnormal) {
    AF_CHECK(img != NULL, AF_EINVAL, "phantom_generate_batch: img is NULL");
    AF_CHECK(B >= 0, AF_EINVAL, "phantom_generate_batch: n must be >= 0, got %d", B);
    AF_TRY(check_args(S, lesion_kind < 0 ? 0 : lesion_kind));
    AF_CHECK(lesion_kind >= -1, AF_EINVAL, "phantom_generate_batch: lesion kind -1 (random) "
             "or 0..3 expected, got %d", lesion_kind);
    AF_CHECK(p_abnormal >= 0.0f && p_abnormal <= 1.0f, AF_EINVAL,
             "phantom_generate_batch: p_abnormal must be in [0, 1], got %g", (double)p_abnormal);
    size_t SS = (size_t)S * (size_t)S;
#pragma omp parallel for schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        uint64_t subject = first_subject + (uint64_t)b;
        uint64_t st = subject_stream(subject);
        int kind = PHANTOM_NONE;
        if (lesion_kind != PHANTOM_NONE && af_rand_uniform(seed, st, SLOT_ABNORMAL) < p_abnormal)
            kind = lesion_kind > 0 ? lesion_kind : (int)af_rand_int(seed, st, SLOT_KIND, 1, 3);
        size_t off = (size_t)b * SS;
        render(img + off, lesion_masks ? lesion_masks + off : NULL,
               organ_labels ? organ_labels + off : NULL, S, seed, subject, kind);
        if (labels) labels[b] = kind;
    }
    return AF_OK;
}
