/* conv2d.c: 2-D convolution, stride 1, zero padding, as im2col + GEMM.
 *
 * Each thread owns a contiguous block of images and one slice of the shared
 * workspace: an im2col buffer (K = C k k rows, OH OW columns) and private
 * weight/bias gradient accumulators that are summed in thread order at the
 * end, so results depend on the thread count but never on timing. */
#include "adaloss.h"

#include <omp.h>
#include <string.h>

typedef struct {
    int C, H, W, OC, k, pad, OH, OW;
    size_t K, OHW, col_floats, thread_floats;
} conv_geom;

static conv_geom geometry(int C, int H, int W, int OC, int k, int pad)
{
    conv_geom g;
    g.C = C; g.H = H; g.W = W; g.OC = OC; g.k = k; g.pad = pad;
    g.OH = H + 2 * pad - k + 1;
    g.OW = W + 2 * pad - k + 1;
    g.K = (size_t)C * k * k;
    g.OHW = (size_t)g.OH * g.OW;
    g.col_floats = g.K * g.OHW;
    /* col, then dweight (OC, K), then dbias (OC); rounded to 16 floats so
     * threads never share a cache line */
    g.thread_floats = (g.col_floats + g.K * OC + OC + 15) / 16 * 16;
    return g;
}

size_t ada_conv2d_workspace_floats(int C, int H, int W, int OC, int k, int pad,
                                   int num_threads)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    return g.thread_floats * (size_t)num_threads;
}

/* col (K, OH OW): col[(c, ki, kj)][oh, ow] = inp[c][oh + ki - pad][ow + kj - pad], 0 outside */
static void im2col(float *col, const float *inp, const conv_geom *g)
{
    for (int c = 0; c < g->C; c++)
        for (int ki = 0; ki < g->k; ki++)
            for (int kj = 0; kj < g->k; kj++) {
                float *row = col + ((size_t)(c * g->k + ki) * g->k + kj) * g->OHW;
                int shift = kj - g->pad;
                int ow_lo = shift < 0 ? -shift : 0;             /* first ow with iw >= 0 */
                int ow_hi = g->W - shift < g->OW ? g->W - shift : g->OW; /* iw < W */
                if (ow_hi < ow_lo) ow_hi = ow_lo;
                for (int oh = 0; oh < g->OH; oh++) {
                    float *dst = row + (size_t)oh * g->OW;
                    int ih = oh + ki - g->pad;
                    if (ih < 0 || ih >= g->H) {
                        memset(dst, 0, sizeof(float) * g->OW);
                        continue;
                    }
                    const float *src = inp + ((size_t)c * g->H + ih) * g->W;
                    for (int ow = 0; ow < ow_lo; ow++) dst[ow] = 0.0f;
                    memcpy(dst + ow_lo, src + ow_lo + shift, sizeof(float) * (ow_hi - ow_lo));
                    for (int ow = ow_hi; ow < g->OW; ow++) dst[ow] = 0.0f;
                }
            }
}

/* the adjoint of im2col: dinp (overwritten) gathers every column entry that
 * read it */
static void col2im(float *dinp, const float *col, const conv_geom *g)
{
    memset(dinp, 0, sizeof(float) * (size_t)g->C * g->H * g->W);
    for (int c = 0; c < g->C; c++)
        for (int ki = 0; ki < g->k; ki++)
            for (int kj = 0; kj < g->k; kj++) {
                const float *row = col + ((size_t)(c * g->k + ki) * g->k + kj) * g->OHW;
                int shift = kj - g->pad;
                int ow_lo = shift < 0 ? -shift : 0;
                int ow_hi = g->W - shift < g->OW ? g->W - shift : g->OW;
                for (int oh = 0; oh < g->OH; oh++) {
                    int ih = oh + ki - g->pad;
                    if (ih < 0 || ih >= g->H) continue;
                    float *dst = dinp + ((size_t)c * g->H + ih) * g->W + shift;
                    const float *src = row + (size_t)oh * g->OW;
                    for (int ow = ow_lo; ow < ow_hi; ow++) dst[ow] += src[ow];
                }
            }
}

/* out (N, OC, OH, OW) = weight (OC, K) @ col_n (K, OH OW) + bias, then ReLU
 * when `relu`: one GEMM per image, images split over threads. */
