/* adaloss.h: the one public header of the adaloss C core.
 *
 * Conventions (docs/design.md, "The C contract"):
 *   - every symbol starts with ada_; nothing here prints, exits or includes Python;
 *   - arrays are float32, C-contiguous, NCHW; weight layouts follow PyTorch
 *     (Conv2d weight (out, in, k, k), Linear weight (out, in));
 *   - kernel arguments: outputs first, then caches, then inputs, then
 *     weights, then sizes;
 *   - forward kernels overwrite their outputs; backward kernels OVERWRITE the
 *     input gradient (dinp) and ACCUMULATE (+=) into parameter gradients.
 *     Whoever owns the parameter gradients zeroes them: the network's
 *     ada_net_zero_grad, the head's ada_head_zero_grad, ada_adam_zero_grad,
 *     or the training step, which zeroes everything it accumulates into.
 *
 * Error contract:
 *   - every entry point that can fail returns an ada_status and takes, as its
 *     last argument, an ada_error the CALLER owns (it may be NULL: the
 *     message is then dropped). On failure err->msg names the argument and
 *     what was expected (the range, or the order of calls) and what it got;
 *     on success err is left untouched. Constructors return the new object
 *     through their first argument and set it to NULL on failure; no
 *     function returns a bare NULL for an error.
 *   - every argument is validated before any state changes: a call that
 *     fails with ADA_EINVAL or ADA_ESTATE leaves the objects exactly as they
 *     were (weights, Adam moments and step, AdaFace running statistics).
 *     ADA_ENONFINITE from ada_train_step also leaves them unchanged (the
 *     gradients it zeroed and recomputed are scratch). ADA_ENOMEM leaves the
 *     object usable with its previous capacity.
 *   - range checks (batch sizes, label values, hyper-parameters, thread
 *     counts, layer sizes) live here, once; the Python wrapper checks only
 *     types, dtypes, shapes and contiguity and passes err->msg on as the
 *     exception message.
 *   - kernels (ada_<op>_forward / _backward, ada_sgemm*) cannot fail: their
 *     callers have validated the sizes.
 */
#ifndef ADALOSS_H
#define ADALOSS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    ADA_OK = 0,
    ADA_ENOMEM = 1,       /* an allocation failed */
    ADA_EINVAL = 2,       /* an argument is out of range */
    ADA_ENONFINITE = 3,   /* a loss or gradient was NaN or inf; nothing was updated */
    ADA_ESTATE = 4        /* called in the wrong order (e.g. backward before forward) */
} ada_status;

#define ADA_ERRLEN 256
/* the caller-owned error message of a failed call */
typedef struct { char msg[ADA_ERRLEN]; } ada_error;

/* err->msg = the printf-formatted message (when err is not NULL); returns
 * status, so a check reads `return ada_fail(err, ADA_EINVAL, "...", ...)` */
ada_status ada_fail(ada_error *err, ada_status status, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* limits the range checks enforce */
#define ADA_MAX_BATCH (1 << 24)      /* examples per call */
#define ADA_MAX_DIM (1 << 24)        /* num_classes, embedding_dim */
#define ADA_MAX_HEAD_WEIGHTS (1 << 28) /* num_classes * embedding_dim */
#define ADA_MAX_LAYERS 10000

/* ---------------------------------------------------------------- threads */
/* Our threads call OpenBLAS at the same time; the scipy-openblas32 build
 * keeps per-thread buffers for MAX_THREADS=64 of them. */
#define ADA_MAX_THREADS 64
/* OpenMP threads for our loops, 1..ADA_MAX_THREADS. Every entry point reads
 * the count once (ada_get_num_threads) and passes it to each kernel it runs
 * (their num_threads argument), so changing it from another thread never
 * affects a call under way. In a child forked after threads ran, OpenMP's
 * pool is gone: the count drops to 1 there and more is ADA_ESTATE. */
ada_status ada_set_num_threads(int num_threads, ada_error *err);
int ada_get_num_threads(void);

/* ------------------------------------------------------------------ gemm */
/* Row-major C = alpha * op(A) @ op(B) + beta * C, op(A) (M, K), op(B) (K, N),
 * cblas semantics. ada_sgemm cuts the larger of M and N into ADA_GEMM_BLOCKS
 * blocks (from 4 MFLOP up) and runs them on up to that many of num_threads
 * threads; the BLAS calls are the same whatever the thread count, so results
 * are too (OpenBLAS's rounding of an element depends on the shape of the call
 * it is computed in). Each C element is computed by one call with the full K
 * sum; inside a parallel region the blocks run in turn. ada_sgemm_serial is
 * one BLAS call; ada_sgemm_reference the naive triple loop, for tests. */
#define ADA_GEMM_BLOCKS 2
void ada_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta,
               float *C, int ldc, int num_threads);
