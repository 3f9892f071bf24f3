/* conv2d.c: 2-D convolution, stride 1, zero padding, as im2col + GEMM.
 *
 * The work is cut into pieces that depend on the batch and the layer, never
 * on the thread count: GEMM groups of `group` images and, in backward,
 * reduction chunks of `chunk` images, both counted from image 0. Threads
 * take whole pieces, each with its slice of the workspace (an im2col buffer
 * of K = C k k rows); every chunk sums its weight and bias gradients into a
 * slot of its own, and the slots are added in chunk order. So results are
 * the same on any number of threads, and never depend on timing. */
#include "adaloss.h"

#include <omp.h>
#include <string.h>

typedef struct {
    int C, H, W, OC, k, pad, OH, OW;
    int group;                 /* images per GEMM: small feature maps are batched */
    int chunk;                 /* images per gradient slot in backward: whole groups */
    size_t K, OHW, ld, col_floats, tmp_floats, pad_floats, thread_floats, slot_floats;
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
     * side by side in one im2col buffer, `group` images make N >= ~1024. A
     * power of two, so that batches of 2^k images split evenly over threads. */
    g.group = 1;
    while (g.group < 16 && (size_t)g.group * g.OHW < 1024) g.group *= 2;
    g.chunk = g.group > 8 ? g.group : 8;
    g.ld = g.OHW * g.group;
    g.col_floats = g.K * g.ld;
    g.tmp_floats = g.group > 1 ? (size_t)OC * g.ld : 0;
    g.pad_floats = pad ? (size_t)C * (H + 2 * pad) * (W + 2 * pad) : 0;
    /* per thread: col, tmp (OC, ld), then the padded image; per chunk: a
     * slot of dweight (OC, K) and dbias (OC); each rounded to 16 floats so
     * threads never share a cache line */
    g.thread_floats = (g.col_floats + g.tmp_floats + g.pad_floats + 15) / 16 * 16;
    g.slot_floats = (g.K * OC + OC + 15) / 16 * 16;
    return g;
}

static size_t num_chunks(const conv_geom *g, int N)
{
    return N > 0 ? ((size_t)N + g->chunk - 1) / g->chunk : 0;
}

size_t ada_conv2d_workspace_floats(int N, int C, int H, int W, int OC, int k, int pad,
                                   int num_threads)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    return g.thread_floats * (size_t)num_threads + g.slot_floats * num_chunks(&g, N);
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
 * ReLU when `relu`: one GEMM per group of images, groups shared out over the
 * threads. */
void ada_conv2d_forward(float *out, float *workspace, const float *inp,
                        const float *weight, const float *bias,
                        int N, int C, int H, int W, int OC, int k, int pad, int relu,
                        int num_threads)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    int groups = N > 0 ? (N + g.group - 1) / g.group : 0;
    int threads = num_threads < groups ? num_threads : (groups > 0 ? groups : 1);
    const int direct = k == 1 && pad == 0 && g.group == 1;  /* the input is its own im2col */
    #pragma omp parallel num_threads(threads)
    {
        float *col = workspace + g.thread_floats * (size_t)omp_get_thread_num();
        float *tmp = col + g.col_floats;
        float *xp = tmp + g.tmp_floats;
        #pragma omp for schedule(static)
        for (int gi = 0; gi < groups; gi++) {
            int n = gi * g.group;
            int count = N - n < g.group ? N - n : g.group;
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
 * With a fused ReLU, dy is first masked by out > 0 (d relu(v)/dv = [v > 0]).
 * Each chunk of images sums its dW and db into its own slot (groups in
 * order); the slots are then added to dweight and dbias in chunk order. */
void ada_conv2d_backward(float *dinp, float *dweight, float *dbias, float *workspace,
                         float *dout, const float *out, const float *inp,
                         const float *weight,
                         int N, int C, int H, int W, int OC, int k, int pad,
                         int num_threads)
{
    conv_geom g = geometry(C, H, W, OC, k, pad);
    int chunks = (int)num_chunks(&g, N);
    int threads = num_threads < chunks ? num_threads : (chunks > 0 ? chunks : 1);
    const int direct = k == 1 && pad == 0 && g.group == 1;
    float *slots = workspace + g.thread_floats * (size_t)num_threads;
    #pragma omp parallel num_threads(threads)
    {
        float *col = workspace + g.thread_floats * (size_t)omp_get_thread_num();
        float *tmp = col + g.col_floats;
        float *xp = tmp + g.tmp_floats;
        #pragma omp for schedule(static)
        for (int ci = 0; ci < chunks; ci++) {
            float *dw = slots + g.slot_floats * (size_t)ci;
            float *db = dw + g.K * OC;
            memset(db, 0, sizeof(float) * OC);
            int chunk_end = (ci + 1) * g.chunk < N ? (ci + 1) * g.chunk : N;
            for (int n = ci * g.chunk; n < chunk_end; n += g.group) {
                int count = chunk_end - n < g.group ? chunk_end - n : g.group;
                size_t cols = (size_t)count * g.OHW;
                /* dy of the group as one (OC, cols) matrix: in place for one
                 * image, gathered into tmp for several; masked by a fused ReLU */
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
                /* the chunk's first group sets its slot, the others add to it */
                ada_sgemm_serial(0, 1, OC, (int)g.K, (int)cols, 1.0f, dy, (int)cols,
                                 direct ? x : col, (int)cols, n == ci * g.chunk ? 0.0f : 1.0f,
                                 dw, (int)g.K);
                if (dinp) {
                    float *dx = dinp + (size_t)n * C * H * W;
                    if (direct) {
                        ada_sgemm_serial(1, 0, (int)g.K, (int)cols, OC, 1.0f, weight, (int)g.K,
                                         dy, (int)cols, 0.0f, dx, (int)cols);
                    } else {
                        ada_sgemm_serial(1, 0, (int)g.K, (int)cols, OC, 1.0f, weight, (int)g.K,
                                         dy, (int)cols, 0.0f, col, (int)cols);
                        for (int j = 0; j < count; j++)
                            col2im(dx + (size_t)j * C * H * W, xp, col + (size_t)j * g.OHW,
                                   cols, &g);
                    }
                }
            }
        }
        /* (the implied barrier of the loop above) then the slots in chunk
         * order, split by element */
        size_t total = g.K * OC + OC;
        #pragma omp for schedule(static)
        for (size_t i = 0; i < total; i++) {
            float acc = 0.0f;
            for (int c = 0; c < chunks; c++) acc += slots[g.slot_floats * (size_t)c + i];
            if (i < g.K * OC) dweight[i] += acc;
            else dbias[i - g.K * OC] += acc;
        }
    }
}
