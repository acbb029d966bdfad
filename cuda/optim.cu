// AdamW, gradient clipping and the EMA teacher on the GPU: the twins of csrc/core/optim.c.
// Multi-tensor kernels over m->tensors (the trainable tensors in table order): blockIdx.y
// picks the tensor, blockIdx.x strides over its elements. Reductions are per tensor in a
// fixed order (double), and the total is summed over tensors in table order, as optim.c.
// Updates read a device flag `ok` so a refused step leaves parameters, moments and teacher
// bit-exact without a host round trip.
#include <math.h>

#include "common.cuh"
#include "model.cuh"

#define CLIP_EPS 1e-6  // optim.c
#define SUMSQ_THREADS 512
#define CHUNKS 32      // blocks per tensor for the elementwise kernels

// sumsq[i] = sum of g^2 over tensor i (one block per tensor; strided partial sums then a
// fixed shared-memory tree: deterministic). Twin of optim.c sumsq.
__global__ void sumsq_kernel(double *sumsq, const af_cuda_tensor *ts) {
    __shared__ double part[SUMSQ_THREADS];
    const af_cuda_tensor t = ts[blockIdx.x];
    double s = 0.0;
    for (size_t k = threadIdx.x; k < t.n; k += SUMSQ_THREADS) {
        double g = (double)t.g[k];
        s += g * g;
    }
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = SUMSQ_THREADS / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) sumsq[blockIdx.x] = part[0];
}

// One thread: the total norm in table order and each tensor's factor (1 = untouched), as
// af_clip_grad_per_tensor (mode 0), af_clip_grad_global (1) or no clipping (2).
__global__ void clip_coef_kernel(float *coef, double *norm, const double *sumsq, int n,
                                 float max_norm, int mode) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double tot = 0.0;
    for (int i = 0; i < n; i++) tot += sumsq[i];
    tot = sqrt(tot);
    double gcoef = max_norm / (tot + CLIP_EPS);
    for (int i = 0; i < n; i++) {
        double c = mode == 0 ? max_norm / (sqrt(sumsq[i]) + CLIP_EPS) : gcoef;
        coef[i] = (mode != 2 && c < 1.0) ? (float)c : 1.0f;
    }
    *norm = tot;
}

__global__ void scale_kernel(const af_cuda_tensor *ts, const float *coef) {
    const af_cuda_tensor t = ts[blockIdx.y];
    float f = coef[blockIdx.y];
    if (f == 1.0f) return;  // optim.c scales only when the factor is < 1
    AF_GRID_STRIDE(size_t, k, t.n)
        t.g[k] *= f;
}

// twin of af_adamw_update (csrc/ops/adamw.c, cuda/ops/adamw.cu) over every trainable tensor
__global__ void adamw_multi_kernel(const af_cuda_tensor *ts, const int *ok, float beta1,
                                   float beta2, float eps, float decay_on, float step_size,
                                   float bc2s, int freeze_last) {
    if (ok != nullptr && !*ok) return;
    const af_cuda_tensor t = ts[blockIdx.y];
    if (freeze_last && t.last_layer) return;
    float decay = t.decay ? decay_on : 1.0f;
    AF_GRID_STRIDE(size_t, i, t.n) {
        float g = t.g[i];
        float mi = beta1 * t.m[i] + (1.0f - beta1) * g;
        float vi = beta2 * t.v[i] + (1.0f - beta2) * g * g;
        t.m[i] = mi;
        t.v[i] = vi;
        float denom = sqrtf(vi) / bc2s + eps;
        t.p[i] = t.p[i] * decay - step_size * mi / denom;
    }
}

// twin of af_ema_update (Eq. 1): teacher = keep * teacher + take * student (encoder and head)
__global__ void ema_multi_kernel(const af_cuda_tensor *ts, const int *ok, float keep, float take) {
    if (ok != nullptr && !*ok) return;
    const af_cuda_tensor t = ts[blockIdx.y];
    if (t.t == nullptr) return;
    AF_GRID_STRIDE(size_t, i, t.n)
        t.t[i] = keep * t.t[i] + take * t.p[i];
}

