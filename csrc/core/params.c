/* Configuration presets, parameter layouts, named-parameter tables and initialisation of the
 * three networks (METHOD.md §2, §7). See model.h for the layout contract. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "ops/ops.h"
#include "rng.h"

/* ------------------------------------------------------------------ configuration */

af_status af_config_preset(af_config *cfg, const char *name) {
    AF_CHECK(cfg != NULL && name != NULL, AF_EINVAL, "config preset: NULL argument");
    af_config c = {0};
    c.S = 224, c.P = 16, c.C = 1, c.mlp_ratio = 4;
    c.K = 256, c.head_hidden = 1024, c.head_bottleneck = 256;
    if (strcmp(name, "vit_base") == 0) {
        c.D = 768, c.depth = 12, c.H = 12, c.Dd = 512, c.depth_d = 8, c.Hd = 16;
    } else if (strcmp(name, "vit_small") == 0) {
        c.D = 384, c.depth = 12, c.H = 6, c.Dd = 256, c.depth_d = 4, c.Hd = 8;
    } else if (strcmp(name, "vit_tiny") == 0) {
        c.D = 192, c.depth = 12, c.H = 3, c.Dd = 128, c.depth_d = 2, c.Hd = 4;
    } else if (strcmp(name, "test") == 0) {
        /* unit-test size; the head is shrunk too so that whole-model gradient fixtures stay
         * small (METHOD §7 fixes only D, depth, heads and the decoder for this preset) */
        c.S = 32, c.P = 8;
        c.D = 32, c.depth = 2, c.H = 2, c.Dd = 32, c.depth_d = 1, c.Hd = 2;
        c.K = 16, c.head_hidden = 32, c.head_bottleneck = 16;
    } else {
        return af_error(AF_EINVAL, "unknown preset '%s' (expected vit_base, vit_small, vit_tiny "
                        "or test)", name);
    }
    *cfg = c;
    return AF_OK;
}

af_status af_config_validate(const af_config *c) {
    AF_CHECK(c != NULL, AF_EINVAL, "config is NULL");
#define POS(f) AF_CHECK(c->f > 0, AF_EINVAL, "config: " #f " must be > 0, got %d", c->f)
#define FLAG(f) AF_CHECK(c->f == 0 || c->f == 1, AF_EINVAL, "config: " #f " must be 0 or 1, got %d", c->f)
    POS(S); POS(P); POS(D); POS(depth); POS(H); POS(mlp_ratio); POS(Dd); POS(depth_d); POS(Hd);
    POS(K); POS(head_hidden); POS(head_bottleneck);
    FLAG(shared_last_layer); FLAG(shared_mask_token); FLAG(learned_pos);
#undef POS
#undef FLAG
    AF_CHECK(c->C == 1 || c->C == 3, AF_EINVAL, "config: in_chans must be 1 or 3, got %d", c->C);
    AF_CHECK(c->S % c->P == 0, AF_EINVAL, "config: image size %d is not divisible by patch size %d",
             c->S, c->P);
    AF_CHECK(c->D % c->H == 0, AF_EINVAL, "config: D=%d is not divisible by heads=%d", c->D, c->H);
    AF_CHECK(c->Dd % c->Hd == 0, AF_EINVAL, "config: decoder width %d is not divisible by decoder "
             "heads %d", c->Dd, c->Hd);
    /* the 2-D sin-cos embedding splits the width into 4 equal parts */
    AF_CHECK(c->D % 4 == 0, AF_EINVAL, "config: D=%d must be divisible by 4 (sin-cos position "
             "embedding)", c->D);
    AF_CHECK(c->Dd % 4 == 0, AF_EINVAL, "config: decoder width %d must be divisible by 4 (sin-cos "
             "position embedding)", c->Dd);
    /* int-indexed kernels: keep every activation dimension product far below 2^31 */
    long long L = (long long)(c->S / c->P) * (c->S / c->P);
    long long Wm = (long long)c->mlp_ratio * (c->D > c->Dd ? c->D : c->Dd);
    AF_CHECK(L <= 65536 && Wm <= 65536 && c->head_hidden <= 65536 && c->K <= 65536 &&
             c->head_bottleneck <= 65536 && (long long)c->P * c->P * c->C <= 65536,
             AF_EINVAL, "config: sizes too large (L=%lld)", L);
    return AF_OK;
}

