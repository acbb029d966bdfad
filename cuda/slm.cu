// Synthetic Lesion Masks on the GPU: the twin of csrc/core/slm.c (rules in csrc/core/slm.h), bit-identical.
//
// One block per image. The block plans the lesions with the very same draws as the CPU
// (af_stream(AF_RNG_SLM, step, image), slots of slm.c), then every thread draws whole pixels:
// a pixel's M is the saturated sum over the lesions covering it, which equals the CPU's
// lesion-by-lesion saturated accumulation (all terms are >= 0). Token labels follow from
// integer sums. Every float operation of slm.c is spelled with a _rn intrinsic here so that
// nvcc cannot contract it into an FMA; the fall-off uses af_exp_exact like slm.c.
#include "common.cuh"
#include "fp_exact.h"
#include "objective.cuh"
#include "rng.h"

#define SLM_THREADS 256
#define SLOT_LESION(r, k) (1u + 8u * (uint64_t)(r) + (k))

struct slm_dev_lesion {
    int x0, y0, w, h;
    int cx0, cy0, cw, ch;         // texture crop
    float dmin, range, rx, ry;    // fall-off extremes and bilinear ratios
};

// ---- the float steps of slm.c, operation by operation ------------------------------------

// falloff() of slm.c: Eq. 2-3 on the LW x LH box.
__device__ __forceinline__ float slm_falloff(int w, int h, int LW, int LH, float gamma2) {
    float hw = __fmul_rn(0.5f, (float)LW), hh = __fmul_rn(0.5f, (float)LH);
    float u = __fdiv_rn(__fsub_rn(__fadd_rn((float)w, 0.5f), hw), hw);
    float v = __fdiv_rn(__fsub_rn(__fadd_rn((float)h, 0.5f), hh), hh);
    return af_exp_exact(__fdiv_rn(-__fadd_rn(__fmul_rn(u, u), __fmul_rn(v, v)), gamma2));
}

// bilinear_src() of slm.c.
__device__ __forceinline__ void slm_bilinear_src(int i, float ratio, int in, int *a, int *b,
                                                 float *f) {
    float s = __fsub_rn(__fmul_rn(__fadd_rn((float)i, 0.5f), ratio), 0.5f);
    if (s < 0.0f) s = 0.0f;
    if (s > (float)(in - 1)) s = (float)(in - 1);
    int a0 = (int)s;
    *a = a0;
    *b = a0 + 1 < in ? a0 + 1 : in - 1;
    *f = __fsub_rn(s, (float)a0);
}

// The rounded value lesion L adds at (w, h) of its box (lesion_draw() of slm.c).
__device__ __forceinline__ int slm_lesion_value(const slm_dev_lesion &L, int w, int h,
                                                const uint8_t *xb, int S, float gamma2,
                                                float strength) {
    int ya, yb, xa, xb2;
    float fy, fx;
    slm_bilinear_src(h, L.ry, L.ch, &ya, &yb, &fy);
    slm_bilinear_src(w, L.rx, L.cw, &xa, &xb2, &fx);
    const uint8_t *crop = xb + (size_t)L.cy0 * S + L.cx0;
    const uint8_t *ra = crop + (size_t)ya * S, *rb = crop + (size_t)yb * S;
    float omfx = __fsub_rn(1.0f, fx);
    float top = __fadd_rn(__fmul_rn(omfx, (float)ra[xa]), __fmul_rn(fx, (float)ra[xb2]));
    float bot = __fadd_rn(__fmul_rn(omfx, (float)rb[xa]), __fmul_rn(fx, (float)rb[xb2]));
    float eta = __fadd_rn(__fmul_rn(__fsub_rn(1.0f, fy), top), __fmul_rn(fy, bot));
    float d = strength;
    if (L.range > 0.0f) {
        d = __fmul_rn(__fdiv_rn(__fsub_rn(slm_falloff(w, h, L.w, L.h, gamma2), L.dmin), L.range),
                      strength);
        if (d < 0.0f) d = 0.0f;
        if (d > strength) d = strength;
    }
    return (int)__fadd_rn(__fmul_rn(eta, d), 0.5f);
}

// ---- planning (integer logic of slm.c) --------------------------------------------------

// otsu_from_hist() of slm.c.
__device__ int slm_otsu(const unsigned *hist, int64_t n) {
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
        double score = __ddiv_rn(__dmul_rn(diff, diff), __dmul_rn((double)n0, (double)n1));
        if (score > best) {
            best = score;
            best_t = t;
        }
    }
    return best_t < 0 ? vmax : best_t;
}

// largest_component() of slm.c (serial flood fill, one thread); ws holds 2*S*S ints.
__device__ void slm_largest_component(const uint8_t *x, int S, int t, int32_t *ws, int *cx,
                                      int *cy) {
    size_t n = (size_t)S * (size_t)S;
    int32_t *seen = ws, *stack = ws + n;
    for (size_t i = 0; i < n; i++) seen[i] = 0;
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
            xmin = min(xmin, px);
            xmax = max(xmax, px);
            ymin = min(ymin, py);
            ymax = max(ymax, py);
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
        if (count > best) {
            best = count;
            *cx = (xmin + xmax) / 2;
            *cy = (ymin + ymax) / 2;
        }
    }
}

