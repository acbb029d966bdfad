/* One transformer block inside the stacked [NL, ...] parameters and activations of model.h:
 * the views that vit.c and cuda/vit.cu both walk (plain C, also compiled by nvcc), so the
 * CPU and GPU cannot carve a block differently. The strides are those of params.c
 * (blocks_sizes, blocks_acts_carve). Sizes as vit.c: W block width, R mlp ratio, NH heads.
 */
#ifndef AFIRE_BLOCKS_H
#define AFIRE_BLOCKS_H

#include <stddef.h>

#include "model.h"

/* Parameters of block l (each pointer as af_blocks_params without the NL axis). */
typedef struct {
    float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
    float *ln2_w, *ln2_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
} af_block_view;

static inline af_block_view af_block_at(const af_blocks_params *p, int l, int W, int R) {
    size_t w = (size_t)W, m = (size_t)R * W, L_ = (size_t)l;
    af_block_view v = {p->ln1_w + L_ * w, p->ln1_b + L_ * w, p->qkv_w + L_ * 3 * w * w,
                       p->qkv_b + L_ * 3 * w, p->proj_w + L_ * w * w, p->proj_b + L_ * w,
                       p->ln2_w + L_ * w, p->ln2_b + L_ * w, p->fc1_w + L_ * m * w,
                       p->fc1_b + L_ * m, p->fc2_w + L_ * w * m, p->fc2_b + L_ * w};
    return v;
}

/* Saved activations of block l (each pointer as af_blocks_acts without the NL axis; att and
 * att_stats NULL when the layout keeps none). */
typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *att, *att_stats, *atty, *res2, *ln2, *ln2_mean,
        *ln2_rstd, *fch, *fch_gelu, *res3;
} af_block_acts_view;

static inline af_block_acts_view af_block_acts_at(const af_blocks_acts *a, int l, int T, int W,
                                                  int R, int NH) {
    size_t B = (size_t)a->cap; /* the layer stride is the capacity, not the current batch */
    size_t N = B * T, L_ = a->shared ? 0 : (size_t)l, w = (size_t)W, m = (size_t)R * W;
    size_t Lg = a->gelu_shared ? 0 : L_;
    af_block_acts_view v = {a->ln1 + L_ * N * w, a->ln1_mean + L_ * N, a->ln1_rstd + L_ * N,
                            a->qkv + L_ * N * 3 * w,
                            a->att ? a->att + L_ * B * NH * T * T : NULL,
                            a->att_stats ? a->att_stats + L_ * B * NH * T * 2 : NULL,
                            a->atty + L_ * N * w, a->res2 + L_ * N * w, a->ln2 + L_ * N * w,
                            a->ln2_mean + L_ * N, a->ln2_rstd + L_ * N, a->fch + L_ * N * m,
                            a->fch_gelu + Lg * N * m, a->res3 + L_ * N * w};
    return v;
}

/* The output of the last of NL blocks (its res3). */
static inline const float *af_blocks_output(const af_blocks_acts *a, int NL, int T, int W, int R,
                                            int NH) {
    return af_block_acts_at(a, NL - 1, T, W, R, NH).res3;
}

#endif