/* ------------------------------------------------------------------ layouts */

/* Field sizes in struct (= memory) order; llm.c's param_sizes. */
enum { NB_FIELDS = 12, ENC_FIELDS = 4 + NB_FIELDS + 2, HEAD_FIELDS = 7,
       DEC_FIELDS = 4 + NB_FIELDS + 4 };

static void blocks_sizes(size_t *s, int NL, int W, int R) {
    size_t nl = (size_t)NL, w = (size_t)W, m = (size_t)R * W;
    size_t v[NB_FIELDS] = {nl * w, nl * w, nl * 3 * w * w, nl * 3 * w, nl * w * w, nl * w,
                           nl * w, nl * w, nl * m * w, nl * m, nl * w * m, nl * w};
    memcpy(s, v, sizeof v);
}

static void encoder_sizes(size_t *s, const af_config *c) {
    size_t D = (size_t)c->D, L = (size_t)(c->S / c->P) * (c->S / c->P);
    size_t Q = (size_t)c->P * c->P * c->C;
    s[0] = D * Q;
    s[1] = D;
    s[2] = D;
    s[3] = (L + 1) * D;
    blocks_sizes(s + 4, c->depth, c->D, c->mlp_ratio);
    s[4 + NB_FIELDS] = D;
    s[5 + NB_FIELDS] = D;
}

static void head_sizes(size_t *s, const af_config *c) {
    size_t D = (size_t)c->D, Hh = (size_t)c->head_hidden, Bn = (size_t)c->head_bottleneck;
    size_t L = (size_t)(c->S / c->P) * (c->S / c->P);
    s[0] = Hh * D, s[1] = Hh, s[2] = Hh * Hh, s[3] = Hh, s[4] = Bn * Hh, s[5] = Bn;
    s[6] = (c->shared_last_layer ? 1 : L) * (size_t)c->K * Bn;
}

static void decoder_sizes(size_t *s, const af_config *c) {
    size_t D = (size_t)c->D, Dd = (size_t)c->Dd, L = (size_t)(c->S / c->P) * (c->S / c->P);
    size_t Q = (size_t)c->P * c->P * c->C;
    s[0] = Dd * D;
    s[1] = Dd;
    s[2] = (c->shared_mask_token ? 1 : L) * Dd;
    s[3] = (L + 1) * Dd;
    blocks_sizes(s + 4, c->depth_d, c->Dd, c->mlp_ratio);
    s[4 + NB_FIELDS] = Dd;
    s[5 + NB_FIELDS] = Dd;
    s[6 + NB_FIELDS] = Q * Dd;
    s[7 + NB_FIELDS] = Q;
}

static void blocks_ptrs(float ***p, af_blocks_params *b) {
    float **v[NB_FIELDS] = {&b->ln1_w, &b->ln1_b, &b->qkv_w, &b->qkv_b, &b->proj_w, &b->proj_b,
                            &b->ln2_w, &b->ln2_b, &b->fc1_w, &b->fc1_b, &b->fc2_w, &b->fc2_b};
    memcpy(p, v, sizeof v);
}

static void carve(float ***ptrs, const size_t *sizes, int n, float *base) {
    for (int i = 0; i < n; i++) {
        *ptrs[i] = base;
        base += sizes[i];
    }
}

void af_encoder_carve(af_encoder_params *p, float *base, const af_config *c) {
    size_t s[ENC_FIELDS];
    float **v[ENC_FIELDS] = {&p->patch_w, &p->patch_b, &p->cls, &p->pos};
    blocks_ptrs(v + 4, &p->blocks);
    v[4 + NB_FIELDS] = &p->norm_w;
    v[5 + NB_FIELDS] = &p->norm_b;
    encoder_sizes(s, c);
    carve(v, s, ENC_FIELDS, base);
}

void af_head_carve(af_head_params *p, float *base, const af_config *c) {
    size_t s[HEAD_FIELDS];
    float **v[HEAD_FIELDS] = {&p->fc1_w, &p->fc1_b, &p->fc2_w, &p->fc2_b,
                              &p->fc3_w, &p->fc3_b, &p->last_v};
    head_sizes(s, c);
    carve(v, s, HEAD_FIELDS, base);
}

