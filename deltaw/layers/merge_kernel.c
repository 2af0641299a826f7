/* deltaw's fused merge kernel: W = W0 + Σ_t alpha_t · M1_t · M2_t in one pass over memory, with the all-finite
 * check folded in.
 *
 * Why it exists: torch.addmm(W0, B, A, out=W) copies W0 into W (one full pass over the weight) and then runs a
 * K = r GEMM that reads and writes W again (a second pass). A rank-16 update is ~16 FMAs per element, so both
 * passes are bound by memory, and merging the 135M model (210 weights, 425 MB) costs two passes plus a third
 * for the NaN/inf scan. Here W0 is read once and the result written once with non-temporal stores (no
 * read-for-ownership of W). M2 is first repacked into one contiguous (R, 16) panel per 16-column block, so the
 * inner loop streams one buffer instead of R rows at once (-15 to -20 % time at r = 16..64).
 * Each thread works through its rows a chunk (<= 24 rows, <= ~144 KB) at a time, in two phases: the products of
 * the chunk, 4 rows x 16 columns in registers at a time, go to a cache-resident scratch while W0's lines for
 * them are prefetched into L2; then W = W0 + scratch is streamed out. Formed and added in one step, the FMAs and
 * the memory traffic took turns instead of overlapping (135M model, 2 threads: 96 -> 73 ms median).
 *
 * A weighted stack of adapters is one product of rank R = Σ r_t: the terms' ranks are walked in order.
 * Arithmetic, identical on every path (vector block, column tail, row tail) and for any thread count, so a
 * result never depends on alignment or partition:   c_k = alpha_t * M1_t[i, k]   (fp32 multiply)
 *     s = 0;  s = fma(c_k, M2_t[k, j], s) for every (t, k) in order;   W[i, j] = W0[i, j] + s
 *
 * Shapes: W, W0 (rows, cols) contiguous; M1_t (rows, r_t) with any strides; M2_t (r_t, cols) contiguous;
 * R <= 256.
 * Returns 0 when every W[i, j] is finite, 1 when one is not (NaN/inf: v - v is NaN exactly then), -1 when this
 * build or CPU cannot run it (the caller falls back to torch). x86-64 with AVX2 + FMA only.
 *
 * Also here: dw_lora_gemv_f32, a few tokens' LoRA update of a Linear layer (decode), see below.
 */
#include <stdint.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define DW_MAX_RANK 256

typedef struct {
    const float *m1, *m2; /* M1_t (rows, r) at strides (s1r, s1k); M2_t (r, cols) contiguous */
    int64_t s1r, s1k, r;
    float alpha;
} dw_term;

/* One term of a mixed decode batch: rows[0..n) of x and y get y += s · B (A x); A (r, in), B (out, r). */
typedef struct {
    const float *a, *b;
    const int64_t *rows;
    int64_t r, n;
    float s;
} dw_rowterm;

typedef struct {
    float *w;
    const float *w0;
    const dw_term *terms;
    const float *const *m2row; /* row k of the stacked M2, k < R */
    const float *panels; /* M2 repacked per 16-column block: panel jb is (R, 16) contiguous */
    int64_t cols, rank, r0, r1, chunk; /* chunk: rows per two-phase step */
    int nterms, streaming, bad;
    unsigned csr; /* the caller's MXCSR (flush-to-zero, denormals-are-zero, rounding): workers run with it */
} dw_job;

#if defined(DW_OMP) && (defined(__clang__) || !defined(__GNUC__))
#error "the OpenMP build is for GCC, whose -fopenmp links libgomp: the runtime torch ships (another compiler would bring a second OpenMP runtime)"
#endif
#ifdef DW_OMP
/* GNU OpenMP hangs in a child forked from a process whose OpenMP threads exist: a child forked after this library
 * was loaded runs its jobs on the calling thread. (One that loads it only after the fork is in the position of
 * torch's own parallel ops there.) */
static volatile int dw_forked;
static void dw_mark_forked(void) { dw_forked = 1; }
__attribute__((constructor)) static void dw_omp_init(void) { pthread_atfork(0, 0, dw_mark_forked); }
#if defined(__x86_64__)
/* Around each parallel region. A thread libgomp creates for a region starts with the creating thread's MXCSR, and
 * what it restores after its job is that: with the caller's flush-to-zero / denormals-are-zero it would keep them
 * for good (a later parallel torch op flushed half of 2^20 denormals, from a review). So the caller clears the two
 * bits while the region starts (every job loads the caller's full setting itself) and gets them back after. */
