/* heads.c: the loss heads. Softmax (linear classifier + cross-entropy),
 * CosFace, ArcFace and AdaFace, the last two in a "paper" and a "report"
 * variant (docs/design.md gives every formula), and the combined margin
 * cos(m1 theta + m2) - m3. The paper ArcFace has four rules for theta + m
 * near pi (ada_margin_rule in adaloss.h).
 *
 * All heads share one shape:
 *   a = e or e/||e||,  w_j = W_j or W_j/||W_j||,   c = a w^T          (N, C)
 *   logit_ij = s f(c_ij)   with f the margin transform (target j = y_i or not)
 *   loss = mean_i [ logsumexp_j logit_ij - logit_iy ]
 * so forward computes d loss / d c once, and backward is two GEMMs and the
 * normalisations' chain rule. */
#include "adaloss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PI_F 3.14159265358979323846f

/* finite and in [lo, hi] (lo excluded when low_open) */
static int in_range(float x, float lo, float hi, int low_open)
{
    return isfinite(x) && x <= hi && (low_open ? x > lo : x >= lo);
}

ada_status ada_head_create(ada_head **out, int kind, int variant, int num_classes,
                           int embedding_dim, float s, float m, float h, float t_alpha,
                           ada_error *err)
{
    *out = NULL;
    if (kind < ADA_HEAD_SOFTMAX || kind > ADA_HEAD_COMBINED)
        return ada_fail(err, ADA_EINVAL, "kind: expected %d..%d (softmax, cosface, arcface, "
                        "adaface, combined), got %d", ADA_HEAD_SOFTMAX, ADA_HEAD_COMBINED, kind);
    if (variant != ADA_VARIANT_PAPER && variant != ADA_VARIANT_REPORT)
        return ada_fail(err, ADA_EINVAL, "variant: expected %d (paper) or %d (report), got %d",
                        ADA_VARIANT_PAPER, ADA_VARIANT_REPORT, variant);
    if (num_classes < 1 || num_classes > ADA_MAX_DIM)
        return ada_fail(err, ADA_EINVAL, "num_classes: expected 1..%d, got %d", ADA_MAX_DIM,
                        num_classes);
    if (embedding_dim < 1 || embedding_dim > ADA_MAX_DIM)
        return ada_fail(err, ADA_EINVAL, "embedding_dim: expected 1..%d, got %d", ADA_MAX_DIM,
                        embedding_dim);
    if ((size_t)num_classes * embedding_dim > (size_t)ADA_MAX_HEAD_WEIGHTS)
        return ada_fail(err, ADA_EINVAL, "num_classes * embedding_dim: expected at most %d "
                        "weights, got %zu", ADA_MAX_HEAD_WEIGHTS,
                        (size_t)num_classes * embedding_dim);
    if (!in_range(s, 0.0f, 1e4f, 1))
        return ada_fail(err, ADA_EINVAL, "s: expected a finite number in (0, 10000], got %g",
                        (double)s);
    if (!in_range(m, 0.0f, PI_F, 0))
        return ada_fail(err, ADA_EINVAL, "m: expected a finite number in [0, pi], got %g",
                        (double)m);
    if (!in_range(h, 0.0f, 1e3f, 0))
        return ada_fail(err, ADA_EINVAL, "h: expected a finite number in [0, 1000], got %g",
                        (double)h);
    if (!in_range(t_alpha, 0.0f, 1.0f, 0))
        return ada_fail(err, ADA_EINVAL, "t_alpha: expected a finite number in [0, 1], got %g",
                        (double)t_alpha);
    ada_head *head = calloc(1, sizeof(*head));
    if (!head) return ada_fail(err, ADA_ENOMEM, "out of memory for the head");
    head->kind = kind;
    head->variant = (kind == ADA_HEAD_ARCFACE || kind == ADA_HEAD_ADAFACE) ? variant
                                                                           : ADA_VARIANT_PAPER;
    head->num_classes = num_classes;
    head->embedding_dim = embedding_dim;
    head->s = kind == ADA_HEAD_SOFTMAX ? 1.0f : s;
    head->m = m;
    head->h = h;
    head->t_alpha = t_alpha;
    head->eps = 1e-3f;
    head->margin_rule = ADA_MARGIN_FALLBACK;
    head->m1 = 1.0f;
    head->running_mean = 20.0f;
    head->running_std = 100.0f;
    /* the report's ArcFace normalises nothing; softmax is a plain classifier */
    int raw = kind == ADA_HEAD_SOFTMAX ||
              (kind == ADA_HEAD_ARCFACE && variant == ADA_VARIANT_REPORT);
    head->normalize_embedding = !raw;
    head->normalize_weight = !raw;
    size_t cd = (size_t)num_classes * embedding_dim;
    head->weight = calloc(cd * 4 + num_classes, sizeof(float));
    if (!head->weight) {
        free(head);
        return ada_fail(err, ADA_ENOMEM, "out of memory for %zu class weights", cd);
    }
    head->weight_grad = head->weight + cd;
    head->weight_unit = head->weight + 2 * cd;
    head->weight_scratch = head->weight + 3 * cd;
    head->weight_norm = head->weight + 4 * cd;
    *out = head;
    return ADA_OK;
}