extern "C" af_status af_cuda_clip_grad(af_cuda_context *ctx, af_cuda_model *m, float max_norm,
                                       int global, double *norm) {
    AF_CUDA_CHECK(m != nullptr && norm != nullptr, "clip_grad: NULL argument");
    AF_CUDA_CHECK(max_norm >= 0.0f && isfinite(max_norm), "clip_grad: max_norm must be finite and >= 0");
    if (m->ntrain == 0) return af_cuda_zero(ctx, (float *)norm, 2);
    sumsq_kernel<<<m->ntrain, SUMSQ_THREADS, 0, ctx->stream>>>(m->sumsq, m->tensors);
    AF_CUDA_LAUNCHED();
    int mode = max_norm == 0.0f ? 2 : global ? 1 : 0;
    clip_coef_kernel<<<1, 32, 0, ctx->stream>>>(m->coef, norm, m->sumsq, m->ntrain, max_norm, mode);
    AF_CUDA_LAUNCHED();
    if (mode != 2) {
        scale_kernel<<<dim3(CHUNKS, m->ntrain), 256, 0, ctx->stream>>>(m->tensors, m->coef);
        AF_CUDA_LAUNCHED();
    }
    return AF_OK;
}

extern "C" af_status af_cuda_adamw_step(af_cuda_context *ctx, af_cuda_model *m,
                                        const af_adamw_args *a, const int *ok) {
    AF_CUDA_CHECK(m != nullptr && a != nullptr, "adamw_step: NULL argument");
    AF_CUDA_CHECK(a->t >= 1, "adamw_step: step t must be >= 1, got %d", a->t);
    AF_CUDA_CHECK(isfinite(a->lr) && a->lr >= 0.0f, "adamw_step: lr must be finite and >= 0");
    AF_CUDA_CHECK(isfinite(a->weight_decay) && a->weight_decay >= 0.0f,
                  "adamw_step: weight_decay must be finite and >= 0");
    AF_CUDA_CHECK(a->beta1 >= 0.0f && a->beta1 < 1.0f && a->beta2 >= 0.0f && a->beta2 < 1.0f,
                  "adamw_step: betas must be in [0, 1)");
    AF_CUDA_CHECK(a->eps > 0.0f, "adamw_step: eps must be > 0");
    if (m->ntrain == 0) return AF_OK;
    // the scalars exactly as af_adamw_update computes them on the host
    double bc1 = 1.0 - pow((double)a->beta1, (double)a->t);
    float bc2s = (float)sqrt(1.0 - pow((double)a->beta2, (double)a->t));
    float step_size = (float)((double)a->lr / bc1);
    float decay_on = 1.0f - a->lr * a->weight_decay;
    adamw_multi_kernel<<<dim3(CHUNKS, m->ntrain), 256, 0, ctx->stream>>>(
        m->tensors, ok, a->beta1, a->beta2, a->eps, decay_on, step_size, bc2s,
        a->freeze_last_layer);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}

extern "C" af_status af_cuda_ema_update(af_cuda_context *ctx, af_cuda_model *m, float momentum,
                                        const int *ok) {
    AF_CUDA_CHECK(m != nullptr, "ema_update: model is NULL");
    AF_CUDA_CHECK(momentum >= 0.0f && momentum <= 1.0f, "ema_update: momentum must be in [0, 1], got %g",
                  (double)momentum);
    if (m->ntrain == 0) return AF_OK;
    ema_multi_kernel<<<dim3(CHUNKS, m->ntrain), 256, 0, ctx->stream>>>(m->tensors, ok, momentum,
                                                                        1.0f - momentum);
    AF_CUDA_LAUNCHED();
    return AF_OK;
}