#define DW_FTZ_DAZ 0x8040u
static inline unsigned dw_csr_enter(void) {
    unsigned csr = __builtin_ia32_stmxcsr();
    __builtin_ia32_ldmxcsr(csr & ~DW_FTZ_DAZ);
    return csr;
}
static inline void dw_csr_leave(unsigned csr) { __builtin_ia32_ldmxcsr(csr); }
#endif
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

static float dw_tail(const dw_job *jb, const float *c, int64_t i, int64_t j) {
    float s = 0.f;
    for (int64_t k = 0; k < jb->rank; ++k) s = __builtin_fmaf(c[k], jb->m2row[k][j], s);
    float v = jb->w0[i * jb->cols + j] + s;
    jb->w[i * jb->cols + j] = v;
    return v - v;
}

static void dw_coefficients(const dw_job *jb, int64_t i, float *c) {
    int64_t k0 = 0;
    for (int t = 0; t < jb->nterms; ++t) {
        const dw_term *tm = &jb->terms[t];
        for (int64_t k = 0; k < tm->r; ++k) c[k0 + k] = tm->alpha * tm->m1[i * tm->s1r + k * tm->s1k];
        k0 += tm->r;
    }
}

/* Each thread's scratch for the two-phase loop, kept between calls (allocating ~150 KB per layer made glibc give
 * its heap top back and fault it in again: +10 ms per merge of the 135M model) and freed when the thread ends.
 * NULL when it cannot be had: the caller then takes the one-phase loop. */
#define DW_KEEP (4 << 20)
static pthread_key_t dw_key;
static pthread_once_t dw_key_once = PTHREAD_ONCE_INIT;
static int dw_key_ok;

static void dw_key_init(void) { dw_key_ok = pthread_key_create(&dw_key, free) == 0; }

static float *dw_scratch(size_t bytes) {
    if (pthread_once(&dw_key_once, dw_key_init) != 0 || !dw_key_ok || bytes > DW_KEEP) return 0;
    size_t *held = (size_t *)pthread_getspecific(dw_key); /* [capacity, pad to 64 bytes, scratch...] */
    if (held && held[0] >= bytes) return (float *)(held + 8);
    size_t *fresh = (size_t *)aligned_alloc(64, (bytes + 64 + 63) / 64 * 64);
    if (!fresh) return 0;
    fresh[0] = bytes;
    if (pthread_setspecific(dw_key, fresh) != 0) {
        free(fresh);
        return 0;
    }
    free(held);
    return (float *)(fresh + 8);
}

/* The rows past the last whole group of 4 (element by element), then the job's finiteness verdict: chk and tail
 * hold the sums of (v - v) over everything written, NaN exactly when some v was not finite. */
__attribute__((target("avx2,fma")))
static void dw_finish(dw_job *jb, int64_t i, float *c, __m256 chk, float tail) {
    for (; i < jb->r1; ++i) {
        dw_coefficients(jb, i, c);
        for (int64_t j = 0; j < jb->cols; ++j) tail += dw_tail(jb, c, i, j);
    }
    if (jb->streaming) _mm_sfence();
    float lanes[8];
    _mm256_storeu_ps(lanes, chk);
    for (int q = 0; q < 8; ++q) tail += lanes[q];
    jb->bad = !(tail == 0.f);
}

/* s = the rank-R products of 4 rows (coefficients c) and columns [j, j + 16): the FMAs in k order. */
__attribute__((target("avx2,fma"), always_inline))
static inline void dw_block(const dw_job *jb, float c[4][DW_MAX_RANK], int64_t j, __m256 s[4][2]) {
    const float *panel = jb->panels + (j / 16) * jb->rank * 16;
    for (int q = 0; q < 4; ++q) s[q][0] = s[q][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < jb->rank; ++k) {
        const float *mk = panel + k * 16;
        __m256 x0 = _mm256_loadu_ps(mk), x1 = _mm256_loadu_ps(mk + 8);
        for (int q = 0; q < 4; ++q) {
            __m256 ck = _mm256_broadcast_ss(&c[q][k]);
            s[q][0] = _mm256_fmadd_ps(ck, x0, s[q][0]);
            s[q][1] = _mm256_fmadd_ps(ck, x1, s[q][1]);
        }
    }
}

/* One phase: each 4 x 16 block formed in registers and added to W0 as it is written. Small weights (in cache)
 * and the fallback when no scratch can be had. */
