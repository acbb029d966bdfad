/* Row softmax, max-subtracted for range safety. */
#include "ops.h"
#include "ops_internal.h"

/* The body of both row softmaxes; inlined into each of their target clones. Returns the
 * row max in *mx_out and 1 / sum in *inv_out. */
static inline __attribute__((always_inline)) void softmax_row_body(float *y, const float *x,
                                                                   int IC, float *mx_out,
                                                                   float *inv_out) {
    float mx = x[0];
    #pragma omp simd reduction(max : mx)
    for (int c = 1; c < IC; c++) mx = x[c] > mx ? x[c] : mx;
    float sum = 0.0f;
    #pragma omp simd reduction(+ : sum)
    for (int c = 0; c < IC; c++) {
        y[c] = af_expf(x[c] - mx);
        sum += y[c];
    }
    float inv = 1.0f / sum;
    #pragma omp simd
    for (int c = 0; c < IC; c++) y[c] *= inv;
    *mx_out = mx;
    *inv_out = inv;
}

AF_TARGET_CLONES void af_softmax_row(float *y, const float *x, int IC) {
    float mx, inv;
    softmax_row_body(y, x, IC, &mx, &inv);
}

/* af_softmax_row that also returns the row max and 1 / sum: af_softmax_row_replay rebuilds
 * the same y from x and them, bit for bit (the same operations in the same order). */
AF_TARGET_CLONES void af_softmax_row_stats(float *y, const float *x, int IC, float *mx_out,
                                           float *inv_out) {
    softmax_row_body(y, x, IC, mx_out, inv_out);
}

AF_TARGET_CLONES void af_softmax_row_replay(float *y, const float *x, int IC, float mx,
                                            float inv) {
    #pragma omp simd
    for (int c = 0; c < IC; c++) {
        float e = af_expf(x[c] - mx);
        y[c] = e * inv;
    }
}

AF_TARGET_CLONES void af_softmax_row_backward(float *dx, const float *dy, const float *y, int IC) {
    float dot = 0.0f;
    #pragma omp simd reduction(+ : dot)
    for (int c = 0; c < IC; c++) dot += dy[c] * y[c];
    #pragma omp simd
    for (int c = 0; c < IC; c++) dx[c] = y[c] * (dy[c] - dot);
}

void af_softmax_forward(float *out, const float *inp, int N, int IC) {
    #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
    for (int n = 0; n < N; n++) af_softmax_row(out + (size_t)n * IC, inp + (size_t)n * IC, IC);
}

void af_softmax_backward(float *dinp, const float *dout, const float *out, int N, int IC) {
    #pragma omp parallel for if (AF_OMP_ROWS(N, IC))
    for (int n = 0; n < N; n++) {
        size_t o = (size_t)n * IC;
        af_softmax_row_backward(dinp + o, dout + o, out + o, IC);
    }
}
