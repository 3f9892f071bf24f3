/* test_core.c: the C core on its own, for the sanitizer (ASan + UBSan) and
 * valgrind builds in CI. Exits non-zero on any failure; prints one summary
 * line "N passed, N failed". */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adaloss.h"

static int passed = 0, failed = 0;

#define CHECK(cond, ...) do { \
    if (cond) passed++; \
    else { failed++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
           fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

static unsigned long long rng_state = 88172645463325252ULL;
static float frand(void)  /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (float)((rng_state >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static float *randn(size_t n) { float *p = malloc(n * sizeof(float)); for (size_t i = 0; i < n; i++) p[i] = frand(); return p; }
static float max_abs(const float *a, size_t n) { float m = 0; for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i])); return m; }
static float max_diff(const float *a, const float *b, size_t n) { float m = 0; for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i] - b[i])); return m; }

static void test_gemm(void)
{
    int M = 37, N = 53, K = 71;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            float *A = randn((size_t)M * K), *B = randn((size_t)K * N);
            float *C = calloc((size_t)M * N, 4), *R = calloc((size_t)M * N, 4);
            ada_sgemm(ta, tb, M, N, K, 1.0f, A, ta ? M : K, B, tb ? K : N, 0.0f, C, N, ada_get_num_threads());
            ada_sgemm_reference(ta, tb, M, N, K, 1.0f, A, ta ? M : K, B, tb ? K : N, 0.0f, R, N);
            CHECK(max_diff(C, R, (size_t)M * N) < 1e-4f * max_abs(R, (size_t)M * N), "gemm ta=%d tb=%d", ta, tb);
            free(A); free(B); free(C); free(R);
        }
}

/* naive direct convolution */
static void conv_ref(float *out, const float *x, const float *w, const float *b,
                     int N, int C, int H, int W, int OC, int k, int pad)
{
    int OH = H + 2 * pad - k + 1, OW = W + 2 * pad - k + 1;
    for (int n = 0; n < N; n++) for (int o = 0; o < OC; o++) for (int i = 0; i < OH; i++) for (int j = 0; j < OW; j++) {
        double acc = b[o];
        for (int c = 0; c < C; c++) for (int p = 0; p < k; p++) for (int q = 0; q < k; q++) {
            int ih = i + p - pad, iw = j + q - pad;
            if (ih >= 0 && ih < H && iw >= 0 && iw < W)
                acc += (double)x[((size_t)(n * C + c) * H + ih) * W + iw] * w[((size_t)(o * C + c) * k + p) * k + q];
        }
        out[((size_t)(n * OC + o) * OH + i) * OW + j] = (float)acc;
    }
}

static double conv_objective(const float *x, const float *w, const float *b, const float *r,
                             int N, int C, int H, int W, int OC, int k, int pad, size_t nout)
{
    float *out = malloc(nout * 4);
    conv_ref(out, x, w, b, N, C, H, W, OC, k, pad);
    double s = 0; for (size_t i = 0; i < nout; i++) s += (double)out[i] * r[i];
    free(out);
    return s;
}

/* largest |central difference - analytic| over every element of `param`
 * (which is x or w itself) */
static float fd_worst(float *param, size_t n, const float *analytic, const float *x,
                      const float *w, const float *b, const float *r, int N, int C, int H,
                      int W, int OC, int k, int pad, size_t nout)
{
    float h = 1e-2f, worst = 0;
    for (size_t i = 0; i < n; i++) {
        float old = param[i];
        param[i] = old + h; double up = conv_objective(x, w, b, r, N, C, H, W, OC, k, pad, nout);
        param[i] = old - h; double dn = conv_objective(x, w, b, r, N, C, H, W, OC, k, pad, nout);
        param[i] = old;
        worst = fmaxf(worst, fabsf((float)((up - dn) / (2 * h)) - analytic[i]));
    }
    return worst;
}