__attribute__((target("avx2,fma")))
static void dw_rows_direct(dw_job *jb) {
    const int64_t cols = jb->cols;
    float c[4][DW_MAX_RANK];
    __m256 chk = _mm256_setzero_ps();
    float tail = 0.f;
    int64_t i = jb->r0;
    for (; i + 4 <= jb->r1; i += 4) {
        for (int q = 0; q < 4; ++q) dw_coefficients(jb, i + q, c[q]);
        int64_t j = 0;
        for (; j + 16 <= cols; j += 16) {
            __m256 s[4][2];
            dw_block(jb, c, j, s);
            for (int q = 0; q < 4; ++q) {
                const float *src = jb->w0 + (i + q) * cols + j;
                float *dst = jb->w + (i + q) * cols + j;
                __m256 v0 = _mm256_add_ps(_mm256_loadu_ps(src), s[q][0]);
                __m256 v1 = _mm256_add_ps(_mm256_loadu_ps(src + 8), s[q][1]);
                if (jb->streaming) {
                    _mm256_stream_ps(dst, v0);
                    _mm256_stream_ps(dst + 8, v1);
                } else {
                    _mm256_storeu_ps(dst, v0);
                    _mm256_storeu_ps(dst + 8, v1);
                }
                chk = _mm256_add_ps(chk, _mm256_add_ps(_mm256_sub_ps(v0, v0), _mm256_sub_ps(v1, v1)));
            }
        }
        for (; j < cols; ++j)
            for (int q = 0; q < 4; ++q) tail += dw_tail(jb, c[q], i + q, j);
    }
    dw_finish(jb, i, c[0], chk, tail);
}

__attribute__((target("avx2,fma")))
static void dw_rows(dw_job *jb) {
    const int64_t cols = jb->cols, cb = cols / 16 * 16; /* cb: columns in whole 16-blocks */
    float *scratch = jb->streaming ? dw_scratch((size_t)jb->chunk * (cb > 0 ? cb : 16) * sizeof(float)) : 0;
    if (!scratch) {
        dw_rows_direct(jb);
        return;
    }
    float c[4][DW_MAX_RANK];
    __m256 chk = _mm256_setzero_ps();
    float tail = 0.f;
    int64_t i = jb->r0;
    while (i + 4 <= jb->r1) {
        int64_t i1 = i + (jb->r1 - i < jb->chunk ? jb->r1 - i : jb->chunk) / 4 * 4;
        for (int64_t ii = i; ii < i1; ii += 4) { /* phase 1: products of rows [i, i1) into scratch */
            for (int q = 0; q < 4; ++q) dw_coefficients(jb, ii + q, c[q]);
            for (int64_t j = 0; j < cb; j += 16) {
                __m256 s[4][2];
                for (int q = 0; q < 4; ++q) _mm_prefetch((const char *)(jb->w0 + (ii + q) * cols + j), _MM_HINT_T1);
                dw_block(jb, c, j, s);
                for (int q = 0; q < 4; ++q) {
                    float *dst = scratch + (ii - i + q) * cb + j;
                    _mm256_store_ps(dst, s[q][0]);
                    _mm256_store_ps(dst + 8, s[q][1]);
                }
            }
            for (int64_t j = cb; j < cols; ++j)
                for (int q = 0; q < 4; ++q) tail += dw_tail(jb, c[q], ii + q, j);
        }
        for (int64_t ii = i; ii < i1; ++ii) { /* phase 2: W = W0 + products */
            const float *src = jb->w0 + ii * cols, *sc = scratch + (ii - i) * cb;
            float *dst = jb->w + ii * cols;
            for (int64_t j = 0; j < cb; j += 8) {
                __m256 v = _mm256_add_ps(_mm256_loadu_ps(src + j), _mm256_load_ps(sc + j));
                if (jb->streaming)
                    _mm256_stream_ps(dst + j, v);
                else
                    _mm256_storeu_ps(dst + j, v);
                chk = _mm256_add_ps(chk, _mm256_sub_ps(v, v));
            }
        }
        i = i1;
    }
    dw_finish(jb, i, c[0], chk, tail);
}

int dw_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

__attribute__((target("avx2,fma")))
static float dw_hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* A few tokens' LoRA update of a Linear layer (decode):  y += s · B (A x)  per token, on the calling thread.
 * A (r, in), B (out, r), x (n, in), y (n, out): contiguous fp32, r <= DW_MAX_RANK.
 * Why: two tiny matmuls per module (mv + addmv_, or two skinny GEMMs for a small batch) whose factors were evicted
 * by the base weights streaming past cost ~2x their bytes in per-op, threading and cold-start overhead; here A
 * and B are read once, sequentially, for all n tokens. Both halves keep several independent FMA chains in
 * flight (4 rows of A share each load of x; 8 rows of B are summed at once and reduced by one hadd tree): one
 * chain per output with a horizontal sum each was bound by FMA + shuffle latency (L2-resident factors, per call:
 * 576 -> 576 3.1 -> 2.4 us, 576 -> 1536 5.2 -> 3.2 us; in the model, batch 1, the pass is bound by the factors'
 * bytes and gained only ~0.2 ms of ~3.3 ms over 210 modules).
 * Arithmetic, the same for every (token, output) whatever n or its position (so no dependence on batch size,
 * alignment or grouping):
 *   h_k = s * t_k,  t_k = Σ_j A[k, j] x[j]  in 2 x 8 lanes over 16-column blocks, then dw_hsum, then the
 *         columns past the last block one by one;
 *   y_o += u_o,     u_o = Σ_k B[o, k] h_k  in 8 lanes over 8-wide rank chunks (the last chunk zero-filled),
 *         then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). */
