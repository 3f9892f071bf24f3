/* net.c: a sequential network that plans its memory once, and the one-call
 * training step.
 *
 * Parameters and their gradients live in two arenas with identical layouts
 * (each layer's weight then bias, 64-byte aligned). Activations, their
 * gradients, pooling indices and the convolution workspace live in one block
 * sized for `capacity` examples; it is reallocated only when a larger batch
 * (or more threads) arrives, never inside a step of a size already seen. */
#include "adaloss.h"

#include <stdlib.h>
#include <string.h>

#define ALIGN_FLOATS 16

static size_t round_up(size_t n) { return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS; }

ada_status ada_net_create(ada_net **out, const ada_layer_spec *specs, int num_layers,
                          int in_c, int in_h, int in_w, ada_error *err)
{
    *out = NULL;
    if (num_layers < 1 || num_layers > ADA_MAX_LAYERS)
        return ada_fail(err, ADA_EINVAL, "layers: expected 1 to %d layers, got %d",
                        ADA_MAX_LAYERS, num_layers);
    int flat = in_h == 0 && in_w == 0;
    if (flat) { in_h = 1; in_w = 1; }
    if (in_c < 1 || in_h < 1 || in_w < 1)
        return ada_fail(err, ADA_EINVAL, "input_shape: expected (C, H, W) or (D,) of positive "
                        "sizes, got (%d, %d, %d)", in_c, in_h, in_w);
    /* every layer checked and sized before anything is allocated */
    int c = in_c, h = in_h, w = in_w;
    for (int i = 0; i < num_layers; i++) {
        const ada_layer_spec *sp = &specs[i];
        switch (sp->kind) {
        case ADA_LAYER_CONV2D: {
            int k = sp->conv2d.kernel_size, pad = sp->conv2d.padding;
            if (flat)
                return ada_fail(err, ADA_EINVAL, "layer %d (Conv2d) needs an image input (C, H, "
                                "W), got a flat vector", i);
            if (sp->conv2d.in_channels != c)
                return ada_fail(err, ADA_EINVAL, "layer %d (Conv2d) expects %d input channels, "
                                "but receives %d", i, sp->conv2d.in_channels, c);
            if (sp->conv2d.out_channels < 1 || sp->conv2d.out_channels > ADA_MAX_DIM ||
                k < 1 || k % 2 == 0 || k > 63 || pad < 0 || pad > 63)
                return ada_fail(err, ADA_EINVAL, "layer %d (Conv2d): out_channels in 1..%d, an odd "
                                "kernel_size in 1..63 and padding in 0..63 expected, got %d, %d, %d",
                                i, ADA_MAX_DIM, sp->conv2d.out_channels, k, pad);
            if (h + 2 * pad - k + 1 < 1 || w + 2 * pad - k + 1 < 1)
                return ada_fail(err, ADA_EINVAL, "layer %d (Conv2d): kernel %d with padding %d "
                                "does not fit a %dx%d input", i, k, pad, h, w);
            c = sp->conv2d.out_channels;
            h += 2 * pad - k + 1;
            w += 2 * pad - k + 1;
            break;
        }
        case ADA_LAYER_LINEAR:
            if (!flat)
                return ada_fail(err, ADA_EINVAL, "layer %d (Linear) needs a flat input; put "
                                "Flatten() before it (input is %dx%dx%d)", i, c, h, w);
            if (sp->linear.in_features != c)
                return ada_fail(err, ADA_EINVAL, "layer %d (Linear) expects in_features=%d, but "
                                "receives %d", i, sp->linear.in_features, c);
            if (sp->linear.out_features < 1 || sp->linear.out_features > ADA_MAX_DIM)
                return ada_fail(err, ADA_EINVAL, "layer %d (Linear): out_features in 1..%d "
                                "expected, got %d", i, ADA_MAX_DIM, sp->linear.out_features);
            c = sp->linear.out_features;
            break;
        case ADA_LAYER_MAXPOOL2D:
            if (flat || h < 2 || w < 2)
                return ada_fail(err, ADA_EINVAL, "layer %d (MaxPool2d) needs an image input of "
                                "at least 2x2", i);
            h /= 2; w /= 2;
            break;
        case ADA_LAYER_FLATTEN:
            c = c * h * w; h = 1; w = 1;
            flat = 1;
            break;
        case ADA_LAYER_L2NORM:
            if (!flat)
                return ada_fail(err, ADA_EINVAL, "layer %d (L2Normalize) needs a flat input; put "
                                "Flatten() before it", i);
            break;
        case ADA_LAYER_RELU:
            break;
        default:
            return ada_fail(err, ADA_EINVAL, "layers[%d].kind: expected %d..%d, got %d", i,
                            ADA_LAYER_CONV2D, ADA_LAYER_L2NORM, sp->kind);
        }
    }

    ada_net *net = calloc(1, sizeof(*net));
    if (!net || !(net->layers = calloc((size_t)num_layers, sizeof(ada_layer)))) {
        free(net);
        return ada_fail(err, ADA_ENOMEM, "out of memory for a network of %d layers", num_layers);
    }
    net->num_layers = num_layers;
    net->in_c = in_c; net->in_h = in_h; net->in_w = in_w;
    net->in_size = (size_t)in_c * in_h * in_w;
    c = in_c; h = in_h; w = in_w;
    size_t params = 0;
    for (int i = 0; i < num_layers; i++) {
        ada_layer *L = &net->layers[i];
        const ada_layer_spec *sp = &specs[i];
        L->kind = sp->kind;
        L->in_c = c; L->in_h = h; L->in_w = w;
        L->out_c = c; L->out_h = h; L->out_w = w;
        switch (sp->kind) {
        case ADA_LAYER_CONV2D:
            L->k = sp->conv2d.kernel_size; L->pad = sp->conv2d.padding;
            L->out_c = sp->conv2d.out_channels;
            L->out_h = h + 2 * L->pad - L->k + 1;
            L->out_w = w + 2 * L->pad - L->k + 1;
            L->weight_size = (size_t)L->out_c * c * L->k * L->k;
            L->bias_size = (size_t)L->out_c;
            break;
        case ADA_LAYER_LINEAR:
            L->out_c = sp->linear.out_features;
            L->weight_size = (size_t)L->out_c * c;
            L->bias_size = (size_t)L->out_c;
            break;
        case ADA_LAYER_MAXPOOL2D:
            L->out_h = h / 2; L->out_w = w / 2;
            break;
        case ADA_LAYER_FLATTEN:
            L->out_c = c * h * w; L->out_h = 1; L->out_w = 1;
            break;
        }
        c = L->out_c; h = L->out_h; w = L->out_w;
        L->out_size = (size_t)c * h * w;
        if (L->weight_size) {
            L->weight_offset = params;
            params += round_up(L->weight_size);
            L->bias_offset = params;
            params += round_up(L->bias_size);
        }
    }
    for (int i = 0; i + 1 < num_layers; i++) {
        ada_layer *L = &net->layers[i];
        if (net->layers[i + 1].kind == ADA_LAYER_RELU &&
            (L->kind == ADA_LAYER_CONV2D || L->kind == ADA_LAYER_LINEAR))
            L->fused_relu = 1;
    }
    net->out_size = net->layers[num_layers - 1].out_size;
    net->num_params = params;
    net->params = aligned_alloc(64, sizeof(float) * round_up(params + 1));
    net->grads = aligned_alloc(64, sizeof(float) * round_up(params + 1));
    if (!net->params || !net->grads) {
        ada_net_free(net);
        return ada_fail(err, ADA_ENOMEM, "out of memory for %zu parameters", params);
    }
    memset(net->params, 0, sizeof(float) * round_up(params + 1));
    memset(net->grads, 0, sizeof(float) * round_up(params + 1));
    *out = net;
    return ADA_OK;
}

