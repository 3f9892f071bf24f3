/* adam.c: Adam with torch.optim.Adam semantics (bias correction, L2 weight
 * decay added to the gradient), as one flat loop per parameter segment. The
 * moment arenas m and v have the concatenated layout of the segments. */
#include "adaloss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static ada_status check_lr(float lr, ada_error *err)
{
    if (!(isfinite(lr) && lr >= 0.0f && lr <= 1e3f))
        return ada_fail(err, ADA_EINVAL, "lr: expected a finite number in [0, 1000], got %g",
                        (double)lr);
    return ADA_OK;
}

ada_status ada_adam_create(ada_adam **out, int num_segments, float *const *params,
                           float *const *grads, const size_t *sizes, float lr, float beta1,
                           float beta2, float eps, float weight_decay, ada_error *err)
{
    *out = NULL;
    if (num_segments < 0)
        return ada_fail(err, ADA_EINVAL, "params: expected 0 or more segments, got %d",
                        num_segments);
    ada_status st = check_lr(lr, err);
    if (st != ADA_OK) return st;
    if (!(beta1 >= 0.0f && beta1 < 1.0f) || !(beta2 >= 0.0f && beta2 < 1.0f))
        return ada_fail(err, ADA_EINVAL, "betas: expected values in [0, 1), got (%g, %g)",
                        (double)beta1, (double)beta2);
    if (!(eps >= 0.0f && eps <= 1.0f))
        return ada_fail(err, ADA_EINVAL, "eps: expected a finite number in [0, 1], got %g",
                        (double)eps);
    if (!(weight_decay >= 0.0f && weight_decay <= 1e3f))
        return ada_fail(err, ADA_EINVAL, "weight_decay: expected a finite number in [0, 1000], "
                        "got %g", (double)weight_decay);
    ada_adam *adam = calloc(1, sizeof(*adam));
    if (!adam) return ada_fail(err, ADA_ENOMEM, "out of memory for the optimizer");
    adam->num_segments = num_segments;
    adam->params = calloc((size_t)num_segments + 1, sizeof(float *));
    adam->grads = calloc((size_t)num_segments + 1, sizeof(float *));
    adam->sizes = calloc((size_t)num_segments + 1, sizeof(size_t));
    if (!adam->params || !adam->grads || !adam->sizes) goto nomem;
    for (int i = 0; i < num_segments; i++) {
        adam->params[i] = params[i];
        adam->grads[i] = grads[i];
        adam->sizes[i] = sizes[i];
        adam->total += sizes[i];
    }
    adam->m = calloc(adam->total * 2 + 1, sizeof(float));
    if (!adam->m) goto nomem;
    adam->v = adam->m + adam->total;
    adam->lr = lr; adam->beta1 = beta1; adam->beta2 = beta2;
    adam->eps = eps; adam->weight_decay = weight_decay;
    *out = adam;
    return ADA_OK;
nomem:
    ada_adam_free(adam);
    return ada_fail(err, ADA_ENOMEM, "out of memory for the optimizer's moments");
}

ada_status ada_adam_set(ada_adam *adam, int64_t step, float lr, ada_error *err)
{
    if (step < 0)
        return ada_fail(err, ADA_EINVAL, "step: expected >= 0, got %lld", (long long)step);
    ada_status st = check_lr(lr, err);
    if (st != ADA_OK) return st;
    adam->step = step;
    adam->lr = lr;
    return ADA_OK;
}

void ada_adam_free(ada_adam *adam)
{
    if (!adam) return;
    free(adam->params); free(adam->grads); free(adam->sizes); free(adam->m);
    free(adam);
}

/* PyTorch's single-tensor Adam, operation for operation in float32:
 *   g = grad + wd p;  m = lerp(m, g, 1 - b1);  v = v b2 + (1 - b2) g g
 *   p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * The scalars are computed in double, as Python floats, then rounded. */
void ada_adam_step(ada_adam *adam, int num_threads)
{
    adam->step++;
    double bc1 = 1.0 - pow(adam->beta1, (double)adam->step);
    double bc2 = 1.0 - pow(adam->beta2, (double)adam->step);
    const float step_size = (float)(adam->lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    const float one_minus_b1 = (float)(1.0 - (double)adam->beta1);
    const float one_minus_b2 = (float)(1.0 - (double)adam->beta2);
    const float b2 = adam->beta2, eps = adam->eps, wd = adam->weight_decay;
    size_t offset = 0;
    for (int s = 0; s < adam->num_segments; s++) {
        float *p = adam->params[s];
        const float *grad = adam->grads[s];
        float *m = adam->m + offset, *v = adam->v + offset;
        size_t n = adam->sizes[s];
        #pragma omp parallel for schedule(static) if (n > 65536) num_threads(num_threads)
        for (size_t i = 0; i < n; i++) {
            float g = wd != 0.0f ? grad[i] + wd * p[i] : grad[i];
            m[i] = m[i] + one_minus_b1 * (g - m[i]);
            v[i] = v[i] * b2 + one_minus_b2 * g * g;
            float denom = sqrtf(v[i]) / bc2_sqrt + eps;
            p[i] = p[i] + (-step_size) * (m[i] / denom);
        }
        offset += n;
    }
}

void ada_adam_zero_grad(ada_adam *adam)
{
    for (int s = 0; s < adam->num_segments; s++)
        memset(adam->grads[s], 0, sizeof(float) * adam->sizes[s]);
}

int ada_adam_grads_finite(const ada_adam *adam, int num_threads)
{
    for (int s = 0; s < adam->num_segments; s++)
        if (!ada_all_finite(adam->grads[s], adam->sizes[s], num_threads)) return 0;
    return 1;
}
