/* AdamW, PyTorch semantics (torch.optim.AdamW, amsgrad off, maximize off). */
#include <math.h>

#include "ops.h"
#include "ops_internal.h"

void af_adamw_update(float *params, const float *grads, float *m, float *v, size_t n, float lr,
                  float beta1, float beta2, float eps, float weight_decay, int t) {
    /* bias corrections in double, as PyTorch computes them in Python floats */
    double bc1 = 1.0 - pow((double)beta1, (double)t);
    double bc2_sqrt = sqrt(1.0 - pow((double)beta2, (double)t));
    float step_size = (float)((double)lr / bc1);
    float bc2s = (float)bc2_sqrt;
    float decay = 1.0f - lr * weight_decay;
    #pragma omp parallel for simd if (n >= AF_OMP_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) {
        float g = grads[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2s + eps;
        params[i] = params[i] * decay - step_size * mi / denom;
    }
}
