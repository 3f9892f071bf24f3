/* winograd_probe.c: how much Winograd F(2x2, 3x3) could save on the networks'
 * 3x3 convolutions. A plain prototype of the forward pass only (scalar input
 * and output transforms, the 16 products as GEMMs through ada_sgemm_serial)
 * timed against adaloss's im2col + GEMM forward on one thread; it reports
 * both, the time of the prototype's 16 GEMMs alone (the floor of any
 * Winograd with these GEMMs) and its error against the im2col path.
 *
 *   libdir=$(python -c 'import scipy_openblas32 as s; print(s.get_lib_dir())')
 *   lib=$(python -c 'import scipy_openblas32 as s; print(s.get_library())')
 *   gcc -O3 -std=c11 -fopenmp -Icsrc -DADA_BLAS_PREFIX_SCIPY=1 benchmarks/winograd_probe.c \
 *       csrc/[a-z]*.c -L$libdir -l$lib -Wl,-rpath,$libdir -lm -o /tmp/probe
 *   /tmp/probe N C H OC [IMAGES_PER_GEMM]     # e.g. /tmp/probe 64 128 8 256 16
 *
 * Not part of the library: H must be even, pad is 1, no ReLU, no backward. */
#include "adaloss.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <math.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static double gemm_seconds = 0;
/* U[xi][oc][c] = (G g G^T)[xi] */
static void transform_weights(float *U, const float *w, int OC, int C)
{
    for (int oc = 0; oc < OC; oc++)
        for (int c = 0; c < C; c++) {
            const float *g = w + ((size_t)oc * C + c) * 9;
            float t[4][3];
            for (int j = 0; j < 3; j++) {
                t[0][j] = g[0 * 3 + j];
                t[1][j] = 0.5f * (g[0 * 3 + j] + g[1 * 3 + j] + g[2 * 3 + j]);
                t[2][j] = 0.5f * (g[0 * 3 + j] - g[1 * 3 + j] + g[2 * 3 + j]);
                t[3][j] = g[2 * 3 + j];
            }
            for (int i = 0; i < 4; i++) {
                float u[4];
                u[0] = t[i][0];
                u[1] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
                u[2] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
                u[3] = t[i][2];
                for (int j = 0; j < 4; j++) U[((size_t)(i * 4 + j) * OC + oc) * C + c] = u[j];
            }
        }
}

/* forward for N images: x (N,C,H,W), out (N,OC,H,W), pad 1, H,W even */
static void wino_forward(float *out, const float *x, const float *U, const float *bias,
                         int N, int C, int H, int W, int OC, float *V, float *M, float *xp)
{
    int TH = H / 2, TW = W / 2, Hp = H + 2, Wp = W + 2;
    size_t T = (size_t)N * TH * TW;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            float *p = xp;
            memset(p, 0, sizeof(float) * Hp * Wp);
            for (int h = 0; h < H; h++) memcpy(p + (h + 1) * Wp + 1, x + (((size_t)n * C + c) * H + h) * W, 4 * W);
            for (int ty = 0; ty < TH; ty++)
                for (int tx = 0; tx < TW; tx++) {
                    float d[4][4], t[4][4];
                    for (int i = 0; i < 4; i++) for (int j = 0; j < 4; j++) d[i][j] = p[(2 * ty + i) * Wp + 2 * tx + j];
                    for (int j = 0; j < 4; j++) {
                        t[0][j] = d[0][j] - d[2][j]; t[1][j] = d[1][j] + d[2][j];
                        t[2][j] = d[2][j] - d[1][j]; t[3][j] = d[1][j] - d[3][j];
                    }
                    size_t tile = ((size_t)n * TH + ty) * TW + tx;
                    for (int i = 0; i < 4; i++) {
                        float v0 = t[i][0] - t[i][2], v1 = t[i][1] + t[i][2], v2 = t[i][2] - t[i][1], v3 = t[i][1] - t[i][3];
                        V[((size_t)(i * 4 + 0) * C + c) * T + tile] = v0;
                        V[((size_t)(i * 4 + 1) * C + c) * T + tile] = v1;
                        V[((size_t)(i * 4 + 2) * C + c) * T + tile] = v2;
                        V[((size_t)(i * 4 + 3) * C + c) * T + tile] = v3;
                    }
                }
        }
    double tg = now();
    for (int xi = 0; xi < 16; xi++)
        ada_sgemm_serial(0, 0, OC, (int)T, C, 1.0f, U + (size_t)xi * OC * C, C, V + (size_t)xi * C * T, (int)T, 0.0f, M + (size_t)xi * OC * T, (int)T);
    gemm_seconds += now() - tg;
    for (int oc = 0; oc < OC; oc++)
        for (int n = 0; n < N; n++)
            for (int ty = 0; ty < TH; ty++)
                for (int tx = 0; tx < TW; tx++) {
                    size_t tile = ((size_t)n * TH + ty) * TW + tx;
                    float m[4][4], t[2][4];
                    for (int i = 0; i < 4; i++) for (int j = 0; j < 4; j++) m[i][j] = M[((size_t)(i * 4 + j) * OC + oc) * T + tile];
                    for (int j = 0; j < 4; j++) { t[0][j] = m[0][j] + m[1][j] + m[2][j]; t[1][j] = m[1][j] - m[2][j] - m[3][j]; }
                    float *y = out + (((size_t)n * OC + oc) * H + 2 * ty) * W + 2 * tx;
                    for (int i = 0; i < 2; i++) {
                        y[i * W + 0] = t[i][0] + t[i][1] + t[i][2] + bias[oc];
                        y[i * W + 1] = t[i][1] - t[i][2] - t[i][3] + bias[oc];
                    }
                }
}

