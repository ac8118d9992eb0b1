/* merger's native CPU kernel: read one slice of one tensor from every input and fold it.
 * Each input's slice lies in one or more byte extents (one for safetensors and torch zip files;
 * one per chunk for torch.distributed.checkpoint), read where they lie.
 *
 * The bits are those of the torch kernel (merger/kernel.py), which stays the definition and the
 * path for CUDA, for --hash and for CPUs without AVX2/FMA/F16C:
 *
 *   acc = x_1 * w_1;  acc = fma(x_i, w_i, acc) for i = 2..n   (torch's add_(x, alpha=w): fmadd)
 *   acc = acc / d  (equal weights that average)  or  acc * s  (other equal weights)
 *   out = cast(acc)  (float64 -> 16-bit goes through float32, as c10 does)
 *
 * in float32 (16-bit inputs) or float64 (32-bit ones), with every rule applied per CHUNK of
 * elements counted from the tensor's start: a chunk bit-identical in every input is copied from
 * input 1 (when the weights sum to 1), a non-finite result is an error naming the first input
 * that holds NaN/Inf in that chunk (or an overflow), consecutive inputs are tracked for being
 * bit-identical (duplicate revisions).
 *
 * Why native: folding from torch costs an `import torch` (1.1 s, three times a `cat` of a
 * 410m x 9 trajectory on the machine this was written on), and a chunked torch fold moves every
 * byte through DRAM twice (pread into a block buffer, then fold). Here every input's bytes are
 * pread, SUB elements at a time, into small per-thread buffers that stay in cache, and folded from
 * there in one fused pass (n inputs -> one output, the accumulator in registers). Callers run one
 * call per thread with the GIL released (ctypes), so the folds of two slices overlap.
 *
 * No Python API is used: the library is loaded with ctypes (merger/native.py). Compiled with
 * -ffp-contract=off: the only fused multiply-adds are the explicit ones above.
 */
#define _GNU_SOURCE 1 /* pread */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MERGER_X86 1
#define TARGET __attribute__((target("avx2,fma,f16c")))
#else
#define MERGER_X86 0
#define TARGET
#endif

enum { DT_F16 = 0, DT_BF16 = 1, DT_F32 = 2, DT_F64 = 3, DT_RAW = 4 };
enum { ST_OK = 0, ST_NONFINITE = 1, ST_OVERFLOW = 2, ST_READ = 3, ST_EOF = 4, ST_DIFFERS = 5, ST_NOMEM = 6 };
enum { FIN_NONE = 0, FIN_DIVIDE = 1, FIN_SCALE = 2 };

#define ABI_VERSION 3
#define MAX_INPUTS 4096

typedef struct {
    /* in */
    int32_t n;              /* inputs */
    int32_t in_dtype;       /* DT_*; DT_RAW: not floating, must be identical, copied */
    int32_t out_dtype;
    int32_t acc_dtype;      /* DT_F32 or DT_F64 */
    int32_t itemsize;       /* bytes per element of the input (DT_RAW: of the raw type) */
    int32_t copy_identical; /* chunks identical in every input are copied */
    int32_t allow_nonfinite;
    int32_t finish;         /* FIN_* */
    double finish_value;
    const int32_t *ext_first; /* n + 1: input i's bytes lie in extents ext_first[i] .. ext_first[i+1] - 1 */
    const int32_t *ext_fd;    /* per extent: the file */
    const int64_t *ext_off;   /* per extent: file offset of its first element */
    const int64_t *ext_end;   /* per extent: the slice element after its last (extents tile the slice) */
    const double *weights;  /* per input: fold weights */
    int64_t count;          /* elements in the slice; it starts at a chunk boundary */
    int64_t chunk;          /* elements per rule chunk (CHUNK); a multiple of sub */
    int64_t sub;            /* elements folded at a time (power of two, multiple of 8) */
    void *out;              /* count output elements */
    uint8_t *same_as_prev;  /* per input, in/out: cleared where input i differs from input i-1 */
    uint8_t *differs;       /* per input, out (DT_RAW): input i differs from input 0 */
    /* out */
    int32_t status;         /* ST_* */
    int32_t all_copied;     /* every chunk was identical in every input and copied */
    int32_t err_input;      /* failing input, or -1 */
    int32_t err_extent;     /* failing extent (its file names the input file), or -1 */
    int32_t err_errno;
    int64_t err_element;    /* first element of the failing chunk (in the slice) */
} merger_job;

/* ---------------------------------------------------------------- scalar conversions */

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

