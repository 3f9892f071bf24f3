/* linear.c: fully connected layer, y = x W^T + b (PyTorch's nn.Linear). */
#include "adaloss.h"

/* inp (N, I), weight (O, I), bias (O) -> out (N, O); ReLU after when `relu`. */
void ada_linear_forward(float *out, const float *inp, const float *weight,
                        const float *bias, int N, int in_features, int out_features,
                        int relu, int num_threads)
{
    ada_sgemm(0, 1, N, out_features, in_features, 1.0f, inp, in_features,
              weight, in_features, 0.0f, out, out_features, num_threads);
    #pragma omp parallel for schedule(static) if ((long)N * out_features > 65536) \
        num_threads(num_threads)
    for (int n = 0; n < N; n++) {
        float *y = out + (size_t)n * out_features;
        for (int o = 0; o < out_features; o++) {
            float v = y[o] + bias[o];
            y[o] = relu && !(v > 0.0f) ? 0.0f : v;
        }
    }
}

/* Chain rule for y = x W^T + b: dW += dy^T x, db += sum_n dy, dx = dy W.
 * With a fused ReLU, dy is first masked by out > 0. dinp may be NULL. */
void ada_linear_backward(float *dinp, float *dweight, float *dbias,
                         float *dout, const float *out, const float *inp,
                         const float *weight,
                         int N, int in_features, int out_features, int num_threads)
{
    if (out) ada_relu_mask(dout, dout, out, (size_t)N * out_features);
    for (int n = 0; n < N; n++) {
        const float *dy = dout + (size_t)n * out_features;
        for (int o = 0; o < out_features; o++) dbias[o] += dy[o];
    }
    ada_sgemm(1, 0, out_features, in_features, N, 1.0f, dout, out_features,
              inp, in_features, 1.0f, dweight, in_features, num_threads);
    if (dinp)
        ada_sgemm(0, 0, N, in_features, out_features, 1.0f, dout, out_features,
                  weight, in_features, 0.0f, dinp, in_features, num_threads);
}