void af_decoder_carve(af_decoder_params *p, float *base, const af_config *c) {
    size_t s[DEC_FIELDS];
    float **v[DEC_FIELDS] = {&p->embed_w, &p->embed_b, &p->mask_token, &p->pos};
    blocks_ptrs(v + 4, &p->blocks);
    v[4 + NB_FIELDS] = &p->norm_w;
    v[5 + NB_FIELDS] = &p->norm_b;
    v[6 + NB_FIELDS] = &p->pred_w;
    v[7 + NB_FIELDS] = &p->pred_b;
    decoder_sizes(s, c);
    carve(v, s, DEC_FIELDS, base);
}

/* ------------------------------------------------------------------ named tables */

enum {
    AF_INIT_ZERO = 0,
    AF_INIT_ONE = 1,
    AF_INIT_XAVIER = 2,   /* U(-a, a), a = sqrt(6 / (fan_in + fan_out)) on the 2-D view */
    AF_INIT_NORMAL = 3,   /* N(0, std)                                                  */
    AF_INIT_UNIFORM = 4,  /* U(-a, a)                                                   */
    AF_INIT_SINCOS = 5    /* MAE 2-D sin-cos with a zero cls row                        */
};

typedef struct {
    af_param_info *t;
    int n, cap;
    size_t off[32]; /* start offset of each field */
} table_builder;