void ada_net_free(ada_net *net)
{
    if (!net) return;
    free(net->layers);
    free(net->params);
    free(net->grads);
    free(net->act_arena);
    free(net);
}

/* a layer's output is another's buffer when it computes nothing of its own */
static int aliases_input(const ada_net *net, int i)
{
    const ada_layer *L = &net->layers[i];
    if (L->kind == ADA_LAYER_FLATTEN) return 1;
    return L->kind == ADA_LAYER_RELU && i > 0 && net->layers[i - 1].fused_relu;
}

ada_status ada_net_reserve(ada_net *net, int N, int threads, ada_error *err)
{
    if (N < 1 || N > ADA_MAX_BATCH)
        return ada_fail(err, ADA_EINVAL, "N: expected a batch of 1..%d examples, got %d",
                        ADA_MAX_BATCH, N);
    if (threads < 1 || threads > ADA_MAX_THREADS)
        return ada_fail(err, ADA_EINVAL, "num_threads: expected 1..%d, got %d", ADA_MAX_THREADS,
                        threads);
    if (N <= net->capacity && threads <= net->threads_planned) return ADA_OK;
    if (N < net->capacity) N = net->capacity;
    size_t ws = 0, floats = round_up((size_t)N * net->in_size), bytes_u8 = 0;
    for (int i = 0; i < net->num_layers; i++) {
        ada_layer *L = &net->layers[i];
        if (!aliases_input(net, i)) floats += 2 * round_up((size_t)N * L->out_size);
        if (L->kind == ADA_LAYER_L2NORM) floats += round_up((size_t)N);
        if (L->kind == ADA_LAYER_MAXPOOL2D) bytes_u8 += round_up((size_t)N * L->out_size);
        if (L->kind == ADA_LAYER_CONV2D) {
            size_t need = ada_conv2d_workspace_floats(N, L->in_c, L->in_h, L->in_w,
                                                      L->out_c, L->k, L->pad, threads);
            if (need > ws) ws = need;
        }
    }
    floats += round_up(ws);
    void *arena = aligned_alloc(64, (sizeof(float) * floats + bytes_u8 + 127) / 64 * 64);
    if (!arena)
        return ada_fail(err, ADA_ENOMEM, "out of memory planning activations for a batch of %d",
                        N);
    free(net->act_arena);
    net->act_arena = arena;
    float *p = arena;
    net->input = p; p += round_up((size_t)N * net->in_size);
    net->workspace = p; p += round_up(ws);
    for (int i = 0; i < net->num_layers; i++) {
        ada_layer *L = &net->layers[i];
        if (aliases_input(net, i)) {
            L->out = i > 0 ? net->layers[i - 1].out : net->input;
            L->dout = i > 0 ? net->layers[i - 1].dout : NULL;
            continue;
        }
        L->out = p; p += round_up((size_t)N * L->out_size);
        L->dout = p; p += round_up((size_t)N * L->out_size);
        if (L->kind == ADA_LAYER_L2NORM) { L->norms = p; p += round_up((size_t)N); }
    }
    uint8_t *q = (uint8_t *)p;
    for (int i = 0; i < net->num_layers; i++) {
        ada_layer *L = &net->layers[i];
        if (L->kind == ADA_LAYER_MAXPOOL2D) { L->argmax = q; q += round_up((size_t)N * L->out_size); }
    }
    net->capacity = N;
    net->threads_planned = threads;
    return ADA_OK;
}

