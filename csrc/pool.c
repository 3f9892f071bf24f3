/* pool.c: 2x2 max pooling, stride 2, floor mode (PyTorch's MaxPool2d(2)). */
#include "adaloss.h"

#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* x beats the best so far: it is larger, or it is the first NaN */
#define BEATS(x, best) (((x) > (best)) | (((x) != (x)) & ((best) == (best))))

#ifdef __SSE2__
/* windows ow .. ow + 3 of one output row, branch-free: even/odd columns
 * deinterleaved, then the scalar rule of pool_row lane by lane */
static inline void pool4(float *y, uint8_t *am, const float *r0, const float *r1, int ow)
{
    __m128 p0 = _mm_loadu_ps(r0 + 2 * ow), p1 = _mm_loadu_ps(r0 + 2 * ow + 4);
    __m128 q0 = _mm_loadu_ps(r1 + 2 * ow), q1 = _mm_loadu_ps(r1 + 2 * ow + 4);
    __m128 v[4] = {_mm_shuffle_ps(p0, p1, _MM_SHUFFLE(2, 0, 2, 0)),
                   _mm_shuffle_ps(p0, p1, _MM_SHUFFLE(3, 1, 3, 1)),
                   _mm_shuffle_ps(q0, q1, _MM_SHUFFLE(2, 0, 2, 0)),
                   _mm_shuffle_ps(q0, q1, _MM_SHUFFLE(3, 1, 3, 1))};
    __m128 best = v[0];
    __m128i idx = _mm_setzero_si128();
    for (int w = 1; w < 4; w++) {
        __m128 beats = _mm_or_ps(_mm_cmpgt_ps(v[w], best),
                                 _mm_and_ps(_mm_cmpunord_ps(v[w], v[w]),
                                            _mm_cmpord_ps(best, best)));
        best = _mm_or_ps(_mm_and_ps(beats, v[w]), _mm_andnot_ps(beats, best));
        __m128i bi = _mm_castps_si128(beats);
        idx = _mm_or_si128(_mm_and_si128(bi, _mm_set1_epi32(w)), _mm_andnot_si128(bi, idx));
    }
    _mm_storeu_ps(y + ow, best);
    __m128i packed = _mm_packus_epi16(_mm_packs_epi32(idx, idx), _mm_setzero_si128());
    int bytes = _mm_cvtsi128_si32(packed);
    memcpy(am + ow, &bytes, 4);
}
#endif

/* one output row: windows r0[2 ow .. 2 ow + 1], r1[2 ow .. 2 ow + 1] */
static void pool_row(float *y, uint8_t *am, const float *r0, const float *r1, int OW)
{
    int ow = 0;
#ifdef __SSE2__
    for (; ow + 4 <= OW; ow += 4) pool4(y, am, r0, r1, ow);
    /* the last 1-3 windows as the last four, overlapping the ones before:
     * those are recomputed to the same values (the common 7- and 14-wide
     * rows would otherwise spend most of their time in the scalar loop) */
    if (ow < OW && OW >= 4) {
        pool4(y, am, r0, r1, OW - 4);
        ow = OW;
    }
#endif
    for (; ow < OW; ow++) {
        float v[4] = {r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1]};
        float best = v[0];
        int idx = 0;
        for (int w = 1; w < 4; w++) {
            int beats = BEATS(v[w], best);
            best = beats ? v[w] : best;
            idx = beats ? w : idx;
        }
        y[ow] = best;
        am[ow] = (uint8_t)idx;
    }
}

/* inp (N, C, H, W) -> out (N, C, H/2, W/2); argmax[i] in 0..3 is the window
 * position (row-major) of the first maximum, as PyTorch picks it. NaN wins, as
 * in PyTorch, so a NaN input propagates. */
void ada_maxpool2d_forward(float *out, uint8_t *argmax, const float *inp,
                           int N, int C, int H, int W, int num_threads)
{
    int OH = H / 2, OW = W / 2;
    long planes = (long)N * C;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long p = 0; p < planes; p++) {
        const float *x = inp + (size_t)p * H * W;
        for (int oh = 0; oh < OH; oh++) {
            const float *r0 = x + (size_t)(2 * oh) * W;
            size_t o = ((size_t)p * OH + oh) * OW;
            pool_row(out + o, argmax + o, r0, r0 + W, OW);
        }
    }
}

#ifdef __SSE2__
/* dx of windows ow .. ow + 3: the gradient where argmax == w for each window
 * position w, zero elsewhere, even and odd columns interleaved */
static inline void unpool4(float *r0, float *r1, const float *g, const uint8_t *a, int ow)
{
    __m128 v = _mm_loadu_ps(g + ow);
    int bytes;
    memcpy(&bytes, a + ow, 4);
    __m128i idx = _mm_unpacklo_epi8(_mm_cvtsi32_si128(bytes), _mm_setzero_si128());
    idx = _mm_unpacklo_epi16(idx, _mm_setzero_si128());
    __m128 m[4];
    for (int w = 0; w < 4; w++)
        m[w] = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(idx, _mm_set1_epi32(w))));
    _mm_storeu_ps(r0 + 2 * ow, _mm_unpacklo_ps(m[0], m[1]));
    _mm_storeu_ps(r0 + 2 * ow + 4, _mm_unpackhi_ps(m[0], m[1]));
    _mm_storeu_ps(r1 + 2 * ow, _mm_unpacklo_ps(m[2], m[3]));
    _mm_storeu_ps(r1 + 2 * ow + 4, _mm_unpackhi_ps(m[2], m[3]));
}
#endif

/* The max passes its gradient to the element that won; the others get 0.
 * dinp is overwritten, each window whole (the gradient at its winner, zeros
 * around it) rather than zeroed first and scattered into: one pass over dinp
 * instead of two. The row and column a floor-mode pooling leaves out (odd H
 * or W) are zeroed on their own. */
void ada_maxpool2d_backward(float *dinp, const float *dout, const uint8_t *argmax,
                            int N, int C, int H, int W, int num_threads)
{
    int OH = H / 2, OW = W / 2;
    long planes = (long)N * C;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long p = 0; p < planes; p++) {
        float *dx = dinp + (size_t)p * H * W;
        const float *dy = dout + (size_t)p * OH * OW;
        const uint8_t *am = argmax + (size_t)p * OH * OW;
        for (int oh = 0; oh < OH; oh++) {
            float *r0 = dx + (size_t)(2 * oh) * W, *r1 = r0 + W;
            const float *g = dy + (size_t)oh * OW;
            const uint8_t *a = am + (size_t)oh * OW;
            int ow = 0;
#ifdef __SSE2__
            for (; ow + 4 <= OW; ow += 4) unpool4(r0, r1, g, a, ow);
            if (ow < OW && OW >= 4) {   /* the last four again, as in pool_row */
                unpool4(r0, r1, g, a, OW - 4);
                ow = OW;
            }
#endif
            for (; ow < OW; ow++) {
                float v = g[ow];
                int w = a[ow];
                r0[2 * ow] = w == 0 ? v : 0.0f;
                r0[2 * ow + 1] = w == 1 ? v : 0.0f;
                r1[2 * ow] = w == 2 ? v : 0.0f;
                r1[2 * ow + 1] = w == 3 ? v : 0.0f;
            }
            if (W & 1) r0[W - 1] = r1[W - 1] = 0.0f;
        }
        if (H & 1) memset(dx + (size_t)(H - 1) * W, 0, sizeof(float) * (size_t)W);
    }
}
