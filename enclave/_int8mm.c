/* int8 weights x per-row-quantized activations, for the fast engine's linear layers (AVX2).
 *
 * out[m, n] = bias[n] + low[m] * rowsum[n] + span[m] * scale[n] * sum_k q[m, k] * w[n, k] / 127
 *
 * where each row x[m] of the input is mapped onto [0, 1] by its own minimum (low) and range
 * (span) and rounded to 7-bit codes q (0..127). Every output element is one exact integer sum
 * and the same few float operations whatever M is and however the rows are split between
 * threads, so a row's result never depends on the rows computed with it (batch invariance).
 *
 * 7-bit codes: AVX2 without VNNI multiplies u8 x s8 pairs and sums each pair in 16 bits
 * (vpmaddubsw); 127 * 127 * 2 fits, 255 * 127 * 2 would saturate.
 *
 * Threads: a pool of its own (pthreads), since torch's OpenMP pool is not reachable from C
 * without torch's headers. Workers spin briefly between calls (products follow each other within
 * microseconds during a decode step) and then sleep on a condition variable.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define SPIN_ROUNDS 20000 /* about 0.2-0.5 ms of pause instructions before sleeping */
#define ROW_ALIGN 16      /* threads split the output rows in multiples of this */
#ifndef PREFETCH_BYTES /* how far ahead of the rows being summed the weights are fetched */
#define PREFETCH_BYTES 8192 /* 4-8 KiB measured best here; 16 KiB and more lost (performance.md) */
#endif

typedef struct {
    const uint8_t *q;
    int64_t m, k, n;
    const int8_t *w;
    const float *scale, *rowsum, *bias, *low, *span;
    float *out;
    int parts;
} job_t;

static job_t job;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one product at a time */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static atomic_long generation;
static atomic_int finished;
static int sleepers; /* guarded by pool_lock */
static int workers;  /* started so far; only grows */
static long start_generation[MAX_THREADS]; /* what each worker has already seen at its start */

/* ---- the kernel -------------------------------------------------------------------------- */

__attribute__((target("avx2,fma"))) static inline __m128i hsum4(__m256i a, __m256i b, __m256i c,
                                                                 __m256i d) {
    __m256i ab = _mm256_hadd_epi32(a, b);
    __m256i cd = _mm256_hadd_epi32(c, d);
    __m256i abcd = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

__attribute__((target("avx2,fma"))) static inline __m256i dot32(__m256i acc, __m256i q, __m256i w,
                                                                 __m256i ones) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, w), ones));
}

/* out[m, n0:n0+4] from the four sums, the same float operations for every element. */
__attribute__((target("avx2,fma"))) static inline void finish4(const job_t *j, int64_t m,
                                                                int64_t n0, __m128i sums) {
    __m128 y = _mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_loadu_ps(j->scale + n0));
    __m128 base = _mm_fmadd_ps(_mm_set1_ps(j->low[m]), _mm_loadu_ps(j->rowsum + n0),
                               _mm_loadu_ps(j->bias + n0));
    _mm_storeu_ps(j->out + m * j->n + n0, _mm_fmadd_ps(_mm_set1_ps(j->span[m]), y, base));
}

static inline void finish1(const job_t *j, int64_t m, int64_t n, int32_t sum) {
    float y = (float)sum * j->scale[n];
    float base = fmaf(j->low[m], j->rowsum[n], j->bias[n]);
    j->out[m * j->n + n] = fmaf(j->span[m], y, base);
}

/* Rows n0..n1 of the output for every m: four weight rows at a time, two input rows at a time,
 * so each 32-byte block of weights is loaded once per pair of inputs and stays in L1 across
 * pairs. K is a multiple of 32 (checked by the caller). */
