/* pool.c: 2x2 max pooling, stride 2, floor mode (PyTorch's MaxPool2d(2)). */
#include "adaloss.h"

#include <string.h>

/* inp (N, C, H, W) -> out (N, C, H/2, W/2); argmax[i] in 0..3 is the window
 * position (row-major) of the first maximum, as PyTorch picks it. NaN wins, as
 * in PyTorch, so a NaN input propagates. */
void ada_maxpool2d_forward(float *out, uint8_t *argmax, const float *inp,
                           int N, int C, int H, int W)
{
    int OH = H / 2, OW = W / 2;
    long planes = (long)N * C;
    #pragma omp parallel for schedule(static)
    for (long p = 0; p < planes; p++) {
        const float *x = inp + (size_t)p * H * W;
        float *y = out + (size_t)p * OH * OW;
        uint8_t *am = argmax ? argmax + (size_t)p * OH * OW : NULL;
        for (int oh = 0; oh < OH; oh++) {
            const float *r0 = x + (size_t)(2 * oh) * W, *r1 = r0 + W;
            for (int ow = 0; ow < OW; ow++) {
                float a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
                /* strict > keeps the first maximum; a NaN wins (PyTorch's rule) */
                float best = a;
                int idx = 0;
                if (b > best || (b != b && best == best)) { best = b; idx = 1; }
                if (c > best || (c != c && best == best)) { best = c; idx = 2; }
                if (d > best || (d != d && best == best)) { best = d; idx = 3; }
                y[oh * OW + ow] = best;
                if (am) am[oh * OW + ow] = (uint8_t)idx;
            }
        }
    }
}

/* The max passes its gradient to the element that won; the others get 0.
 * dinp is overwritten. */
void ada_maxpool2d_backward(float *dinp, const float *dout, const uint8_t *argmax,
                            int N, int C, int H, int W)
{
    int OH = H / 2, OW = W / 2;
    long planes = (long)N * C;
    #pragma omp parallel for schedule(static)
    for (long p = 0; p < planes; p++) {
        float *dx = dinp + (size_t)p * H * W;
        const float *dy = dout + (size_t)p * OH * OW;
        const uint8_t *am = argmax + (size_t)p * OH * OW;
        memset(dx, 0, sizeof(float) * (size_t)H * W);
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int a = am[oh * OW + ow];
                dx[(size_t)(2 * oh + (a >> 1)) * W + 2 * ow + (a & 1)] = dy[oh * OW + ow];
            }
    }
}