__attribute__((target("avx2,fma"), always_inline))
static inline void dw_gemv_a(float *h, const float *x, const float *a, int64_t k0, int64_t n, int64_t in, float s) {
    __m256 s0[4], s1[4];
    for (int q = 0; q < n; ++q) s0[q] = s1[q] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= in; j += 16) {
        __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
        for (int q = 0; q < n; ++q) {  /* n rows of A share each load of x */
            const float *ak = a + (k0 + q) * in + j;
            s0[q] = _mm256_fmadd_ps(_mm256_loadu_ps(ak), x0, s0[q]);
            s1[q] = _mm256_fmadd_ps(_mm256_loadu_ps(ak + 8), x1, s1[q]);
        }
    }
    for (int q = 0; q < n; ++q) {
        const float *ak = a + (k0 + q) * in;
        float t = dw_hsum(_mm256_add_ps(s0[q], s1[q]));
        for (int64_t c = j; c < in; ++c) t = __builtin_fmaf(ak[c], x[c], t);
        h[k0 + q] = s * t;
    }
}

/* u for 8 rows of B at b (row stride r) against h zero-filled to a multiple of 8; mask: the last chunk's lanes. */
__attribute__((target("avx2,fma"), always_inline))
static inline __m256 dw_gemv_b8(const float *b, const float *h, int64_t r, __m256i mask) {
    __m256 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= r; k += 8) {
        __m256 hk = _mm256_load_ps(h + k);
        for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(_mm256_loadu_ps(b + q * r + k), hk, acc[q]);
    }
    if (k < r) {  /* masked lanes load as 0 and never touch memory past the row */
        __m256 hk = _mm256_load_ps(h + k);
        for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(_mm256_maskload_ps(b + q * r + k, mask), hk, acc[q]);
    }
    __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
    __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  /* lanes 0-3 and 4-7 sums, per row */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* h rows [k0, k1) of every token (A's rows in that range are read once for all n tokens, staying in L1/L2 after
 * the first). Each row of h has its own accumulators, so the grouping by 4 and the range split leave every value
 * the same bits. Token t is row idx[t] of x (row t when idx is NULL). h: (n, rp), rp = r rounded up to 8. */
__attribute__((target("avx2,fma")))
static void dw_gemv_h(float *h, const float *x, const float *a, int64_t n, const int64_t *idx, int64_t rp,
                      int64_t k0, int64_t k1, int64_t in, float s) {
    for (int64_t t = 0; t < n; ++t) {
        float *ht = h + t * rp;
        const float *xt = x + (idx ? idx[t] : t) * in;
        int64_t k = k0;
        for (; k + 4 <= k1; k += 4) dw_gemv_a(ht, xt, a, k, 4, in, s);
        for (; k < k1; ++k) dw_gemv_a(ht, xt, a, k, 1, in, s);
    }
}

/* Outputs [o0, o1) of every token (o0 a multiple of 8): each block of 8 rows of B once for all tokens (it stays
 * in L1); the last rows, when o1 = out is not a multiple of 8, copied into a zero-filled block of 8 so they get
 * the same arithmetic. h: zero-filled past r. */
__attribute__((target("avx2,fma")))
static void dw_gemv_y(float *y, const float *b, const float *h, int64_t n, const int64_t *idx, int64_t r,
                      int64_t rp, int64_t o0, int64_t o1, int64_t out) {
    int32_t lanes[8];
    for (int q = 0; q < 8; ++q) lanes[q] = (q < r % 8) ? -1 : 0;
    __m256i mask = _mm256_loadu_si256((const __m256i *)lanes);
    int64_t o = o0;
    for (; o + 8 <= o1; o += 8)
        for (int64_t t = 0; t < n; ++t) {
            float *yt = y + (idx ? idx[t] : t) * out + o;
            _mm256_storeu_ps(yt, _mm256_add_ps(_mm256_loadu_ps(yt), dw_gemv_b8(b + o * r, h + t * rp, r, mask)));
        }
    if (o < o1) {
        float tail[8 * DW_MAX_RANK];
        memset(tail, 0, sizeof(float) * 8 * r);
        memcpy(tail, b + o * r, sizeof(float) * (o1 - o) * r);
        for (int64_t t = 0; t < n; ++t) {
            float u[8], *yt = y + (idx ? idx[t] : t) * out + o;
            _mm256_storeu_ps(u, dw_gemv_b8(tail, h + t * rp, r, mask));
            for (int64_t q = 0; q < o1 - o; ++q) yt[q] += u[q];
        }
    }
}