void ada_head_free(ada_head *head)
{
    if (!head) return;
    free(head->weight);
    free(head->example_loss);
    free(head);
}

ada_status ada_head_reserve(ada_head *head, int N, ada_error *err)
{
    if (N < 1 || N > ADA_MAX_BATCH)
        return ada_fail(err, ADA_EINVAL, "N: expected a batch of 1..%d examples, got %d",
                        ADA_MAX_BATCH, N);
    if (N <= head->capacity) return ADA_OK;
    size_t D = head->embedding_dim, C = head->num_classes;
    /* example_loss (N doubles) first, for its alignment, then emb_unit (N D),
     * cosine and dcosine (N C each), emb_norm, quality, angle (N) */
    size_t doubles = ((size_t)N + 1) / 2 * 2;   /* an even count keeps the floats 16-byte aligned */
    double *losses = malloc(sizeof(double) * doubles
                            + sizeof(float) * ((size_t)N * (D + 2 * C + 3)));
    if (!losses)
        return ada_fail(err, ADA_ENOMEM, "out of memory for the head's caches for a batch of %d",
                        N);
    float *block = (float *)(losses + doubles);
    free(head->example_loss);
    head->example_loss = losses;
    head->emb_unit = block;
    head->cosine = block + (size_t)N * D;
    head->dcosine = head->cosine + (size_t)N * C;
    head->emb_norm = head->dcosine + (size_t)N * C;
    head->quality = head->emb_norm + N;
    head->target_angle = head->quality + N;
    head->capacity = N;
    head->has_forward = 0;
    return ADA_OK;
}

void ada_head_zero_grad(ada_head *head)
{
    memset(head->weight_grad, 0, sizeof(float) * head->num_classes * head->embedding_dim);
}

static const char *rule_name(int rule)
{
    static const char *names[] = {"fallback", "easy", "clip", "straight-through"};
    return rule >= 0 && rule < 4 ? names[rule] : "?";
}

static const char *head_name(int kind)
{
    static const char *names[] = {"Softmax", "CosFace", "ArcFace", "AdaFace", "CombinedMargin"};
    return kind >= 0 && kind < 5 ? names[kind] : "?";
}

