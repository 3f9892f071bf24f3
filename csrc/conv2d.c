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
    int group;                 /* images per GEMM: small feature maps are batched */
    size_t K, OHW, ld, col_floats, tmp_floats, pad_floats, thread_floats;
} conv_geom;

static conv_geom geometry(int C, int H, int W, int OC, int k, int pad)
{
    conv_geom g;
    g.C = C; g.H = H; g.W = W; g.OC = OC; g.k = k; g.pad = pad;
    g.OH = H + 2 * pad - k + 1;
    g.OW = W + 2 * pad - k + 1;
    g.K = (size_t)C * k * k;
    g.OHW = (size_t)g.OH * g.OW;
    /* A GEMM whose N = OH OW is small (8x8 maps: 64) runs far below peak;
     * side by side in one im2col buffer, `group` images make N >= ~1024. */
    g.group = g.OHW >= 1024 ? 1 : (int)((1024 + g.OHW - 1) / g.OHW);
    if (g.group > 16) g.group = 16;
    g.ld = g.OHW * g.group;
    g.col_floats = g.K * g.ld;
    g.tmp_floats = g.group > 1 ? (size_t)OC * g.ld : 0;
    g.pad_floats = pad ? (size_t)C * (H + 2 * pad) * (W + 2 * pad) : 0;
    /* col, tmp (OC, ld), then dweight (OC, K), dbias (OC), then the padded
     * image; rounded to 16 floats so threads never share a cache line */
    g.thread_floats = (g.col_floats + g.tmp_floats + g.K * OC + OC + g.pad_floats + 15) / 16 * 16;
    return g;
}

size_t ada_conv2d_workspace_floats(int C, int H, int W, int OC, int k, int pad,
                                   int num_threads)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    return g.thread_floats * (size_t)num_threads;
}

/* xp = x with `pad` zeros around each of its C planes: (C, H + 2 pad, W + 2 pad) */
static void pad_image(float *restrict xp, const float *restrict x, const conv_geom *g)
{
    int Hp = g->H + 2 * g->pad, Wp = g->W + 2 * g->pad;
    memset(xp, 0, sizeof(float) * (size_t)g->C * Hp * Wp);
    for (int c = 0; c < g->C; c++)
        for (int h = 0; h < g->H; h++)
            memcpy(xp + ((size_t)c * Hp + h + g->pad) * Wp + g->pad,
                   x + ((size_t)c * g->H + h) * g->W, sizeof(float) * g->W);
}

/* OH rows of OW floats, `stride` floats apart in src, to contiguous dst; the
 * common widths get a constant size the compiler inlines */
#define COPY_ROWS(WIDTH)                                                        \
    for (int oh = 0; oh < OH; oh++)                                             \
        memcpy(dst + (size_t)oh * (WIDTH), src + (size_t)oh * stride,           \
               sizeof(float) * (WIDTH));                                        \
    break;

static void gather_rows(float *restrict dst, const float *restrict src, int OH, int OW,
                        size_t stride)
{
    switch (OW) {
    case 32: COPY_ROWS(32)
    case 28: COPY_ROWS(28)
    case 16: COPY_ROWS(16)
    case 14: COPY_ROWS(14)
    case 8: COPY_ROWS(8)
    case 7: COPY_ROWS(7)
    default: COPY_ROWS(OW)
    }
}

/* col (K, ld): col[(c, ki, kj)][oh, ow] = xp[c][oh + ki][ow + kj] from the
 * padded image xp; rows are `ld` floats apart so several images can sit side
 * by side */
static void im2col(float *restrict col, size_t ld, const float *restrict xp, const conv_geom *g)
{
    size_t Hp = g->H + 2 * g->pad, Wp = g->W + 2 * g->pad;
    for (int c = 0; c < g->C; c++)
        for (int ki = 0; ki < g->k; ki++)
            for (int kj = 0; kj < g->k; kj++)
                gather_rows(col + ((size_t)(c * g->k + ki) * g->k + kj) * ld,
                            xp + ((size_t)c * Hp + ki) * Wp + kj, g->OH, g->OW, Wp);
}

/* the input of one image as the im2col source: padded into `xp`, or the
 * image itself when there is no padding */
static const float *padded(float *xp, const float *x, const conv_geom *g)
{
    if (g->pad == 0) return x;
    pad_image(xp, x, g);
    return xp;
}