/* n tokens, one term, on the calling thread: every h first, then every output. Every token gets exactly the
 * one-token arithmetic above, so a row's result does not depend on how many rows share the call. */
static void dw_gemv_tokens(float *y, const float *x, const float *a, const float *b, int64_t n, const int64_t *idx,
                           int64_t r, int64_t in, int64_t out, float s, float *h) {
    int64_t rp = (r + 7) / 8 * 8;
    dw_gemv_h(h, x, a, n, idx, rp, 0, r, in, s);
    dw_gemv_y(y, b, h, n, idx, r, rp, 0, out, out);
}

/* A scratch h of n x rp floats: on the stack when small, else allocated (NULL on failure). */
#define DW_STACK_H (4 * DW_MAX_RANK)

#ifdef DW_OMP
#include <omp.h>
/* From how many tokens and factor bytes the update is split over the threads. Below, one thread's pass beat the
 * fork/join (135M shape, 2 threads, the update's time per decode step: B = 1 3.05 ms on one thread vs 3.47 split,
 * B = 4 3.76 vs 3.55, B = 16 6.05 vs 4.28). */
#define DW_GEMV_SPLIT_TOKENS 8
#define DW_GEMV_SPLIT_BYTES (16 << 10)

/* The update on `threads` OpenMP threads, torch's own (see dw_run): thread i takes an even share of h's rows in
 * groups of 4, then, after a barrier, an even share of the outputs in blocks of 8. The base GEMM before it ran on
 * the same threads, which still spin, so the fork costs ~1 us; it pays where a batch's update is compute-bound.
 * Every value is computed by the same code as on one thread, so the bits do not depend on the thread count. */
static void dw_gemv_split(float *y, const float *x, const float *a, const float *b, int64_t n, int64_t r, int64_t in,
                          int64_t out, float s, float *h, int threads) {
    unsigned csr = dw_csr_enter();
    int64_t rp = (r + 7) / 8 * 8, groups = (r + 3) / 4, blocks = (out + 7) / 8;
#pragma omp parallel num_threads(threads)
    {
        unsigned own = __builtin_ia32_stmxcsr(); /* torch's thread: its own setting goes back afterwards */
        __builtin_ia32_ldmxcsr(csr);
        int64_t i = omp_get_thread_num(), m = omp_get_num_threads();
        int64_t k0 = groups * i / m * 4, k1 = groups * (i + 1) / m * 4;
        dw_gemv_h(h, x, a, n, 0, rp, k0 < r ? k0 : r, k1 < r ? k1 : r, in, s);
#pragma omp barrier
        int64_t o0 = blocks * i / m * 8, o1 = blocks * (i + 1) / m * 8;
        dw_gemv_y(y, b, h, n, 0, r, rp, o0 < out ? o0 : out, o1 < out ? o1 : out, out);
        __builtin_ia32_ldmxcsr(own);
    }
    dw_csr_leave(csr);
}
#endif

/* y (n, out) += s · (x (n, in) Aᵀ) Bᵀ for a few tokens (decode of a small batch): A and B are read from memory
 * once for all n tokens, where two torch GEMMs of these skinny shapes pay more than their arithmetic in per-op
 * and threading overhead. On up to `threads` threads in the OpenMP build, else on the calling thread. Returns -1
 * (nothing written) for shapes it does not take or a failed allocation. */
int dw_lora_gemv_f32(float *y, const float *x, const float *a, const float *b, int64_t n, int64_t r, int64_t in,
                     int64_t out, float s, int threads) {
    if (!dw_supported() || n < 1 || r < 1 || r > DW_MAX_RANK || in < 1 || out < 1) return -1;
    int64_t rp = (r + 7) / 8 * 8;
    float stack[DW_STACK_H] __attribute__((aligned(32)));
    float *h = n * rp <= DW_STACK_H ? stack : (float *)aligned_alloc(32, (size_t)(n * rp) * sizeof(float));
    if (!h) return -1;
    memset(h, 0, (size_t)(n * rp) * sizeof(float));  /* zeros past r: the last chunk's padding */
#ifdef DW_OMP
    if (threads > 1 && !dw_forked && n >= DW_GEMV_SPLIT_TOKENS && r * (in + out) * 4 >= DW_GEMV_SPLIT_BYTES)
        dw_gemv_split(y, x, a, b, n, r, in, out, s, h, threads > 64 ? 64 : threads);
    else
#endif
        dw_gemv_tokens(y, x, a, b, n, 0, r, in, out, s, h);
    if (h != stack) free(h);
    return 0;
}