static inline uint16_t f32_to_bf16(float f) {  /* c10::round_to_nearest_even */
    if (f != f) return 0x7fc0;
    uint32_t u = f32_bits(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* IEEE half <-> float, exact / round-to-nearest-even (Maratyszcza's FP16, as in c10) */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = bits_f32(0x7800000u);
    const float normalized = bits_f32((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = bits_f32((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result = sign | (two_w < denormalized_cutoff ? f32_bits(denormalized) : f32_bits(normalized));
    return bits_f32(result);
}

static inline uint16_t f32_to_f16(float f) {
    const float scale_to_inf = bits_f32(0x77800000u);
    const float scale_to_zero = bits_f32(0x08800000u);
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline int float_size(int dt) { return dt == DT_F16 || dt == DT_BF16 ? 2 : dt == DT_F32 ? 4 : 8; }

static inline double load_f64(const void *p, int dt, int64_t j) {
    switch (dt) {
    case DT_F16: return f16_to_f32(((const uint16_t *)p)[j]);
    case DT_BF16: return bf16_to_f32(((const uint16_t *)p)[j]);
    case DT_F32: return ((const float *)p)[j];
    default: return ((const double *)p)[j];
    }
}

static inline float load_f32(const void *p, int dt, int64_t j) {
    switch (dt) {
    case DT_F16: return f16_to_f32(((const uint16_t *)p)[j]);
    case DT_BF16: return bf16_to_f32(((const uint16_t *)p)[j]);
    case DT_F32: return ((const float *)p)[j];
    default: return (float)((const double *)p)[j];
    }
}

static inline void store_f32(void *p, int dt, int64_t j, float v) {
    switch (dt) {
    case DT_F16: ((uint16_t *)p)[j] = f32_to_f16(v); break;
    case DT_BF16: ((uint16_t *)p)[j] = f32_to_bf16(v); break;
    case DT_F32: ((float *)p)[j] = v; break;
    default: ((double *)p)[j] = v; break;
    }
}

static inline void store_f64(void *p, int dt, int64_t j, double v) {
    if (dt == DT_F64) ((double *)p)[j] = v;
    else store_f32(p, dt, j, (float)v);  /* double -> 16-bit via float, as c10 casts */
}

static int nonfinite_bits(const void *p, int dt, int64_t m) {
    int bad = 0;
    if (dt == DT_F16) {
        const uint16_t *q = p;
        for (int64_t j = 0; j < m; j++) bad |= (q[j] & 0x7c00) == 0x7c00;
    } else if (dt == DT_BF16) {
        const uint16_t *q = p;
        for (int64_t j = 0; j < m; j++) bad |= (q[j] & 0x7f80) == 0x7f80;
    } else if (dt == DT_F32) {
        const uint32_t *q = p;
        for (int64_t j = 0; j < m; j++) bad |= (q[j] & 0x7f800000u) == 0x7f800000u;
    } else if (dt == DT_F64) {
        const uint64_t *q = p;
        for (int64_t j = 0; j < m; j++) bad |= (q[j] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    }
    return bad;
}

/* ---------------------------------------------------------------- the fused fold (float32) */

#if MERGER_X86
TARGET static inline __m256 load8(const void *p, int dt, int64_t j) {
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + j)));
    if (dt == DT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + j))), 16));
    return _mm256_loadu_ps((const float *)p + j);
}

/* acc[0:m] = finish(sum_i w_i x_i) in float32, m a multiple of 8 (the buffers are padded) */
#define FOLD_F32(DT)                                                                         \
    for (int64_t j = 0; j < m; j += 8) {                                                     \
        __m256 v = _mm256_mul_ps(load8(x[0], DT, j), w[0]);                                  \
        for (int i = 1; i < n; i++) v = _mm256_fmadd_ps(load8(x[i], DT, j), w[i], v);       \
        if (fin == FIN_DIVIDE) v = _mm256_div_ps(v, f);                                      \
        else if (fin == FIN_SCALE) v = _mm256_mul_ps(v, f);                                  \
        _mm256_storeu_ps(acc + j, v);                                                        \
    }

TARGET static void fold_f32(const void *const *x, int n, int dt, const float *wf, int fin, float fv,
                            float *acc, int64_t m) {
    __m256 w[MAX_INPUTS > 64 ? 64 : MAX_INPUTS];
    const __m256 f = _mm256_set1_ps(fv);
    if (n > 64) {  /* many inputs: one pass per input over the accumulator (same arithmetic) */
        const __m256 w0 = _mm256_set1_ps(wf[0]);
        for (int64_t j = 0; j < m; j += 8) _mm256_storeu_ps(acc + j, _mm256_mul_ps(load8(x[0], dt, j), w0));
        for (int i = 1; i < n; i++) {
            const __m256 wi = _mm256_set1_ps(wf[i]);
            for (int64_t j = 0; j < m; j += 8)
                _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(load8(x[i], dt, j), wi, _mm256_loadu_ps(acc + j)));
        }
        for (int64_t j = 0; j < m; j += 8) {
            __m256 v = _mm256_loadu_ps(acc + j);
            if (fin == FIN_DIVIDE) v = _mm256_div_ps(v, f);
            else if (fin == FIN_SCALE) v = _mm256_mul_ps(v, f);
            _mm256_storeu_ps(acc + j, v);
        }
        return;
    }
    for (int i = 0; i < n; i++) w[i] = _mm256_set1_ps(wf[i]);
    if (dt == DT_F16) { FOLD_F32(DT_F16) }
    else if (dt == DT_BF16) { FOLD_F32(DT_BF16) }
    else { FOLD_F32(DT_F32) }
}