static void test_conv(int k, int pad)
{
    int N = 3, C = 2, H = 6, W = 5, OC = 4;
    int OH = H + 2 * pad - k + 1, OW = W + 2 * pad - k + 1;
    size_t nx = (size_t)N * C * H * W, nw = (size_t)OC * C * k * k, nout = (size_t)N * OC * OH * OW;
    float *x = randn(nx), *w = randn(nw), *b = randn(OC), *r = randn(nout);
    float *out = malloc(nout * 4), *ref = malloc(nout * 4);
    float *ws = malloc(ada_conv2d_workspace_floats(N, C, H, W, OC, k, pad, ada_get_num_threads()) * 4);
    ada_conv2d_forward(out, ws, x, w, b, N, C, H, W, OC, k, pad, 0, ada_get_num_threads());
    conv_ref(ref, x, w, b, N, C, H, W, OC, k, pad);
    CHECK(max_diff(out, ref, nout) < 1e-5f * max_abs(ref, nout) + 1e-6f, "conv forward k=%d pad=%d", k, pad);
    float *dx = malloc(nx * 4), *dw = calloc(nw, 4), *db = calloc(OC, 4), *dout = malloc(nout * 4);
    memcpy(dout, r, nout * 4);
    ada_conv2d_backward(dx, dw, db, ws, dout, NULL, x, w, N, C, H, W, OC, k, pad, ada_get_num_threads());
    /* central differences in float on the double-accumulated objective */
    float worst = fd_worst(w, nw, dw, x, w, b, r, N, C, H, W, OC, k, pad, nout);
    CHECK(worst < 1e-2f * max_abs(dw, nw), "conv dweight k=%d pad=%d (%g)", k, pad, worst);
    worst = fd_worst(x, nx, dx, x, w, b, r, N, C, H, W, OC, k, pad, nout);
    CHECK(worst < 1e-2f * max_abs(dx, nx), "conv dinput k=%d pad=%d (%g)", k, pad, worst);
    float dbsum = 0, rsum = 0;
    for (int o = 0; o < OC; o++) dbsum += db[o];
    for (size_t i = 0; i < nout; i++) rsum += r[i];
    CHECK(fabsf(dbsum - rsum) < 1e-3f * (1 + fabsf(rsum)), "conv dbias sum");
    free(x); free(w); free(b); free(r); free(out); free(ref); free(ws); free(dx); free(dw); free(db); free(dout);
}

