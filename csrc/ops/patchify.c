/* Image <-> patch-token layout. Patch l = gy*G + gx covers rows gy*P.., cols gx*P.. */
#include "ops.h"

/* Offset of pixel (c, p, q) inside one flattened patch. */
static inline size_t patch_index(int order, int C, int P, int c, int p, int q) {
    return order == AF_PATCH_PQC ? ((size_t)p * P + q) * C + c : ((size_t)c * P + p) * P + q;
}

/* to_img 0: patches = img; 1: img = patches */
static void patch_walk(float *patches, float *img, int B, int C, int S, int P, int order,
                       int to_img) {
    int G = S / P, L = G * G, Q = P * P * C;
    #pragma omp parallel for collapse(2) if ((size_t)B * C * S * S >= ((size_t)1 << 16))
    for (int b = 0; b < B; b++) {
        for (int l = 0; l < L; l++) {
            int gy = l / G, gx = l % G;
            float *pt = patches + ((size_t)b * L + l) * Q;
            for (int c = 0; c < C; c++) {
                for (int p = 0; p < P; p++) {
                    float *im = img + (((size_t)b * C + c) * S + (size_t)gy * P + p) * S
                                + (size_t)gx * P;
                    for (int q = 0; q < P; q++) {
                        float *e = pt + patch_index(order, C, P, c, p, q);
                        if (to_img) im[q] = *e;
                        else *e = im[q];
                    }
                }
            }
        }
    }
}

void af_patchify_forward(float *patches, const float *img, int B, int C, int S, int P, int order) {
    patch_walk(patches, (float *)img, B, C, S, P, order, 0); /* img is only read */
}

void af_patchify_backward(float *dimg, const float *dpatches, int B, int C, int S, int P,
                       int order) {
    /* patches do not overlap: each pixel receives exactly one term, so the adjoint of
     * patchify is unpatchify (a permutation) */
    patch_walk((float *)dpatches, dimg, B, C, S, P, order, 1);
}

void af_unpatchify(float *img, const float *patches, int B, int C, int S, int P, int order) {
    patch_walk((float *)patches, img, B, C, S, P, order, 1);
}