/* out[0:m] = cast(acc[0:m]); the tail (m % 8) through the scalar conversions, which round alike */
TARGET static void store_acc_f32(const float *acc, int dt, void *out, int64_t m) {
    int64_t j = 0, m8 = m & ~(int64_t)7;
    if (dt == DT_F16) {
        for (; j < m8; j += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)out + j),
                             _mm256_cvtps_ph(_mm256_loadu_ps(acc + j), _MM_FROUND_TO_NEAREST_INT));
    } else if (dt == DT_BF16) {
        const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
        const __m256i qnan = _mm256_set1_epi32(0x7fc0);
        for (; j < m8; j += 8) {
            __m256 v = _mm256_loadu_ps(acc + j);
            __m256i u = _mm256_castps_si256(v);
            __m256i r = _mm256_srli_epi32(
                _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
            __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            r = _mm256_blendv_epi8(r, qnan, isnan);
            __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
            _mm_storeu_si128((__m128i *)((uint16_t *)out + j), _mm_packus_epi32(lo, hi));
        }
    } else if (dt == DT_F32) {
        memcpy(out, acc, (size_t)m * 4);
        return;
    }
    for (; j < m; j++) store_f32(out, dt, j, acc[j]);
}
#endif

/* ---------------------------------------------------------------- the float64 fold */

#if !MERGER_X86
TARGET static void fold_f64_scalar(const void *const *x, int n, int dt, const double *w, int fin, double fv,
                                   double *acc, int64_t m) {
    for (int64_t j = 0; j < m; j++) acc[j] = load_f64(x[0], dt, j) * w[0];
    for (int i = 1; i < n; i++) {
        const double wi = w[i];
        const void *xi = x[i];
        for (int64_t j = 0; j < m; j++) acc[j] = fma(load_f64(xi, dt, j), wi, acc[j]);
    }
    if (fin == FIN_DIVIDE) for (int64_t j = 0; j < m; j++) acc[j] /= fv;
    else if (fin == FIN_SCALE) for (int64_t j = 0; j < m; j++) acc[j] *= fv;
}
#endif

#if MERGER_X86
/* 4 elements as doubles: every input dtype widens exactly (f16/bf16 -> f32 -> f64, f32 -> f64) */
TARGET static inline __m256d load4d(const void *p, int dt, int64_t j) {
    if (dt == DT_F64) return _mm256_loadu_pd((const double *)p + j);
    if (dt == DT_F32) return _mm256_cvtps_pd(_mm_loadu_ps((const float *)p + j));
    const __m128i h = _mm_loadl_epi64((const __m128i *)((const uint16_t *)p + j));
    if (dt == DT_F16) return _mm256_cvtps_pd(_mm_cvtph_ps(h));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));  /* bf16 */
}

/* The same operations as fold_f64_scalar, 4 lanes at a time (vfmadd is the correctly rounded fma,
 * vdivpd the correctly rounded division): the same bits. m is rounded up to 4 over the padded
 * buffers; the extra lanes are never stored. */