static void test_pool(void)
{
    float x[2 * 5 * 4], out[2 * 2 * 2], dx[2 * 5 * 4], dy[8];
    uint8_t am[8];
    for (int i = 0; i < 40; i++) x[i] = (float)((i * 7) % 11);
    ada_maxpool2d_forward(out, am, x, 1, 2, 5, 4, 2);
    for (int i = 0; i < 8; i++) dy[i] = (float)(i + 1);
    ada_maxpool2d_backward(dx, dy, am, 1, 2, 5, 4, 2);
    float total = 0; for (int i = 0; i < 40; i++) total += dx[i];
    CHECK(total == 36.0f, "pool backward routes every gradient once");
    CHECK(out[0] == fmaxf(fmaxf(x[0], x[1]), fmaxf(x[4], x[5])), "pool forward max");

    /* planes of 20, 14 and 15 columns (5 rows: one left out): 10, 7 and 7
     * windows a row, so the 4-wide SIMD path, its overlapping last four and
     * the scalar loop (3 windows) all run; values in {0, 1, 2} make ties
     * common, some are NaN. Each window must follow the rule: first maximum
     * in row-major order, the first NaN wins. Backward must overwrite every
     * element of dx (it starts as garbage): the gradient at the winner, 0
     * elsewhere, 0 in the row and column the pooling leaves out. */
    enum { PH = 5, PWMAX = 20 };
    const int widths[4] = {20, 14, 15, 6};
    int rule_ok = 1, back_ok = 1;
    for (int wi = 0; wi < 4; wi++) {
        int PW = widths[wi], OW = PW / 2;
        float px[PH * PWMAX], pout[(PH / 2) * (PWMAX / 2)], pdy[(PH / 2) * (PWMAX / 2)];
        float pdx[PH * PWMAX];
        uint8_t pam[(PH / 2) * (PWMAX / 2)];
        for (int i = 0; i < PH * PW; i++) {
            px[i] = (i * 37) % 13 == 0 ? NAN : (float)((i * 5) % 3);
            pdx[i] = NAN;
        }
        for (int i = 0; i < (PH / 2) * OW; i++) pdy[i] = (float)(i + 1);
        ada_maxpool2d_forward(pout, pam, px, 1, 1, PH, PW, 1);
        ada_maxpool2d_backward(pdx, pdy, pam, 1, 1, PH, PW, 1);
        for (int oh = 0; oh < PH / 2; oh++)
            for (int ow = 0; ow < OW; ow++) {
                float v[4] = {px[2 * oh * PW + 2 * ow], px[2 * oh * PW + 2 * ow + 1],
                              px[(2 * oh + 1) * PW + 2 * ow], px[(2 * oh + 1) * PW + 2 * ow + 1]};
                int want = 0;
                for (int w = 1; w < 4; w++)
                    if (v[w] > v[want] || (isnan(v[w]) && !isnan(v[want]))) want = w;
                int o = oh * OW + ow;
                if (pam[o] != want || !(pout[o] == v[want] || (isnan(pout[o]) && isnan(v[want]))))
                    rule_ok = 0;
                for (int w = 0; w < 4; w++) {
                    float g = pdx[(2 * oh + (w >> 1)) * PW + 2 * ow + (w & 1)];
                    if (g != (w == want ? pdy[o] : 0.0f)) back_ok = 0;
                }
            }
        for (int h = 0; h < PH; h++)
            for (int w = 0; w < PW; w++)
                if ((h >= 2 * (PH / 2) || w >= 2 * OW) && pdx[h * PW + w] != 0.0f) back_ok = 0;
    }
    CHECK(rule_ok, "pool SIMD, overlapping and scalar windows: first maximum, first NaN wins");
    CHECK(back_ok, "pool backward writes every element: the gradient at the winner, 0 elsewhere");
}

static void test_heads(void)
{
    int N = 6, C = 4, D = 5;
    for (int kind = 0; kind < 4; kind++)
        for (int variant = 0; variant < 2; variant++) {
            if (variant && kind < 2) continue;
            ada_head *head;
            ada_error err = {""};
            CHECK(ada_head_create(&head, kind, variant, C, D, 4.0f, 0.3f, 0.333f, 0.01f, &err) == ADA_OK,
                  "head create: %s", err.msg);
            float *emb = randn((size_t)N * D);
            for (size_t i = 0; i < (size_t)C * D; i++) head->weight[i] = frand() * (kind == 2 && variant ? 0.2f : 1.0f);
            for (size_t i = 0; i < (size_t)N * D; i++) emb[i] *= (kind == 2 && variant) ? 0.2f : (kind == 3 && !variant ? 20.0f : 1.0f);
            int64_t labels[6] = {0, 1, 2, 3, 1, 2};
            float loss, demb[30];
            CHECK(ada_head_forward(head, &loss, emb, labels, N, 0, 2, &err) == ADA_OK && isfinite(loss), "head forward %d/%d", kind, variant);
            ada_head_zero_grad(head);
            CHECK(ada_head_backward(head, demb, 1, 2, NULL) == ADA_OK, "head backward");
            if (!(kind == 3 && variant == 1)) {  /* report AdaFace: q is noise, not differentiable */
                float h = 1e-2f, worst = 0;
                for (int i = 0; i < N * D; i++) {
                    float old = emb[i], up, dn;
                    emb[i] = old + h; ada_head_forward(head, &up, emb, labels, N, 0, 2, NULL);
                    emb[i] = old - h; ada_head_forward(head, &dn, emb, labels, N, 0, 2, NULL);
                    emb[i] = old;
                    worst = fmaxf(worst, fabsf((up - dn) / (2 * h) - demb[i]));
                }
                CHECK(worst < 0.05f * max_abs(demb, (size_t)N * D) + 1e-4f, "head %d/%d demb (%g)", kind, variant, worst);
            }
            int64_t bad[6] = {0, 1, 2, 3, 4, 0};
            float mean = head->running_mean, std = head->running_std;
            CHECK(ada_head_forward(head, &loss, emb, bad, N, 1, 2, &err) == ADA_EINVAL &&
                  strstr(err.msg, "labels: expected values in [0, 4) (num_classes), got 4 at index 4"),
                  "head rejects labels: %s", err.msg);
            CHECK(head->running_mean == mean && head->running_std == std, "rejected forward changes nothing");
            free(emb);
            ada_head_free(head);
        }
}