void ada_conv2d_forward(float *out, float *workspace, const float *inp,
                        const float *weight, const float *bias,
                        int N, int C, int H, int W, int OC, int k, int pad, int relu)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    int threads = ada_get_num_threads();
    #pragma omp parallel num_threads(threads)
    {
        float *col = workspace + g.thread_floats * (size_t)omp_get_thread_num();
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C * H * W;
            float *y = out + (size_t)n * OC * g.OHW;
            const float *b_mat = x;
            if (!(k == 1 && pad == 0)) {
                im2col(col, x, &g);
                b_mat = col;
            }
            ada_sgemm_serial(0, 0, OC, (int)g.OHW, (int)g.K, 1.0f, weight, (int)g.K,
                             b_mat, (int)g.OHW, 0.0f, y, (int)g.OHW);
            for (int oc = 0; oc < OC; oc++) {
                float *plane = y + (size_t)oc * g.OHW;
                float b = bias[oc];
                if (relu) {
                    for (size_t i = 0; i < g.OHW; i++) {
                        float v = plane[i] + b;
                        plane[i] = v > 0.0f ? v : 0.0f;
                    }
                } else {
                    for (size_t i = 0; i < g.OHW; i++) plane[i] += b;
                }
            }
        }
    }
}

/* Chain rule for y = W col + b (per image):
 *   dW += dy col^T (summed over images), db += sum of dy over positions,
 *   dcol = W^T dy, and dx = col2im(dcol).
 * With a fused ReLU, dy is first masked by out > 0 (d relu(v)/dv = [v > 0]). */
void ada_conv2d_backward(float *dinp, float *dweight, float *dbias, float *workspace,
                         float *dout, const float *out, const float *inp,
                         const float *weight,
                         int N, int C, int H, int W, int OC, int k, int pad)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    int threads = ada_get_num_threads();
    if (threads > N) threads = N > 0 ? N : 1;
    #pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), team = omp_get_num_threads();
        float *col = workspace + g.thread_floats * (size_t)tid;
        float *dw = col + g.col_floats;
        float *db = dw + g.K * OC;
        memset(dw, 0, sizeof(float) * (g.K * OC + OC));
        /* the same static split as an explicit block, so each thread's images
         * are contiguous and summed in order */
        int block = (N + team - 1) / team;
        int n0 = tid * block, n1 = n0 + block < N ? n0 + block : N;
        for (int n = n0; n < n1; n++) {
            const float *x = inp + (size_t)n * C * H * W;
            float *dy = dout + (size_t)n * OC * g.OHW;
            if (out) {
                const float *y = out + (size_t)n * OC * g.OHW;
                for (size_t i = 0; i < (size_t)OC * g.OHW; i++)
                    if (!(y[i] > 0.0f)) dy[i] = 0.0f;
            }
            for (int oc = 0; oc < OC; oc++) {
                const float *plane = dy + (size_t)oc * g.OHW;
                float acc = 0.0f;
                for (size_t i = 0; i < g.OHW; i++) acc += plane[i];
                db[oc] += acc;
            }
            const float *b_mat = x;
            if (!(k == 1 && pad == 0)) {
                im2col(col, x, &g);
                b_mat = col;
            }
            ada_sgemm_serial(0, 1, OC, (int)g.K, (int)g.OHW, 1.0f, dy, (int)g.OHW,
                             b_mat, (int)g.OHW, 1.0f, dw, (int)g.K);
            if (dinp) {
                float *dx = dinp + (size_t)n * C * H * W;
                if (k == 1 && pad == 0) {
                    ada_sgemm_serial(1, 0, (int)g.K, (int)g.OHW, OC, 1.0f, weight, (int)g.K,
                                     dy, (int)g.OHW, 0.0f, dx, (int)g.OHW);
                } else {
                    ada_sgemm_serial(1, 0, (int)g.K, (int)g.OHW, OC, 1.0f, weight, (int)g.K,
                                     dy, (int)g.OHW, 0.0f, col, (int)g.OHW);
                    col2im(dx, col, &g);
                }
            }
        }
        #pragma omp barrier
        /* reduce the private accumulators in thread order, split by element */
        size_t total = g.K * OC + OC;
        #pragma omp for schedule(static)
        for (size_t i = 0; i < total; i++) {
            float acc = 0.0f;
            for (int t = 0; t < team; t++)
                acc += (workspace + g.thread_floats * (size_t)t + g.col_floats)[i];
            if (i < g.K * OC) dweight[i] += acc;
            else dbias[i - g.K * OC] += acc;
        }
    }
}
