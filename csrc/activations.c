/* activations.c: ReLU, row-wise L2 normalisation, input conversion. */
#include "adaloss.h"

#include <math.h>
#include <stdint.h>

#define ADA_PARALLEL_MIN 32768

void ada_relu_forward(float *out, const float *inp, size_t n, int num_threads)
{
    #pragma omp parallel for schedule(static) if (n > ADA_PARALLEL_MIN) \
        num_threads(num_threads)
    for (size_t i = 0; i < n; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

#define ADA_RELU_CHUNK 16384

/* ada_relu_mask over the threads, in chunks (one call when n is small) */
void ada_relu_backward(float *dinp, const float *dout, const float *out, size_t n,
                       int num_threads)
{
    size_t chunks = (n + ADA_RELU_CHUNK - 1) / ADA_RELU_CHUNK;
    #pragma omp parallel for schedule(static) if (n > ADA_PARALLEL_MIN) \
        num_threads(num_threads)
    for (size_t c = 0; c < chunks; c++) {
        size_t start = c * ADA_RELU_CHUNK;
        size_t len = n - start < ADA_RELU_CHUNK ? n - start : ADA_RELU_CHUNK;
        ada_relu_mask(dinp + start, dout + start, out + start, len);
    }
}

/* inp (N, D) -> out (N, D) = x / max(||x||, 1e-12); norms (N) = ||x|| */
void ada_l2norm_forward(float *out, float *norms, const float *inp, int N, int D)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * D;
        float *y = out + (size_t)n * D;
        double sq = 0.0;
        for (int d = 0; d < D; d++) sq += (double)x[d] * x[d];
        float norm = (float)sqrt(sq);
        float denom = norm > 1e-12f ? norm : 1e-12f;
        for (int d = 0; d < D; d++) y[d] = x[d] / denom;
        norms[n] = norm;
    }
}

/* y = x / ||x||: dx = (dy - y (y . dy)) / ||x||, the projection of dy onto
 * the tangent space of the sphere. Below the 1e-12 floor the denominator is a
 * constant and dx = dy / 1e-12. dinp is overwritten (may alias dout). */
void ada_l2norm_backward(float *dinp, const float *dout, const float *out,
                         const float *norms, int N, int D)
{
    for (int n = 0; n < N; n++) {
        const float *y = out + (size_t)n * D, *dy = dout + (size_t)n * D;
        float *dx = dinp + (size_t)n * D;
        if (norms[n] > 1e-12f) {
            double dot = 0.0;
            for (int d = 0; d < D; d++) dot += (double)y[d] * dy[d];
            float dotf = (float)dot, inv = norms[n];
            for (int d = 0; d < D; d++) dx[d] = (dy[d] - y[d] * dotf) / inv;
        } else {
            for (int d = 0; d < D; d++) dx[d] = dy[d] / 1e-12f;
        }
    }
}

void ada_u8_to_float(float *out, const uint8_t *inp, size_t n, int num_threads)
{
    /* the same float32 operations as (x.float() / 255 - 0.5) / 0.5 in PyTorch */
    #pragma omp parallel for schedule(static) if (n > ADA_PARALLEL_MIN) \
        num_threads(num_threads)
    for (size_t i = 0; i < n; i++) out[i] = ((float)inp[i] / 255.0f - 0.5f) / 0.5f;
}

/* no NaN or infinity in x: an exponent of all ones marks both. Integer ORs
 * vectorise, unlike a short-circuit isfinite() loop. */
int ada_all_finite(const float *x, size_t n, int num_threads)
{
    const uint32_t *bits = (const uint32_t *)(const void *)x;
    uint32_t bad = 0;
    #pragma omp parallel for schedule(static) reduction(| : bad) if (n > ADA_PARALLEL_MIN) \
        num_threads(num_threads)
    for (size_t i = 0; i < n; i++) bad |= (bits[i] & 0x7f800000u) == 0x7f800000u;
    return !bad;
}