/* dxp[c][oh + ki][ow + kj] += src[oh][ow] for OH rows of OW floats */
static void scatter_add_rows(float *restrict dxp, const float *restrict src, int OH, int OW,
                             size_t stride)
{
    for (int oh = 0; oh < OH; oh++) {
        float *restrict d = dxp + (size_t)oh * stride;
        const float *restrict s = src + (size_t)oh * OW;
        for (int ow = 0; ow < OW; ow++) d[ow] += s[ow];
    }
}

/* the adjoint of im2col: dinp (overwritten) gathers every column entry that
 * read it, accumulated in the padded buffer dxp whose interior is then copied
 * out */
static void col2im(float *restrict dinp, float *restrict dxp, const float *restrict col,
                   size_t ld, const conv_geom *g)
{
    size_t Hp = g->H + 2 * g->pad, Wp = g->W + 2 * g->pad;
    float *acc = g->pad ? dxp : dinp;
    memset(acc, 0, sizeof(float) * (size_t)g->C * Hp * Wp);
    for (int c = 0; c < g->C; c++)
        for (int ki = 0; ki < g->k; ki++)
            for (int kj = 0; kj < g->k; kj++)
                scatter_add_rows(acc + ((size_t)c * Hp + ki) * Wp + kj,
                                 col + ((size_t)(c * g->k + ki) * g->k + kj) * ld,
                                 g->OH, g->OW, Wp);
    if (g->pad)
        for (int c = 0; c < g->C; c++)
            for (int h = 0; h < g->H; h++)
                memcpy(dinp + ((size_t)c * g->H + h) * g->W,
                       dxp + ((size_t)c * Hp + h + g->pad) * Wp + g->pad, sizeof(float) * g->W);
}


/* a sum in a fixed order the compiler can vectorise: 8 running partial sums */
static float sum8(const float *x, size_t n)
{
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) part[l] += x[i + l];
    float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; i < n; i++) acc += x[i];
    return acc;
}

static void bias_relu(float *dst, const float *src, const float *bias, int OC, size_t OHW,
                      size_t src_ld, int relu)
{
    for (int oc = 0; oc < OC; oc++) {
        const float *in = src + (size_t)oc * src_ld;
        float *plane = dst + (size_t)oc * OHW;
        float b = bias[oc];
        if (relu) {
            for (size_t i = 0; i < OHW; i++) {
                float v = in[i] + b;
                plane[i] = v > 0.0f ? v : 0.0f;
            }
        } else {
            for (size_t i = 0; i < OHW; i++) plane[i] = in[i] + b;
        }
    }
}

/* out (N, OC, OH, OW) = weight (OC, K) @ col (K, group OH OW) + bias, then
 * ReLU when `relu`: one GEMM per group of images, images split over threads
 * in contiguous blocks. */