void ada_sgemm_serial(int trans_a, int trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta,
                      float *C, int ldc);
void ada_sgemm_reference(int trans_a, int trans_b, int M, int N, int K, float alpha,
                         const float *A, int lda, const float *B, int ldb, float beta,
                         float *C, int ldc);

/* ---------------------------------------------------------------- conv2d */
/* 2-D convolution, stride 1, zero padding `pad`, square odd kernel k.
 * inp (N, C, H, W), weight (OC, C, k, k), bias (OC), out (N, OC, OH, OW)
 * with OH = H + 2 pad - k + 1. `workspace` holds ada_conv2d_workspace_floats
 * floats for a batch of at least N and the same num_threads. Results do not
 * depend on num_threads. */
size_t ada_conv2d_workspace_floats(int N, int C, int H, int W, int OC, int k, int pad,
                                   int num_threads);
void ada_conv2d_forward(float *out, float *workspace, const float *inp,
                        const float *weight, const float *bias,
                        int N, int C, int H, int W, int OC, int k, int pad,
                        int relu, int num_threads);
/* dinp may be NULL (first layer). If the forward fused a ReLU, pass its
 * output as `out` and the gradient is masked by out > 0; else out = NULL. */
void ada_conv2d_backward(float *dinp, float *dweight, float *dbias, float *workspace,
                         float *dout, const float *out, const float *inp,
                         const float *weight,
                         int N, int C, int H, int W, int OC, int k, int pad,
                         int num_threads);

/* ------------------------------------------------------------------ pool */
/* 2x2 max pooling, stride 2, floor mode. inp (N, C, H, W), out (N, C, H/2, W/2).
 * argmax (same size as out) records which of the 4 window positions won; the
 * first maximum in row-major order wins ties, as in PyTorch. */
void ada_maxpool2d_forward(float *out, uint8_t *argmax, const float *inp,
                           int N, int C, int H, int W, int num_threads);
void ada_maxpool2d_backward(float *dinp, const float *dout, const uint8_t *argmax,
                            int N, int C, int H, int W, int num_threads);

/* ---------------------------------------------------------------- linear */
/* inp (N, I), weight (O, I), bias (O), out (N, O) = inp @ weight^T + bias. */
void ada_linear_forward(float *out, const float *inp, const float *weight,
                        const float *bias, int N, int in_features, int out_features,
                        int relu, int num_threads);
void ada_linear_backward(float *dinp, float *dweight, float *dbias,
                         float *dout, const float *out, const float *inp,
                         const float *weight,
                         int N, int in_features, int out_features, int num_threads);

/* ----------------------------------------------------------- activations */
void ada_relu_forward(float *out, const float *inp, size_t n, int num_threads);
void ada_relu_backward(float *dinp, const float *dout, const float *out, size_t n,
                       int num_threads);
/* d relu(x)/dx = [x > 0], read from the ReLU's output (PyTorch's
 * threshold_backward): dst[i] = src[i] where relu_out[i] > 0, else 0. dst may
 * be src (in place), never relu_out. src is loaded unconditionally so the loop
 * vectorises. Shared by the ReLU layer and the fused ReLU of conv and linear. */
