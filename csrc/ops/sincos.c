/* Fixed 2-D sin-cos position embedding, MAE's get_2d_sincos_pos_embed.
 * Grid point (i, j) = (row, column) is row (cls) + i*G + j. Channels, with Q = D/4 and
 * omega_k = 1 / 10000^(k / Q):
 *   [0, Q)     sin(j omega)   [Q, 2Q)   cos(j omega)     (MAE's first half: grid[0] = w)
 *   [2Q, 3Q)   sin(i omega)   [3Q, 4Q)  cos(i omega)
 * Computed in double, rounded to float once. */
#include <math.h>
#include <string.h>

#include "ops.h"

void af_sincos_2d_embed(float *out, int D, int G, int cls) {
    int Q = D / 4;
    if (cls) {
        memset(out, 0, (size_t)D * sizeof(float));
        out += D;
    }
    for (int i = 0; i < G; i++) {
        for (int j = 0; j < G; j++) {
            float *row = out + ((size_t)i * G + j) * D;
            for (int k = 0; k < Q; k++) {
                double omega = 1.0 / pow(10000.0, (double)k / (double)Q);
                row[k] = (float)sin(j * omega);
                row[Q + k] = (float)cos(j * omega);
                row[2 * Q + k] = (float)sin(i * omega);
                row[3 * Q + k] = (float)cos(i * omega);
            }
        }
    }
}