__attribute__((target("avx2,fma"))) static void rows(const job_t *j, int64_t n0, int64_t n1) {
    const int64_t k = j->k, m_all = j->m;
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const int8_t *w0 = j->w + n * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        /* The weights ahead, fetched while these four rows are summed: the hardware prefetcher
         * stops at each 4 KiB page (four rows of 1024), and without this the kernel streamed
         * slower than fbgemm. The prefetch walks four bytes for each column step of a row, as
         * fast as the four rows are read. */
        const char *next = (const char *)w0 + PREFETCH_BYTES;
        const char *next_end = (const char *)(j->w + n1 * k);
        int64_t m = 0;
        for (; m + 2 <= m_all; m += 2) {
            const uint8_t *qa = j->q + m * k, *qb = qa + k;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int64_t i = 0; i < k; i += 32) {
                if (m == 0 && next + 4 * i + 64 < next_end) {
                    _mm_prefetch(next + 4 * i, _MM_HINT_T0);
                    _mm_prefetch(next + 4 * i + 64, _MM_HINT_T0);
                }
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(w0 + i));
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(w1 + i));
                __m256i x2 = _mm256_loadu_si256((const __m256i *)(w2 + i));
                __m256i x3 = _mm256_loadu_si256((const __m256i *)(w3 + i));
                __m256i va = _mm256_loadu_si256((const __m256i *)(qa + i));
                __m256i vb = _mm256_loadu_si256((const __m256i *)(qb + i));
                a0 = dot32(a0, va, x0, ones);
                a1 = dot32(a1, va, x1, ones);
                a2 = dot32(a2, va, x2, ones);
                a3 = dot32(a3, va, x3, ones);
                b0 = dot32(b0, vb, x0, ones);
                b1 = dot32(b1, vb, x1, ones);
                b2 = dot32(b2, vb, x2, ones);
                b3 = dot32(b3, vb, x3, ones);
            }
            finish4(j, m, n, hsum4(a0, a1, a2, a3));
            finish4(j, m + 1, n, hsum4(b0, b1, b2, b3));
        }
        for (; m < m_all; m++) {
            const uint8_t *qa = j->q + m * k;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < k; i += 32) {
                if (m == 0 && next + 4 * i + 64 < next_end) {
                    _mm_prefetch(next + 4 * i, _MM_HINT_T0);
                    _mm_prefetch(next + 4 * i + 64, _MM_HINT_T0);
                }
                __m256i va = _mm256_loadu_si256((const __m256i *)(qa + i));
                a0 = dot32(a0, va, _mm256_loadu_si256((const __m256i *)(w0 + i)), ones);
                a1 = dot32(a1, va, _mm256_loadu_si256((const __m256i *)(w1 + i)), ones);
                a2 = dot32(a2, va, _mm256_loadu_si256((const __m256i *)(w2 + i)), ones);
                a3 = dot32(a3, va, _mm256_loadu_si256((const __m256i *)(w3 + i)), ones);
            }
            finish4(j, m, n, hsum4(a0, a1, a2, a3));
        }
    }
    for (; n < n1; n++) { /* fewer than four rows left */
        const int8_t *w0 = j->w + n * k;
        for (int64_t m = 0; m < m_all; m++) {
            const uint8_t *qa = j->q + m * k;
            __m256i a0 = _mm256_setzero_si256();
            for (int64_t i = 0; i < k; i += 32)
                a0 = dot32(a0, _mm256_loadu_si256((const __m256i *)(qa + i)),
                           _mm256_loadu_si256((const __m256i *)(w0 + i)), ones);
            __m128i s = hsum4(a0, a0, a0, a0);
            finish1(j, m, n, _mm_cvtsi128_si32(s));
        }
    }
}

static void run_part(const job_t *j, int part) {
    int64_t blocks = (j->n + ROW_ALIGN - 1) / ROW_ALIGN;
    int64_t b0 = blocks * part / j->parts, b1 = blocks * (part + 1) / j->parts;
    int64_t n0 = b0 * ROW_ALIGN, n1 = b1 * ROW_ALIGN;
    if (n1 > j->n) n1 = j->n;
    if (n0 < n1) rows(j, n0, n1);
}

/* Each input row onto [0, 1] by its own minimum and range, then to 7-bit codes. */
__attribute__((target("avx2,fma"))) static void quantize(const float *x, int64_t m_all, int64_t k,
                                                          uint8_t *q, float *low, float *span) {
    for (int64_t m = 0; m < m_all; m++) {
        const float *row = x + m * k;
        __m256 lo = _mm256_loadu_ps(row), hi = lo;
        __m256 nan = _mm256_cmp_ps(lo, lo, _CMP_UNORD_Q);
        for (int64_t i = 8; i < k; i += 8) {
            __m256 v = _mm256_loadu_ps(row + i);
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float l[8], h[8];
        _mm256_storeu_ps(l, lo);
        _mm256_storeu_ps(h, hi);
        float mn = l[0], mx = h[0];
        for (int i = 1; i < 8; i++) {
            mn = l[i] < mn ? l[i] : mn;
            mx = h[i] > mx ? h[i] : mx;
        }
        float s = mx - mn;
        if (!(s > 1e-30f)) s = 1e-30f; /* a constant row: codes of zero */
        low[m] = mn;
        span[m] = s;
        if (_mm256_movemask_ps(nan)) { /* a NaN in the row: its outputs are NaN, as in fbgemm's */
            low[m] = span[m] = __builtin_nanf("");
            mn = 0.0f, s = 1.0f; /* codes from the other values, never used */
        }
        const __m256 vlow = _mm256_set1_ps(mn), vmul = _mm256_set1_ps(127.0f / s);
        const __m256 vmax = _mm256_set1_ps(127.0f), vzero = _mm256_setzero_ps();
        uint8_t *out = q + m * k;
        for (int64_t i = 0; i < k; i += 32) {
            __m256i c[4];
            for (int t = 0; t < 4; t++) {
                __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + i + 8 * t), vlow), vmul);
                v = _mm256_min_ps(_mm256_max_ps(v, vzero), vmax);
                c[t] = _mm256_cvtps_epi32(v); /* round to nearest, ties to even */
            }
            __m256i p01 = _mm256_packs_epi32(c[0], c[1]), p23 = _mm256_packs_epi32(c[2], c[3]);
            __m256i p = _mm256_packus_epi16(p01, p23);
            /* the packs interleave 128-bit lanes: put the 32 codes back in order */
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(out + i), p);
        }
    }
}