/* Append one tensor at field `f` + `sub` floats; shape given as up to 4 dims. */
static void add(table_builder *tb, const char *name, int f, size_t sub, int ndim, int64_t d0,
                int64_t d1, int64_t d2, int64_t d3, int trainable, int init, float scale) {
    af_param_info *e = &tb->t[tb->n++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->offset = tb->off[f] + sub;
    e->ndim = ndim;
    int64_t d[4] = {d0, d1, d2, d3};
    e->numel = 1;
    for (int i = 0; i < ndim; i++) {
        e->shape[i] = d[i];
        e->numel *= (size_t)d[i];
    }
    size_t len = strlen(e->name);
    int is_bias = len >= 5 && strcmp(e->name + len - 5, ".bias") == 0;
    e->decay = trainable && !is_bias && ndim > 1; /* DINO's get_params_groups rule */
    e->trainable = trainable;
    e->init = init;
    e->init_scale = scale;
}

static float xavier(int64_t fan_out, int64_t fan_in) {
    return (float)sqrt(6.0 / (double)(fan_in + fan_out));
}

/* timm/MAE names of NL blocks of width W; `prefix` is "blocks" or "decoder_blocks". */
static void add_blocks(table_builder *tb, const char *prefix, int f0, int NL, int W, int R) {
    char nm[64];
    size_t w = (size_t)W, m = (size_t)R * W;
    int64_t W3 = 3 * (int64_t)W, M = (int64_t)m;
    for (int l = 0; l < NL; l++) {
        size_t L_ = (size_t)l;
#define NAME(s) (snprintf(nm, sizeof nm, "%s.%d.%s", prefix, l, s), nm)
        add(tb, NAME("norm1.weight"), f0 + 0, L_ * w, 1, W, 0, 0, 0, 1, AF_INIT_ONE, 1.f);
        add(tb, NAME("norm1.bias"), f0 + 1, L_ * w, 1, W, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add(tb, NAME("attn.qkv.weight"), f0 + 2, L_ * 3 * w * w, 2, W3, W, 0, 0, 1, AF_INIT_XAVIER,
            xavier(W3, W));
        add(tb, NAME("attn.qkv.bias"), f0 + 3, L_ * 3 * w, 1, W3, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add(tb, NAME("attn.proj.weight"), f0 + 4, L_ * w * w, 2, W, W, 0, 0, 1, AF_INIT_XAVIER,
            xavier(W, W));
        add(tb, NAME("attn.proj.bias"), f0 + 5, L_ * w, 1, W, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add(tb, NAME("norm2.weight"), f0 + 6, L_ * w, 1, W, 0, 0, 0, 1, AF_INIT_ONE, 1.f);
        add(tb, NAME("norm2.bias"), f0 + 7, L_ * w, 1, W, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add(tb, NAME("mlp.fc1.weight"), f0 + 8, L_ * m * w, 2, M, W, 0, 0, 1, AF_INIT_XAVIER,
            xavier(M, W));
        add(tb, NAME("mlp.fc1.bias"), f0 + 9, L_ * m, 1, M, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add(tb, NAME("mlp.fc2.weight"), f0 + 10, L_ * w * m, 2, W, M, 0, 0, 1, AF_INIT_XAVIER,
            xavier(W, M));
        add(tb, NAME("mlp.fc2.bias"), f0 + 11, L_ * w, 1, W, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
#undef NAME
    }
}

af_status af_param_table(const af_config *c, af_net net, af_param_info **table, int *count,
                         size_t *total) {
    AF_TRY(af_config_validate(c));
    AF_CHECK(table != NULL && count != NULL, AF_EINVAL, "af_param_table: NULL output");
    AF_CHECK(net >= 0 && net < AF_NET_COUNT, AF_EINVAL, "unknown network %d", (int)net);
    int L = (c->S / c->P) * (c->S / c->P), T = L + 1;
    size_t sizes[32];
    int nf = net == AF_NET_ENCODER ? ENC_FIELDS : net == AF_NET_HEAD ? HEAD_FIELDS : DEC_FIELDS;
    if (net == AF_NET_ENCODER) encoder_sizes(sizes, c);
    else if (net == AF_NET_HEAD) head_sizes(sizes, c);
    else decoder_sizes(sizes, c);
    table_builder tb = {0};
    size_t sum = 0;
    for (int i = 0; i < nf; i++) {
        tb.off[i] = sum;
        sum += sizes[i];
    }
    int depth = net == AF_NET_ENCODER ? c->depth : net == AF_NET_DECODER ? c->depth_d : 0;
    tb.cap = 16 + NB_FIELDS * depth + (net == AF_NET_HEAD ? L : 0);
    tb.t = af_calloc((size_t)tb.cap, sizeof(af_param_info));
    if (tb.t == NULL) return AF_ENOMEM;

    int64_t D = c->D, Dd = c->Dd, C = c->C, P = c->P, Q = (int64_t)P * P * C;
    if (net == AF_NET_ENCODER) {
        add(&tb, "cls_token", 2, 0, 3, 1, 1, D, 0, 1, AF_INIT_NORMAL, 0.02f);
        add(&tb, "pos_embed", 3, 0, 3, 1, T, D, 0, c->learned_pos, AF_INIT_SINCOS, 0.f);
        add(&tb, "patch_embed.proj.weight", 0, 0, 4, D, C, P, P, 1, AF_INIT_XAVIER,
            xavier(D, Q));
        add(&tb, "patch_embed.proj.bias", 1, 0, 1, D, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add_blocks(&tb, "blocks", 4, c->depth, c->D, c->mlp_ratio);
        add(&tb, "norm.weight", 4 + NB_FIELDS, 0, 1, D, 0, 0, 0, 1, AF_INIT_ONE, 1.f);
        add(&tb, "norm.bias", 5 + NB_FIELDS, 0, 1, D, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
    } else if (net == AF_NET_HEAD) {
        int64_t Hh = c->head_hidden, Bn = c->head_bottleneck, K = c->K;
        /* released code: trunc_normal(0.02) on the MLP (the +-2 cut never triggers) */
        add(&tb, "mlp.0.weight", 0, 0, 2, Hh, D, 0, 0, 1, AF_INIT_NORMAL, 0.02f);
        add(&tb, "mlp.0.bias", 1, 0, 1, Hh, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add(&tb, "mlp.2.weight", 2, 0, 2, Hh, Hh, 0, 0, 1, AF_INIT_NORMAL, 0.02f);
        add(&tb, "mlp.2.bias", 3, 0, 1, Hh, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add(&tb, "mlp.4.weight", 4, 0, 2, Bn, Hh, 0, 0, 1, AF_INIT_NORMAL, 0.02f);
        add(&tb, "mlp.4.bias", 5, 0, 1, Bn, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        /* the weight-normalised layers keep nn.Linear's default init (created after the
         * MLP init in the released code): U(-1/sqrt(Bn), 1/sqrt(Bn)) on v */
        float a = (float)(1.0 / sqrt((double)Bn));
        if (c->shared_last_layer) {
            add(&tb, "last_layer.weight_v", 6, 0, 2, K, Bn, 0, 0, 1, AF_INIT_UNIFORM, a);
            tb.t[tb.n - 1].last_layer = 1;
        } else {
            char nm[64];
            for (int j = 0; j < L; j++) {
                snprintf(nm, sizeof nm, "last_layers.%d.weight_v", j);
                add(&tb, nm, 6, (size_t)j * (size_t)(K * Bn), 2, K, Bn, 0, 0, 1, AF_INIT_UNIFORM, a);
                tb.t[tb.n - 1].last_layer = 1;
            }
        }
    } else {
        add(&tb, "mask_token", 2, 0, 3, 1, c->shared_mask_token ? 1 : L, Dd, 0, 1, AF_INIT_NORMAL,
            0.02f);
        add(&tb, "decoder_pos_embed", 3, 0, 3, 1, T, Dd, 0, 0, AF_INIT_SINCOS, 0.f);
        add(&tb, "decoder_embed.weight", 0, 0, 2, Dd, D, 0, 0, 1, AF_INIT_XAVIER, xavier(Dd, D));
        add(&tb, "decoder_embed.bias", 1, 0, 1, Dd, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add_blocks(&tb, "decoder_blocks", 4, c->depth_d, c->Dd, c->mlp_ratio);
        add(&tb, "decoder_norm.weight", 4 + NB_FIELDS, 0, 1, Dd, 0, 0, 0, 1, AF_INIT_ONE, 1.f);
        add(&tb, "decoder_norm.bias", 5 + NB_FIELDS, 0, 1, Dd, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
        add(&tb, "decoder_pred.weight", 6 + NB_FIELDS, 0, 2, Q, Dd, 0, 0, 1, AF_INIT_XAVIER,
            xavier(Q, Dd));
        add(&tb, "decoder_pred.bias", 7 + NB_FIELDS, 0, 1, Q, 0, 0, 0, 1, AF_INIT_ZERO, 0.f);
    }
    *table = tb.t;
    *count = tb.n;
    if (total) *total = sum;
    return AF_OK;
}

/* ------------------------------------------------------------------ initialisation */

af_status af_init_params(const af_config *c, af_net net, float *buf) {
    af_param_info *t;
    int n;
    AF_TRY(af_param_table(c, net, &t, &n, NULL));
    int G = c->S / c->P;
    for (int i = 0; i < n; i++) {
        const af_param_info *e = &t[i];
        float *p = buf + e->offset;
        /* one stream per tensor: (network, table index) -> identical draws on any backend */
        uint64_t stream = af_stream(AF_RNG_INIT, 0, ((uint32_t)net << 16) | (uint32_t)i);
        switch (e->init) {
        case AF_INIT_ZERO: memset(p, 0, e->numel * sizeof(float)); break;
        case AF_INIT_ONE:
            for (size_t k = 0; k < e->numel; k++) p[k] = 1.0f;
            break;
        case AF_INIT_XAVIER:
        case AF_INIT_UNIFORM:
            for (size_t k = 0; k < e->numel; k++)
                p[k] = (2.0f * af_rand_uniform(c->seed, stream, k) - 1.0f) * e->init_scale;
            break;
        case AF_INIT_NORMAL:
            for (size_t k = 0; k < e->numel; k++)
                p[k] = e->init_scale * af_rand_normal(c->seed, stream, k);
            break;
        case AF_INIT_SINCOS:
            af_sincos_2d_embed(p, (int)e->shape[2], G, 1);
            break;
        default:
            af_free(t);
            return af_error(AF_EINTERNAL, "unknown init kind %d for %s", e->init, e->name);
        }
    }
    af_free(t);
    return AF_OK;
}

/* ------------------------------------------------------------------ input normalisation */

af_status af_normalize_images(float *out, const uint8_t *img, int B, int C, int S) {
    AF_CHECK(out != NULL && img != NULL, AF_EINVAL, "normalize_images: NULL buffer");
    AF_CHECK(B >= 0 && S > 0, AF_EINVAL, "normalize_images: bad sizes B=%d S=%d", B, S);
    AF_CHECK(C == 1 || C == 3, AF_EINVAL, "normalize_images: in_chans must be 1 or 3, got %d", C);
    /* C=1: the ImageNet means/stds averaged (METHOD §1); C=3: ImageNet per channel */
    static const float mean1[1] = {0.449f}, std1[1] = {0.226f};
    static const float mean3[3] = {0.485f, 0.456f, 0.406f}, std3[3] = {0.229f, 0.224f, 0.225f};
    const float *mean = C == 1 ? mean1 : mean3, *sd = C == 1 ? std1 : std3;
    size_t SS = (size_t)S * S;
    for (int b = 0; b < B; b++)
        for (int ch = 0; ch < C; ch++) {
            float *o = out + ((size_t)b * C + ch) * SS;
            const uint8_t *x = img + (size_t)b * SS;
            float inv = 1.0f / sd[ch];
            for (size_t k = 0; k < SS; k++) o[k] = ((float)x[k] / 255.0f - mean[ch]) * inv;
        }
    return AF_OK;
}

/* ------------------------------------------------------------------ activation blocks */

/* Bump allocator over one activation block: counts when base is NULL. */
typedef struct {
    float *base;
    size_t used, align; /* align: floats, a power of two */
} bump;

static float *take(bump *b, size_t n) {
    float *p = b->base ? b->base + b->used : NULL;
    b->used += (n + b->align - 1) & ~(b->align - 1); /* every array starts aligned */
    return p;
}

/* NL blocks' activations; `slots` of them kept (NL, or 1 for a forward that nothing
 * differentiates), fch_gelu in `gelu_slots`, the softmax as probabilities (att_probs) or row
 * statistics (att_stats; neither when nothing is kept). */
static void blocks_acts_carve(af_blocks_acts *a, bump *b, int NL, int cap, int T, int W, int R,
                              int NH, int shared, int gelu_shared, int fused) {
    int slots = shared ? 1 : NL, gslots = shared || gelu_shared ? 1 : NL;
    size_t N = (size_t)slots * cap * T, w = (size_t)W, m = (size_t)R * W;
    a->ln1 = take(b, N * w), a->ln1_mean = take(b, N), a->ln1_rstd = take(b, N);
    a->qkv = take(b, N * 3 * w);
    a->att = fused ? NULL : take(b, (size_t)slots * cap * NH * T * T);
    a->att_stats = fused && !shared ? take(b, (size_t)slots * cap * NH * T * 2) : NULL;
    a->atty = take(b, N * w), a->res2 = take(b, N * w);
    a->ln2 = take(b, N * w), a->ln2_mean = take(b, N), a->ln2_rstd = take(b, N);
    a->fch = take(b, N * m), a->fch_gelu = take(b, (size_t)gslots * cap * T * m);
    a->res3 = take(b, N * w);
    a->cap = cap;
    a->shared = shared;
    a->gelu_shared = gelu_shared || shared;
}

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

size_t af_acts_carve(const af_config *c, int cap, int branches, float *base, size_t align,
                     af_encoder_acts enc[2], af_head_acts head[2], af_decoder_acts *d,
                     af_scratch *s) {
    static const af_acts_layout full = {0, 0, 0, 0, 0};
    return af_acts_carve_layout(c, cap, branches, base, align, &full, enc, head, d, s);
}

size_t af_acts_carve_layout(const af_config *c, int cap, int branches, float *base,
                            size_t align, const af_acts_layout *lay, af_encoder_acts enc[2],
                            af_head_acts head[2], af_decoder_acts *d, af_scratch *s) {
    bump bb = {base, 0, align}, *b = &bb;
    int Ti = (c->S / c->P) * (c->S / c->P) + 1;
    size_t L = (size_t)Ti - 1, T = (size_t)Ti, Bc = (size_t)cap, Q = (size_t)c->P * c->P * c->C;
    size_t D = (size_t)c->D, Dd = (size_t)c->Dd, R = (size_t)c->mlp_ratio;
    size_t Hh = (size_t)c->head_hidden, Bn = (size_t)c->head_bottleneck, K = (size_t)c->K;
    size_t nlast = c->shared_last_layer ? 1 : L;
    int fused = lay->fused_attention, inf = lay->inference;
    for (int br = 0; br < 2; br++) {
        if (br >= branches) {   /* no activations: NULL pointers, refused by the forwards */
            memset(&enc[br], 0, sizeof enc[br]);
            memset(&head[br], 0, sizeof head[br]);
            continue;
        }
        af_encoder_acts *e = &enc[br];
        if (inf && br == AF_TEACHER) { /* never live at the same time as the student's */
            enc[br] = enc[AF_STUDENT];
        } else {
            int transient = inf || (br == AF_TEACHER && lay->teacher_transient);
            e->patches = take(b, Bc * L * Q);
            e->x0 = take(b, Bc * T * D);
            blocks_acts_carve(&e->blocks, b, c->depth, cap, Ti, c->D, c->mlp_ratio, c->H,
                              transient, lay->gelu_recompute, fused);
            e->out = take(b, Bc * T * D), e->lnf_mean = take(b, Bc * T);
            e->lnf_rstd = take(b, Bc * T);
        }
        af_head_acts *h = &head[br];
        if (inf) {
            memset(h, 0, sizeof *h);
            continue;
        }
        size_t N = Bc * L;
        h->x = take(b, N * D);
        h->h1 = take(b, N * Hh), h->g1 = take(b, N * Hh);
        if (br == AF_TEACHER && lay->teacher_transient) { /* fc2 overwrites fc1's buffers */
            h->h2 = h->h1, h->g2 = h->g1;
        } else {
            h->h2 = take(b, N * Hh), h->g2 = take(b, N * Hh);
        }
        h->z = take(b, N * Bn), h->zn_t = take(b, N * Bn), h->znorm = take(b, N);
        h->w_eff = take(b, nlast * K * Bn), h->vnorm = take(b, nlast * K);
        h->logits_t = take(b, N * K), h->logits = take(b, N * K);
    }
    d->tokens = take(b, Bc * T * D);
    d->x0 = take(b, Bc * T * Dd);
    blocks_acts_carve(&d->blocks, b, c->depth_d, cap, Ti, c->Dd, c->mlp_ratio, c->Hd, inf,
                      lay->gelu_recompute, fused);
    d->lnf = take(b, Bc * T * Dd), d->lnf_mean = take(b, Bc * T), d->lnf_rstd = take(b, Bc * T);
    d->pred_full = take(b, Bc * T * Q), d->pred = take(b, Bc * L * Q);
    size_t W = max_sz(D, Dd), NH = (size_t)(c->H > c->Hd ? c->H : c->Hd);
    size_t wide = max_sz(max_sz(Hh, Bn), max_sz(max_sz(D, Q), K));
    memset(s, 0, sizeof *s);
    s->dres = take(b, Bc * T * W); /* also the encoder's patch-embedding temporary */
    if (fused) {
        s->datt_floats = lay->att_scratch_floats; /* af_attention_fused_*, CPU only */
    } else {
        s->datt_floats = Bc * NH * T * T;
    }
    s->datt = take(b, s->datt_floats);
    if (inf) return bb.used;
    s->dres2 = take(b, Bc * T * W);
    s->dln = take(b, Bc * T * W), s->datty = take(b, Bc * T * W);
    s->dqkv = take(b, Bc * T * 3 * W);
    s->dfch = take(b, Bc * T * R * W), s->dfch_gelu = take(b, Bc * T * R * W);
    s->dh_a = take(b, Bc * T * wide), s->dh_b = take(b, Bc * T * wide);
    s->dz_t = take(b, Bc * L * Bn);
    if (fused) { /* the CPU head runs its per-position last layers one per thread */
        s->wn_slots = lay->threads < 1 ? 1 : lay->threads;
        s->wn_ws = take(b, (size_t)s->wn_slots * K * Bn);
    }
    return bb.used;
}

af_status af_acts_size(const af_config *c, int cap, int branches, size_t align,
                       size_t *floats) {
    static const af_acts_layout full = {0, 0, 0, 0, 0};
    return af_acts_size_layout(c, cap, branches, align, &full, floats);
}

af_status af_acts_size_layout(const af_config *c, int cap, int branches, size_t align,
                              const af_acts_layout *lay, size_t *floats) {
    /* size check in double first: the int-indexed kernels need B*H*T*T < 2^31 (the T x T
     * layout) and B*T*R*W < 2^31 */
    double T = (c->S / c->P) * (c->S / c->P) + 1, NH = c->H > c->Hd ? c->H : c->Hd;
    double W = c->D > c->Dd ? c->D : c->Dd;
    AF_CHECK((lay->fused_attention || (double)cap * NH * T * T < 2147483647.0) &&
             (double)cap * NH * T * 2 < 2147483647.0 &&
             (double)cap * T * W * c->mlp_ratio < 2147483647.0,
             AF_EINVAL, "batch size %d too large for this model", cap);
    af_encoder_acts enc[2];
    af_head_acts head[2];
    af_decoder_acts dec;
    af_scratch s;
    AF_CHECK(branches == 1 || branches == 2, AF_EINVAL, "branches must be 1 or 2, got %d",
             branches);
    *floats = af_acts_carve_layout(c, cap, branches, NULL, align, lay, enc, head, &dec, &s);
    return AF_OK;
}
