// Patchify / af_unpatchify: the twin of csrc/ops/patchify.c. One thread per patch element;
// patches[b, l, k] (k < Q) with l = gi*G + gj and k = (p*P + q)*C + c (PQC, MAE) or
// (c*P + p)*P + q (CPQ, conv weight order) maps to img[b, c, gi*P + p, gj*P + q]. The map is a
// bijection (S % P == 0): the backward is unpatchify, one writer per pixel, no atomics.
#include "common.cuh"

enum { MODE_PATCHIFY = 0, MODE_UNPATCHIFY = 1 };

__global__ void patch_kernel(float *patches, float *img, int64_t total, int C, int S, int P,
                             int order, int mode) {
    const int G = S / P, Q = P * P * C;
    AF_GRID_STRIDE(int64_t, j, total) {
        int k = (int)(j % Q);
        int64_t bl = j / Q;
        int l = (int)(bl % ((int64_t)G * G));
        int64_t b = bl / ((int64_t)G * G);
        int gi = l / G, gj = l % G, p, q, c;
        if (order == 0) {  // AF_PATCH_PQC
            c = k % C;
            q = (k / C) % P;
            p = k / (C * P);
        } else {  // AF_PATCH_CPQ
            q = k % P;
            p = (k / P) % P;
            c = k / (P * P);
        }
        int64_t pix = ((b * C + c) * S + (int64_t)gi * P + p) * S + (int64_t)gj * P + q;
        if (mode == MODE_PATCHIFY)
            patches[j] = img[pix];
        else
            img[pix] = patches[j];
    }
}

static af_status run(af_cuda_context *ctx, const char *what, float *patches, float *img, int B,
                     int C, int S, int P, int order, int mode) {
    AF_CUDA_CHECK(B > 0 && C > 0 && S > 0 && P > 0, "%s: bad sizes B=%d C=%d S=%d P=%d", what, B,
                  C, S, P);
    AF_CUDA_CHECK(S % P == 0, "%s: S=%d is not divisible by P=%d", what, S, P);
    AF_CUDA_CHECK(order == 0 || order == 1, "%s: order must be 0 (PQC) or 1 (CPQ), got %d", what,
                  order);
    AF_CUDA_CHECK(patches && img, "%s: NULL pointer", what);
    int64_t total = (int64_t)B * C * S * S;
    patch_kernel<<<af_grid_1d(total, 256), 256, 0, ctx->stream>>>(patches, img, total, C, S, P,
                                                                   order, mode);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_patchify_forward(af_cuda_context *ctx, float *patches,
                                              const float *img, int B, int C, int S, int P,
                                              int order) {
    return run(ctx, "patchify_forward", patches, (float *)img, B, C, S, P, order, MODE_PATCHIFY);
}

extern "C" af_status af_cuda_patchify_backward(af_cuda_context *ctx, float *dimg,
                                               const float *dpatches, int B, int C, int S, int P,
                                               int order) {
    return run(ctx, "patchify_backward", (float *)dpatches, dimg, B, C, S, P, order,
               MODE_UNPATCHIFY);
}

extern "C" af_status af_cuda_unpatchify(af_cuda_context *ctx, float *img, const float *patches,
                                        int B, int C, int S, int P, int order) {
    return run(ctx, "unpatchify", (float *)patches, img, B, C, S, P, order, MODE_UNPATCHIFY);
}