void ada_net_zero_grad(ada_net *net)
{
    memset(net->grads, 0, sizeof(float) * net->num_params);
}

/* the batch size and the input, as forward and the training step need */
static ada_status check_input(const ada_net *net, const float *x_float, const uint8_t *x_u8,
                              int N, int min_n, int threads, ada_error *err)
{
    if (threads < 1 || threads > ADA_MAX_THREADS)
        return ada_fail(err, ADA_EINVAL, "num_threads: expected 1..%d, got %d", ADA_MAX_THREADS,
                        threads);
    if (N < min_n || N > ADA_MAX_BATCH)
        return ada_fail(err, ADA_EINVAL, "x: expected a batch of %d..%d examples, got %d",
                        min_n, ADA_MAX_BATCH, N);
    if (N == 0) return ADA_OK;
    if (!x_float == !x_u8)
        return ada_fail(err, ADA_EINVAL, "x: expected exactly one of x_float and x_u8");
    if (x_float && !ada_all_finite(x_float, (size_t)N * net->in_size, threads))
        return ada_fail(err, ADA_EINVAL, "x contains NaN or inf");
    return ADA_OK;
}

ada_status ada_net_forward(ada_net *net, const float **output, const float *x_float,
                           const uint8_t *x_u8, int N, int threads, ada_error *err)
{
    ada_status st = check_input(net, x_float, x_u8, N, 0, threads, err);
    if (st != ADA_OK) return st;
    if (N == 0) {   /* nothing to compute, but backward must now expect 0 rows */
        net->batch = 0;
        *output = NULL;
        return ADA_OK;
    }
    st = ada_net_reserve(net, N, threads, err);
    if (st != ADA_OK) return st;
    net->batch = N;
    size_t n_in = (size_t)N * net->in_size;
    if (x_u8) ada_u8_to_float(net->input, x_u8, n_in, threads);
    else memcpy(net->input, x_float, sizeof(float) * n_in);
    const float *x = net->input;
    for (int i = 0; i < net->num_layers; i++) {
        ada_layer *L = &net->layers[i];
        const float *weight = net->params + L->weight_offset;
        const float *bias = net->params + L->bias_offset;
        switch (L->kind) {
        case ADA_LAYER_CONV2D:
            ada_conv2d_forward(L->out, net->workspace, x, weight, bias, N, L->in_c, L->in_h,
                               L->in_w, L->out_c, L->k, L->pad, L->fused_relu, threads);
            break;
        case ADA_LAYER_LINEAR:
            ada_linear_forward(L->out, x, weight, bias, N, L->in_c, L->out_c, L->fused_relu,
                               threads);
            break;
        case ADA_LAYER_RELU:
            if (!aliases_input(net, i))
                ada_relu_forward(L->out, x, (size_t)N * L->out_size, threads);
            break;
        case ADA_LAYER_MAXPOOL2D:
            ada_maxpool2d_forward(L->out, L->argmax, x, N, L->in_c, L->in_h, L->in_w, threads);
            break;
        case ADA_LAYER_L2NORM:
            ada_l2norm_forward(L->out, L->norms, x, N, L->in_c);
            break;
        case ADA_LAYER_FLATTEN:
            break;
        }
        x = L->out;
    }
    *output = x;
    return ADA_OK;
}