ada_status ada_head_set_margin(ada_head *head, int rule, float m1, float m2, float m3,
                               ada_error *err)
{
    if (rule < ADA_MARGIN_FALLBACK || rule > ADA_MARGIN_STRAIGHT_THROUGH)
        return ada_fail(err, ADA_EINVAL, "rule: expected %d..%d (fallback, easy, clip, "
                        "straight-through), got %d", ADA_MARGIN_FALLBACK,
                        ADA_MARGIN_STRAIGHT_THROUGH, rule);
    if (rule != ADA_MARGIN_FALLBACK &&
        !(head->kind == ADA_HEAD_ARCFACE && head->variant == ADA_VARIANT_PAPER))
        return ada_fail(err, ADA_EINVAL, "rule: only the paper ArcFace (variant 'paper') "
                        "has margin rules other than 'fallback', got rule '%s' for a%s %s head",
                        rule_name(rule), head->variant == ADA_VARIANT_REPORT ? " report" : "",
                        head_name(head->kind));
    if (!in_range(m1, 0.0f, 10.0f, 1))
        return ada_fail(err, ADA_EINVAL, "m1: expected a finite number in (0, 10], got %g",
                        (double)m1);
    if (!in_range(m2, 0.0f, PI_F, 0))
        return ada_fail(err, ADA_EINVAL, "m2: expected a finite number in [0, pi], got %g",
                        (double)m2);
    if (!in_range(m3, 0.0f, PI_F, 0))
        return ada_fail(err, ADA_EINVAL, "m3: expected a finite number in [0, pi], got %g",
                        (double)m3);
    if (head->kind != ADA_HEAD_COMBINED && (m1 != 1.0f || m2 != 0.0f || m3 != 0.0f))
        return ada_fail(err, ADA_EINVAL, "m1, m2, m3: only the combined head (kind %d) uses "
                        "them; expected (1, 0, 0) for kind %d, got (%g, %g, %g)",
                        ADA_HEAD_COMBINED, head->kind, (double)m1, (double)m2, (double)m3);
    head->margin_rule = rule;
    head->m1 = m1;
    head->m2 = m2;
    head->m3 = m3;
    return ADA_OK;
}

ada_status ada_head_set_m(ada_head *head, float m, ada_error *err)
{
    if (!in_range(m, 0.0f, PI_F, 0))
        return ada_fail(err, ADA_EINVAL, "m: expected a finite number in [0, pi], got %g",
                        (double)m);
    head->m = m;
    return ADA_OK;
}

ada_status ada_head_set_running_stats(ada_head *head, float mean, float std, ada_error *err)
{
    if (!isfinite(mean))
        return ada_fail(err, ADA_EINVAL, "mean: expected a finite number, got %g", (double)mean);
    if (!isfinite(std) || std < 0.0f)
        return ada_fail(err, ADA_EINVAL, "std: expected a finite number >= 0, got %g",
                        (double)std);
    head->running_mean = mean;
    head->running_std = std;
    return ADA_OK;
}

ada_status ada_head_check_labels(const ada_head *head, const int64_t *labels, int N,
                                 ada_error *err)
{
    for (int n = 0; n < N; n++)
        if (labels[n] < 0 || labels[n] >= head->num_classes)
            return ada_fail(err, ADA_EINVAL, "labels: expected values in [0, %d) (num_classes), "
                            "got %lld at index %d", head->num_classes, (long long)labels[n], n);
    return ADA_OK;
}

/* the batch size and the embeddings' finiteness, as forward and logits need */
static ada_status check_batch(const ada_head *head, const float *emb, int N, int min_n,
                              int num_threads, ada_error *err)
{
    if (num_threads < 1 || num_threads > ADA_MAX_THREADS)
        return ada_fail(err, ADA_EINVAL, "num_threads: expected 1..%d, got %d", ADA_MAX_THREADS,
                        num_threads);
    if (N < min_n || N > ADA_MAX_BATCH)
        return ada_fail(err, ADA_EINVAL, "emb: expected a batch of %d..%d examples, got %d",
                        min_n, ADA_MAX_BATCH, N);
    if (N > 0 && !ada_all_finite(emb, (size_t)N * head->embedding_dim, num_threads))
        return ada_fail(err, ADA_EINVAL, "emb contains NaN or inf");
    return ADA_OK;
}

/* a (N, D), w (C, D) and cosine = a w^T, from the raw embedding and weight */
static void cosines(ada_head *head, const float *emb, int N, int num_threads)
{
    int C = head->num_classes, D = head->embedding_dim;
    if (head->normalize_embedding) {
        ada_l2norm_forward(head->emb_unit, head->emb_norm, emb, N, D);
    } else {
        memcpy(head->emb_unit, emb, sizeof(float) * (size_t)N * D);
        for (int n = 0; n < N; n++) head->emb_norm[n] = 1.0f;
    }
    if (head->normalize_weight) {
        ada_l2norm_forward(head->weight_unit, head->weight_norm, head->weight, C, D);
    } else {
        memcpy(head->weight_unit, head->weight, sizeof(float) * (size_t)C * D);
    }
    ada_sgemm(0, 1, N, C, D, 1.0f, head->emb_unit, D, head->weight_unit, D, 0.0f,
              head->cosine, C, num_threads);
}