/* A mixed batch's decode step (one adapter per row, or a weighted stack): for each term, the rows idx[0..n) of x
 * and y get y += s · B (A x), with the arithmetic above, so a row whose spec is one adapter gets exactly what it
 * gets alone. Terms are added in order (a stacked row gets its terms one after another). All terms are checked
 * before anything is written; returns -1 (nothing written) when one does not fit.
 * From DW_GEMV_SPLIT_TOKENS entries, the OpenMP build splits the work over `threads` of torch's threads: first
 * every term's h, an even share of the (term, group of 4 rows of h) pairs each; after a barrier, an even share of
 * the outputs each, every term in order. Each value is computed by the same code as on one thread, in the same
 * order, so the bits do not depend on the thread count. */
int dw_lora_rows_f32(float *y, const float *x, int64_t in, int64_t out, const dw_rowterm *terms, int nterms,
                     int threads) {
    if (!dw_supported() || in < 1 || out < 1 || nterms < 1) return -1;
    int64_t most = 0, total = 0, entries = 0, bytes = 0;
    for (int t = 0; t < nterms; ++t) {
        int64_t need = terms[t].n * ((terms[t].r + 7) / 8 * 8);
        if (terms[t].r < 1 || terms[t].r > DW_MAX_RANK || terms[t].n < 1) return -1;
        if (need > most) most = need;
        total += need;
        entries += terms[t].n;
        bytes += terms[t].r * (in + out) * 4;
    }
    int split = 0;
#ifdef DW_OMP
    split = threads > 1 && !dw_forked && entries >= DW_GEMV_SPLIT_TOKENS && bytes >= DW_GEMV_SPLIT_BYTES;
#endif
    int64_t size = split ? total : most; /* split: every term's h at once */
    float stack[DW_STACK_H] __attribute__((aligned(32)));
    float *h = size <= DW_STACK_H ? stack : (float *)aligned_alloc(32, (size_t)size * sizeof(float));
    if (!h) return -1;
    if (!split) {
        for (int t = 0; t < nterms; ++t) {
            const dw_rowterm *tm = &terms[t];
            memset(h, 0, (size_t)(tm->n * ((tm->r + 7) / 8 * 8)) * sizeof(float));
            dw_gemv_tokens(y, x, tm->a, tm->b, tm->n, tm->rows, tm->r, in, out, tm->s, h);
        }
    }
#ifdef DW_OMP
    else {
        memset(h, 0, (size_t)total * sizeof(float));
        int64_t groups = 0;
        for (int t = 0; t < nterms; ++t) groups += (terms[t].r + 3) / 4;
        int64_t blocks = (out + 7) / 8;
        unsigned csr = dw_csr_enter();
#pragma omp parallel num_threads(threads > 64 ? 64 : threads)
        {
            unsigned own = __builtin_ia32_stmxcsr(); /* torch's thread: its own setting goes back afterwards */
            __builtin_ia32_ldmxcsr(csr);
            int64_t i = omp_get_thread_num(), m = omp_get_num_threads();
            int64_t g0 = groups * i / m, g1 = groups * (i + 1) / m, g = 0;
            float *ht = h;
            for (int t = 0; t < nterms && g < g1; ++t) { /* term t owns groups [g, g + its groups) */
                const dw_rowterm *tm = &terms[t];
                int64_t mine = (tm->r + 3) / 4, rp = (tm->r + 7) / 8 * 8;
                int64_t lo = g0 > g ? g0 - g : 0, hi = g1 - g < mine ? g1 - g : mine;
                if (lo < hi)
                    dw_gemv_h(ht, x, tm->a, tm->n, tm->rows, rp, lo * 4, hi * 4 < tm->r ? hi * 4 : tm->r, in, tm->s);
                g += mine;
                ht += tm->n * rp;
            }
#pragma omp barrier
            int64_t o0 = blocks * i / m * 8, o1 = blocks * (i + 1) / m * 8;
            o0 = o0 < out ? o0 : out;
            o1 = o1 < out ? o1 : out;
            ht = h;
            for (int t = 0; t < nterms; ++t) {
                const dw_rowterm *tm = &terms[t];
                int64_t rp = (tm->r + 7) / 8 * 8;
                if (o0 < o1) dw_gemv_y(y, tm->b, ht, tm->n, tm->rows, tm->r, rp, o0, o1, out);
                ht += tm->n * rp;
            }
            __builtin_ia32_ldmxcsr(own);
        }
        dw_csr_leave(csr);
    }
#endif
    if (h != stack) free(h);
    return 0;
}
#else
static void dw_rows(dw_job *jb) { jb->bad = 1; }
int dw_supported(void) { return 0; }
int dw_lora_gemv_f32(float *y, const float *x, const float *a, const float *b, int64_t n, int64_t r, int64_t in,
                     int64_t out, float s, int threads) {
    return -1;
}
int dw_lora_rows_f32(float *y, const float *x, int64_t in, int64_t out, const dw_rowterm *terms, int nterms,
                     int threads) {
    return -1;
}
#endif