static inline void ada_relu_mask(float *dst, const float *src, const float *restrict relu_out,
                                 size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float s = src[i];
        dst[i] = relu_out[i] > 0.0f ? s : 0.0f;
    }
}
/* Row-wise x / max(||x||, 1e-12), as torch.nn.functional.normalize.
 * inp (N, D), out (N, D), norms (N) caches ||x||. */
void ada_l2norm_forward(float *out, float *norms, const float *inp, int N, int D);
void ada_l2norm_backward(float *dinp, const float *dout, const float *out,
                         const float *norms, int N, int D);
/* uint8 images to float32: (x / 255 - 0.5) / 0.5 */
void ada_u8_to_float(float *out, const uint8_t *inp, size_t n, int num_threads);
/* 1 when every element is finite */
int ada_all_finite(const float *x, size_t n, int num_threads);

/* ----------------------------------------------------------------- heads */
typedef enum { ADA_HEAD_SOFTMAX = 0, ADA_HEAD_COSFACE = 1,
               ADA_HEAD_ARCFACE = 2, ADA_HEAD_ADAFACE = 3,
               ADA_HEAD_COMBINED = 4 } ada_head_kind;
typedef enum { ADA_VARIANT_PAPER = 0, ADA_VARIANT_REPORT = 1 } ada_head_variant;
typedef enum { ADA_RULE_PLAIN = 0, ADA_RULE_REPORT = 1 } ada_eval_rule;
/* The paper ArcFace's target logit s f(c), c = cos theta, theta in [0, pi]:
 *   FALLBACK          cos(theta + m) where c > cos(pi - m), else c - m sin m
 *                     (insightface's original code; the default)
 *   EASY              cos(theta + m) where c > 0, else c (insightface easy_margin)
 *   CLIP              cos(clip(theta + m, eps, pi - eps)), eps = the head's eps
 *                     (1e-3, as the AdaFace paper head); zero gradient where it clips
 *   STRAIGHT_THROUGH  value cos(theta + m), gradient that of c (d f / d c = 1: the
 *                     margin is added without gradient, as insightface's arcface_torch)
 * The combined-margin head (ADA_HEAD_COMBINED) has no rule: its target is
 * cos(m1 theta + m2) - m3, continued past m1 theta + m2 = pi as SphereFace's
 * psi (see heads.c). */
typedef enum { ADA_MARGIN_FALLBACK = 0, ADA_MARGIN_EASY = 1, ADA_MARGIN_CLIP = 2,
               ADA_MARGIN_STRAIGHT_THROUGH = 3 } ada_margin_rule;

typedef struct ada_head {
    int kind, variant;
    int num_classes, embedding_dim;
    float s, m, h, t_alpha, eps;
    int margin_rule;                      /* ada_margin_rule, paper ArcFace only */
    float m1, m2, m3;                     /* combined-margin head only */
    int normalize_embedding, normalize_weight;
    float *weight, *weight_grad;          /* (C, D) each, in one arena */
    float running_mean, running_std;      /* AdaFace paper only */
    /* caches sized for `capacity` examples, valid after a forward */
    int capacity, cached_n, has_forward;
    float *emb_unit;    /* (cap, D) normalised (or raw) embedding used in the GEMM */
    float *emb_norm;    /* (cap) ||e|| */
    float *weight_unit; /* (C, D) normalised (or raw) weight used in the GEMM */
    float *weight_norm; /* (C) */
    float *weight_scratch; /* (C, D) backward's d w_unit */
    float *cosine;      /* (cap, C) */
    float *dcosine;     /* (cap, C) d loss / d cosine, filled by forward */
    float *quality;     /* (cap) AdaFace q of the last forward */
    float *target_angle;/* (cap) theta_y of the last forward */
    double *example_loss; /* (cap) each example's loss; owns the caches' block */
} ada_head;

/* kind and variant as the enums above; 1 <= num_classes, embedding_dim <=
 * ADA_MAX_DIM with at most ADA_MAX_HEAD_WEIGHTS weights; finite s in (0, 1e4]
 * (ignored by softmax), m in [0, pi] (ignored by the combined head), h in
 * [0, 1e3], t_alpha in [0, 1]. The head starts with rule FALLBACK and
 * (m1, m2, m3) = (1, 0, 0); ada_head_set_margin changes them. */