static float clampf(float x, float lo, float hi, int *inside)
{
    /* PyTorch's clamp passes the gradient for lo <= x <= hi, both inclusive */
    *inside = x >= lo && x <= hi;
    return x < lo ? lo : (x > hi ? hi : x);
}

/* AdaFace quality indicator q (no gradient), per docs/design.md */
static void adaface_quality(ada_head *head, int N, int training)
{
    float *q = head->quality;
    if (head->variant == ADA_VARIANT_PAPER) {
        /* Kim et al. 2022, Eq. 4: norms of the unnormalised embedding, clipped
         * to [0.001, 100], against running batch statistics (momentum t_alpha) */
        double sum = 0.0, sq = 0.0;
        for (int n = 0; n < N; n++) {
            float norm = head->emb_norm[n];
            q[n] = norm < 0.001f ? 0.001f : (norm > 100.0f ? 100.0f : norm);
            sum += q[n];
        }
        double mean = sum / N;
        for (int n = 0; n < N; n++) sq += (q[n] - mean) * (q[n] - mean);
        if (training) {
            float a = head->t_alpha;
            head->running_mean = (float)mean * a + (1.0f - a) * head->running_mean;
            /* the unbiased std of one example is undefined: keep the running std */
            float std = N > 1 ? (float)sqrt(sq / (N - 1)) : head->running_std;
            head->running_std = std * a + (1.0f - a) * head->running_std;
        }
        for (int n = 0; n < N; n++) {
            float v = (q[n] - head->running_mean) / (head->running_std + head->eps);
            v *= head->h;
            q[n] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
        }
    } else {
        /* The report measures the norm of an embedding it has just normalised:
         * 1 up to float32 rounding, so q is rounding noise, amplified by
         * 1 / (std + 1e-7). Computed in float32 as the report's code did. */
        int D = head->embedding_dim;
        float mean = 0.0f;
        for (int n = 0; n < N; n++) {
            const float *a = head->emb_unit + (size_t)n * D;
            float acc = 0.0f;
            for (int d = 0; d < D; d++) acc += a[d] * a[d];
            q[n] = sqrtf(acc);
            mean += q[n];
        }
        mean /= (float)N;
        float var = 0.0f;
        for (int n = 0; n < N; n++) var += (q[n] - mean) * (q[n] - mean);
        float std = N > 1 ? sqrtf(var / (float)(N - 1)) : 0.0f;
        for (int n = 0; n < N; n++) {
            float v = (q[n] - mean) / ((std + 1e-7f) / head->h);
            q[n] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
        }
    }
}

/* cos(theta + m) = c cos m - sin(theta) sin m for c = cos theta in [-1, 1], and
 * (*dfdc) its slope in c (0 when !inside: c was clamped). The term c cos m
 * contributes cos m. The term -sin(theta) sin m contributes c sin m / sin(theta),
 * since d sin(theta) / dc = -c / sin(theta). sin(theta) = sqrt(1 - c^2) with
 * 1 - c^2 floored at 1e-12, and no gradient through it on the floor. Every
 * ArcFace rule takes cos(theta + m) from here. */
static float arc_margin(float cc, float m, int inside, float *dfdc)
{
    float one_minus = 1.0f - cc * cc;
    int floored = !(one_minus > 1e-12f);
    float sine = sqrtf(floored ? 1e-12f : one_minus);
    float value = cc * cosf(m) - sine * sinf(m);
    *dfdc = inside ? cosf(m) + (floored ? 0.0f : cc * sinf(m) / sine) : 0.0f;
    return value;
}