/* the ArcFace margin rules and the combined head: validation, one forward and
 * backward each on targets spread over (0, pi) (so theta + m passes pi), and
 * central differences where the gradient is that of the forward value */
static void test_margin_rules(void)
{
    int N = 8, C = 4, D = 5;
    ada_error err = {""};
    for (int rule = -1; rule <= ADA_MARGIN_STRAIGHT_THROUGH + 2; rule++) {
        int combined = rule == ADA_MARGIN_STRAIGHT_THROUGH + 1;
        int bad = rule < 0 || rule == ADA_MARGIN_STRAIGHT_THROUGH + 2;
        ada_head *head;
        CHECK(ada_head_create(&head, combined ? ADA_HEAD_COMBINED : ADA_HEAD_ARCFACE, 0, C, D,
                              4.0f, 0.5f, 0.333f, 0.01f, &err) == ADA_OK, "create: %s", err.msg);
        ada_status st = combined ? ada_head_set_margin(head, 0, 1.5f, 0.3f, 0.2f, &err)
                                 : ada_head_set_margin(head, rule, 1.0f, 0.0f, 0.0f, &err);
        if (bad) {
            CHECK(st == ADA_EINVAL && strstr(err.msg, "rule: expected 0..3") &&
                  head->margin_rule == ADA_MARGIN_FALLBACK, "bad rule %d: %s", rule, err.msg);
            ada_head_free(head);
            continue;
        }
        CHECK(st == ADA_OK, "rule %d: %s", rule, err.msg);
        for (size_t i = 0; i < (size_t)C * D; i++) head->weight[i] = frand();
        int64_t labels[8] = {0, 1, 2, 3, 0, 1, 2, 3};
        float *emb = randn((size_t)N * D);
        for (int n = 0; n < N; n++)   /* e = t w_y + noise, t from +1 to -1 */
            for (int d = 0; d < D; d++)
                emb[n * D + d] = (1.0f - 2.0f * n / (N - 1)) * head->weight[labels[n] * D + d] +
                                 0.3f * emb[n * D + d];
        float loss, demb[40];
        CHECK(ada_head_forward(head, &loss, emb, labels, N, 1, 1, &err) == ADA_OK && isfinite(loss),
              "rule %d forward: %s", rule, err.msg);
        ada_head_zero_grad(head);
        CHECK(ada_head_backward(head, demb, 1, 1, &err) == ADA_OK &&
              ada_all_finite(demb, (size_t)N * D, 1) &&
              ada_all_finite(head->weight_grad, (size_t)C * D, 1), "rule %d backward", rule);
        if (rule != ADA_MARGIN_STRAIGHT_THROUGH) {
            float h = 1e-3f, worst = 0;
            for (int i = 0; i < N * D; i++) {
                float old = emb[i], up, dn;
                emb[i] = old + h; ada_head_forward(head, &up, emb, labels, N, 0, 1, NULL);
                emb[i] = old - h; ada_head_forward(head, &dn, emb, labels, N, 0, 1, NULL);
                emb[i] = old;
                worst = fmaxf(worst, fabsf((up - dn) / (2 * h) - demb[i]));
            }
            CHECK(worst < 0.05f * max_abs(demb, (size_t)N * D) + 1e-3f, "rule %d demb (%g)", rule,
                  worst);
        }
        free(emb);
        ada_head_free(head);
    }
    ada_head *head;
    CHECK(ada_head_create(&head, ADA_HEAD_ARCFACE, ADA_VARIANT_REPORT, C, D, 4.0f, 0.5f, 0.3f,
                          0.01f, &err) == ADA_OK, "report head");
    CHECK(ada_head_set_margin(head, ADA_MARGIN_EASY, 1.0f, 0.0f, 0.0f, &err) == ADA_EINVAL &&
          strstr(err.msg, "rule: only the paper ArcFace"), "rule on the report head: %s", err.msg);
    CHECK(ada_head_set_margin(head, ADA_MARGIN_FALLBACK, 2.0f, 0.0f, 0.0f, &err) == ADA_EINVAL &&
          strstr(err.msg, "m1, m2, m3: only the combined head"), "m1 on ArcFace: %s", err.msg);
    ada_head_free(head);
    CHECK(ada_head_create(&head, ADA_HEAD_COMBINED, 0, C, D, 4.0f, 0.0f, 0.3f, 0.01f, &err) ==
          ADA_OK, "combined head");
    CHECK(ada_head_set_margin(head, 0, 0.0f, 0.5f, 0.0f, &err) == ADA_EINVAL &&
          strstr(err.msg, "m1: expected a finite number in (0, 10], got 0"), "m1: %s", err.msg);
    CHECK(ada_head_set_margin(head, 0, 1.0f, NAN, 0.0f, &err) == ADA_EINVAL &&
          strstr(err.msg, "m2: expected a finite number"), "m2: %s", err.msg);
    CHECK(ada_head_set_margin(head, 0, 1.0f, 0.5f, INFINITY, &err) == ADA_EINVAL &&
          strstr(err.msg, "m3: expected a finite number"), "m3: %s", err.msg);
    CHECK(head->m1 == 1.0f && head->m2 == 0.0f && head->m3 == 0.0f, "rejected margins change nothing");
    ada_head_free(head);    /* ada_head_set_m: validated; a rejected m changes nothing */
    CHECK(ada_head_create(&head, ADA_HEAD_ARCFACE, ADA_VARIANT_PAPER, C, D, 4.0f, 0.5f, 0.3f,
                          0.01f, &err) == ADA_OK, "paper head");
    CHECK(ada_head_set_m(head, 0.25f, &err) == ADA_OK && head->m == 0.25f, "set_m 0.25");
    CHECK(ada_head_set_m(head, -0.1f, &err) == ADA_EINVAL &&
          strstr(err.msg, "m: expected a finite number in [0, pi], got -0.1"), "m < 0: %s",
          err.msg);
    CHECK(ada_head_set_m(head, NAN, &err) == ADA_EINVAL, "m NaN");
    CHECK(ada_head_set_m(head, 4.0f, &err) == ADA_EINVAL, "m > pi");
    CHECK(head->m == 0.25f, "rejected m changes nothing");
    ada_head_free(head);
}