/* backward from the last layer's dout buffer, which the caller filled */
static void backward_from_last(ada_net *net, float *dinp, int N, int threads)
{
    for (int i = net->num_layers - 1; i >= 0; i--) {
        ada_layer *L = &net->layers[i];
        const float *x = i > 0 ? net->layers[i - 1].out : net->input;
        /* a leading Flatten has no buffers of its own: its input gradient is dinp */
        float *dx = i > 0 && net->layers[i - 1].dout ? net->layers[i - 1].dout : dinp;
        float *dweight = net->grads + L->weight_offset;
        float *dbias = net->grads + L->bias_offset;
        const float *weight = net->params + L->weight_offset;
        switch (L->kind) {
        case ADA_LAYER_CONV2D:
            ada_conv2d_backward(dx, dweight, dbias, net->workspace, L->dout,
                                L->fused_relu ? L->out : NULL, x, weight, N, L->in_c,
                                L->in_h, L->in_w, L->out_c, L->k, L->pad, threads);
            break;
        case ADA_LAYER_LINEAR:
            ada_linear_backward(dx, dweight, dbias, L->dout, L->fused_relu ? L->out : NULL,
                                x, weight, N, L->in_c, L->out_c, threads);
            break;
        case ADA_LAYER_RELU:
            if (aliases_input(net, i)) {
                /* fused into layer i - 1; at i == 0 impossible */
            } else if (dx) {
                ada_relu_backward(dx, L->dout, L->out, (size_t)N * L->out_size, threads);
            }
            break;
        case ADA_LAYER_MAXPOOL2D:
            if (dx)
                ada_maxpool2d_backward(dx, L->dout, L->argmax, N, L->in_c, L->in_h, L->in_w,
                                       threads);
            break;
        case ADA_LAYER_L2NORM:
            if (dx) ada_l2norm_backward(dx, L->dout, L->out, L->norms, N, L->in_c);
            break;
        case ADA_LAYER_FLATTEN:
            /* nothing to do: a Flatten shares its buffers with its neighbours */
            break;
        }
    }
}