/* f(c) and df/dc for one cosine; `target` says whether j == y_i */
static float margin(const ada_head *head, float c, int target, float q,
                    float *dfdc, float *angle)
{
    int inside;
    float m = head->m;
    switch (head->kind) {
    case ADA_HEAD_SOFTMAX:
        *dfdc = 1.0f;
        return c;
    case ADA_HEAD_COSFACE:
        /* Wang et al. 2018, Eq. 4: s (cos theta_y - m) */
        *dfdc = 1.0f;
        if (target) *angle = acosf(c < -1.0f ? -1.0f : (c > 1.0f ? 1.0f : c));
        return target ? c - m : c;
    case ADA_HEAD_ARCFACE: {
        float cc = clampf(c, -1.0f, 1.0f, &inside);
        if (head->variant == ADA_VARIANT_REPORT) {
            /* the report: s (clamp(e . w, -1, 1) - m [j = y]) on raw vectors */
            *dfdc = inside ? 1.0f : 0.0f;
            if (target) *angle = acosf(cc);
            return target ? cc - m : cc;
        }
        if (!target) { *dfdc = inside ? 1.0f : 0.0f; return cc; }
        /* Deng et al. 2019, Eq. 3: cos(theta + m), value and slope from
         * arc_margin; the rules differ only where theta + m nears or passes pi. */
        float theta = acosf(cc);
        *angle = theta;
        switch (head->margin_rule) {
        case ADA_MARGIN_EASY:
            /* cos(theta + m) for c > 0 (theta < pi/2), else c itself (slope 1) */
            if (cc > 0.0f) return arc_margin(cc, m, inside, dfdc);
            *dfdc = inside ? 1.0f : 0.0f;
            return cc;
        case ADA_MARGIN_CLIP: {
            /* g = theta + m clipped to [eps, pi - eps], eps = head->eps = 1e-3
             * (the AdaFace paper head's): inside, the slope of cos(theta + m);
             * where it clips, g is a constant, so d f / d c = 0 */
            int g_inside;
            float g = clampf(theta + m, head->eps, PI_F - head->eps, &g_inside);
            if (g_inside) return arc_margin(cc, m, inside, dfdc);
            *dfdc = 0.0f;
            return cosf(g);
        }
        case ADA_MARGIN_STRAIGHT_THROUGH: {
            /* the value cos(theta + m) for every theta (it rises again past
             * pi - m); the margin carries no gradient, so d f / d c = 1 (the
             * clamp's mask aside) */
            float unused;
            float value = arc_margin(cc, m, inside, &unused);
            *dfdc = inside ? 1.0f : 0.0f;
            return value;
        }
        case ADA_MARGIN_FALLBACK: default: {
            /* past theta > pi - m the target falls back to c - m sin m (slope 1) */
            float threshold = cosf(PI_F - m);
            if (cc > threshold) return arc_margin(cc, m, inside, dfdc);
            *dfdc = inside ? 1.0f : 0.0f;
            return cc - m * sinf(m);
        }
        }
    }
    case ADA_HEAD_COMBINED: {
        float cc = clampf(c, -1.0f, 1.0f, &inside);
        if (!target) { *dfdc = inside ? 1.0f : 0.0f; return cc; }
        /* cos(m1 theta + m2) - m3 (insightface's combined margin). Past
         * g = m1 theta + m2 > pi a plain cosine would rise again (the target
         * logit would grow with theta); we continue it as SphereFace's psi
         * (Liu et al. 2017, Sec. 3.3): with k = floor(g / pi),
         *   f = (-1)^k cos(g) - 2k - m3,
         * continuous at every g = k pi and decreasing in theta. It equals the
         * plain formula wherever g <= pi. Slope: d g / d theta = m1,
         * d theta / d c = -1 / sin(theta), d ((-1)^k cos g) / d g =
         * -(-1)^k sin g, so d f / d c = (-1)^k m1 sin(g) / sin(theta) >= 0.
         * sin(theta) = sqrt((1 - c)(1 + c)); at c = +-1 exactly (sin(theta) =
         * 0) the slope is its limit m1^2 where finite (theta = 0 with m2 = 0),
         * else 0, as ArcFace's floor. */
        float theta = acosf(cc);
        *angle = theta;
        float g = head->m1 * theta + head->m2;
        float k = floorf(g / PI_F);
        float sign = fmodf(k, 2.0f) == 0.0f ? 1.0f : -1.0f;
        float sine = sqrtf((1.0f - cc) * (1.0f + cc));
        if (!inside) *dfdc = 0.0f;
        else if (sine > 0.0f) *dfdc = sign * head->m1 * sinf(g) / sine;
        else *dfdc = (cc > 0.0f && head->m2 == 0.0f) ? head->m1 * head->m1 : 0.0f;
        return sign * cosf(g) - 2.0f * k - head->m3;
    }
    case ADA_HEAD_ADAFACE: default: {
        int report = head->variant == ADA_VARIANT_REPORT;
        float lo = report ? -0.9999f : -1.0f + head->eps;
        float hi = report ? 0.9999f : 1.0f - head->eps;
        float cc = clampf(c, lo, hi, &inside);
        if (!target) { *dfdc = inside ? 1.0f : 0.0f; return cc; }
        /* Kim et al. 2022, Eq. 7: cos(theta - m q) - (m + m q). theta = acos(c),
         * d theta / dc = -1 / sqrt(1 - c^2), d cos(g) / dg = -sin(g). The paper
         * head clips g = theta - m q to [eps, pi - eps] (zero gradient outside);
         * the report's does not clip. */
        float theta = acosf(cc);
        *angle = theta;
        float g = theta - m * q;
        int g_inside = 1;
        if (!report) g = clampf(g, head->eps, PI_F - head->eps, &g_inside);
        float value = cosf(g) - (m + m * q);
        *dfdc = (inside && g_inside) ? sinf(g) / sqrtf(1.0f - cc * cc) : 0.0f;
        return value;
    }
    }
}

