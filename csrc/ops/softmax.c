/* Row softmax, max-subtracted for range safety. */
#include <math.h>

#include "ops.h"
#include "ops_internal.h"

void softmax_forward(float *out, const float *inp, int N, int C) {
    #pragma omp parallel for if (AF_OMP_ROWS(N, C))
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        float mx = x[0];
        #pragma omp simd reduction(max : mx)
        for (int c = 1; c < C; c++) mx = x[c] > mx ? x[c] : mx;
        float sum = 0.0f;
        #pragma omp simd reduction(+ : sum)
        for (int c = 0; c < C; c++) {
            y[c] = af_expf(x[c] - mx);
            sum += y[c];
        }
        float inv = 1.0f / sum;
        #pragma omp simd
        for (int c = 0; c < C; c++) y[c] *= inv;
    }
}

void softmax_backward(float *dinp, const float *dout, const float *out, int N, int C) {
    /* dx = y * (dy - <dy, y>) */
    #pragma omp parallel for if (AF_OMP_ROWS(N, C))
    for (int n = 0; n < N; n++) {
        const float *y = out + (size_t)n * C, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        float dot = 0.0f;
        #pragma omp simd reduction(+ : dot)
        for (int c = 0; c < C; c++) dot += dy[c] * y[c];
        #pragma omp simd
        for (int c = 0; c < C; c++) dx[c] += y[c] * (dy[c] - dot);
    }
}