TARGET static void fold_f64_vec(const void *const *x, int n, int dt, const double *w, int fin, double fv,
                                double *acc, int64_t m) {
    const __m256d f = _mm256_set1_pd(fv);
    if (n > 64) {
        const __m256d w0 = _mm256_set1_pd(w[0]);
        for (int64_t j = 0; j < m; j += 4) _mm256_storeu_pd(acc + j, _mm256_mul_pd(load4d(x[0], dt, j), w0));
        for (int i = 1; i < n; i++) {
            const __m256d wi = _mm256_set1_pd(w[i]);
            for (int64_t j = 0; j < m; j += 4)
                _mm256_storeu_pd(acc + j, _mm256_fmadd_pd(load4d(x[i], dt, j), wi, _mm256_loadu_pd(acc + j)));
        }
        for (int64_t j = 0; j < m; j += 4) {
            __m256d v = _mm256_loadu_pd(acc + j);
            if (fin == FIN_DIVIDE) v = _mm256_div_pd(v, f);
            else if (fin == FIN_SCALE) v = _mm256_mul_pd(v, f);
            _mm256_storeu_pd(acc + j, v);
        }
        return;
    }
    __m256d wv[64];
    for (int i = 0; i < n; i++) wv[i] = _mm256_set1_pd(w[i]);
    for (int64_t j = 0; j < m; j += 4) {
        __m256d v = _mm256_mul_pd(load4d(x[0], dt, j), wv[0]);
        for (int i = 1; i < n; i++) v = _mm256_fmadd_pd(load4d(x[i], dt, j), wv[i], v);
        if (fin == FIN_DIVIDE) v = _mm256_div_pd(v, f);
        else if (fin == FIN_SCALE) v = _mm256_mul_pd(v, f);
        _mm256_storeu_pd(acc + j, v);
    }
}

/* out[0:m] = cast(acc[0:m]) from float64: float32 and float64 vectorised (vcvtpd2ps rounds to
 * nearest, as the C cast does); 16-bit outputs through the scalar path (double -> float -> 16-bit) */
TARGET static void store_acc_f64(const double *acc, int dt, void *out, int64_t m) {
    int64_t j = 0;
    if (dt == DT_F64) {
        memcpy(out, acc, (size_t)m * 8);
        return;
    }
    if (dt == DT_F32)
        for (; j + 4 <= m; j += 4) _mm_storeu_ps((float *)out + j, _mm256_cvtpd_ps(_mm256_loadu_pd(acc + j)));
    for (; j < m; j++) store_f64(out, dt, j, acc[j]);
}
#endif

/* float32 accumulation of 64-bit inputs (--accumulate float32): scalar, rare */
TARGET static void fold_f32_scalar(const void *const *x, int n, int dt, const float *w, int fin, float fv,
                                   float *acc, int64_t m) {
    for (int64_t j = 0; j < m; j++) acc[j] = load_f32(x[0], dt, j) * w[0];
    for (int i = 1; i < n; i++)
        for (int64_t j = 0; j < m; j++) acc[j] = fmaf(load_f32(x[i], dt, j), w[i], acc[j]);
    if (fin == FIN_DIVIDE) for (int64_t j = 0; j < m; j++) acc[j] /= fv;
    else if (fin == FIN_SCALE) for (int64_t j = 0; j < m; j++) acc[j] *= fv;
}

/* ---------------------------------------------------------------- per-thread scratch */

static __thread unsigned char *scratch;
static __thread size_t scratch_size;

static unsigned char *get_scratch(size_t need) {
    if (need <= scratch_size) return scratch;
    free(scratch);
    scratch = NULL;
    scratch_size = 0;
    void *p = NULL;
    if (posix_memalign(&p, 64, need) != 0) return NULL;
    scratch = p;
    scratch_size = need;
    return scratch;
}

/* ---------------------------------------------------------------- reading */

static int read_full(merger_job *job, int i, int k, void *dst, size_t nbytes, int64_t offset) {
    size_t done = 0;
    while (done < nbytes) {
        ssize_t r = pread(job->ext_fd[k], (char *)dst + done, nbytes - done, (off_t)(offset + (int64_t)done));
        if (r < 0) {
            if (errno == EINTR) continue;
            job->status = ST_READ;
            job->err_errno = errno;
        } else if (r == 0) {
            job->status = ST_EOF;
        } else {
            done += (size_t)r;
            continue;
        }
        job->err_input = i;
        job->err_extent = k;
        job->err_element = offset + (int64_t)done;  /* the file offset, for the message */
        return -1;
    }
    return 0;
}

/* Read elements [e0, e0 + m) of input i (slice-relative) into dst, from the extents that hold them.
 * One extent (every format but DCP): one pread. */
