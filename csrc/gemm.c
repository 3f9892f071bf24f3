/* gemm.c: the one GEMM entry point (cblas semantics, OpenBLAS underneath),
 * its thread split, and a naive reference for tests. */
#include "adaloss.h"

#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>

/* OpenBLAS is called through its cblas symbol. The scipy-openblas32 wheel
 * prefixes every symbol with "scipy_"; a system OpenBLAS does not. The enum
 * arguments are passed as their int values (CblasRowMajor 101, CblasNoTrans
 * 111, CblasTrans 112), which is what the ABI carries. */
#ifdef ADA_BLAS_PREFIX_SCIPY
#define ADA_CBLAS_SGEMM scipy_cblas_sgemm
#define ADA_BLAS_SET_THREADS scipy_openblas_set_num_threads
#else
#define ADA_CBLAS_SGEMM cblas_sgemm
#define ADA_BLAS_SET_THREADS openblas_set_num_threads
#endif
void ADA_CBLAS_SGEMM(int order, int trans_a, int trans_b, int M, int N, int K,
                     float alpha, const float *A, int lda, const float *B, int ldb,
                     float beta, float *C, int ldc);
void ADA_BLAS_SET_THREADS(int num_threads);

/* The thread count every call reads once, at its start (ada_get_num_threads),
 * and passes down to each of its kernels: another thread may change it at any
 * moment without affecting a call under way. 0: not set yet. */
static atomic_int ada_threads = 0;
/* set in a child forked after we ran threads: OpenMP's thread pool (libgomp)
 * does not survive fork, and a parallel region of more than one thread would
 * wait forever for the parent's workers; one thread never touches the pool */
static atomic_int fork_limited = 0;
static atomic_int ran_threads = 0;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void after_fork_in_child(void)
{
    if (atomic_load(&ran_threads)) {
        atomic_store(&fork_limited, 1);
        atomic_store(&ada_threads, 1);
    }
}

static void init_once(void)
{
    /* We split work over OpenMP threads ourselves; OpenBLAS's own pthreads
     * would oversubscribe the cores and make results depend on its split. */
    ADA_BLAS_SET_THREADS(1);
    pthread_atfork(NULL, NULL, after_fork_in_child);
}

ada_status ada_set_num_threads(int num_threads, ada_error *err)
{
    pthread_once(&once, init_once);
    if (num_threads < 1 || num_threads > ADA_MAX_THREADS)
        return ada_fail(err, ADA_EINVAL, "num_threads: expected 1..%d, got %d",
                        ADA_MAX_THREADS, num_threads);
    if (num_threads > 1 && atomic_load(&fork_limited))
        return ada_fail(err, ADA_ESTATE, "num_threads: this process was forked after adaloss "
                        "ran threads, and OpenMP's thread pool does not survive fork, so only 1 "
                        "thread works here, got %d (start workers with the 'spawn' or "
                        "'forkserver' method to use more)", num_threads);
    atomic_store(&ada_threads, num_threads);
    return ADA_OK;
}

int ada_get_num_threads(void)
{
    pthread_once(&once, init_once);
    int threads = atomic_load(&ada_threads);
    if (threads == 0) {   /* honours OMP_NUM_THREADS, within our limit */
        threads = omp_get_max_threads();
        threads = threads < 1 ? 1 : (threads > ADA_MAX_THREADS ? ADA_MAX_THREADS : threads);
        int unset = 0;
        if (!atomic_compare_exchange_strong(&ada_threads, &unset, threads)) threads = unset;
    }
    if (threads > 1) atomic_store(&ran_threads, 1);
    return threads;
}

void ada_sgemm_serial(int trans_a, int trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta,
                      float *C, int ldc)
{
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {   /* cblas leaves C * beta; do the same without calling it */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++)
                C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
        return;
    }
    pthread_once(&once, init_once);
    ADA_CBLAS_SGEMM(101, trans_a ? 112 : 111, trans_b ? 112 : 111, M, N, K, alpha,
                    A, lda, B, ldb, beta, C, ldc);
}

void ada_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta,
               float *C, int ldc, int num_threads)
{
    double flops = 2.0 * M * N * K;
    if (flops < 4.0e6) {
        ada_sgemm_serial(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    /* Two blocks of the larger output dimension (rounded to 16 so they stay
     * aligned with the BLAS kernels' panels), whatever the thread count: one
     * thread computes both in turn, two or more take one each. OpenBLAS's
     * value for an element depends on the shape of the call it is computed
     * in, so the calls, not just the sums, must not follow the thread count
     * for results to be the same on 1, 2 or 64 threads. Costs one thread a
     * second packing of the shared operand, a few per cent of a large GEMM. */
    int split_n = N >= M;
    int extent = split_n ? N : M;
    int block = (extent + ADA_GEMM_BLOCKS - 1) / ADA_GEMM_BLOCKS;
    block = (block + 15) / 16 * 16;
    int threads = omp_in_parallel() ? 1 : num_threads;
    if (threads > ADA_GEMM_BLOCKS) threads = ADA_GEMM_BLOCKS;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int t = 0; t < ADA_GEMM_BLOCKS; t++) {
        int start = t * block;
        int stop = start + block < extent ? start + block : extent;
        if (start >= stop) continue;
        if (split_n) {
            const float *B_part = trans_b ? B + (size_t)start * ldb : B + start;
            ada_sgemm_serial(trans_a, trans_b, M, stop - start, K, alpha, A, lda,
                             B_part, ldb, beta, C + start, ldc);
        } else {
            const float *A_part = trans_a ? A + start : A + (size_t)start * lda;
            ada_sgemm_serial(trans_a, trans_b, stop - start, N, K, alpha, A_part, lda,
                             B, ldb, beta, C + (size_t)start * ldc, ldc);
        }
    }
}

void ada_sgemm_reference(int trans_a, int trans_b, int M, int N, int K, float alpha,
                         const float *A, int lda, const float *B, int ldb, float beta,
                         float *C, int ldc)
{
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int p = 0; p < K; p++) {
                float a = trans_a ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                float b = trans_b ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                acc += (double)a * b;
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = (float)(alpha * acc) + (beta == 0.0f ? 0.0f : beta * *c);
        }
    }
}