static void test_adam(void)
{
    float p[3] = {1, 2, 3}, g[3] = {0.5f, -0.5f, 0}, *pp = p, *gp = g;
    size_t n = 3;
    ada_adam *adam;
    CHECK(ada_adam_create(&adam, 1, &pp, &gp, &n, 0.1f, 0.9f, 0.999f, 1e-8f, 0.0f, NULL) == ADA_OK, "adam create");
    ada_adam_step(adam, 1);
    CHECK(fabsf(p[0] - 0.9f) < 1e-6f && fabsf(p[1] - 2.1f) < 1e-6f && p[2] == 3.0f, "adam first step is lr * sign(g)");
    ada_adam_free(adam);
}

static void test_errors(void)
{
    ada_error err = {""};
    ada_head *head = (ada_head *)&err;   /* must be reset to NULL on failure */
    CHECK(ada_head_create(&head, 7, 0, 4, 8, 1.0f, 0.0f, 0.3f, 0.01f, &err) == ADA_EINVAL &&
          head == NULL && strstr(err.msg, "kind: expected 0..4") && strstr(err.msg, "got 7"),
          "bad head kind: %s", err.msg);
    CHECK(ada_head_create(&head, ADA_HEAD_ARCFACE, 0, 4, 8, NAN, 0.5f, 0.3f, 0.01f, &err) == ADA_EINVAL &&
          strstr(err.msg, "s: expected a finite number in (0, 10000]"), "bad s: %s", err.msg);
    CHECK(ada_head_create(&head, ADA_HEAD_ARCFACE, 0, 0, 8, 1.0f, 0.5f, 0.3f, 0.01f, NULL) == ADA_EINVAL &&
          head == NULL, "a NULL error is allowed");
    CHECK(ada_set_num_threads(0, &err) == ADA_EINVAL && strstr(err.msg, "num_threads: expected 1.."),
          "num_threads: %s", err.msg);
    CHECK(ada_set_num_threads(ADA_MAX_THREADS + 1, &err) == ADA_EINVAL, "num_threads above the cap");
    ada_adam *adam = (ada_adam *)&err;
    CHECK(ada_adam_create(&adam, 0, NULL, NULL, NULL, 1e-3f, 0.9f, 1.0f, 1e-8f, 0.0f, &err) == ADA_EINVAL &&
          adam == NULL && strstr(err.msg, "betas: expected values in [0, 1)"), "betas: %s", err.msg);
    ada_net *net = (ada_net *)&err;
    ada_layer_spec bad[1] = {{.kind = 17}};
    CHECK(ada_net_create(&net, bad, 1, 1, 4, 4, &err) == ADA_EINVAL && net == NULL &&
          strstr(err.msg, "layers[0].kind: expected 0..5, got 17"), "layer kind: %s", err.msg);
}