/* 1 when the jobs run on OpenMP threads (torch's runtime), 0 on this file's own pool. */
int dw_openmp(void) {
#ifdef DW_OMP
    return 1;
#else
    return 0;
#endif
}

/* Worker threads kept between calls. A merge calls the kernel once per layer (210 calls for the 135M model):
 * creating and joining a thread per call cost ~50 us each, ~10 ms of a ~100 ms merge. Workers spin briefly for
 * the next call (the next layer comes within ~50 us), then sleep on a condition variable, so an idle pool costs
 * nothing. One call uses the pool at a time (dw_call); a call that finds it busy runs on its own thread. A fork
 * waits for the call in flight and leaves the child without workers, so the child starts over. */
#define DW_SPIN 20000 /* pause instructions: ~0.1-1 ms depending on the CPU */
static pthread_mutex_t dw_call = PTHREAD_MUTEX_INITIALIZER, dw_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t dw_go = PTHREAD_COND_INITIALIZER, dw_done = PTHREAD_COND_INITIALIZER;
static int dw_nworkers, dw_pending, dw_active, dw_forkhook;
static long dw_gen, dw_born[64]; /* dw_born[k]: the generation worker k was created in (it waits for the next) */
static dw_job *dw_jobs;

static void dw_before_fork(void) {
    pthread_mutex_lock(&dw_call);
    pthread_mutex_lock(&dw_mu);
}

static void dw_parent_after_fork(void) {
    pthread_mutex_unlock(&dw_mu);
    pthread_mutex_unlock(&dw_call);
}

static void dw_child_after_fork(void) {
    pthread_mutex_unlock(&dw_mu);
    pthread_mutex_unlock(&dw_call);
    pthread_cond_init(&dw_go, 0); /* waiter counts of the parent's workers would stall a later broadcast */
    pthread_cond_init(&dw_done, 0);
    dw_nworkers = dw_pending = dw_active = 0;
    dw_jobs = 0;
}

static void dw_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *dw_worker(void *arg) {
    int k = (int)(intptr_t)arg;
    long seen = dw_born[k];
    for (;;) {
        for (int s = 0; s < DW_SPIN && __atomic_load_n(&dw_gen, __ATOMIC_ACQUIRE) == seen; ++s) dw_relax();
        pthread_mutex_lock(&dw_mu);
        while (dw_gen == seen) pthread_cond_wait(&dw_go, &dw_mu);
        seen = dw_gen;
        dw_job *job = k < dw_active ? &dw_jobs[k] : 0;
        pthread_mutex_unlock(&dw_mu);
        if (!job) continue; /* this call needs fewer workers: only those with a job report back */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        __builtin_ia32_ldmxcsr(job->csr); /* a worker outlives the setting it was created with */
#endif
        dw_rows(job);
        pthread_mutex_lock(&dw_mu);
        if (--dw_pending == 0) pthread_cond_signal(&dw_done);
        pthread_mutex_unlock(&dw_mu);
    }
    return 0;
}

/* Starts workers up to n - 1 (fewer if creation fails); called holding dw_call. */
static void dw_grow(int n) {
    if (!dw_forkhook) /* without the fork hook a forked child would wait for workers it does not have */
        dw_forkhook = pthread_atfork(dw_before_fork, dw_parent_after_fork, dw_child_after_fork) == 0;
    if (!dw_forkhook) return;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* workers inherit it: signals go to the application's threads */
    while (dw_nworkers < n - 1) {
        pthread_t tid;
        pthread_attr_t attr;
        int k = dw_nworkers + 1, rc;
        dw_born[k] = dw_gen;
        if (pthread_attr_init(&attr) != 0) break;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        rc = pthread_create(&tid, &attr, dw_worker, (void *)(intptr_t)k);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        dw_nworkers = k;
    }
    pthread_sigmask(SIG_SETMASK, &old, 0);
}