static int read_elems(merger_job *job, int i, void *dst, int64_t e0, int64_t m) {
    const int64_t isz = job->itemsize;
    int k = job->ext_first[i];
    const int last = job->ext_first[i + 1] - 1;
    while (k < last && job->ext_end[k] <= e0) k++;
    int64_t e = e0;
    char *d = dst;
    while (e < e0 + m) {
        if (k > last || job->ext_end[k] <= e) {  /* the extents end before the slice: a planning bug */
            job->status = ST_EOF;
            job->err_input = i;
            job->err_extent = last;
            job->err_element = -1;
            return -1;
        }
        const int64_t begin = k == job->ext_first[i] ? 0 : job->ext_end[k - 1];
        const int64_t stop = job->ext_end[k] < e0 + m ? job->ext_end[k] : e0 + m;
        if (read_full(job, i, k, d, (size_t)((stop - e) * isz), job->ext_off[k] + (e - begin) * isz)) return -1;
        d += (stop - e) * isz;
        e = stop;
        k++;
    }
    return 0;
}

/* Read elements [e0, e0 + m) of every input into bufs[i]. */
static int read_all(merger_job *job, void **bufs, int64_t e0, int64_t m) {
    for (int i = 0; i < job->n; i++)
        if (read_elems(job, i, bufs[i], e0, m)) return -1;
    return 0;
}

/* ---------------------------------------------------------------- rules */

/* Which input first holds NaN/Inf in elements [c0, c1)? -1: none (an overflow of the output). */
static int first_nonfinite(merger_job *job, void **bufs, int64_t c0, int64_t c1) {
    for (int i = 0; i < job->n; i++) {
        for (int64_t s0 = c0; s0 < c1; s0 += job->sub) {
            const int64_t m = c1 - s0 < job->sub ? c1 - s0 : job->sub;
            if (read_elems(job, i, bufs[0], s0, m)) return -2;
            if (nonfinite_bits(bufs[0], job->in_dtype, m)) return i;
        }
    }
    return -1;
}

/* out[c0:c1] = cast(input 1's elements); a finite element that the cast turns into Inf is an
 * overflow of the output dtype (ST_OVERFLOW), as for averaged chunks, unless allow_nonfinite */
static int copy_first(merger_job *job, void **bufs, int64_t c0, int64_t c1) {
    const int osz = float_size(job->out_dtype);
    for (int64_t s0 = c0; s0 < c1; s0 += job->sub) {
        const int64_t m = c1 - s0 < job->sub ? c1 - s0 : job->sub;
        char *o = (char *)job->out + s0 * osz;
        if (job->in_dtype == job->out_dtype) {
            if (read_elems(job, 0, o, s0, m)) return -1;
            continue;
        }
        if (read_elems(job, 0, bufs[0], s0, m)) return -1;
        for (int64_t j = 0; j < m; j++) store_f64(o, job->out_dtype, j, load_f64(bufs[0], job->in_dtype, j));
        if (job->allow_nonfinite || !nonfinite_bits(o, job->out_dtype, m)) continue;
        for (int64_t j = 0; j < m; j++)
            if (!nonfinite_bits((char *)bufs[0] + j * job->itemsize, job->in_dtype, 1) &&
                nonfinite_bits(o + j * osz, job->out_dtype, 1)) {
                job->status = ST_OVERFLOW;
                job->err_element = s0 + j;
                return 1;
            }
    }
    return 0;
}

/* Non-floating tensors: identical in every input (else ST_DIFFERS with job->differs), copied. */
static int exact(merger_job *job, void **bufs) {
    int any = 0;
    for (int64_t s0 = 0; s0 < job->count; s0 += job->sub) {
        const int64_t m = job->count - s0 < job->sub ? job->count - s0 : job->sub;
        const size_t nb = (size_t)(m * job->itemsize);
        if (read_all(job, bufs, s0, m)) return -1;
        for (int i = 1; i < job->n; i++)
            if (!job->differs[i] && memcmp(bufs[i], bufs[0], nb)) job->differs[i] = 1, any = 1;
        memcpy((char *)job->out + s0 * job->itemsize, bufs[0], nb);
    }
    job->all_copied = 1;
    if (any) job->status = ST_DIFFERS;
    return 0;
}

/* ---------------------------------------------------------------- entry points */

int merger_abi_version(void) { return ABI_VERSION; }

