/* Fixed 2-D sin-cos position embedding, MAE's get_2d_sincos_pos_embed.
 * Grid point (i, j) = (row, column) is row (cls) + i*G + j. Channels, with D4 = D/4 and
 * omega_k = 1 / 10000^(k / D4):
 *   [0, D4)     sin(j omega)   [D4, 2D4)   cos(j omega)     (MAE's first half: grid[0] = w)
 *   [2D4, 3D4)  sin(i omega)   [3D4, 4D4)  cos(i omega)
 * Computed in double, rounded to float once. */
#include <math.h>
#include <string.h>

#include "ops.h"

void af_sincos_2d_embed(float *out, int D, int G, int cls) {
    int D4 = D / 4;
    if (cls) {
        memset(out, 0, (size_t)D * sizeof(float));
        out += D;
    }
    for (int i = 0; i < G; i++) {
        for (int j = 0; j < G; j++) {
            float *row = out + ((size_t)i * G + j) * D;
            for (int k = 0; k < D4; k++) {
                double omega = 1.0 / pow(10000.0, (double)k / (double)D4);
                row[k] = (float)sin(j * omega);
                row[D4 + k] = (float)cos(j * omega);
                row[2 * D4 + k] = (float)sin(i * omega);
                row[3 * D4 + k] = (float)cos(i * omega);
            }
        }
    }
}