/* a step that fails leaves the AdaFace running statistics and the weights as
 * they were */
static void test_failed_step_changes_nothing(void)
{
    ada_error err = {""};
    ada_layer_spec flatten[1] = {{.kind = ADA_LAYER_FLATTEN}};
    ada_net *net;
    ada_head *head;
    ada_adam *adam;
    CHECK(ada_net_create(&net, flatten, 1, 1, 4, 4, &err) == ADA_OK, "flatten net: %s", err.msg);
    CHECK(ada_head_create(&head, ADA_HEAD_ADAFACE, ADA_VARIANT_PAPER, 4, 16, 16.0f, 0.4f, 0.333f,
                          0.01f, &err) == ADA_OK, "head");
    for (int i = 0; i < 64; i++) head->weight[i] = frand();
    size_t n = 64;
    CHECK(ada_adam_create(&adam, 1, &head->weight, &head->weight_grad, &n, 1e-2f, 0.9f, 0.999f,
                          1e-8f, 0.0f, &err) == ADA_OK, "adam");
    uint8_t x[4 * 16];
    for (int i = 0; i < 64; i++) x[i] = (uint8_t)(i * 53 % 256);
    int64_t y[4] = {0, 1, 2, 3};
    float w0[64], loss;
    memcpy(w0, head->weight, sizeof w0);
    float mean = head->running_mean, std = head->running_std;
    CHECK(ada_train_step(net, head, adam, &loss, NULL, x, y, 4, 1, 2, &err) == ADA_EINVAL &&
          strstr(err.msg, "Flatten"), "a Flatten-only network cannot be trained: %s", err.msg);
    CHECK(head->running_mean == mean && head->running_std == std,
          "running stats unchanged after a failed step (%g, %g) -> (%g, %g)", (double)mean,
          (double)std, (double)head->running_mean, (double)head->running_std);
    CHECK(memcmp(w0, head->weight, sizeof w0) == 0 && adam->step == 0, "weights unchanged");
    ada_adam_free(adam);
    ada_head_free(head);
    ada_net_free(net);
}