ada_status ada_head_forward(ada_head *head, float *loss, const float *emb,
                            const int64_t *labels, int N, int training, int num_threads,
                            ada_error *err)
{
    int C = head->num_classes;
    ada_status st = check_batch(head, emb, N, 1, num_threads, err);
    if (st == ADA_OK) st = ada_head_check_labels(head, labels, N, err);
    if (st == ADA_OK) st = ada_head_reserve(head, N, err);
    if (st != ADA_OK) return st;
    cosines(head, emb, N, num_threads);
    if (head->kind == ADA_HEAD_ADAFACE) adaface_quality(head, N, training);
    const float s = head->s, inv_n = 1.0f / (float)N;
    #pragma omp parallel for schedule(static) if (N * C > 8192) num_threads(num_threads)
    for (int n = 0; n < N; n++) {
        const float *c = head->cosine + (size_t)n * C;
        float *dc = head->dcosine + (size_t)n * C;   /* holds logits, then dloss/dc */
        float q = head->kind == ADA_HEAD_ADAFACE ? head->quality[n] : 0.0f;
        float angle = NAN, dfdc;
        float maxlogit = -INFINITY;
        int y = (int)labels[n];
        float target_slope = 0.0f;
        for (int j = 0; j < C; j++) {
            float f = margin(head, c[j], j == y, q, &dfdc, &angle);
            dc[j] = s * f;
            if (j == y) target_slope = dfdc;
            if (dc[j] > maxlogit) maxlogit = dc[j];
        }
        head->target_angle[n] = angle;
        double sumexp = 0.0;
        for (int j = 0; j < C; j++) sumexp += exp((double)(dc[j] - maxlogit));
        double lse = maxlogit + log(sumexp);
        head->example_loss[n] = lse - dc[y];
        /* d loss / d logit_j = (softmax_j - [j = y]) / N; times s f'(c_j) */
        for (int j = 0; j < C; j++) {
            float p = (float)exp((double)dc[j] - lse);
            float dlogit = (p - (j == y ? 1.0f : 0.0f)) * inv_n;
            float slope_j;
            if (j == y) slope_j = target_slope;
            else margin(head, c[j], 0, q, &slope_j, &angle);
            dc[j] = dlogit * s * slope_j;
        }
    }
    double total = 0.0;   /* in example order, whatever the thread count */
    for (int n = 0; n < N; n++) total += head->example_loss[n];
    *loss = (float)(total / N);
    head->cached_n = N;
    head->has_forward = 1;
    return ADA_OK;
}