ada_status ada_head_create(ada_head **head, int kind, int variant, int num_classes,
                           int embedding_dim, float s, float m, float h, float t_alpha,
                           ada_error *err);
void ada_head_free(ada_head *head);
/* caches for batches of up to N examples */
ada_status ada_head_reserve(ada_head *head, int N, ada_error *err);
void ada_head_zero_grad(ada_head *head);
/* the margin rule (ada_margin_rule; other than FALLBACK for the paper ArcFace
 * only) and the combined head's margins: finite m1 in (0, 10], m2 in [0, pi],
 * m3 in [0, pi]; other kinds take (1, 0, 0). Applies from the next forward. */
ada_status ada_head_set_margin(ada_head *head, int rule, float m1, float m2, float m3,
                               ada_error *err);
/* the margin m of CosFace, ArcFace and AdaFace (finite, in [0, pi], as at
 * creation; softmax and the combined head ignore it), for margin schedules
 * (warm-ups). Applies from the next forward; on error the head is unchanged. */
ada_status ada_head_set_m(ada_head *head, float m, ada_error *err);
/* AdaFace running statistics: finite mean, finite std >= 0 */
ada_status ada_head_set_running_stats(ada_head *head, float mean, float std, ada_error *err);
/* 0 when every label is in [0, num_classes), else ADA_EINVAL naming the first
 * bad one */
ada_status ada_head_check_labels(const ada_head *head, const int64_t *labels, int N,
                                 ada_error *err);
/* The head's computations take the caller's num_threads (1..ADA_MAX_THREADS,
 * read once per call with ada_get_num_threads).
 * Mean cross-entropy over the batch of N (1..ADA_MAX_BATCH) finite
 * embeddings; caches what backward needs. `training` updates the AdaFace
 * running statistics. */
ada_status ada_head_forward(ada_head *head, float *loss, const float *emb,
                            const int64_t *labels, int N, int training, int num_threads,
                            ada_error *err);
/* demb (N, D) overwritten, N of the last forward; weight_grad accumulated
 * when accumulate_weight. ADA_ESTATE without a forward since the last
 * ada_head_logits or resize. */
ada_status ada_head_backward(ada_head *head, float *demb, int accumulate_weight,
                             int num_threads, ada_error *err);
/* scores used for prediction (N, C), N in 0..ADA_MAX_BATCH. rule PLAIN:
 * margin-free; REPORT: the report's own evaluation (ArcFace report: margin
 * on labels[i], AdaFace report: e . W^T with raw W). labels may be NULL for
 * PLAIN. */
ada_status ada_head_logits(ada_head *head, float *logits, const float *emb,
                           const int64_t *labels, int N, int rule, int num_threads,
                           ada_error *err);

/* ------------------------------------------------------------------ adam */
typedef struct ada_adam {
    int num_segments;
    float **params, **grads;
    size_t *sizes, total;
    float *m, *v;                  /* arenas with the concatenated layout */
    int64_t step;
    float lr, beta1, beta2, eps, weight_decay;
} ada_adam;

/* Adam over num_segments >= 0 (param, grad) arrays of sizes[i] floats each:
 * finite lr in [0, 1e3], beta1 and beta2 in [0, 1), eps in [0, 1],
 * weight_decay in [0, 1e3]. */
ada_status ada_adam_create(ada_adam **adam, int num_segments, float *const *params,
                           float *const *grads, const size_t *sizes, float lr, float beta1,
                           float beta2, float eps, float weight_decay, ada_error *err);
void ada_adam_free(ada_adam *adam);
/* restore a step count (>= 0) and a learning rate (as in ada_adam_create) */
ada_status ada_adam_set(ada_adam *adam, int64_t step, float lr, ada_error *err);
void ada_adam_step(ada_adam *adam, int num_threads);
void ada_adam_zero_grad(ada_adam *adam);
int ada_adam_grads_finite(const ada_adam *adam, int num_threads);