static void test_net(void)
{
    ada_error err = {""};
    ada_net *net;
    ada_layer_spec bad[2] = {{ADA_LAYER_CONV2D, .conv2d = {3, 4, 3, 1}}, {ADA_LAYER_RELU}};
    CHECK(ada_net_create(&net, bad, 2, 1, 8, 8, &err) == ADA_EINVAL && net == NULL &&
          strstr(err.msg, "input channels"), "net rejects channels");
    ada_layer_spec specs[] = {{ADA_LAYER_CONV2D, .conv2d = {.in_channels = 1, .out_channels = 4,
                                                            .kernel_size = 3, .padding = 1}},
                              {ADA_LAYER_RELU}, {ADA_LAYER_MAXPOOL2D}, {ADA_LAYER_FLATTEN},
                              {ADA_LAYER_LINEAR, .linear = {.in_features = 64, .out_features = 16}},
                              {ADA_LAYER_RELU},
                              {ADA_LAYER_LINEAR, .linear = {.in_features = 16, .out_features = 8}},
                              {ADA_LAYER_L2NORM}};
    CHECK(ada_net_create(&net, specs, 8, 1, 8, 8, &err) == ADA_OK, "net create: %s", err.msg);
    for (size_t i = 0; i < net->num_params; i++) net->params[i] = 0.3f * frand();
    ada_head *head;
    CHECK(ada_head_create(&head, ADA_HEAD_ADAFACE, ADA_VARIANT_PAPER, 4, 8, 16.0f, 0.4f, 0.333f, 0.01f, &err) == ADA_OK, "head");
    for (int i = 0; i < 32; i++) head->weight[i] = frand();
    float *params[2] = {net->params, head->weight}, *grads[2] = {net->grads, head->weight_grad};
    size_t sizes[2] = {net->num_params, 32};
    ada_adam *adam;
    CHECK(ada_adam_create(&adam, 2, params, grads, sizes, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.0f, &err) == ADA_OK, "adam");
    uint8_t x[16 * 64];
    int64_t y[16];
    for (int i = 0; i < 16 * 64; i++) x[i] = (uint8_t)(i * 37 % 256);
    for (int i = 0; i < 16; i++) y[i] = i % 4;
    float first = 0, loss = 0;
    for (int step = 0; step < 60; step++) {
        CHECK(ada_train_step(net, head, adam, &loss, NULL, x, y, 16, 1, 2, &err) == ADA_OK, "train step: %s", err.msg);
        if (step == 0) first = loss;
    }
    CHECK(isfinite(loss) && loss < first, "loss falls on a fixed batch (%g -> %g)", first, loss);
    /* a larger batch replans; a smaller one reuses */
    CHECK(ada_train_step(net, head, adam, &loss, NULL, x, y, 3, 1, 2, &err) == ADA_OK, "smaller batch");
    int64_t badlab[16] = {0};
    badlab[5] = 9;
    float mean = head->running_mean, std = head->running_std;
    int64_t step = adam->step;
    CHECK(ada_train_step(net, head, adam, &loss, NULL, x, badlab, 16, 1, 2, &err) == ADA_EINVAL &&
          strstr(err.msg, "got 9 at index 5"), "bad label rejected: %s", err.msg);
    CHECK(head->running_mean == mean && head->running_std == std && adam->step == step,
          "a rejected step changes nothing");
    const float *outp;
    float xf[2 * 64];
    for (int i = 0; i < 128; i++) xf[i] = frand();
    CHECK(ada_net_forward(net, &outp, xf, NULL, 2, 2, &err) == ADA_OK, "float forward");
    float dx[2 * 64], dout[16];
    for (int i = 0; i < 16; i++) dout[i] = frand();
    CHECK(ada_net_backward(net, dx, dout, 2, 2, &err) == ADA_OK, "backward");
    /* backward must match the last forward's batch, not an earlier, larger one */
    CHECK(ada_net_forward(net, &outp, xf, NULL, 1, 2, &err) == ADA_OK, "forward of 1");
    CHECK(ada_net_backward(net, dx, dout, 2, 2, &err) == ADA_EINVAL &&
          strstr(err.msg, "d_emb: expected 1 rows (the batch of the last forward), got 2"),
          "stale batch rejected: %s", err.msg);
    ada_adam_free(adam);
    ada_head_free(head);
    ada_net_free(net);
}