ada_status ada_head_backward(ada_head *head, float *demb, int accumulate_weight,
                             int num_threads, ada_error *err)
{
    if (num_threads < 1 || num_threads > ADA_MAX_THREADS)
        return ada_fail(err, ADA_EINVAL, "num_threads: expected 1..%d, got %d", ADA_MAX_THREADS,
                        num_threads);
    if (!head->has_forward)
        return ada_fail(err, ADA_ESTATE, "backward() needs a forward(emb, labels) first");
    int N = head->cached_n, C = head->num_classes, D = head->embedding_dim;
    /* c = a w^T: da = dc w (N, D), dw = dc^T a (C, D) */
    ada_sgemm(0, 0, N, D, C, 1.0f, head->dcosine, C, head->weight_unit, D, 0.0f, demb, D,
              num_threads);
    if (head->normalize_embedding)
        ada_l2norm_backward(demb, demb, head->emb_unit, head->emb_norm, N, D);
    if (accumulate_weight) {
        if (!head->normalize_weight) {
            ada_sgemm(1, 0, C, D, N, 1.0f, head->dcosine, C, head->emb_unit, D, 1.0f,
                      head->weight_grad, D, num_threads);
        } else {
            /* d w_unit first, then through the row normalisation */
            size_t cd = (size_t)C * D;
            float *dw = head->weight_scratch;
            ada_sgemm(1, 0, C, D, N, 1.0f, head->dcosine, C, head->emb_unit, D, 0.0f, dw, D,
                      num_threads);
            ada_l2norm_backward(dw, dw, head->weight_unit, head->weight_norm, C, D);
            for (size_t i = 0; i < cd; i++) head->weight_grad[i] += dw[i];
        }
    }
    return ADA_OK;
}

ada_status ada_head_logits(ada_head *head, float *logits, const float *emb,
                           const int64_t *labels, int N, int rule, int num_threads,
                           ada_error *err)
{
    int C = head->num_classes, D = head->embedding_dim;
    if (rule != ADA_RULE_PLAIN && rule != ADA_RULE_REPORT)
        return ada_fail(err, ADA_EINVAL, "rule: expected %d (plain) or %d (report), got %d",
                        ADA_RULE_PLAIN, ADA_RULE_REPORT, rule);
    if (rule == ADA_RULE_REPORT && head->variant != ADA_VARIANT_REPORT)
        return ada_fail(err, ADA_EINVAL, "rule='report' exists only for variant='report' heads");
    int needs_labels = rule == ADA_RULE_REPORT && head->kind != ADA_HEAD_ADAFACE;
    if (needs_labels && !labels)
        return ada_fail(err, ADA_EINVAL, "labels: the report's ArcFace evaluation needs labels");
    ada_status st = check_batch(head, emb, N, 0, num_threads, err);
    if (st == ADA_OK && labels) st = ada_head_check_labels(head, labels, N, err);
    if (st != ADA_OK || N == 0) return st;
    if (rule == ADA_RULE_REPORT && head->kind == ADA_HEAD_ADAFACE) {
        /* the report's accuracy: argmax of e . W^T with the raw weight */
        ada_sgemm(0, 1, N, C, D, 1.0f, emb, D, head->weight, D, 0.0f, logits, C, num_threads);
        return ADA_OK;
    }
    st = ada_head_reserve(head, N, err);
    if (st != ADA_OK) return st;
    cosines(head, emb, N, num_threads);
    head->has_forward = 0;
    int inside;
    for (size_t i = 0; i < (size_t)N * C; i++) {
        float c = head->cosine[i];
        if (head->kind == ADA_HEAD_ARCFACE || head->kind == ADA_HEAD_COMBINED)
            c = clampf(c, -1.0f, 1.0f, &inside);
        else if (head->kind == ADA_HEAD_ADAFACE) {
            float lim = head->variant == ADA_VARIANT_REPORT ? 0.9999f : 1.0f - head->eps;
            c = clampf(c, -lim, lim, &inside);
        }
        logits[i] = head->s * c;
    }
    if (rule == ADA_RULE_REPORT)   /* ArcFace report: the margin on the true class */
        for (int n = 0; n < N; n++) logits[(size_t)n * C + labels[n]] -= head->s * head->m;
    return ADA_OK;
}