int main(int argc, char **argv)
{
    int N = atoi(argv[1]), C = atoi(argv[2]), H = atoi(argv[3]), OC = atoi(argv[4]), W = H;
    int chunk = argc > 5 ? atoi(argv[5]) : N;
    ada_error err; ada_set_num_threads(1, &err);
    size_t nx = (size_t)N * C * H * W, ny = (size_t)N * OC * H * W;
    float *x = malloc(4 * nx), *w = malloc(4 * (size_t)OC * C * 9), *b = calloc(OC, 4);
    float *y1 = malloc(4 * ny), *y2 = malloc(4 * ny);
    srand(1);
    for (size_t i = 0; i < nx; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    for (size_t i = 0; i < (size_t)OC * C * 9; i++) w[i] = (rand() / (float)RAND_MAX - 0.5f) * 0.1f;
    float *ws = malloc(4 * ada_conv2d_workspace_floats(N, C, H, W, OC, 3, 1, 1));
    float *U = malloc(4 * 16 * (size_t)OC * C);
    size_t T = (size_t)chunk * (H / 2) * (W / 2);
    float *V = malloc(4 * 16 * (size_t)C * T), *M = malloc(4 * 16 * (size_t)OC * T), *xp = malloc(4 * (H + 2) * (W + 2));
    transform_weights(U, w, OC, C);
    double best1 = 1e9, best2 = 1e9, best_gemm = 0;
    for (int r = 0; r < 7; r++) {
        double t0 = now();
        ada_conv2d_forward(y1, ws, x, w, b, N, C, H, W, OC, 3, 1, 0, 1);
        double t1 = now();
        gemm_seconds = 0;
        for (int n = 0; n < N; n += chunk)
            wino_forward(y2 + (size_t)n * OC * H * W, x + (size_t)n * C * H * W, U, b, chunk, C, H, W, OC, V, M, xp);
        double t2 = now();
        if (t1 - t0 < best1) best1 = t1 - t0;
        if (t2 - t1 < best2) { best2 = t2 - t1; best_gemm = gemm_seconds; }
    }
    double err_max = 0, ref_max = 0;
    for (size_t i = 0; i < ny; i++) { double e = fabs(y1[i] - y2[i]); if (e > err_max) err_max = e; if (fabs(y1[i]) > ref_max) ref_max = fabs(y1[i]); }
    double flops = 2.0 * N * OC * C * 9 * H * W;
    printf("C=%d H=%d OC=%d N=%d chunk=%d: im2col %.2f ms (%.1f GF/s)  winograd %.2f ms (%.1f GF/s effective)  ratio %.2f  rel err %.1e  (its GEMMs %.2f ms)\n",
           C, H, OC, N, chunk, 1e3 * best1, flops / best1 / 1e9, 1e3 * best2, flops / best2 / 1e9, best1 / best2, err_max / ref_max, 1e3 * best_gemm);
    return 0;
}