ada_status ada_net_backward(ada_net *net, float *dinp, const float *dout, int N,
                            int threads, ada_error *err)
{
    if (threads < 1 || threads > ADA_MAX_THREADS)
        return ada_fail(err, ADA_EINVAL, "num_threads: expected 1..%d, got %d", ADA_MAX_THREADS,
                        threads);
    if (net->capacity == 0)
        return ada_fail(err, ADA_EINVAL, "d_emb: backward needs a forward first (no forward yet)");
    if (N != net->batch)
        return ada_fail(err, ADA_EINVAL, "d_emb: expected %d rows (the batch of the last "
                        "forward), got %d", net->batch, N);
    if (N == 0) return ADA_OK;
    /* the workspace was planned, at the forward, for threads_planned threads;
     * the count may have been raised since (set_num_threads between forward
     * and backward). Fewer threads give the same results, so use those. */
    if (threads > net->threads_planned) threads = net->threads_planned;
    if (!ada_all_finite(dout, (size_t)N * net->out_size, threads))
        return ada_fail(err, ADA_EINVAL, "d_emb contains NaN or inf");
    ada_layer *last = &net->layers[net->num_layers - 1];
    if (!last->dout) {
        /* a network that is a lone Flatten: the gradient passes through */
        if (dinp) memcpy(dinp, dout, sizeof(float) * (size_t)N * net->out_size);
        return ADA_OK;
    }
    memcpy(last->dout, dout, sizeof(float) * (size_t)N * net->out_size);
    backward_from_last(net, dinp, N, threads);
    return ADA_OK;
}

ada_status ada_train_step(ada_net *net, ada_head *head, ada_adam *adam, float *loss,
                          const float *x_float, const uint8_t *x_u8,
                          const int64_t *labels, int N, int head_weight_trained,
                          int threads, ada_error *err)
{
    /* everything is checked before the forward changes any state */
    if ((size_t)head->embedding_dim != net->out_size)
        return ada_fail(err, ADA_EINVAL, "head: embedding_dim %d differs from the network's "
                        "output size %zu", head->embedding_dim, net->out_size);
    /* a chain of Flattens has no buffers of its own to take the head's gradient */
    int only_flatten = 1;
    for (int i = 0; i < net->num_layers; i++)
        only_flatten &= net->layers[i].kind == ADA_LAYER_FLATTEN;
    if (only_flatten)
        return ada_fail(err, ADA_EINVAL, "net: a network of Flatten layers alone cannot be "
                        "trained; add a layer after it");
    ada_status st = check_input(net, x_float, x_u8, N, 1, threads, err);
    if (st == ADA_OK) st = ada_head_check_labels(head, labels, N, err);
    if (st == ADA_OK) st = ada_head_reserve(head, N, err);
    if (st != ADA_OK) return st;

    const float *emb;
    st = ada_net_forward(net, &emb, x_float, x_u8, N, threads, err);
    if (st != ADA_OK) return st;
    float saved_mean = head->running_mean, saved_std = head->running_std;
    st = ada_head_forward(head, loss, emb, labels, N, 1, threads, err);
    if (st != ADA_OK) return st;
    ada_net_zero_grad(net);
    if (head_weight_trained) ada_head_zero_grad(head);
    st = ada_head_backward(head, net->layers[net->num_layers - 1].dout, head_weight_trained,
                           threads, err);
    if (st != ADA_OK) return st;
    backward_from_last(net, NULL, N, threads);
    if (!(*loss == *loss) || *loss > 3.0e38f || *loss < -3.0e38f || !ada_adam_grads_finite(adam, threads)) {
        head->running_mean = saved_mean;
        head->running_std = saved_std;
        return ada_fail(err, ADA_ENONFINITE, "non-finite loss or gradient (loss %g); the step "
                        "was not applied", (double)*loss);
    }
    ada_adam_step(adam, threads);
    return ADA_OK;
}