/* ---- the thread pool --------------------------------------------------------------------- */

static void *worker_main(void *arg) {
    int part = (int)(intptr_t)arg;
    long seen = start_generation[part];
    for (;;) {
        long now = atomic_load_explicit(&generation, memory_order_acquire);
        for (int spin = 0; now == seen && spin < SPIN_ROUNDS; spin++) {
            _mm_pause();
            now = atomic_load_explicit(&generation, memory_order_acquire);
        }
        if (now == seen) {
            pthread_mutex_lock(&pool_lock);
            sleepers++;
            while ((now = atomic_load(&generation)) == seen) pthread_cond_wait(&pool_wake, &pool_lock);
            sleepers--;
            pthread_mutex_unlock(&pool_lock);
        }
        seen = now;
        if (part < job.parts) run_part(&job, part);
        atomic_fetch_add_explicit(&finished, 1, memory_order_release);
    }
    return NULL;
}

/* A forked child has none of its parent's threads: it starts its own pool when it needs one. */
static void after_fork_in_child(void) {
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
    workers = 0;
    sleepers = 0;
}

static int ensure_workers(int wanted) {
    while (workers < wanted) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_generation[workers + 1] = atomic_load(&generation);
        int err = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(workers + 1));
        pthread_attr_destroy(&attr);
        if (err) return -1;
        workers++;
    }
    return 0;
}

/* ---- Python ------------------------------------------------------------------------------ */

static PyObject *linear(PyObject *self, PyObject *args) {
    unsigned long long x, w, scale, rowsum, bias, out;
    long long m, k, n;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLKLKKKKi", &x, &m, &k, &w, &n, &scale, &rowsum, &bias, &out,
                          &threads))
        return NULL;
    if (m <= 0 || k <= 0 || n <= 0 || k % 32 != 0) {
        PyErr_SetString(PyExc_ValueError, "int8 linear: rows, columns and outputs must be positive "
                                          "and columns a multiple of 32");
        return NULL;
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    uint8_t *q = aligned_alloc(64, (size_t)(m * k + 63) / 64 * 64);
    float *low = malloc(sizeof(float) * (size_t)m), *span = malloc(sizeof(float) * (size_t)m);
    if (!q || !low || !span) {
        free(q), free(low), free(span);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_lock);
    quantize((const float *)x, m, k, q, low, span);
    /* A worker that could not be started (out of threads) is done without: fewer parts, the
     * same results (every output is computed the same way whichever thread owns it). */
    if (threads > 1 && ensure_workers(threads - 1) != 0) threads = workers + 1;
    job = (job_t){q, m, k, n, (const int8_t *)w, (const float *)scale, (const float *)rowsum,
                  (const float *)bias, low, span, (float *)out, threads};
    atomic_store(&finished, 0);
    if (threads > 1) {
        atomic_fetch_add_explicit(&generation, 1, memory_order_release);
        pthread_mutex_lock(&pool_lock);
        if (sleepers) pthread_cond_broadcast(&pool_wake);
        pthread_mutex_unlock(&pool_lock);
    }
    run_part(&job, 0);
    /* Every started worker answers each generation (parts beyond `threads` do nothing). Spin a
     * little, then yield: a descheduled worker must not cost the caller its whole time slice. */
    for (int spin = 0;
         threads > 1 && atomic_load_explicit(&finished, memory_order_acquire) < workers; spin++) {
        if (spin < SPIN_ROUNDS)
            _mm_pause();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&call_lock);
    Py_END_ALLOW_THREADS
    free(q), free(low), free(span);
    Py_RETURN_NONE;
}

static PyObject *supported(PyObject *self, PyObject *args) {
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
}

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS,
     "linear(x, m, k, w, n, scale, rowsum, bias, out, threads): addresses of contiguous float32 "
     "x[m, k], int8 w[n, k], float32 scale[n] (the weight scale / 127), rowsum[n], bias[n] and "
     "out[m, n]."},
    {"supported", supported, METH_NOARGS, "Whether this CPU has AVX2 and FMA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int8mm", NULL, -1, methods};

PyMODINIT_FUNC PyInit__int8mm(void) {
    if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "int8 kernel: pthread_atfork failed");
        return NULL;
    }
    return PyModule_Create(&module);
}