// crop_around() of slm.c.
__device__ __forceinline__ void slm_crop_around(slm_dev_lesion &L, int cx, int cy, int S,
                                                int crop_max) {
    int x0 = cx - crop_max / 2, y0 = cy - crop_max / 2;
    int x1 = x0 + crop_max, y1 = y0 + crop_max;
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 > S) x1 = S;
    if (y1 > S) y1 = S;
    L.cx0 = x0;
    L.cy0 = y0;
    L.cw = x1 - x0;
    L.ch = y1 - y0;
}

// ---- the kernel: one block per image ------------------------------------------------------

__global__ void __launch_bounds__(SLM_THREADS)
slm_kernel(uint8_t *x_prime, uint8_t *mask, uint8_t *labels, const uint8_t *x, int S, int P,
           af_slm_config cfg, int lo, int hi, uint64_t seed, uint64_t step, uint64_t first,
           int32_t *ws) {
    __shared__ unsigned hist[256];
    __shared__ int64_t pre[SLM_THREADS + 1];  // foreground pixels before each thread's chunk
    __shared__ slm_dev_lesion les[AF_SLM_MAX_LESIONS];
    __shared__ int sh_t, sh_lcx, sh_lcy;
    __shared__ int64_t sh_fg;
    __shared__ unsigned long long sh_total;
    const int tid = threadIdx.x, nth = blockDim.x;
    const int b = blockIdx.x;
    const int64_t n = (int64_t)S * S;
    const uint8_t *xb = x + (size_t)b * n;
    uint8_t *mb = mask + (size_t)b * n, *xpb = x_prime + (size_t)b * n;
    const uint64_t stream = af_stream(AF_RNG_SLM, step, (uint32_t)(first + (uint64_t)b));
    // R is the same in every thread, so the barriers below are uniform
    const int R = (int)af_rand_int(seed, stream, 0, cfg.lesions_min, cfg.lesions_max);
    if (tid == 0) sh_total = 0ull;
    if (R > 0) {
        for (int i = tid; i < 256; i += nth) hist[i] = 0u;
        __syncthreads();
        for (int64_t p = tid; p < n; p += nth) atomicAdd(&hist[xb[p]], 1u);  // integer: exact
        __syncthreads();
        if (tid == 0) {
            int t = slm_otsu(hist, n);
            int64_t fg = 0;
            for (int v = t + 1; v < 256; v++) fg += hist[v];
            if (fg == 0) {  // constant image: the whole image is the texture source
                t = -1;
                fg = n;
            }
            sh_t = t;
            sh_fg = fg;
            sh_lcx = sh_lcy = 0;
            if (cfg.region_rule == AF_SLM_REGION_LARGEST)
                slm_largest_component(xb, S, t, ws + (size_t)b * 2 * n, &sh_lcx, &sh_lcy);
        }
        __syncthreads();
        const int t = sh_t;
        // chunked count of {x > t}: thread k owns pixels [k*cs, (k+1)*cs), row-major
        const int64_t cs = (n + nth - 1) / nth;
        if (cfg.region_rule == AF_SLM_REGION_RANDOM) {
            int64_t c = 0;
            for (int64_t p = tid * cs, e = min(n, (tid + 1) * cs); p < e; p++) c += (int)xb[p] > t;
            pre[tid + 1] = c;
            __syncthreads();
            if (tid == 0) {
                pre[0] = 0;
                for (int k = 1; k <= nth; k++) pre[k] += pre[k - 1];
            }
            __syncthreads();
        }
        for (int r = tid; r < R; r += nth) {  // thread r plans lesion r (slots of slm.c)
            slm_dev_lesion L;
            L.w = (int)af_rand_int(seed, stream, SLOT_LESION(r, 0), lo, hi);
            L.h = (int)af_rand_int(seed, stream, SLOT_LESION(r, 1), lo, hi);
            L.x0 = (int)af_rand_int(seed, stream, SLOT_LESION(r, 2), 0, S - L.w);
            L.y0 = (int)af_rand_int(seed, stream, SLOT_LESION(r, 3), 0, S - L.h);
            if (cfg.region_rule == AF_SLM_REGION_LARGEST) {
                slm_crop_around(L, sh_lcx, sh_lcy, S, cfg.crop_max);
            } else {
                int64_t k = af_rand_int(seed, stream, SLOT_LESION(r, 4), 0, sh_fg - 1);
                // the chunk c with pre[c] <= k < pre[c+1], then the k-th pixel inside it
                int a = 0, z = nth - 1;
                while (a < z) {
                    int mid = (a + z + 1) / 2;
                    if (pre[mid] <= k) a = mid; else z = mid - 1;
                }
                int64_t left = k - pre[a], p = n - 1;
                for (int64_t q = a * cs, e = min(n, (a + 1) * cs); q < e; q++) {
                    if ((int)xb[q] > t) {
                        if (left == 0) { p = q; break; }
                        left--;
                    }
                }
                slm_crop_around(L, (int)(p % S), (int)(p / S), S, cfg.crop_max);
            }
            float dmax = slm_falloff((L.w - 1) / 2, (L.h - 1) / 2, L.w, L.h, cfg.gamma2);
            L.dmin = slm_falloff(0, 0, L.w, L.h, cfg.gamma2);
            L.range = __fsub_rn(dmax, L.dmin);
            L.rx = __fdiv_rn((float)L.cw, (float)L.w);
            L.ry = __fdiv_rn((float)L.ch, (float)L.h);
            les[r] = L;
        }
    }
    __syncthreads();

    // every pixel: M = saturated sum of the lesions covering it, x' = clip(x + M)
    unsigned long long local = 0;
    for (int64_t p = tid; p < n; p += nth) {
        int py = (int)(p / S), px = (int)(p % S);
        int m = 0;
        for (int r = 0; r < R; r++) {
            const slm_dev_lesion &L = les[r];
            int w = px - L.x0, h = py - L.y0;
            if (w < 0 || h < 0 || w >= L.w || h >= L.h) continue;
            int v = slm_lesion_value(L, w, h, xb, S, cfg.gamma2, cfg.strength);
            int s = m + (v > 255 ? 255 : v);
            m = s > 255 ? 255 : s;
        }
        mb[p] = (uint8_t)m;
        int s = (int)xb[p] + m;
        xpb[p] = (uint8_t)(s > 255 ? 255 : s);
        local += (unsigned long long)m;
    }
    atomicAdd(&sh_total, local);  // integer sum: exact in any order
    __syncthreads();              // also makes this block's mask writes visible to it

    // token labels (token_labels_one() of slm.c)
    const int G = S / P;
    const uint64_t total = sh_total;
    uint8_t *lab = labels + (size_t)b * G * G;
    for (int j = tid; j < G * G; j += nth) {
        int gy = j / G, gx = j % G;
        uint64_t sum = 0;
        int any = 0;
        for (int py = 0; py < P; py++) {
            const uint8_t *row = mb + (size_t)(gy * P + py) * S + (size_t)gx * P;
            for (int px = 0; px < P; px++) {
                sum += row[px];
                any |= row[px] != 0;
            }
        }
        int abnormal = cfg.token_rule == AF_SLM_TOKENS_ANY
                           ? any
                           : sum * (uint64_t)S * S > total * (uint64_t)P * P;
        lab[j] = (uint8_t)abnormal;
    }
}