/* another thread changes the thread count while steps run: each step reads
 * it once and sizes its workspace and its kernels' split with that count */
static atomic_int stop_toggling;

static void *toggle_threads(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_toggling)) {
        ada_set_num_threads(1, NULL);
        ada_set_num_threads(32, NULL);
    }
    return NULL;
}

static void test_thread_count_changes_during_steps(void)
{
    ada_error err = {""};
    ada_layer_spec specs[] = {{ADA_LAYER_CONV2D, .conv2d = {.in_channels = 2, .out_channels = 4,
                                                            .kernel_size = 3, .padding = 1}},
                              {ADA_LAYER_RELU}, {ADA_LAYER_MAXPOOL2D}, {ADA_LAYER_FLATTEN},
                              {ADA_LAYER_LINEAR, .linear = {.in_features = 64, .out_features = 8}}};
    enum { BATCH = 32 };   /* one image per thread at 32 threads */
    uint8_t x[BATCH * 2 * 8 * 8];
    int64_t y[BATCH];
    for (size_t i = 0; i < sizeof x; i++) x[i] = (uint8_t)(i * 31 % 256);
    for (int i = 0; i < BATCH; i++) y[i] = i % 4;
    atomic_store(&stop_toggling, 0);
    pthread_t toggler;
    CHECK(pthread_create(&toggler, NULL, toggle_threads, NULL) == 0, "start the toggling thread");
    int ok = 1;
    for (int round = 0; round < 10; round++) {
        ada_set_num_threads(1, NULL);   /* a fresh network plans for one thread */
        ada_net *net;
        ada_head *head;
        ada_adam *adam;
        ok &= ada_net_create(&net, specs, 5, 2, 8, 8, &err) == ADA_OK;
        ok &= ada_head_create(&head, ADA_HEAD_ARCFACE, ADA_VARIANT_PAPER, 4, 8, 8.0f, 0.5f, 0.3f,
                              0.01f, &err) == ADA_OK;
        for (size_t i = 0; i < net->num_params; i++) net->params[i] = 0.3f * frand();
        for (int i = 0; i < 32; i++) head->weight[i] = frand();
        size_t n = net->num_params;
        ok &= ada_adam_create(&adam, 1, &net->params, &net->grads, &n, 1e-3f, 0.9f, 0.999f,
                              1e-8f, 0.0f, &err) == ADA_OK;
        for (int step = 0; step < 3; step++) {
            float loss;
            ok &= ada_train_step(net, head, adam, &loss, NULL, x, y, BATCH, 0, ada_get_num_threads(),
                                 &err) == ADA_OK && isfinite(loss);
        }
        ada_adam_free(adam);
        ada_head_free(head);
        ada_net_free(net);
    }
    atomic_store(&stop_toggling, 1);
    pthread_join(toggler, NULL);
    CHECK(ok, "steps while another thread changes the thread count: %s", err.msg);
    ada_set_num_threads(2, NULL);
}

int main(void)
{
    test_gemm();
    test_conv(3, 1);
    test_conv(3, 0);
    test_conv(5, 2);
    test_conv(1, 0);
    test_pool();
    test_heads();
    test_margin_rules();
    test_adam();
    test_net();
    test_errors();
    test_failed_step_changes_nothing();
    test_thread_count_changes_during_steps();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