/* Runs jobs[0..n) on up to n - 1 pool workers and the calling thread, which takes the jobs no worker has. */
static void dw_run(dw_job *jobs, int n) {
#ifdef DW_OMP
    if (n > 1 && !dw_forked) {
        /* Built with OpenMP against the runtime torch ships (native.py decides): the jobs run on torch's own
           OpenMP threads. Those spin for some ms after every torch op, and this pool's threads competed with them
           for the cores (merge + unmerge of the 135M shape right after a matmul: 110 vs 96 ms). */
#if defined(__x86_64__)
        unsigned csr = dw_csr_enter();
#endif
#pragma omp parallel for num_threads(n) schedule(static, 1)
        for (int t = 0; t < n; ++t) {
#if defined(__x86_64__)
            unsigned own = __builtin_ia32_stmxcsr(); /* torch's thread: its own setting goes back afterwards */
            __builtin_ia32_ldmxcsr(jobs[t].csr);
            dw_rows(&jobs[t]);
            __builtin_ia32_ldmxcsr(own);
#else
            dw_rows(&jobs[t]);
#endif
        }
#if defined(__x86_64__)
        dw_csr_leave(csr);
#endif
        return;
    }
#endif
    if (n == 1 || pthread_mutex_trylock(&dw_call) != 0) {
        for (int t = 0; t < n; ++t) dw_rows(&jobs[t]);
        return;
    }
    dw_grow(n);
    int helpers = n - 1 < dw_nworkers ? n - 1 : dw_nworkers;
    if (helpers > 0) {
        pthread_mutex_lock(&dw_mu);
        dw_jobs = jobs;
        dw_active = helpers + 1;
        dw_pending = helpers;
        __atomic_add_fetch(&dw_gen, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&dw_go);
        pthread_mutex_unlock(&dw_mu);
    }
    dw_rows(&jobs[0]);
    for (int t = helpers + 1; t < n; ++t) dw_rows(&jobs[t]);
    if (helpers > 0) {
        pthread_mutex_lock(&dw_mu);
        while (dw_pending > 0) pthread_cond_wait(&dw_done, &dw_mu);
        dw_jobs = 0;
        pthread_mutex_unlock(&dw_mu);
    }
    pthread_mutex_unlock(&dw_call);
}

int dw_merge_f32(float *w, const float *w0, int64_t rows, int64_t cols, const dw_term *terms, int nterms,
                 int threads) {
    if (!dw_supported() || nterms < 1 || rows < 1 || cols < 1) return -1;
    const float *m2row[DW_MAX_RANK];
    int64_t rank = 0;
    for (int t = 0; t < nterms; ++t) {
        if (terms[t].r < 1 || rank + terms[t].r > DW_MAX_RANK) return -1;
        for (int64_t k = 0; k < terms[t].r; ++k) m2row[rank + k] = terms[t].m2 + k * cols;
        rank += terms[t].r;
    }
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if ((int64_t)threads * 4 > rows) threads = (int)(rows / 4 > 0 ? rows / 4 : 1);
    /* Non-temporal stores skip reading W into cache before writing it; they need 32-byte aligned rows, and
       only pay off for weights that would not stay in cache anyway. */
    int streaming = ((uintptr_t)w % 32 == 0) && (cols % 8 == 0) && rows * cols * 4 >= (256 << 10);
    int64_t nblk = cols / 16, cb = nblk * 16;
    float *panels = (float *)malloc((size_t)(nblk > 0 ? nblk : 1) * rank * 16 * sizeof(float));
    if (!panels) return -1;
    for (int64_t b = 0; b < nblk; ++b)
        for (int64_t k = 0; k < rank; ++k) memcpy(panels + (b * rank + k) * 16, m2row[k] + b * 16, 64);
    /* Rows per two-phase step: a scratch of at most ~144 KB, so L2 holds it and the W0 lines prefetched for it
       (at least 4 rows: past ~9,200 columns it grows, up to DW_KEEP, and no longer fits L2). */
    int64_t chunk = cb > 0 ? (36864 / cb) / 4 * 4 : 4;
    chunk = chunk < 4 ? 4 : chunk > 24 ? 24 : chunk;
    unsigned csr = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    csr = __builtin_ia32_stmxcsr(); /* e.g. torch.set_flush_denormal(True) sets it for the calling thread only */
#endif
    dw_job jobs[64];
    int64_t per = (rows / threads + 3) / 4 * 4, start = 0;
    for (int t = 0; t < threads; ++t) {
        int64_t stop = (t == threads - 1 || start + per > rows) ? rows : start + per;
        jobs[t] = (dw_job){w, w0, terms, m2row, panels, cols, rank, start, stop, chunk, nterms, streaming, 0, csr};
        start = stop;
    }
    dw_run(jobs, threads);
    int bad = 0;
    for (int t = 0; t < threads; ++t) bad |= jobs[t].bad;
    free(panels);
    return bad;
}