extern "C" af_status af_cuda_slm_generate(af_cuda_context *ctx, uint8_t *x_prime, uint8_t *mask,
                                          uint8_t *token_labels, const uint8_t *x, int B, int S,
                                          int P, const af_slm_config *cfg, uint64_t seed,
                                          uint64_t step, uint64_t first_image_index) {
    AF_CUDA_CHECK(ctx != nullptr, "slm_generate: NULL context");
    AF_CUDA_CHECK(B >= 0, "slm_generate: B must be >= 0, got %d", B);
    AF_CUDA_CHECK(S >= 1 && S <= AF_SLM_MAX_SIDE && P >= 1 && S % P == 0,
                  "slm_generate: need 1 <= S <= %d, P >= 1 and S %% P == 0, got S=%d P=%d",
                  AF_SLM_MAX_SIDE, S, P);
    AF_TRY(af_slm_config_check(cfg));
    if (B == 0) return AF_OK;
    AF_CUDA_CHECK(x_prime && mask && token_labels && x, "slm_generate: NULL pointer");
    int lo, hi;
    af_slm_size_range(S, cfg, &lo, &hi);
    int32_t *ws = nullptr;
    if (cfg->region_rule == AF_SLM_REGION_LARGEST) {
        // the released rule's flood fill needs 2*S*S ints per image (stream-ordered memory)
        size_t bytes = (size_t)B * 2 * (size_t)S * (size_t)S * sizeof(int32_t);
        AF_CUDA_TRY(cudaMallocAsync((void **)&ws, bytes, ctx->stream));
    }
    slm_kernel<<<B, SLM_THREADS, 0, ctx->stream>>>(x_prime, mask, token_labels, x, S, P, *cfg,
                                                   lo, hi, seed, step, first_image_index, ws);
    cudaError_t e = cudaGetLastError();
    if (ws != nullptr) {
        cudaError_t f = cudaFreeAsync(ws, ctx->stream);
        if (e == cudaSuccess) e = f;
    }
    if (e != cudaSuccess)
        return af_error(AF_ECUDA, "slm_generate: kernel launch failed: %s", cudaGetErrorString(e));
    return AF_OK;
}