void ada_conv2d_forward(float *out, float *workspace, const float *inp,
                        const float *weight, const float *bias,
                        int N, int C, int H, int W, int OC, int k, int pad, int relu,
                        int num_threads)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    int threads = num_threads;
    if (threads > N) threads = N > 0 ? N : 1;
    const int direct = k == 1 && pad == 0 && g.group == 1;  /* the input is its own im2col */
    #pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), team = omp_get_num_threads();
        float *col = workspace + g.thread_floats * (size_t)tid;
        float *tmp = col + g.col_floats;
        float *xp = tmp + g.tmp_floats + g.K * OC + OC;
        int block = (N + team - 1) / team;
        int n0 = tid * block, n1 = n0 + block < N ? n0 + block : N;
        for (int n = n0; n < n1; n += g.group) {
            int count = n1 - n < g.group ? n1 - n : g.group;
            size_t cols = (size_t)count * g.OHW;
            const float *x = inp + (size_t)n * C * H * W;
            if (count == 1) {
                float *y = out + (size_t)n * OC * g.OHW;
                if (!direct) im2col(col, g.OHW, padded(xp, x, &g), &g);
                ada_sgemm_serial(0, 0, OC, (int)g.OHW, (int)g.K, 1.0f, weight, (int)g.K,
                                 direct ? x : col, (int)g.OHW, 0.0f, y, (int)g.OHW);
                bias_relu(y, y, bias, OC, g.OHW, g.OHW, relu);
                continue;
            }
            for (int j = 0; j < count; j++)
                im2col(col + (size_t)j * g.OHW, cols, padded(xp, x + (size_t)j * C * H * W, &g),
                       &g);
            ada_sgemm_serial(0, 0, OC, (int)cols, (int)g.K, 1.0f, weight, (int)g.K, col,
                             (int)cols, 0.0f, tmp, (int)cols);
            for (int j = 0; j < count; j++)
                bias_relu(out + (size_t)(n + j) * OC * g.OHW, tmp + (size_t)j * g.OHW, bias, OC,
                          g.OHW, cols, relu);
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
                         int N, int C, int H, int W, int OC, int k, int pad,
                         int num_threads)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    int threads = num_threads;
    if (threads > N) threads = N > 0 ? N : 1;
    const int direct = k == 1 && pad == 0 && g.group == 1;
    #pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), team = omp_get_num_threads();
        float *col = workspace + g.thread_floats * (size_t)tid;
        float *tmp = col + g.col_floats;
        float *dw = tmp + g.tmp_floats;
        float *db = dw + g.K * OC;
        float *xp = db + OC;
        memset(dw, 0, sizeof(float) * (g.K * OC + OC));
        /* the forward's split: each thread's images are contiguous and summed
         * in order, so the result does not depend on timing */
        int block = (N + team - 1) / team;
        int n0 = tid * block, n1 = n0 + block < N ? n0 + block : N;
        for (int n = n0; n < n1; n += g.group) {
            int count = n1 - n < g.group ? n1 - n : g.group;
            size_t cols = (size_t)count * g.OHW;
            /* dy of the group as one (OC, cols) matrix: in place for one image,
             * gathered into tmp for several; masked by a fused ReLU */
            float *dy = count == 1 ? dout + (size_t)n * OC * g.OHW : tmp;
            for (int j = 0; j < count; j++) {
                float *src = dout + (size_t)(n + j) * OC * g.OHW;
                const float *y = out ? out + (size_t)(n + j) * OC * g.OHW : NULL;
                for (int oc = 0; oc < OC; oc++) {
                    const float *s_row = src + (size_t)oc * g.OHW;
                    float *d_row = dy + (size_t)oc * cols + (size_t)j * g.OHW;
                    if (y)   /* in place when d_row == s_row */
                        ada_relu_mask(d_row, s_row, y + (size_t)oc * g.OHW, g.OHW);
                    else if (d_row != s_row)
                        memcpy(d_row, s_row, sizeof(float) * g.OHW);
                    db[oc] += sum8(d_row, g.OHW);
                }
            }
            const float *x = inp + (size_t)n * C * H * W;
            if (!direct)
                for (int j = 0; j < count; j++)
                    im2col(col + (size_t)j * g.OHW, cols,
                           padded(xp, x + (size_t)j * C * H * W, &g), &g);
            ada_sgemm_serial(0, 1, OC, (int)g.K, (int)cols, 1.0f, dy, (int)cols,
                             direct ? x : col, (int)cols, 1.0f, dw, (int)g.K);
            if (dinp) {
                float *dx = dinp + (size_t)n * C * H * W;
                if (direct) {
                    ada_sgemm_serial(1, 0, (int)g.K, (int)cols, OC, 1.0f, weight, (int)g.K,
                                     dy, (int)cols, 0.0f, dx, (int)cols);
                } else {
                    ada_sgemm_serial(1, 0, (int)g.K, (int)cols, OC, 1.0f, weight, (int)g.K,
                                     dy, (int)cols, 0.0f, col, (int)cols);
                    for (int j = 0; j < count; j++)
                        col2im(dx + (size_t)j * C * H * W, xp, col + (size_t)j * g.OHW, cols,
                               &g);
                }
            }
        }
        #pragma omp barrier
        /* reduce the private accumulators in thread order, split by element */
        size_t total = g.K * OC + OC, priv = g.col_floats + g.tmp_floats;
        #pragma omp for schedule(static)
        for (size_t i = 0; i < total; i++) {
            float acc = 0.0f;
            for (int t = 0; t < team; t++)
                acc += (workspace + g.thread_floats * (size_t)t + priv)[i];
            if (i < g.K * OC) dweight[i] += acc;
            else dbias[i - g.K * OC] += acc;
        }
    }
}