/* 1 where this build has the vectorised fold and the CPU runs it (x86-64 with AVX2, FMA, F16C) */
int merger_supported(void) {
#if MERGER_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

int merger_fold(merger_job *job) {
    const int n = job->n;
    const int64_t sub = job->sub;
    job->status = ST_OK;
    job->err_input = -1;
    job->err_extent = -1;
    job->err_errno = 0;
    job->err_element = -1;
    job->all_copied = 1;
    if (n < 1 || n > MAX_INPUTS || sub < 8 || (sub & 7) || job->chunk % sub) {
        job->status = ST_NOMEM;
        return job->status;
    }
    const int isz = job->itemsize;
    const int f64 = job->acc_dtype == DT_F64;
    const size_t buf_bytes = ((size_t)(sub * isz) + 63) & ~(size_t)63;
    const size_t acc_bytes = (size_t)sub * (f64 ? 8 : 4);
    unsigned char *base = get_scratch(buf_bytes * (size_t)n + acc_bytes + 64);
    if (!base) {
        job->status = ST_NOMEM;
        return job->status;
    }
    void *bufs[MAX_INPUTS];
    for (int i = 0; i < n; i++) bufs[i] = base + (size_t)i * buf_bytes;
    void *accbuf = base + (size_t)n * buf_bytes;

    if (job->in_dtype == DT_RAW) {
        exact(job, bufs);
        return job->status;
    }

    float wf[MAX_INPUTS];
    for (int i = 0; i < n; i++) wf[i] = (float)job->weights[i];
    const int osz = float_size(job->out_dtype);
    const int vec = MERGER_X86 && !f64 && job->in_dtype != DT_F64;

    for (int64_t c0 = 0; c0 < job->count; c0 += job->chunk) {
        const int64_t c1 = job->count - c0 < job->chunk ? job->count : c0 + job->chunk;
        int ident = job->copy_identical;  /* still identical in every input (n == 1: trivially) */
        int bad = 0;
        for (int64_t s0 = c0; s0 < c1; s0 += sub) {
            const int64_t m = c1 - s0 < sub ? c1 - s0 : sub;
            const size_t nb = (size_t)(m * isz);
            if (read_all(job, bufs, s0, m)) return job->status;
            if (ident)
                for (int i = 1; i < n && ident; i++) ident = !memcmp(bufs[i], bufs[0], nb);
            for (int i = 1; i < n; i++)
                if (job->same_as_prev[i] && memcmp(bufs[i], bufs[i - 1], nb)) job->same_as_prev[i] = 0;
            void *o = (char *)job->out + s0 * osz;
            if (f64) {
#if MERGER_X86
                const int64_t m4 = (m + 3) & ~(int64_t)3;  /* the buffers are padded to 64 bytes */
                fold_f64_vec((const void *const *)bufs, n, job->in_dtype, job->weights, job->finish,
                             job->finish_value, accbuf, m4);
                store_acc_f64(accbuf, job->out_dtype, o, m);
#else
                fold_f64_scalar((const void *const *)bufs, n, job->in_dtype, job->weights, job->finish,
                                job->finish_value, accbuf, m);
                for (int64_t j = 0; j < m; j++) store_f64(o, job->out_dtype, j, ((double *)accbuf)[j]);
#endif
            } else if (vec) {
#if MERGER_X86
                const int64_t m8 = (m + 7) & ~(int64_t)7;  /* the input buffers are padded to 64 bytes */
                fold_f32((const void *const *)bufs, n, job->in_dtype, wf, job->finish, (float)job->finish_value,
                         accbuf, m8);
                store_acc_f32(accbuf, job->out_dtype, o, m);
#endif
            } else {
                fold_f32_scalar((const void *const *)bufs, n, job->in_dtype, wf, job->finish,
                                (float)job->finish_value, accbuf, m);
                for (int64_t j = 0; j < m; j++) store_f32(o, job->out_dtype, j, ((float *)accbuf)[j]);
            }
            if (!job->allow_nonfinite && !bad) bad = nonfinite_bits(o, job->out_dtype, m);
        }
        if (ident) {
            if (copy_first(job, bufs, c0, c1)) return job->status;
            continue;
        }
        job->all_copied = 0;
        if (bad) {
            const int who = first_nonfinite(job, bufs, c0, c1);
            if (who == -2) return job->status;
            job->status = who >= 0 ? ST_NONFINITE : ST_OVERFLOW;
            job->err_input = who;
            job->err_element = c0;
            return job->status;
        }
    }
    return job->status;
}

/* a module-init symbol, so that setuptools' build_ext can link this as an extension module
 * everywhere; the library is loaded with ctypes, never imported */
void *PyInit__fold(void) { return NULL; }