/* ------------------------------------------------------------------- net */
typedef enum { ADA_LAYER_CONV2D = 0, ADA_LAYER_RELU = 1, ADA_LAYER_MAXPOOL2D = 2,
               ADA_LAYER_FLATTEN = 3, ADA_LAYER_LINEAR = 4,
               ADA_LAYER_L2NORM = 5 } ada_layer_kind;

/* what a layer is; only the member of its kind is read */
typedef struct {
    int kind;                       /* ada_layer_kind */
    union {
        struct { int in_channels, out_channels, kernel_size, padding; } conv2d;
        struct { int in_features, out_features; } linear;
    };
} ada_layer_spec;

typedef struct ada_layer {
    int kind;
    int in_c, in_h, in_w, out_c, out_h, out_w;   /* flattened: (size, 1, 1) */
    int k, pad;
    int fused_relu;          /* conv/linear computed the next ReLU itself */
    size_t out_size;         /* per example */
    size_t weight_offset, bias_offset, weight_size, bias_size; /* in the param arena */
    float *out, *dout;       /* (cap, out_size) activations and their gradients */
    float *norms;            /* L2Normalize: (cap) */
    uint8_t *argmax;         /* MaxPool2d: (cap, out_size) */
} ada_layer;

typedef struct ada_net {
    int num_layers;
    ada_layer *layers;
    int in_c, in_h, in_w;
    size_t in_size, out_size, num_params;
    float *params, *grads;    /* arenas with identical layouts */
    int capacity, threads_planned;
    int batch;                /* N of the last forward, 0 before one: backward's N */
    float *input;             /* (cap, in_size) float copy of the batch */
    float *workspace;         /* shared by conv layers */
    void *act_arena;          /* activations, gradients, caches: one block */
} ada_net;

/* num_layers in 1..ADA_MAX_LAYERS; input (in_c, in_h, in_w), all >= 1, or
 * (in_c, 0, 0) for a flat input of in_c features. Every ReLU directly after
 * a Conv2d or Linear is computed by that layer (fused_relu). */
ada_status ada_net_create(ada_net **net, const ada_layer_spec *specs, int num_layers,
                          int in_c, int in_h, int in_w, ada_error *err);
void ada_net_free(ada_net *net);
/* activations and conv workspace for batches of up to N examples computed
 * by num_threads threads */
ada_status ada_net_reserve(ada_net *net, int N, int num_threads, ada_error *err);
void ada_net_zero_grad(ada_net *net);
/* As the head's, the network's computations take the caller's num_threads
 * (1..ADA_MAX_THREADS, read once per call with ada_get_num_threads); the
 * workspace is planned for it inside the same call.
 * Forward of N (0..ADA_MAX_BATCH) examples: x_float (finite) or x_u8,
 * exactly one non-NULL (both may be NULL when N = 0); returns a pointer to
 * the (N, out_size) output inside the net. */
ada_status ada_net_forward(ada_net *net, const float **output, const float *x_float,
                           const uint8_t *x_u8, int N, int num_threads, ada_error *err);
/* backward of the last forward: dout (N, out_size) finite with N that
 * forward's batch, else ADA_EINVAL; dinp may be NULL. Runs on at most the
 * threads the forward planned its workspace for (same results). */
ada_status ada_net_backward(ada_net *net, float *dinp, const float *dout, int N,
                            int num_threads, ada_error *err);

/* The whole training step: input conversion, forward, head loss, backward,
 * Adam; zeroes the net and head gradients first. Every argument (sizes,
 * batch, labels, finiteness of x_float) is checked before anything changes.
 * If the loss or any gradient Adam would apply is not finite, returns
 * ADA_ENONFINITE and leaves weights, Adam state and the AdaFace running
 * statistics unchanged. */
ada_status ada_train_step(ada_net *net, ada_head *head, ada_adam *adam, float *loss,
                          const float *x_float, const uint8_t *x_u8,
                          const int64_t *labels, int N, int head_weight_trained,
                          int num_threads, ada_error *err);

#ifdef __cplusplus
}
#endif
#endif
