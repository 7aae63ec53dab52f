/*
 * Native CPU kernels for the salr bitmap sparse format (see docs/format.md).
 *
 * A weight W [rows, cols] is stored as
 *   bitmask      uint8 [rows, nbytes], nbytes = ceil(cols / 8); bit (c % 8) of byte [r, c / 8] set iff W[r, c] != 0
 *   values       the nonzeros in row-major order (bf16, fp16 or fp32)
 *   row_offsets  int64 [rows], index in `values` of each row's first nonzero
 *
 * The entry points are called through ctypes with raw pointers (no torch headers, no Python headers):
 *   salr_bitmap_gemv    y[t, r] = sum_c x[t, c] * W[r, c] for a few tokens t: each bitmap byte is expanded
 *                       to 8 fp32 lanes with one shuffle (AVX2) and FMA-ed against every token.
 *   salr_bitmap_decode  rows [r0, r1) of W as dense fp32, for the large-M path (decode a tile, then sgemm).
 * Both check every row they touch: the popcount of the row's bitmap must equal the number of values the
 * offsets give it, so corrupt inputs are reported (return value >= 0 = a bad row) and never read out of bounds.
 * The AVX2 paths check on the fly (a word's popcount must keep the running count within the row before the word
 * is used), so the bitmap is read once; the scalar paths count the row first.
 *
 * The M = 1 GEMV (decode) is compute bound at ~9 instructions per bitmap byte: per byte a shift + popcount for the
 * value offset (independent for the 8 bytes of a word, no serial chain), a 16-byte broadcast load of the values,
 * one vpshufb with the byte's table entry, one FMA; 8 accumulators. Measured ~2 cycles per bitmap byte on Zen 3.
 *
 * On CPUs with AVX-512 VBMI2 (Intel Ice Lake and later, AMD Zen 4 and later) bf16 rows take a third path: one
 * vpexpandw places the kept values of 32 columns (4 bitmap bytes) at once, so the per-byte table shuffles go away.
 * NF4 and INT8 codes (blocks of >= 64 values) have their own AVX-512 gemvs (a word's codes expanded as bytes with one
 * vpexpandb; NF4 then looked up in the scaled codebook 16 columns per vpermt2ps, or 32 per vpermw and vdpbf16ps for a
 * bf16 input; INT8 widened and scaled). fp16 and fp32 values, smaller blocks of codes, the large-M decode of quantized
 * rows, and CPUs without VBMI2 keep the AVX2 path.
 *
 * x must be fp32 with at least nbytes * 8 columns per row (columns >= cols zero-padded): the AVX2 path loads
 * 8 columns per bitmap byte. The AVX2 and AVX-512 code uses target attributes so the file builds with plain -O3,
 * and each CPU runs the best path it has (runtime check with __builtin_cpu_supports; salr.ops.cpu.isa()).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#define SALR_X86 1
#include <immintrin.h>
#else
#define SALR_X86 0
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

#define ISA_SCALAR 0
#define ISA_AVX2 1
#define ISA_AVX512 2 /* the AVX2 paths plus the AVX-512 (VBMI2) bf16 gemv and decode */
/* A flag on the isa argument of the few-token entry points (salr_bitmap_gemv, salr_linear_decode and their quantized
 * twins): an x that is exactly bf16 meets bf16 values, or NF4 books rounded to bf16, in vdpbf16ps (AVX512-BF16; see
 * gemv_row_block_dot512, nf4_gemv_row_block_dot512). The entry points clear it before reading the level. */
#define ISA_BF16_DOT 16

#define MAX_NT 8 /* tokens per register block in the gemv path */
/* Rows per work item: threads take chunks as they come (dynamic schedule), so a thread that the OS delays (a busy
 * shared machine) does not hold up the others at the end of the call. */
#define ROW_CHUNK 32

/* The few-token gemvs' smallest work item. They take rows in a guided schedule: each thread's first chunk is a
 * share of all the rows, later ones shrink down to this, so each thread streams one long run of values and bitmap
 * (a new chunk restarts both streams cold, before the prefetches run ahead) and the small last chunks still balance
 * a thread that the OS delays. On the default model's small layers (576-1536 rows) a dynamic schedule of 32-row
 * chunks restarted the streams ~18 times per call: the 210 fused layers took 11.1-12.2 ms per token on 2 threads
 * against 9.2-9.8 ms guided; the 1B-class model's 44.6 against 40.6-41.7 ms (docs/benchmarks.md, section 18). */
static inline int gemv_chunk(int64_t rows, int nthreads) {
    const int64_t c = rows / (16 * (int64_t)(nthreads > 1 ? nthreads : 1));
    return (int)(c < ROW_CHUNK ? ROW_CHUNK : (c > 256 ? 256 : c));
}
/* Software prefetch distances (bytes ahead of the current read) for the gemv's value/code stream and bitmap. With
 * the weight out of cache (a model's layers in turn) the hardware prefetcher alone left the M = 1 gemv waiting on
 * memory about as long as it computed, the two not overlapping. With the prefetches (and the AVX-512 conversion
 * below) `salr bench --kernel`, 4096x4096 bf16 at 50 %, 1 thread, on an Intel Xeon: 2.43 -> 1.58 ms; the 1B-class
 * model's decode went from 1.09x to 1.41x dense bf16 (docs/benchmarks.md, section 9). Distances of 1-4 KiB and
 * 256-1024 B measured within a few percent of each other. */
#define PREFETCH_VALUES 2048
#define PREFETCH_BITMAP 512
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)

#define AVX2_FN __attribute__((target("avx2,fma,f16c,popcnt")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c,popcnt")))
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx2,fma,f16c,popcnt,bmi2"
#define AVX512_FN __attribute__((target(AVX512_TARGET)))
#define AVX512_INLINE static inline __attribute__((always_inline, target(AVX512_TARGET)))
#define DOT512_TARGET AVX512_TARGET ",avx512bf16"
#define DOT512_FN __attribute__((target(DOT512_TARGET)))
#define DOT512_INLINE static inline __attribute__((always_inline, target(DOT512_TARGET)))

/* ---------------------------------------------------------------------------------------------- tables */

static uint8_t POPCNT8[256];
static uint8_t SHUF_BF16[256][32] __attribute__((aligned(32))); /* vpshufb: bf16 k -> high half of fp32 lane */
static uint8_t SHUF_F16[256][16] __attribute__((aligned(16)));  /* pshufb: fp16 k -> fp16 lane, then vcvtph2ps */
static int32_t PERM_F32[256][8] __attribute__((aligned(32)));   /* vpermps index: fp32 k -> lane */
static int32_t MASK_F32[256][8] __attribute__((aligned(32)));   /* all-ones where the bit is set */
static int32_t LEFTPACK[256][8] __attribute__((aligned(32)));   /* vpermps index: lane k <- k-th set bit */

__attribute__((constructor)) static void init_tables(void) {
    for (int b = 0; b < 256; b++) {
        int k = 0;
        memset(SHUF_BF16[b], 0x80, 32);
        memset(SHUF_F16[b], 0x80, 16);
        for (int i = 0; i < 8; i++) {
            PERM_F32[b][i] = 0;
            MASK_F32[b][i] = 0;
            LEFTPACK[b][i] = 0;
            if (!((b >> i) & 1)) continue;
            /* fp32 lane i: bytes 4i..4i+3 (little endian); bf16 goes to the two high bytes. Lanes 4..7 live in
             * the upper 128-bit half, whose shuffle indexes the (broadcast) upper copy of the same 16 bytes. */
            SHUF_BF16[b][4 * i + 2] = (uint8_t)(2 * k);
            SHUF_BF16[b][4 * i + 3] = (uint8_t)(2 * k + 1);
            SHUF_F16[b][2 * i] = (uint8_t)(2 * k);
            SHUF_F16[b][2 * i + 1] = (uint8_t)(2 * k + 1);
            PERM_F32[b][i] = k;
            MASK_F32[b][i] = -1;
            LEFTPACK[b][k] = i;
            k++;
        }
        POPCNT8[b] = (uint8_t)k;
    }
}

int salr_cpu_has_avx2(void) {
#if !SALR_X86
    return 0;
#else
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("popcnt");
#endif
}

/* AVX-512 with VBMI (vpmultishiftqb) and VBMI2 (vpexpandw): Intel Ice Lake and later, AMD Zen 4 and later. */
int salr_cpu_has_avx512(void) {
#if !SALR_X86
    return 0;
#else
    __builtin_cpu_init();
    return salr_cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
           __builtin_cpu_supports("bmi2");
#endif
}

/* AVX-512 (as above) with AVX512-BF16 (vdpbf16ps): AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and
 * later. 2: an AMD CPU, where the dot-product gemv measured faster (the default there); 1: another vendor's. */
int salr_cpu_has_avx512_bf16_dot(void) {
#if !SALR_X86
    return 0;
#else
    __builtin_cpu_init();
    if (!salr_cpu_has_avx512() || !__builtin_cpu_supports("avx512bf16")) return 0;
    return __builtin_cpu_is("amd") ? 2 : 1;
#endif
}

/* AVX512-BF16 or AMX-BF16: torch's bf16 matmul then runs natively (oneDNN), so the many-token path multiplies
 * 16-bit tiles (salr_bitmap_decode16) instead of fp32 ones. */
int salr_cpu_has_bf16_matmul(void) {
#if !SALR_X86
    return 0;
#else
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#endif
}

int salr_cpu_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* Flush [p, p + nbytes) out of every cache level, a clflush per 64-byte line: the benchmarks time a kernel with its
 * weight in memory, as decoding finds it, without evicting everything else (code, the interpreter). Returns 1, or 0
 * where this build cannot. */
int salr_cpu_flush(const void *p, int64_t nbytes) {
#if SALR_X86
    const char *end = (const char *)p + nbytes;
    for (const char *c = (const char *)((uintptr_t)p & ~(uintptr_t)63); c < end; c += 64) _mm_clflush(c);
    _mm_mfence();
    return 1;
#else
    (void)p;
    (void)nbytes;
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------- helpers */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign; /* +-0 */
    } else {          /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load_value(int dt, const uint8_t *values, int64_t i) {
    if (dt == DT_F32) {
        float f;
        memcpy(&f, values + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, values + 2 * i, 2);
    if (dt == DT_F16) return half_to_float(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline int64_t row_popcount(const uint8_t *bm, int64_t nbytes) {
    int64_t n = 0, j = 0;
    for (; j + 8 <= nbytes; j += 8) {
        uint64_t w;
        memcpy(&w, bm + j, 8);
        n += __builtin_popcountll(w);
    }
    for (; j < nbytes; j++) n += POPCNT8[bm[j]];
    return n;
}

static inline int elem_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* ---------------------------------------------------------------------------------------------- scalar path */

/* y[t * ldy + r] = dot(x[t], W[r]) for t < m, walking the set bits of row r. */
static void gemv_row_scalar(int dt, const uint8_t *bm, const uint8_t *values, int64_t start, int64_t nbytes,
                            const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy, int64_t r) {
    for (int64_t t0 = 0; t0 < m; t0 += MAX_NT) {
        int64_t nt = m - t0 < MAX_NT ? m - t0 : MAX_NT;
        float acc[MAX_NT] = {0};
        int64_t v = start;
        for (int64_t j = 0; j < nbytes; j++) {
            unsigned b = bm[j];
            while (b) {
                int i = __builtin_ctz(b);
                float w = load_value(dt, values, v++);
                for (int64_t t = 0; t < nt; t++) acc[t] += w * x[(t0 + t) * ldx + 8 * j + i];
                b &= b - 1;
            }
        }
        for (int64_t t = 0; t < nt; t++) y[(t0 + t) * ldy + r] = acc[t];
    }
}

static void decode_row_scalar(int dt, const uint8_t *bm, const uint8_t *values, int64_t start, int64_t nbytes,
                              int64_t cols, float *out) {
    memset(out, 0, sizeof(float) * cols);
    int64_t v = start;
    for (int64_t j = 0; j < nbytes; j++) {
        unsigned b = bm[j];
        while (b) {
            int i = __builtin_ctz(b);
            float w = load_value(dt, values, v++);
            if (8 * j + i < cols) out[8 * j + i] = w;
            b &= b - 1;
        }
    }
}

/* ---------------------------------------------------------------------------------------------- AVX2 path */
#if SALR_X86

/* 8 fp32 lanes of one bitmap byte: value k of `v` goes to the lane of the k-th set bit, zeros elsewhere.
 * Reads 16 bytes (bf16/fp16) or 32 bytes (fp32) at v, whatever the popcount: callers keep that in bounds. */
AVX2_INLINE __m256 expand8(int dt, const uint8_t *v, unsigned b) {
    if (dt == DT_BF16) {
        __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)v));
        return _mm256_castsi256_ps(_mm256_shuffle_epi8(src, _mm256_load_si256((const __m256i *)SHUF_BF16[b])));
    }
    if (dt == DT_F16) {
        __m128i h = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)v), _mm_load_si128((const __m128i *)SHUF_F16[b]));
        return _mm256_cvtph_ps(h);
    }
    __m256 src = _mm256_loadu_ps((const float *)v);
    __m256 p = _mm256_permutevar8x32_ps(src, _mm256_load_si256((const __m256i *)PERM_F32[b]));
    return _mm256_and_ps(p, _mm256_castsi256_ps(_mm256_load_si256((const __m256i *)MASK_F32[b])));
}

AVX2_INLINE float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* NT tokens (a compile-time constant after inlining) against one row of n_row values. The bitmap is read 8 bytes at
 * a time; each byte's first value is found with a popcount of the bits below it in the 64-bit word, so the 8
 * expansions are independent (no serial pointer chain). NB accumulator banks per token hide the FMA latency when NT
 * is small. The row's bitmap is validated on the fly: before a word is used, its popcount must keep the running count
 * within n_row, so reads stay below value n_row + 8 of the row. Returns the number of values consumed (== n_row for
 * a consistent row) or -1 when the bitmap asks for more values than the row has. */
AVX2_INLINE int64_t gemv_row_block_avx2(int dt, int NT, const uint8_t *bm, const uint8_t *v0, int64_t nbytes,
                                        int64_t n_row, const float *x, int64_t ldx, float *y, int64_t ldy) {
    const int NB = NT == 1 ? 8 : (NT == 2 ? 4 : (NT <= 4 ? 2 : 1));
    const int esz = elem_size(dt);
    __m256 acc[8][MAX_NT];
#pragma GCC unroll 8
    for (int u = 0; u < 8; u++)
#pragma GCC unroll 8
        for (int t = 0; t < MAX_NT; t++) acc[u][t] = _mm256_setzero_ps();
    int64_t j = 0, cnt = 0;
    for (; j + 8 <= nbytes; j += 8) {
        uint64_t word;
        memcpy(&word, bm + j, 8);
        const int64_t wc = __builtin_popcountll(word);
        if (cnt + wc > n_row) return -1;
        const uint8_t *v = v0 + esz * cnt;
        PREFETCH(v + PREFETCH_VALUES);
        PREFETCH(v + PREFETCH_VALUES + 64);
        PREFETCH(bm + j + PREFETCH_BITMAP);
#pragma GCC unroll 8
        for (int u = 0; u < 8; u++) {
            const uint8_t *vu = u ? v + esz * __builtin_popcountll(word << (64 - 8 * u)) : v;
            __m256 w = expand8(dt, vu, (unsigned)(word >> (8 * u)) & 0xff);
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                acc[u % NB][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + 8 * (j + u)), acc[u % NB][t]);
        }
        cnt += wc;
    }
    for (; j < nbytes; j++) {
        unsigned b = bm[j];
        if (cnt + POPCNT8[b] > n_row) return -1;
        __m256 w = expand8(dt, v0 + esz * cnt, b);
        cnt += POPCNT8[b];
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + 8 * j), acc[0][t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) {
        __m256 s = acc[0][t];
#pragma GCC unroll 8
        for (int u = 1; u < NB; u++) s = _mm256_add_ps(s, acc[u][t]);
        y[t * ldy] = hsum8(s);
    }
    return cnt;
}

/* The body of a gemv row function over m tokens: blocks of MAX_NT, then the 1-7 left, each through the function's
 * ROW_BLOCK(NT) with NT a constant (so the block kernel is unrolled for it); the x pointer XP (row stride LDX) and y
 * advance block by block. Returns the values consumed (n_row) or the failing block's result. */
#define ROWS_IN_TOKEN_BLOCKS(XP, LDX) \
    int64_t got = n_row; \
    for (; m >= MAX_NT && got == n_row; m -= MAX_NT, XP += MAX_NT * (LDX), y += MAX_NT * ldy) got = ROW_BLOCK(8); \
    if (got != n_row) return got; \
    switch (m) { \
    case 1: return ROW_BLOCK(1); \
    case 2: return ROW_BLOCK(2); \
    case 3: return ROW_BLOCK(3); \
    case 4: return ROW_BLOCK(4); \
    case 5: return ROW_BLOCK(5); \
    case 6: return ROW_BLOCK(6); \
    case 7: return ROW_BLOCK(7); \
    default: return got; \
    }

/* Returns the values consumed by the row, or -1 (see gemv_row_block_avx2); m > 8 runs blocks of 8 tokens. */
AVX2_INLINE int64_t gemv_row_avx2_dt(int dt, const uint8_t *bm, const uint8_t *v, int64_t nbytes, int64_t n_row,
                                     const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy) {
#define ROW_BLOCK(NT) gemv_row_block_avx2(dt, NT, bm, v, nbytes, n_row, x, ldx, y, ldy)
    ROWS_IN_TOKEN_BLOCKS(x, ldx);
#undef ROW_BLOCK
}

/* One entry per dtype so each is compiled with its dtype branches folded away. */
AVX2_FN static int64_t gemv_row_avx2(int dt, const uint8_t *bm, const uint8_t *v, int64_t nbytes, int64_t n_row,
                                     const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy) {
    if (dt == DT_BF16) return gemv_row_avx2_dt(DT_BF16, bm, v, nbytes, n_row, x, m, ldx, y, ldy);
    if (dt == DT_F16) return gemv_row_avx2_dt(DT_F16, bm, v, nbytes, n_row, x, m, ldx, y, ldy);
    return gemv_row_avx2_dt(DT_F32, bm, v, nbytes, n_row, x, m, ldx, y, ldy);
}

/* Same word-at-a-time walk and on-the-fly validation as the gemv; returns the values consumed or -1. */
AVX2_INLINE int64_t decode_row_avx2_dt(int dt, const uint8_t *bm, const uint8_t *v0, int64_t nbytes, int64_t n_row,
                                       float *out) {
    const int esz = elem_size(dt);
    int64_t j = 0, cnt = 0;
    for (; j + 8 <= nbytes; j += 8) {
        uint64_t word;
        memcpy(&word, bm + j, 8);
        const int64_t wc = __builtin_popcountll(word);
        if (cnt + wc > n_row) return -1;
        const uint8_t *v = v0 + esz * cnt;
#pragma GCC unroll 8
        for (int u = 0; u < 8; u++) {
            const uint8_t *vu = u ? v + esz * __builtin_popcountll(word << (64 - 8 * u)) : v;
            _mm256_storeu_ps(out + 8 * (j + u), expand8(dt, vu, (unsigned)(word >> (8 * u)) & 0xff));
        }
        cnt += wc;
    }
    for (; j < nbytes; j++) {
        unsigned b = bm[j];
        if (cnt + POPCNT8[b] > n_row) return -1;
        _mm256_storeu_ps(out + 8 * j, expand8(dt, v0 + esz * cnt, b));
        cnt += POPCNT8[b];
    }
    return cnt;
}

AVX2_FN static int64_t decode_row_avx2(int dt, const uint8_t *bm, const uint8_t *v, int64_t nbytes, int64_t n_row,
                                       float *out) {
    if (dt == DT_BF16) return decode_row_avx2_dt(DT_BF16, bm, v, nbytes, n_row, out);
    if (dt == DT_F16) return decode_row_avx2_dt(DT_F16, bm, v, nbytes, n_row, out);
    return decode_row_avx2_dt(DT_F32, bm, v, nbytes, n_row, out);
}


/* ---------------------------------------------------------------------------------------------- AVX-512 path */

/* bf16 values only (the default format): one vpexpandw places a 32-column chunk's kept values (4 bitmap bytes) at
 * their columns, so a chunk costs one expanding load instead of four table shuffles. The expanded words become fp32
 * (bf16 is the high half of fp32) without a shuffle: a left shift of each dword by 16 gives the even columns of the
 * chunk, a mask of its high half the odd ones. The gemv reads x permuted to that order (the chunk's even columns,
 * then its odd ones) once per call (permute_x_avx512), so the inner loop has no cross-lane work beyond the expand
 * and its conversions avoid the shuffle port (unpacks measured ~7 % slower on an Intel Xeon). */

#define CHUNK 32 /* columns per vpexpandw */

/* Columns of x padded to whole chunks (the permuted copy's row length). */
static inline int64_t chunk_cols(int64_t nbytes) { return (nbytes + 3) / 4 * CHUNK; }

/* xq[t * kq + ...] = x[t, :] in the lane order of the unpacks (columns >= ncols are 0). */
static void permute_x_avx512(const float *x, int64_t m, int64_t ldx, int64_t ncols, float *xq, int64_t kq) {
    for (int64_t t = 0; t < m; t++) {
        const float *xt = x + t * ldx;
        float *qt = xq + t * kq;
        for (int64_t c0 = 0; c0 < kq; c0 += CHUNK)
            for (int i = 0; i < CHUNK; i++) {
                const int64_t c = c0 + 2 * (i % 16) + i / 16; /* the chunk's even columns, then its odd ones */
                qt[c0 + i] = c < ncols ? xt[c] : 0.0f;
            }
    }
}

/* The chunk's mask: 4 bitmap bytes from j (fewer at the row's end; missing bytes are 0). */
static inline uint32_t chunk_mask(const uint8_t *bm, int64_t j, int64_t nbytes) {
    uint32_t k = 0;
    if (j + 4 <= nbytes) {
        memcpy(&k, bm + j, 4);
    } else {
        for (int64_t i = 0; j + i < nbytes; i++) k |= (uint32_t)bm[j + i] << (8 * i);
    }
    return k;
}

/* A zero-masked ({z}) vexpandps waits for the previous value of its destination register on AMD Zen 4: the NF4 row
 * kernel's four expands per 64 columns, all given one register by the compiler, ran as a chain. Merging into a zero
 * that the compiler cannot see through (so cannot turn back into {z}) gives each expand a fresh destination, a
 * register copy that renaming eliminates. `salr bench --kernel --quant nf4`, Zen 4: 4096x4096 2.71-2.81 -> 1.92-1.93
 * ms on 1 thread, 1.54-1.55 -> 1.00-1.01 ms on 2 (docs/benchmarks.md, section 15). The bf16 gemv's two expands per 64
 * columns go to two registers; the same change there measured within noise, so it keeps {z}. */
AVX512_INLINE __m512 opaque_zero512(void) {
    __m512 z;
    __asm__("vpxord %0, %0, %0" : "=v"(z));
    return z;
}

AVX512_INLINE __m512 expand_ps(__mmask16 k, __m512 v) { return _mm512_mask_expand_ps(opaque_zero512(), k, v); }

/* The chunk's 32 words: its n kept values (mask k) at their columns, zeros elsewhere. A masked load (which never
 * faults past the row) then the register form of vpexpandw: the memory form is slower on Zen 4 (measured). */
AVX512_INLINE __m512i expand32(uint32_t k, const uint16_t *v, int n) {
    return _mm512_maskz_expand_epi16(k, _mm512_maskz_loadu_epi16(_bzhi_u32(0xffffffffu, (unsigned)n), v));
}

/* The AVX-512 gemvs' accumulators (4 banks of MAX_NT tokens), zeroed. */
AVX512_INLINE void zero_acc512(__m512 acc[4][MAX_NT]) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; u++)
#pragma GCC unroll 8
        for (int t = 0; t < MAX_NT; t++) acc[u][t] = _mm512_setzero_ps();
}

/* y[t * ldy] = the sum of token t's NB accumulator banks, for the AVX-512 gemvs. */
AVX512_INLINE void store_sums512(int NT, int NB, __m512 acc[4][MAX_NT], float *y, int64_t ldy) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) {
        __m512 s = acc[0][t];
#pragma GCC unroll 4
        for (int u = 1; u < NB; u++) s = _mm512_add_ps(s, acc[u][t]);
        y[t * ldy] = _mm512_reduce_add_ps(s);
    }
}

/* The 64 columns of bitmap word `word` (value count wc, first chunk's count c0) as two chunks of expanded bf16
 * words, from the row's values at v; `slack` as gemv_row_block_avx512. */
AVX512_INLINE void expand_word(int slack, uint64_t word, int64_t wc, int c0, const uint16_t *v, __m512i *w0,
                               __m512i *w1) {
    if (slack) {
        const __mmask64 k = _cvtu64_mask64(word);
        *w0 = _mm512_maskz_expand_epi16((__mmask32)k, _mm512_loadu_si512(v));
        *w1 = _mm512_maskz_expand_epi16((__mmask32)_kshiftri_mask64(k, 32), _mm512_loadu_si512(v + c0));
    } else {
        *w0 = expand32((uint32_t)word, v, c0);
        *w1 = expand32((uint32_t)(word >> 32), v + c0, (int)wc - c0);
    }
}

/* NT tokens against one bf16 row, as gemv_row_block_avx2 (validation included) with x in the permuted layout.
 * Without `slack` the expanding loads touch only the values the mask selects, all within the row once the running
 * count is checked, so no read goes past the row's values. With it (>= 32 readable words past the row) a chunk's
 * values are a plain load folded into the expand and its mask comes straight from the bitmap word: no bzhi / kmov
 * pair for a load mask (`salr bench --kernel`, 2 threads, Intel Xeon: 4096x4096 0.72 -> 0.66-0.68 ms, 14336x4096
 * and 1 thread unchanged: docs/benchmarks.md, section 13). */
AVX512_INLINE int64_t gemv_row_block_avx512(int NT, int slack, const uint8_t *bm, const uint16_t *v0, int64_t nbytes,
                                            int64_t n_row, const float *xq, int64_t kq, float *y, int64_t ldy) {
    const int NB = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
    const __m512i odd = _mm512_set1_epi32((int)0xffff0000u); /* a dword's high word: the chunk's odd column */
    __m512 acc[4][MAX_NT];
    zero_acc512(acc);
    int64_t j = 0, cnt = 0;
    for (; j + 8 <= nbytes; j += 8) { /* two chunks per 64-bit word */
        uint64_t word;
        memcpy(&word, bm + j, 8);
        const int64_t wc = __builtin_popcountll(word);
        if (cnt + wc > n_row) return -1;
        PREFETCH(v0 + cnt + PREFETCH_VALUES / 2);
        PREFETCH(v0 + cnt + PREFETCH_VALUES / 2 + 32);
        PREFETCH(bm + j + PREFETCH_BITMAP);
        __m512i w0, w1;
        expand_word(slack, word, wc, __builtin_popcount((uint32_t)word), v0 + cnt, &w0, &w1);
        const __m512 f[4] = {_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)),
                             _mm512_castsi512_ps(_mm512_and_si512(w0, odd)),
                             _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)),
                             _mm512_castsi512_ps(_mm512_and_si512(w1, odd))};
        const float *xc = xq + 8 * j;
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++)
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                acc[u % NB][t] = _mm512_fmadd_ps(f[u], _mm512_loadu_ps(xc + t * kq + 16 * u), acc[u % NB][t]);
        cnt += wc;
    }
    for (; j < nbytes; j += 4) { /* the last 1-7 bytes, a chunk at a time */
        const uint32_t k = chunk_mask(bm, j, nbytes);
        const int kc = __builtin_popcount(k);
        if (cnt + kc > n_row) return -1;
        const __m512i w = expand32(k, v0 + cnt, kc);
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(w, odd));
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            acc[0][t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xq + t * kq + 8 * j), acc[0][t]);
            acc[0][t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xq + t * kq + 8 * j + 16), acc[0][t]);
        }
        cnt += kc;
    }
    store_sums512(NT, NB, acc, y, ldy);
    return cnt;
}

/* As gemv_row_avx2 for bf16 values, x permuted (permute_x_avx512, row stride kq); `slack` as
 * gemv_row_block_avx512. */
AVX512_FN static int64_t gemv_row_avx512(int slack, const uint8_t *bm, const uint16_t *v, int64_t nbytes,
                                         int64_t n_row, const float *xq, int64_t m, int64_t kq, float *y, int64_t ldy) {
#define ROW_BLOCK(NT) \
    (slack ? gemv_row_block_avx512(NT, 1, bm, v, nbytes, n_row, xq, kq, y, ldy) \
           : gemv_row_block_avx512(NT, 0, bm, v, nbytes, n_row, xq, kq, y, ldy))
    ROWS_IN_TOKEN_BLOCKS(xq, kq);
#undef ROW_BLOCK
}

/* As gemv_row_block_avx512 with x as bf16 words in natural column order (row stride kq, zero-padded to whole
 * chunks): each chunk's expanded words meet x in one vdpbf16ps per token, two exact products per fp32 lane summed
 * into the accumulator, instead of two conversions and two FMAs. Used when x is exactly bf16 (bf16 activations) on
 * CPUs with AVX512-BF16; denormal inputs count as zero there (the instruction's rule). On AMD Zen 4 4 and 8 tokens
 * took 1.4-2.5x less time than with the FMAs, 1 token about the same (docs/benchmarks.md, section 15). */
DOT512_INLINE int64_t gemv_row_block_dot512(int NT, int slack, const uint8_t *bm, const uint16_t *v0, int64_t nbytes,
                                            int64_t n_row, const uint16_t *xb, int64_t kq, float *y, int64_t ldy) {
    const int NB = NT == 1 ? 2 : 1; /* one accumulator per chunk for a single token */
    __m512 acc[4][MAX_NT];
    zero_acc512(acc);
    int64_t j = 0, cnt = 0;
    for (; j + 8 <= nbytes; j += 8) {
        uint64_t word;
        memcpy(&word, bm + j, 8);
        const int64_t wc = __builtin_popcountll(word);
        if (cnt + wc > n_row) return -1;
        PREFETCH(v0 + cnt + PREFETCH_VALUES / 2);
        PREFETCH(v0 + cnt + PREFETCH_VALUES / 2 + 32);
        PREFETCH(bm + j + PREFETCH_BITMAP);
        __m512i w[2];
        expand_word(slack, word, wc, __builtin_popcount((uint32_t)word), v0 + cnt, &w[0], &w[1]);
        const uint16_t *xc = xb + 8 * j;
#pragma GCC unroll 2
        for (int u = 0; u < 2; u++)
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                acc[u % NB][t] = _mm512_dpbf16_ps(acc[u % NB][t], (__m512bh)w[u],
                                                  (__m512bh)_mm512_loadu_si512(xc + t * kq + 32 * u));
        cnt += wc;
    }
    for (; j < nbytes; j += 4) { /* the last 1-7 bytes, a chunk at a time */
        const uint32_t k = chunk_mask(bm, j, nbytes);
        const int kc = __builtin_popcount(k);
        if (cnt + kc > n_row) return -1;
        const __m512i w = expand32(k, v0 + cnt, kc);
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++)
            acc[0][t] = _mm512_dpbf16_ps(acc[0][t], (__m512bh)w, (__m512bh)_mm512_loadu_si512(xb + t * kq + 8 * j));
        cnt += kc;
    }
    store_sums512(NT, NB, acc, y, ldy);
    return cnt;
}

/* As gemv_row_avx512 with x as bf16 words (gemv_row_block_dot512). */
DOT512_FN static int64_t gemv_row_dot512(int slack, const uint8_t *bm, const uint16_t *v, int64_t nbytes,
                                         int64_t n_row, const uint16_t *xb, int64_t m, int64_t kq, float *y,
                                         int64_t ldy) {
#define ROW_BLOCK(NT) \
    (slack ? gemv_row_block_dot512(NT, 1, bm, v, nbytes, n_row, xb, kq, y, ldy) \
           : gemv_row_block_dot512(NT, 0, bm, v, nbytes, n_row, xb, kq, y, ldy))
    ROWS_IN_TOKEN_BLOCKS(xb, kq);
#undef ROW_BLOCK
}

/* Whether every value of x [m, ncols] (row stride ldx) is exactly a bf16 (its low 16 bits are 0). */
static int exactly_bf16(const float *x, int64_t m, int64_t ldx, int64_t ncols) {
    for (int64_t t = 0; t < m; t++)
        for (int64_t c = 0; c < ncols; c++) {
            uint32_t bits;
            memcpy(&bits, x + t * ldx + c, 4);
            if (bits & 0xffffu) return 0;
        }
    return 1;
}

/* x for the AVX-512 bf16 gemv, once per call: as bf16 words in natural order (into xb, when `dot` and every value of
 * x is exactly a bf16, which bf16 activations are) or in the unpacks' lane order (into xq). Returns whether xb was
 * filled. Rows are kq long, zero-padded. */
static int wide_x(int dot, const float *x, int64_t m, int64_t ldx, int64_t ncols, int64_t kq, float *xq,
                  uint16_t *xb) {
    if (!dot || !exactly_bf16(x, m, ldx, ncols)) {
        permute_x_avx512(x, m, ldx, ncols, xq, kq);
        return 0;
    }
    for (int64_t t = 0; t < m; t++)
        for (int64_t c = 0; c < kq; c++) {
            uint32_t bits = 0;
            if (c < ncols) memcpy(&bits, x + t * ldx + c, 4);
            xb[t * kq + c] = (uint16_t)(bits >> 16);
        }
    return 1;
}

/* Whether gemv_row_avx512 may read a whole chunk past a row ending at value `row_end` (its `slack`), as avx2_safe. */
static inline int avx512_slack(int64_t row_end, int64_t nnz) { return row_end + CHUNK <= nnz; }

/* One bf16 row as dense fp32 into out[0, nbytes * 8), as decode_row_avx2 (natural column order). */
AVX512_FN static int64_t decode_row_avx512(const uint8_t *bm, const uint16_t *v0, int64_t nbytes, int64_t n_row,
                                           float *out) {
    int64_t cnt = 0;
    for (int64_t j = 0; j < nbytes; j += 4) {
        const uint32_t k = chunk_mask(bm, j, nbytes);
        const int kc = __builtin_popcount(k);
        if (cnt + kc > n_row) return -1;
        const __m512i w = expand32(k, v0 + cnt, kc);
        const __m512i lo = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16);
        const __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16);
        const int64_t left = 8 * (nbytes - j); /* columns of the row from 8j on */
        if (left >= CHUNK) {
            _mm512_storeu_si512(out + 8 * j, lo);
            _mm512_storeu_si512(out + 8 * j + 16, hi);
        } else {
            _mm512_mask_storeu_epi32(out + 8 * j, (__mmask16)(left >= 16 ? 0xffffu : (1u << left) - 1), lo);
            if (left > 16) _mm512_mask_storeu_epi32(out + 8 * j + 16, (__mmask16)((1u << (left - 16)) - 1), hi);
        }
        cnt += kc;
    }
    return cnt;
}

/* One row of 16-bit values (bf16 or fp16) as 16-bit words into out[0, nbytes * 8): the expanded chunk is stored as
 * it is, no conversion. Returns the values consumed or -1, as decode_row_avx512. */
AVX512_FN static int64_t decode16_row_avx512(const uint8_t *bm, const uint16_t *v0, int64_t nbytes, int64_t n_row,
                                             uint16_t *out) {
    int64_t cnt = 0;
    for (int64_t j = 0; j < nbytes; j += 4) {
        const uint32_t k = chunk_mask(bm, j, nbytes);
        const int kc = __builtin_popcount(k);
        if (cnt + kc > n_row) return -1;
        const __m512i w = expand32(k, v0 + cnt, kc);
        const int64_t left = 8 * (nbytes - j); /* columns of the row from 8j on */
        _mm512_mask_storeu_epi16(out + 8 * j, left >= CHUNK ? 0xffffffffu : (1u << left) - 1, w);
        cnt += kc;
    }
    return cnt;
}

#endif /* SALR_X86 */

/* ---------------------------------------------------------------------------------------------- entry points */

/* The AVX2 loads read up to 32 bytes from a row's first value; rows that end that close to the end of `values`
 * take the scalar path (at most the last few rows). */
static inline int avx2_safe(int dt, int64_t row_end, int64_t nnz) { return (row_end + 32 / elem_size(dt)) <= nnz; }

/* Row r's value range [*start, *end) if the offsets are in range (the bitmap is checked by the row kernels). */
static inline int row_range(const int64_t *offs, int64_t r, int64_t rows, int64_t nnz, int64_t *start, int64_t *end) {
    *start = offs[r];
    *end = r + 1 < rows ? offs[r + 1] : nnz;
    return *start >= 0 && *end >= *start && *end <= nnz;
}

/* y[t * ldy + r] = sum_c x[t * ldx + c] * W[r, c] for t < m, r < rows. Returns -1, or a row whose offsets
 * disagree with its bitmap (that row's outputs are left at 0), or -2 when out of memory. Rows go to threads in ROW_CHUNK pieces; pass
 * nthreads = 1 for small layers, where waking a second thread costs more than it saves. */
int64_t salr_bitmap_gemv(int isa, int dt, const uint8_t *bitmask, const void *values, const int64_t *row_offsets,
                         int64_t nnz, int64_t rows, int64_t cols, const float *x, int64_t m, int64_t ldx, float *y,
                         int64_t ldy, int nthreads) {
    const int64_t nbytes = (cols + 7) / 8;
    const uint8_t *vals = (const uint8_t *)values;
    const int esz = elem_size(dt);
    const int bf16_dot = (isa & ISA_BF16_DOT) != 0;
    isa &= ~ISA_BF16_DOT;
    int64_t bad = -1;
    if (nthreads < 1) nthreads = 1;
#if SALR_X86
    /* AVX-512: x once, as bf16 words or in the unpacks' lane order (wide_x; xq holds either) */
    const int wide = isa == ISA_AVX512 && dt == DT_BF16;
    const int64_t kq = chunk_cols(nbytes);
    float *xq = wide ? (float *)malloc(sizeof(float) * (size_t)(m * kq)) : NULL;
    if (wide && !xq) return -2;
    const int dot = wide && wide_x(bf16_dot, x, m, ldx, nbytes * 8, kq, xq, (uint16_t *)xq);
#endif
    const int chunk = gemv_chunk(rows, nthreads);
#pragma omp parallel for schedule(guided, chunk) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *bm = bitmask + r * nbytes;
        int64_t start, end;
        int ok = row_range(row_offsets, r, rows, nnz, &start, &end);
#if SALR_X86
        if (ok && wide) {
            const int slack = avx512_slack(end, nnz);
            const uint16_t *v = (const uint16_t *)vals + start;
            ok = (dot ? gemv_row_dot512(slack, bm, v, nbytes, end - start, (const uint16_t *)xq, m, kq, y + r, ldy)
                      : gemv_row_avx512(slack, bm, v, nbytes, end - start, xq, m, kq, y + r, ldy)) == end - start;
        } else if (ok && isa >= ISA_AVX2 && avx2_safe(dt, end, nnz)) {
            ok = gemv_row_avx2(dt, bm, vals + esz * start, nbytes, end - start, x, m, ldx, y + r, ldy) == end - start;
        } else
#endif
        if (ok && (ok = row_popcount(bm, nbytes) == end - start))
            gemv_row_scalar(dt, bm, vals, start, nbytes, x, m, ldx, y, ldy, r);
        if (!ok) {
            for (int64_t t = 0; t < m; t++) y[t * ldy + r] = 0.0f;
#pragma omp atomic write
            bad = r;
        }
    }
#if SALR_X86
    free(xq);
#endif
    return bad;
}

/* out[(r - r0) * ldo + c] = W[r, c] in fp32 for r0 <= r < r1 and c < nbytes * 8 (columns >= cols are 0; the AVX2
 * path writes whole bytes, so ldo must be >= nbytes * 8). Returns -1 or a bad row (its output row is zeroed). */
int64_t salr_bitmap_decode(int isa, int dt, const uint8_t *bitmask, const void *values, const int64_t *row_offsets,
                           int64_t nnz, int64_t rows, int64_t cols, int64_t r0, int64_t r1, float *out, int64_t ldo,
                           int nthreads) {
    const int64_t nbytes = (cols + 7) / 8;
    const uint8_t *vals = (const uint8_t *)values;
    const int esz = elem_size(dt);
    int64_t bad = -1;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(dynamic, ROW_CHUNK) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *bm = bitmask + r * nbytes;
        float *o = out + (r - r0) * ldo;
        int64_t start, end;
        int ok = row_range(row_offsets, r, rows, nnz, &start, &end);
#if SALR_X86
        if (ok && isa == ISA_AVX512 && dt == DT_BF16) {
            ok = decode_row_avx512(bm, (const uint16_t *)vals + start, nbytes, end - start, o) == end - start;
        } else if (ok && isa >= ISA_AVX2 && avx2_safe(dt, end, nnz)) {
            ok = decode_row_avx2(dt, bm, vals + esz * start, nbytes, end - start, o) == end - start;
        } else
#endif
        if (ok && (ok = row_popcount(bm, nbytes) == end - start))
            decode_row_scalar(dt, bm, vals, start, nbytes, nbytes * 8, o);
        if (!ok) {
            memset(o, 0, sizeof(float) * nbytes * 8);
#pragma omp atomic write
            bad = r;
        }
    }
    return bad;
}

/* Rows [r0, r1) of a weight with 16-bit values (bf16 or fp16) as 16-bit words of the same type: out[(r - r0) * ldo
 * + c] = W[r, c] bit for bit, columns >= cols are 0 (ldo >= nbytes * 8). The many-token path multiplies such tiles
 * with torch's bf16/fp16 matmul where the CPU has one (salr_cpu_has_bf16_matmul). Returns -1 or a bad row (its
 * output row is zeroed), as salr_bitmap_decode. */
int64_t salr_bitmap_decode16(int isa, const uint8_t *bitmask, const uint16_t *values, const int64_t *row_offsets,
                             int64_t nnz, int64_t rows, int64_t cols, int64_t r0, int64_t r1, uint16_t *out,
                             int64_t ldo, int nthreads) {
    const int64_t nbytes = (cols + 7) / 8;
    int64_t bad = -1;
    if (nthreads < 1) nthreads = 1;
    (void)isa;
#pragma omp parallel for schedule(dynamic, ROW_CHUNK) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *bm = bitmask + r * nbytes;
        uint16_t *o = out + (r - r0) * ldo;
        int64_t start, end;
        int ok = row_range(row_offsets, r, rows, nnz, &start, &end);
#if SALR_X86
        if (ok && isa == ISA_AVX512) {
            ok = decode16_row_avx512(bm, values + start, nbytes, end - start, o) == end - start;
        } else
#endif
        if (ok && (ok = row_popcount(bm, nbytes) == end - start)) {
            memset(o, 0, sizeof(uint16_t) * nbytes * 8);
            int64_t v = start;
            for (int64_t j = 0; j < nbytes; j++)
                for (unsigned b = bm[j]; b; b &= b - 1) o[8 * j + __builtin_ctz(b)] = values[v++];
        }
        if (!ok) {
            memset(o, 0, sizeof(uint16_t) * nbytes * 8);
#pragma omp atomic write
            bad = r;
        }
    }
    return bad;
}

/* ---------------------------------------------------------------------------------------------- quantized values */

/* QSALR: the kept values are a flat stream of n codes with one fp32 scale (absmax) per block of `blocksize`
 * consecutive values (blocks ignore rows; blocksize is a multiple of 8):
 *   NF4   codes uint8 [ceil(n/2)], value 2j in the HIGH nibble of byte j; value = NF4[code] * absmax (fp32)
 *   INT8  codes int8 [n];                                                    value = (code * absmax) * fp32(1/127)
 * exactly the fp32 arithmetic of salr.bitmap_format.dequantize_values (and bitsandbytes' NF4 dequantization).
 *
 * The few-token GEMV never builds W. For each row it packs the tokens' x at the row's set bits into a small
 * per-thread buffer in value order (one vpermps with a left-pack table per bitmap byte), then walks the row's
 * values in groups of 8 aligned to the global stream: a group never crosses a scale block, its 8 NF4 codes are one
 * 32-bit load, and they are expanded in registers (broadcast, per-lane shift, two 8-lane permutes of the block's
 * pre-scaled codebook halves, a blend on bit 3) and FMA-ed against the packed x. Lanes of a group outside the row
 * meet zeros in the packed x. Rows are validated on the fly like the unquantized kernel. */

#define Q_NF4 0
#define Q_INT8 1
#define QCHUNK 64                   /* bitmap bytes (512 columns) packed before the packed values are multiplied */
#define QBUF (8 * QCHUNK + 16)      /* floats per token of packed x: chunk + carried partial group + store overrun */

static const float NF4_TABLE[16] __attribute__((aligned(32))) = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};
static const float INV127 = 7.874015718698502e-3f;

typedef struct {
    int kind;
    const uint8_t *codes;
    const float *absmax;
    int64_t nnz;
    int64_t blocksize;
    int bshift; /* log2(blocksize) */
} qstream;

static inline float qvalue(const qstream *q, int64_t i) {
    const float s = q->absmax[i >> q->bshift];
    if (q->kind == Q_NF4) {
        const uint8_t byte = q->codes[i >> 1];
        return NF4_TABLE[(i & 1) ? (byte & 15) : (byte >> 4)] * s;
    }
    return ((float)(int8_t)q->codes[i] * s) * INV127;
}

static void qgemv_row_scalar(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes, const float *x,
                             int64_t m, int64_t ldx, float *y, int64_t ldy) {
    for (int64_t t0 = 0; t0 < m; t0 += MAX_NT) {
        int64_t nt = m - t0 < MAX_NT ? m - t0 : MAX_NT;
        float acc[MAX_NT] = {0};
        int64_t v = start;
        for (int64_t j = 0; j < nbytes; j++) {
            unsigned b = bm[j];
            while (b) {
                int i = __builtin_ctz(b);
                float w = qvalue(q, v++);
                for (int64_t t = 0; t < nt; t++) acc[t] += w * x[(t0 + t) * ldx + 8 * j + i];
                b &= b - 1;
            }
        }
        for (int64_t t = 0; t < nt; t++) y[(t0 + t) * ldy] = acc[t];
    }
}

static void qdecode_row_scalar(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes, float *out) {
    memset(out, 0, sizeof(float) * nbytes * 8);
    int64_t v = start;
    for (int64_t j = 0; j < nbytes; j++) {
        unsigned b = bm[j];
        while (b) {
            int i = __builtin_ctz(b);
            out[8 * j + i] = qvalue(q, v++);
            b &= b - 1;
        }
    }
}

#if SALR_X86
/* The 8 values of the group starting at global index g (a multiple of 8). NF4: lo/hi are the block's codebook
 * halves already multiplied by its absmax; INT8: lo is the block's absmax broadcast. A group at the end of the
 * stream reads only the bytes that exist (its missing values decode as 0). */
AVX2_INLINE __m256 qgroup(int kind, const uint8_t *codes, int64_t g, int64_t nnz, __m256 lo, __m256 hi) {
    if (kind == Q_NF4) {
        __m256i word;
        if (__builtin_expect(g + 8 <= nnz, 1)) {
            word = _mm256_castps_si256(_mm256_broadcast_ss((const float *)(codes + (g >> 1)))); /* one load */
        } else { /* the stream's last bytes; a byte loop, not a memcpy call (a call would spill the accumulators) */
            uint32_t w = 0x77777777u;
            for (int64_t i = 0; i < ((nnz - g + 1) >> 1); i++)
                w = (w & ~(0xffu << (8 * i))) | ((uint32_t)codes[(g >> 1) + i] << (8 * i));
            word = _mm256_set1_epi32((int)w);
        }
        const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24); /* lane i: nibble i, high first */
        __m256i idx = _mm256_srlv_epi32(word, shifts);                          /* vpermps reads the low 3 bits */
        __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
        return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); /* bit 3 -> sign */
    }
    uint64_t w = 0;
    if (__builtin_expect(g + 8 <= nnz, 1)) memcpy(&w, codes + g, 8);
    else
        for (int64_t i = 0; i < nnz - g; i++) w |= (uint64_t)codes[g + i] << (8 * i);
    __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128((int64_t)w)));
    return _mm256_mul_ps(_mm256_mul_ps(c, lo), _mm256_set1_ps(INV127));
}

/* lo/hi for the block of global index g (see qgroup). */
AVX2_INLINE void qblock(int kind, const qstream *q, int64_t g, __m256 *lo, __m256 *hi) {
    const __m256 s = _mm256_set1_ps(q->absmax[g >> q->bshift]);
    if (kind == Q_NF4) {
        *lo = _mm256_mul_ps(_mm256_load_ps(NF4_TABLE), s);
        *hi = _mm256_mul_ps(_mm256_load_ps(NF4_TABLE + 8), s);
    } else {
        *lo = s;
        *hi = s;
    }
}

/* Pack x at the set bits of bitmap bytes [j0, j1) for NT tokens: buf[t * QBUF + fill + k] = x[t, k-th set column].
 * Returns the values packed, or -1 once the bitmap asks for more than `room` values (the row's remaining count). */
AVX2_INLINE int64_t qpack(int NT, const uint8_t *bm, int64_t j0, int64_t j1, int64_t room, const float *x,
                          int64_t ldx, float *buf, int64_t fill) {
    int64_t j = j0, cnt = 0;
    for (; j + 8 <= j1; j += 8) {
        uint64_t word;
        memcpy(&word, bm + j, 8);
        const int64_t wc = __builtin_popcountll(word);
        if (cnt + wc > room) return -1;
        float *dst = buf + fill + cnt;
#pragma GCC unroll 8
        for (int u = 0; u < 8; u++) {
            const int64_t off = u ? __builtin_popcountll(word << (64 - 8 * u)) : 0;
            const __m256i perm = _mm256_load_si256((const __m256i *)LEFTPACK[bm[j + u]]);
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                _mm256_storeu_ps(dst + t * QBUF + off,
                                 _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + t * ldx + 8 * (j + u)), perm));
        }
        cnt += wc;
    }
    for (; j < j1; j++) {
        const unsigned b = bm[j];
        if (cnt + POPCNT8[b] > room) return -1;
        const __m256i perm = _mm256_load_si256((const __m256i *)LEFTPACK[b]);
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++)
            _mm256_storeu_ps(buf + t * QBUF + fill + cnt,
                             _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + t * ldx + 8 * j), perm));
        cnt += POPCNT8[b];
    }
    return cnt;
}

/* NT tokens against one row whose values are [start, start + n_row) of the stream; buf holds NT * QBUF floats.
 * Returns the values consumed (== n_row for a consistent row) or -1 (the bitmap asks for more values). */
AVX2_INLINE int64_t qgemv_row_block_avx2(int kind, int NT, const qstream *q, const uint8_t *bm, int64_t start,
                                         int64_t nbytes, int64_t n_row, const float *x, int64_t ldx, float *y,
                                         int64_t ldy, float *buf) {
    const int NB = NT == 1 ? 4 : (NT == 2 ? 2 : 1); /* accumulator banks per token hide the FMA latency */
    __m256 acc[4][MAX_NT];
#pragma GCC unroll 4
    for (int u = 0; u < 4; u++)
#pragma GCC unroll 8
        for (int t = 0; t < MAX_NT; t++) acc[u][t] = _mm256_setzero_ps();
    int64_t g = start & ~(int64_t)7; /* global index of buf[t * QBUF] */
    int64_t fill = start - g;       /* packed entries (the lanes before `start` hold zeros) */
    int64_t cnt = 0, blk = -1;
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(buf + t * QBUF, _mm256_setzero_ps());
    for (int64_t j = 0; j < nbytes; j += QCHUNK) {
        /* a chunk reads one bitmap line and up to 4 lines of NF4 codes (8 of int8): fetch those of a later chunk */
        PREFETCH(bm + j + PREFETCH_BITMAP);
        const uint8_t *ahead = q->codes + (kind == Q_NF4 ? (g >> 1) : g) + PREFETCH_VALUES;
        for (int i = 0; i < (kind == Q_NF4 ? 4 : 8); i++) PREFETCH(ahead + 64 * i);
        PREFETCH(q->absmax + (g >> q->bshift) + PREFETCH_VALUES / 32);
        const int64_t got = qpack(NT, bm, j, j + QCHUNK < nbytes ? j + QCHUNK : nbytes, n_row - cnt, x, ldx, buf,
                                  fill);
        if (got < 0) return -1;
        cnt += got;
        fill += got;
        const int64_t ng = fill >> 3;
        int64_t k = 0;
        for (; k + NB <= ng; k += NB) {
#pragma GCC unroll 4
            for (int u = 0; u < NB; u++) {
                const int64_t gk = g + 8 * (k + u);
                if ((gk >> q->bshift) != blk) {
                    blk = (gk >> q->bshift);
                    qblock(kind, q, gk, &lo, &hi);
                }
                const __m256 w = qgroup(kind, q->codes, gk, q->nnz, lo, hi);
#pragma GCC unroll 8
                for (int t = 0; t < NT; t++)
                    acc[u][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(buf + t * QBUF + 8 * (k + u)), acc[u][t]);
            }
        }
        for (; k < ng; k++) {
            const int64_t gk = g + 8 * k;
            if ((gk >> q->bshift) != blk) {
                blk = (gk >> q->bshift);
                qblock(kind, q, gk, &lo, &hi);
            }
            const __m256 w = qgroup(kind, q->codes, gk, q->nnz, lo, hi);
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(buf + t * QBUF + 8 * k), acc[0][t]);
        }
        if (ng) /* carry the partial group to the front */
            for (int t = 0; t < NT; t++) _mm256_storeu_ps(buf + t * QBUF, _mm256_loadu_ps(buf + t * QBUF + 8 * ng));
        g += 8 * ng;
        fill &= 7;
    }
    if (cnt != n_row) return cnt;
    if (fill) { /* the row's last, partial group: lanes past the row meet zeros */
        if ((g >> q->bshift) != blk) qblock(kind, q, g, &lo, &hi);
        const __m256 w = qgroup(kind, q->codes, g, q->nnz, lo, hi);
        const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256((const __m256i *)MASK_F32[(1u << fill) - 1]));
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++)
            acc[0][t] = _mm256_fmadd_ps(w, _mm256_and_ps(_mm256_loadu_ps(buf + t * QBUF), keep), acc[0][t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) {
        __m256 s = acc[0][t];
#pragma GCC unroll 4
        for (int u = 1; u < NB; u++) s = _mm256_add_ps(s, acc[u][t]);
        y[t * ldy] = hsum8(s);
    }
    return cnt;
}

AVX2_INLINE int64_t qgemv_row_avx2_kind(int kind, const qstream *q, const uint8_t *bm, int64_t start,
                                        int64_t nbytes, int64_t n_row, const float *x, int64_t m, int64_t ldx,
                                        float *y, int64_t ldy, float *buf) {
#define ROW_BLOCK(NT) qgemv_row_block_avx2(kind, NT, q, bm, start, nbytes, n_row, x, ldx, y, ldy, buf)
    ROWS_IN_TOKEN_BLOCKS(x, ldx);
#undef ROW_BLOCK
}

AVX2_FN static int64_t qgemv_row_avx2(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes,
                                      int64_t n_row, const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy,
                                      float *buf) {
    if (q->kind == Q_NF4) return qgemv_row_avx2_kind(Q_NF4, q, bm, start, nbytes, n_row, x, m, ldx, y, ldy, buf);
    return qgemv_row_avx2_kind(Q_INT8, q, bm, start, nbytes, n_row, x, m, ldx, y, ldy, buf);
}

/* Row decode for the large-M path: the row's values in groups into vbuf (>= n_row + 16 floats), then each bitmap
 * byte expands them like fp32 values. Returns the values consumed or -1. */
AVX2_INLINE int64_t qdecode_row_avx2_kind(int kind, const qstream *q, const uint8_t *bm, int64_t start,
                                          int64_t nbytes, int64_t n_row, float *out, float *vbuf) {
    const int64_t g0 = start & ~(int64_t)7;
    int64_t blk = -1;
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (int64_t g = g0; g < start + n_row; g += 8) {
        if ((g >> q->bshift) != blk) {
            blk = (g >> q->bshift);
            qblock(kind, q, g, &lo, &hi);
        }
        _mm256_storeu_ps(vbuf + (g - g0), qgroup(kind, q->codes, g, q->nnz, lo, hi));
    }
    const float *v0 = vbuf + (start - g0);
    int64_t j = 0, cnt = 0;
    for (; j + 8 <= nbytes; j += 8) {
        uint64_t word;
        memcpy(&word, bm + j, 8);
        const int64_t wc = __builtin_popcountll(word);
        if (cnt + wc > n_row) return -1;
#pragma GCC unroll 8
        for (int u = 0; u < 8; u++) {
            const float *vu = v0 + cnt + (u ? __builtin_popcountll(word << (64 - 8 * u)) : 0);
            _mm256_storeu_ps(out + 8 * (j + u), expand8(DT_F32, (const uint8_t *)vu, (unsigned)(word >> (8 * u)) & 0xff));
        }
        cnt += wc;
    }
    for (; j < nbytes; j++) {
        const unsigned b = bm[j];
        if (cnt + POPCNT8[b] > n_row) return -1;
        _mm256_storeu_ps(out + 8 * j, expand8(DT_F32, (const uint8_t *)(v0 + cnt), b));
        cnt += POPCNT8[b];
    }
    return cnt;
}

AVX2_FN static int64_t qdecode_row_avx2(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes,
                                        int64_t n_row, float *out, float *vbuf) {
    if (q->kind == Q_NF4) return qdecode_row_avx2_kind(Q_NF4, q, bm, start, nbytes, n_row, out, vbuf);
    return qdecode_row_avx2_kind(Q_INT8, q, bm, start, nbytes, n_row, out, vbuf);
}


/* NF4 on AVX-512 with blocks of 16 or 32 values (the few-token GEMV; blocks of >= 64 values, QLoRA's and the default,
 * take the buffer-free kernels below, as does int8; smaller int8 blocks, NF4 blocks below 16 and the large-M fp32
 * decode keep the AVX2 code). The
 * whole 16-entry codebook, scaled by the block's absmax, fits one register, so a row is first decoded into fp32 in a
 * per-thread buffer, 16 values per vpermps in stream order (a group of 16 never crosses a scale block). Then each
 * 16 columns take one vexpandps of the buffer's next values, which puts the kept values at their columns against x
 * in its natural order: no packing of x, and the decode is shared by the tokens. `salr bench --kernel --quant nf4`,
 * 1 thread, on an Intel Xeon: 1.76x less time than the AVX2 NF4 path on 4096x4096 (1.87 vs 3.29 ms;
 * docs/benchmarks.md, section 9). On an AMD Zen 4 it ran no faster than the AVX2 path until its expands stopped
 * chaining through one register (`expand_ps`; section 15). */

/* vpmultishiftqb's selectors: the low byte of dword lane i = 8 bits of a 64-bit code word from bit
 * 8 * (i / 2) + 4 * (1 - i % 2), so its low 4 bits are value i's code (high nibble first); vpermps reads only those. */
AVX512_INLINE __m512i nf4_selectors(void) {
#define NF4_AT(q) ((int64_t)(8 * (q) + 4) | ((int64_t)(8 * (q)) << 32)) /* qword q: lanes 2q (high) and 2q + 1 */
    return _mm512_set_epi64(NF4_AT(7), NF4_AT(6), NF4_AT(5), NF4_AT(4), NF4_AT(3), NF4_AT(2), NF4_AT(1), NF4_AT(0));
#undef NF4_AT
}

/* 16 values from a code word broadcast to every qword, looked up in the block's scaled codebook. */
AVX512_INLINE __m512 nf4_lookup16(__m512i word, __m512 book) {
    return _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(nf4_selectors(), word), book);
}

/* The 16 values of the group starting at global index g (a multiple of 16) from the block's scaled codebook; a group
 * at the end of the stream reads only the code bytes that exist. */
AVX512_INLINE __m512 nf4_group16(const uint8_t *codes, int64_t g, int64_t nnz, __m512 book) {
    __m512i word;
    if (__builtin_expect(g + 16 <= nnz, 1)) {
        int64_t w;
        memcpy(&w, codes + (g >> 1), 8);
        word = _mm512_set1_epi64(w); /* a broadcast load */
    } else {
        uint64_t w = 0;
        for (int64_t i = 0; i < ((nnz - g + 1) >> 1); i++) w |= (uint64_t)codes[(g >> 1) + i] << (8 * i);
        word = _mm512_set1_epi64((int64_t)w);
    }
    return nf4_lookup16(word, book);
}

/* The row's values [start, start + n_row) as fp32 into vbuf[start - g0 ...], g0 = start rounded down to 16. */
AVX512_INLINE void nf4_decode_row_avx512(const qstream *q, int64_t start, int64_t n_row, float *vbuf) {
    const int64_t g0 = start & ~(int64_t)15;
    const __m512 table = _mm512_loadu_ps(NF4_TABLE);
    const int64_t gend = start + n_row;
    int64_t blk = -1, g = g0;
    __m512 book = table;
    if (q->bshift >= 6) { /* a 64-aligned chunk of 64 values lies in one block: one scale and one prefetch per chunk */
        for (; g < gend && (g & 63); g += 16) {
            book = _mm512_mul_ps(table, _mm512_set1_ps(q->absmax[g >> q->bshift]));
            _mm512_storeu_ps(vbuf + (g - g0), nf4_group16(q->codes, g, q->nnz, book));
        }
        for (; g + 64 <= gend && g + 64 <= q->nnz; g += 64) { /* measured ~10 % less time than group by group */
            book = _mm512_mul_ps(table, _mm512_set1_ps(q->absmax[g >> q->bshift]));
            PREFETCH(q->codes + (g >> 1) + PREFETCH_VALUES);
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                int64_t word;
                memcpy(&word, q->codes + (g >> 1) + 8 * u, 8);
                _mm512_storeu_ps(vbuf + (g - g0) + 16 * u, nf4_lookup16(_mm512_set1_epi64(word), book));
            }
        }
    }
    for (; g < gend; g += 16) { /* blocks of 32, the row's last groups and the stream's end */
        if ((g >> q->bshift) != blk) {
            blk = g >> q->bshift;
            book = _mm512_mul_ps(table, _mm512_set1_ps(q->absmax[blk]));
            PREFETCH(q->absmax + blk + 16);
        }
        PREFETCH(q->codes + (g >> 1) + PREFETCH_VALUES);
        _mm512_storeu_ps(vbuf + (g - g0), nf4_group16(q->codes, g, q->nnz, book));
    }
}

/* NT tokens against a row decoded into v (its n_row values), x in natural column order (nbytes * 8 columns, zero
 * padded). Each expand loads 16 floats from v at the running count, which is checked to stay within the row first;
 * the load may run up to 16 floats past the row's values, inside the buffer (sized for it), and the expand's mask
 * drops them. Returns the values consumed (== n_row for a consistent row) or -1. */
AVX512_INLINE int64_t qgemv_row_block_avx512(int NT, const uint8_t *bm, const float *v, int64_t nbytes, int64_t n_row,
                                             const float *x, int64_t ldx, float *y, int64_t ldy) {
    const int NB = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
    __m512 acc[4][MAX_NT];
    zero_acc512(acc);
    int64_t j = 0, cnt = 0;
    for (; j + 8 <= nbytes; j += 8) { /* 64 columns: four expanding loads of 16 */
        uint64_t word;
        memcpy(&word, bm + j, 8);
        const int64_t wc = __builtin_popcountll(word);
        if (cnt + wc > n_row) return -1;
        PREFETCH(bm + j + PREFETCH_BITMAP);
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            const int64_t off = u ? __builtin_popcountll(word << (64 - 16 * u)) : 0;
            const __mmask16 k = _load_mask16((__mmask16 *)(bm + j + 2 * u)); /* kmovw from memory: no shuffle port */
            const __m512 w = expand_ps(k, _mm512_loadu_ps(v + cnt + off));
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                acc[u % NB][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * ldx + 8 * j + 16 * u), acc[u % NB][t]);
        }
        cnt += wc;
    }
    for (; j < nbytes; j++) { /* the last 1-7 bytes, 8 columns at a time */
        const unsigned b = bm[j];
        if (cnt + POPCNT8[b] > n_row) return -1;
        const __m512 w = _mm512_maskz_expandloadu_ps((__mmask16)b, v + cnt);
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++)
            acc[0][t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(0xff, x + t * ldx + 8 * j), acc[0][t]);
        cnt += POPCNT8[b];
    }
    store_sums512(NT, NB, acc, y, ldy);
    return cnt;
}

/* As qgemv_row_avx2 for NF4 codes (blocksize >= 16); vbuf holds >= nbytes * 8 + 32 floats. */
AVX512_FN static int64_t qgemv_row_avx512(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes,
                                          int64_t n_row, const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy,
                                          float *vbuf) {
    nf4_decode_row_avx512(q, start, n_row, vbuf);
    const float *v = vbuf + (start & 15);
#define ROW_BLOCK(NT) qgemv_row_block_avx512(NT, bm, v, nbytes, n_row, x, ldx, y, ldy)
    ROWS_IN_TOKEN_BLOCKS(x, ldx);
#undef ROW_BLOCK
}

/* NF4 with scale blocks of >= 64 values: rows without a decode buffer. Each 64 columns (one bitmap word) take their
 * kept codes as bytes (a vpermb and a vpmultishiftqb unpack the nibbles, whatever the parity of the word's first
 * value), and one vpexpandb puts them at their columns, with code 7 (NF4's exact 0.0) at the pruned ones. A word
 * needs two codebooks scaled by their blocks' absmax, its first value's block and the next one: blocks hold >= 64
 * values, so a word crosses at most one boundary, and its codes past it carry bit 4, which picks the second book.
 *   fp32 (nf4_gemv_row_block512): each 16 columns look their values up with one vpermt2ps in the two books, which
 *     reads the low 5 bits of each dword, so lookup u takes byte u of every dword (column 4i + u of lane i) with no
 *     zero-extension, and x comes permuted to match (nf4_permute_x). Same fp32 weights as the format's dequantization.
 *   bf16 (nf4_gemv_row_block_dot512, an exactly-bf16 x on CPUs with AVX512-BF16): the books rounded to bf16 fill one
 *     register of 32 words, one vpermw looks up the word's even columns and one its odd ones, and a vdpbf16ps per
 *     token multiplies each against x (nf4_permute_x_bf16). Each weight is then its fp32 dequantization rounded to
 *     bf16, as bitsandbytes dequantizes for a bf16 compute dtype and as this module's bf16 tiles hold it.
 * The buffered kernel above decodes each row's values into memory and reads them back with one vexpandps per 16
 * columns: 18 cycles per 64 columns on Zen 4, against 14-15 (fp32) and 11.4 (bf16) here, timed on cache-resident rows;
 * `salr bench --kernel --quant nf4` at M = 1 then reads 1.95-2.47x (fp32) and 2.44-3.81x (bf16) dense bf16, from
 * 1.62-2.05x (docs/benchmarks.md, section 16). */

/* Columns per row of x as the buffer-free kernels take it (q_x): whole 64-column groups. */
static inline int64_t qx_cols(int64_t nbytes) { return (nbytes + 7) / 8 * 64; }

/* xn[t * kn + 64 g + 16 u + i] = x[t, 64 g + 4 i + u] (columns >= ncols are 0): the lanes of the fp32 lookups. */
static void nf4_permute_x(const float *x, int64_t m, int64_t ldx, int64_t ncols, float *xn, int64_t kn) {
    for (int64_t t = 0; t < m; t++)
        for (int64_t c0 = 0; c0 < kn; c0 += 64)
            for (int i = 0; i < 64; i++) {
                const int64_t c = c0 + 4 * (i % 16) + i / 16;
                xn[t * kn + c0 + i] = c < ncols ? x[t * ldx + c] : 0.0f;
            }
}

/* xb[t * kn + 64 g + i] = x[t, 64 g + 2 i] and xb[t * kn + 64 g + 32 + i] = x[t, 64 g + 2 i + 1], as bf16 words (x
 * exactly bf16; columns >= ncols are 0): the lanes of the two bf16 lookups. */
static void nf4_permute_x_bf16(const float *x, int64_t m, int64_t ldx, int64_t ncols, uint16_t *xb, int64_t kn) {
    for (int64_t t = 0; t < m; t++)
        for (int64_t c0 = 0; c0 < kn; c0 += 64)
            for (int i = 0; i < 64; i++) {
                const int64_t c = c0 + 2 * (i % 32) + i / 32;
                uint32_t bits = 0;
                if (c < ncols) memcpy(&bits, x + t * ldx + c, 4);
                xb[t * kn + c0 + i] = (uint16_t)(bits >> 16);
            }
}

/* One quantized row's walk, shared by the buffer-free kernels: where it starts and what each word needs. Value g's
 * code is byte g >> vshift (NF4: two codes per byte, vshift 1; INT8: 0). */
typedef struct {
    const uint8_t *codes;
    const float *absmax;
    int bshift, vshift;
    int64_t code_bytes, last_blk, end, g; /* g: the global index of the next word's first value */
} qwalk;

AVX512_INLINE qwalk qwalk_start(const qstream *q, int vshift, int64_t start, int64_t n_row) {
    const qwalk w = {q->codes,       q->absmax, q->bshift, vshift, (q->nnz + vshift) >> vshift,
                     (q->nnz - 1) >> q->bshift, start + n_row, start};
    return w;
}

/* Whether full 64-byte code loads from any of the row's words, and the block after any word's, stay inside their
 * arrays (all rows but the stream's last few): the walk then needs no masked loads and no clamps. */
static inline int qwalk_slack(const qstream *q, int vshift, int64_t start, int64_t n_row) {
    const int64_t end = start + n_row;
    return (end >> vshift) + 64 <= ((q->nnz + vshift) >> vshift) &&
           (end >> q->bshift) + 1 <= (q->nnz - 1) >> q->bshift;
}

/* The bitmap word at byte j (fewer bytes at the row's end; the missing ones are 0). */
AVX512_INLINE uint64_t bitmap_word64(const uint8_t *bm, int64_t j, int64_t nbytes) {
    uint64_t word = 0;
    if (__builtin_expect(j + 8 <= nbytes, 1)) memcpy(&word, bm + j, 8);
    else
        for (int64_t i = 0; j + i < nbytes; i++) word |= (uint64_t)bm[j + i] << (8 * i);
    return word;
}

/* The scale blocks of the word at w->g: its own (*blk) and the next (*blk_next; both clamped to the stream's last
 * block unless `slack`). */
AVX512_INLINE void qwalk_blocks(int slack, const qwalk *w, int64_t *blk, int64_t *blk_next) {
    *blk = w->g >> w->bshift;
    *blk_next = *blk + 1;
    if (!slack) {
        *blk = *blk < w->last_blk ? *blk : w->last_blk;
        *blk_next = *blk_next < w->last_blk ? *blk_next : w->last_blk;
    }
}

/* The row's next bitmap word (byte j) and its scale blocks (qwalk_blocks), its streams prefetched; *wc = its kept
 * values. Returns 0 when they would run past the row's values (a corrupt row). */
AVX512_INLINE int qwalk_next_word(int slack, const qwalk *w, const uint8_t *bm, int64_t j, int64_t nbytes,
                                uint64_t *word, int64_t *wc, int64_t *blk, int64_t *blk_next) {
    *word = bitmap_word64(bm, j, nbytes);
    *wc = __builtin_popcountll(*word);
    if (w->g + *wc > w->end) return 0;
    PREFETCH(w->codes + (w->g >> w->vshift) + PREFETCH_VALUES / 2);
    PREFETCH(bm + j + PREFETCH_BITMAP);
    qwalk_blocks(slack, w, blk, blk_next);
    return 1;
}

/* Where the word at w->g (its first value in block blk) crosses into the next block: the index of its first value
 * there (>= the word's count when it does not cross). */
AVX512_INLINE int64_t qwalk_boundary(const qwalk *w, int64_t blk) { return ((blk + 1) << w->bshift) - w->g; }

/* The 64 code bytes from the one of the word's first value on; a masked load at the stream's end unless `slack`. */
AVX512_INLINE __m512i qwalk_code_bytes(int slack, const qwalk *w) {
    const uint8_t *p = w->codes + (w->g >> w->vshift);
    const int64_t avail = w->code_bytes - (w->g >> w->vshift);
    return slack ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, avail < 64 ? avail : 64), p);
}

/* The codes of the word at w->g (its first value in block blk) at their columns: byte c = the code of column c (bits
 * 0-3), plus 16 when that value lies in the next block; 7 at pruned columns. */
AVX512_INLINE __m512i nf4_word_codes(int slack, const qwalk *w, uint64_t word, int64_t blk) {
    static const int64_t SELECTORS[2] = {0x181c1014080c0004ll, 0x24181c1014080c00ll}; /* first value even, odd */
    const int64_t g = w->g, r = qwalk_boundary(w, blk);
    __m512i c = qwalk_code_bytes(slack, w);
    /* qword q <- code bytes 4q .. 4q + 7; then byte k <- nibble k + odd of it: value 2j is the high nibble of byte j,
     * so value n sits at bit 8 * (n / 2) + 4 when n is even and at 8 * (n / 2) when odd */
    const __m512i spread = _mm512_set_epi64(0x232221201f1e1d1cll, 0x1f1e1d1c1b1a1918ll,
                                            0x1b1a191817161514ll, 0x1716151413121110ll, 0x131211100f0e0d0cll,
                                            0x0f0e0d0c0b0a0908ll, 0x0b0a090807060504ll, 0x0706050403020100ll);
    c = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(SELECTORS[g & 1]), _mm512_permutexvar_epi8(spread, c));
    c = _mm512_and_si512(c, _mm512_set1_epi8(15));
    c = _mm512_mask_add_epi8(c, r < 64 ? ~0ull << r : 0, c, _mm512_set1_epi8(16));
    return _mm512_mask_expand_epi8(_mm512_set1_epi8(7), word, c);
}

/* The codebook scaled by block blk's absmax (words 0-15) and by block blk_next's (16-31), rounded to bf16 (nearest
 * even): one register for vpermw, the bit-4 flag of nf4_word_codes picking the half. */
DOT512_INLINE __m512i nf4_books16(__m512 table, const qwalk *w, int64_t blk, int64_t blk_next) {
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(table, _mm512_set1_ps(w->absmax[blk_next])),
                                        _mm512_mul_ps(table, _mm512_set1_ps(w->absmax[blk])));
}

/* NT tokens against one row (values [start, start + n_row) of the stream), x permuted (xn, row stride kq); `slack`
 * from qwalk_slack. Returns the values consumed (== n_row for a consistent row) or -1. */
AVX512_INLINE int64_t nf4_gemv_row_block512(int NT, int slack, const qstream *q, const uint8_t *bm, int64_t start,
                                            int64_t nbytes, int64_t n_row, const float *xn, int64_t kq, float *y,
                                            int64_t ldy) {
    const int NB = NT == 1 ? 4 : (NT <= 4 ? 2 : 1); /* accumulator banks: the 4 lookups of a word feed them */
    __m512 acc[4][MAX_NT];
    zero_acc512(acc);
    const __m512 table = _mm512_loadu_ps(NF4_TABLE);
    qwalk w = qwalk_start(q, 1, start, n_row); /* NF4: two codes per byte */
    for (int64_t j = 0; j < nbytes; j += 8) {
        uint64_t word;
        int64_t wc, blk, blk_next;
        if (!qwalk_next_word(slack, &w, bm, j, nbytes, &word, &wc, &blk, &blk_next)) return -1;
        /* the books from the scales each word: fewer instructions than carrying them, and faster than loading books
         * scaled once per row (measured) */
        const __m512 book = _mm512_mul_ps(table, _mm512_set1_ps(w.absmax[blk]));
        const __m512 book_next = _mm512_mul_ps(table, _mm512_set1_ps(w.absmax[blk_next]));
        const __m512i e = nf4_word_codes(slack, &w, word, blk);
        const float *xw = xn + 8 * j;
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            const __m512 v = _mm512_permutex2var_ps(book, u ? _mm512_srli_epi32(e, 8 * u) : e, book_next);
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                acc[u % NB][t] = _mm512_fmadd_ps(v, _mm512_load_ps(xw + t * kq + 16 * u), acc[u % NB][t]);
        }
        w.g += wc;
    }
    store_sums512(NT, NB, acc, y, ldy);
    return w.g - start;
}

/* As nf4_gemv_row_block512 for an exactly-bf16 x as words (xb, nf4_permute_x_bf16), with vdpbf16ps. */
DOT512_INLINE int64_t nf4_gemv_row_block_dot512(int NT, int slack, const qstream *q, const uint8_t *bm,
                                                int64_t start, int64_t nbytes, int64_t n_row, const uint16_t *xb,
                                                int64_t kq, float *y, int64_t ldy) {
    const int NB = NT == 1 ? 2 : 1;
    __m512 acc[4][MAX_NT];
    zero_acc512(acc);
    const __m512 table = _mm512_loadu_ps(NF4_TABLE);
    qwalk w = qwalk_start(q, 1, start, n_row); /* NF4: two codes per byte */
    for (int64_t j = 0; j < nbytes; j += 8) {
        uint64_t word;
        int64_t wc, blk, blk_next;
        if (!qwalk_next_word(slack, &w, bm, j, nbytes, &word, &wc, &blk, &blk_next)) return -1;
        const __m512i books = nf4_books16(table, &w, blk, blk_next);
        const __m512i e = nf4_word_codes(slack, &w, word, blk);
        const uint16_t *xw = xb + 8 * j;
#pragma GCC unroll 2
        for (int u = 0; u < 2; u++) { /* vpermw reads the low 5 bits of each word: its even column, then its odd */
            const __m512i v = _mm512_permutexvar_epi16(u ? _mm512_srli_epi16(e, 8) : e, books);
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                acc[u % NB][t] = _mm512_dpbf16_ps(acc[u % NB][t], (__m512bh)v,
                                                  (__m512bh)_mm512_load_si512(xw + t * kq + 32 * u));
        }
        w.g += wc;
    }
    store_sums512(NT, NB, acc, y, ldy);
    return w.g - start;
}

/* A row that has no values has no scale to read: it must be empty. */
static inline int64_t qempty_row(const uint8_t *bm, int64_t nbytes, int64_t m, float *y, int64_t ldy) {
    for (int64_t t = 0; t < m; t++) y[t * ldy] = 0.0f;
    return row_popcount(bm, nbytes);
}

/* As qgemv_row_avx512 for NF4 with blocks of >= 64 values, x permuted by nf4_permute_x (row stride kq). */
AVX512_FN static int64_t nf4_gemv_row512(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes,
                                         int64_t n_row, const float *xn, int64_t m, int64_t kq, float *y,
                                         int64_t ldy) {
    if (n_row == 0) return qempty_row(bm, nbytes, m, y, ldy);
    const int slack = qwalk_slack(q, 1, start, n_row);
#define ROW_BLOCK(NT) \
    (slack ? nf4_gemv_row_block512(NT, 1, q, bm, start, nbytes, n_row, xn, kq, y, ldy) \
           : nf4_gemv_row_block512(NT, 0, q, bm, start, nbytes, n_row, xn, kq, y, ldy))
    ROWS_IN_TOKEN_BLOCKS(xn, kq);
#undef ROW_BLOCK
}

/* As nf4_gemv_row512 with x as bf16 words (nf4_permute_x_bf16; nf4_gemv_row_block_dot512). */
DOT512_FN static int64_t nf4_gemv_row_dot512(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes,
                                             int64_t n_row, const uint16_t *xb, int64_t m, int64_t kq, float *y,
                                             int64_t ldy) {
    if (n_row == 0) return qempty_row(bm, nbytes, m, y, ldy);
    const int slack = qwalk_slack(q, 1, start, n_row);
#define ROW_BLOCK(NT) \
    (slack ? nf4_gemv_row_block_dot512(NT, 1, q, bm, start, nbytes, n_row, xb, kq, y, ldy) \
           : nf4_gemv_row_block_dot512(NT, 0, q, bm, start, nbytes, n_row, xb, kq, y, ldy))
    ROWS_IN_TOKEN_BLOCKS(xb, kq);
#undef ROW_BLOCK
}

/* INT8 with blocks of >= 64 values, the same walk: the word's codes are bytes already, so one vpexpandb puts them at
 * their columns (0 at pruned ones: code 0 is 0.0); each 16 columns are then widened to fp32 and multiplied by their
 * scale, the word's block's or, past the boundary (its column from a pdep of the word), the next block's, and by
 * 1/127 in the format's order, so the weights are exactly its fp32 dequantization. x in natural column order,
 * zero-padded to whole words (q_x). */
AVX512_INLINE int64_t int8_gemv_row_block512(int NT, int slack, const qstream *q, const uint8_t *bm, int64_t start,
                                             int64_t nbytes, int64_t n_row, const float *xn, int64_t kq, float *y,
                                             int64_t ldy) {
    const int NB = NT == 1 ? 4 : (NT <= 4 ? 2 : 1);
    __m512 acc[4][MAX_NT];
    zero_acc512(acc);
    const __m512 inv127 = _mm512_set1_ps(INV127);
    qwalk w = qwalk_start(q, 0, start, n_row); /* INT8: one code per byte */
    for (int64_t j = 0; j < nbytes; j += 8) {
        uint64_t word;
        int64_t wc, blk, blk_next;
        if (!qwalk_next_word(slack, &w, bm, j, nbytes, &word, &wc, &blk, &blk_next)) return -1;
        const int64_t r = qwalk_boundary(&w, blk); /* the columns of the values in the next block: from the r-th on */
        const uint64_t next_cols = r < wc ? word & ~(_pdep_u64(1ull << r, word) - 1) : 0;
        const __m512i zero = _mm512_castps_si512(opaque_zero512()); /* a fresh zero: see expand_ps */
        const __m512i e = _mm512_mask_expand_epi8(zero, word, qwalk_code_bytes(slack, &w));
        const __m128i lanes[4] = {_mm512_castsi512_si128(e), _mm512_extracti32x4_epi32(e, 1),
                                  _mm512_extracti32x4_epi32(e, 2), _mm512_extracti32x4_epi32(e, 3)};
        const __m512 s0 = _mm512_set1_ps(w.absmax[blk]), s1 = _mm512_set1_ps(w.absmax[blk_next]);
        const float *xw = xn + 8 * j;
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            const __m512 scale = _mm512_mask_blend_ps((__mmask16)(next_cols >> (16 * u)), s0, s1);
            const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lanes[u])), scale),
                                           inv127);
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++)
                acc[u % NB][t] = _mm512_fmadd_ps(v, _mm512_load_ps(xw + t * kq + 16 * u), acc[u % NB][t]);
        }
        w.g += wc;
    }
    store_sums512(NT, NB, acc, y, ldy);
    return w.g - start;
}

/* As qgemv_row_avx2 for INT8 codes with blocks of >= 64 values, x padded by q_x (row stride kq). */
AVX512_FN static int64_t int8_gemv_row512(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes,
                                          int64_t n_row, const float *xn, int64_t m, int64_t kq, float *y,
                                          int64_t ldy) {
    if (n_row == 0) return qempty_row(bm, nbytes, m, y, ldy);
    const int slack = qwalk_slack(q, 0, start, n_row);
#define ROW_BLOCK(NT) \
    (slack ? int8_gemv_row_block512(NT, 1, q, bm, start, nbytes, n_row, xn, kq, y, ldy) \
           : int8_gemv_row_block512(NT, 0, q, bm, start, nbytes, n_row, xn, kq, y, ldy))
    ROWS_IN_TOKEN_BLOCKS(xn, kq);
#undef ROW_BLOCK
}

/* One NF4 row (blocks of >= 64 values) as bf16 words into out[0, nbytes * 8), the many-token path's bf16 tiles, by
 * the gemv's walk: each word's codes at their columns (nf4_word_codes), widened to 16-bit lanes and looked up 32
 * columns per vpermw in the word's two books rounded to bf16 by vcvtne2ps2bf16 (nearest even, as
 * qdecode16_row_avx512 rounds). Returns the values consumed or -1. */
DOT512_INLINE int64_t nf4_decode16_row_block512(int slack, const qstream *q, const uint8_t *bm, int64_t start,
                                                int64_t nbytes, int64_t n_row, uint16_t *out) {
    const __m512 table = _mm512_loadu_ps(NF4_TABLE);
    qwalk w = qwalk_start(q, 1, start, n_row); /* NF4: two codes per byte */
    for (int64_t j = 0; j < nbytes; j += 8) {
        uint64_t word;
        int64_t wc, blk, blk_next;
        if (!qwalk_next_word(slack, &w, bm, j, nbytes, &word, &wc, &blk, &blk_next)) return -1;
        const __m512i books = nf4_books16(table, &w, blk, blk_next);
        const __m512i e = nf4_word_codes(slack, &w, word, blk);
        const __m512i lo = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(e)), books);
        const __m512i hi = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(e, 1)), books);
        const int64_t left = 8 * (nbytes - j); /* columns of the row from 8j on */
        if (left >= 64) {
            _mm512_storeu_si512(out + 8 * j, lo);
            _mm512_storeu_si512(out + 8 * j + 32, hi);
        } else {
            _mm512_mask_storeu_epi16(out + 8 * j, _bzhi_u32(~0u, (unsigned)(left < 32 ? left : 32)), lo);
            if (left > 32) _mm512_mask_storeu_epi16(out + 8 * j + 32, _bzhi_u32(~0u, (unsigned)(left - 32)), hi);
        }
        w.g += wc;
    }
    return w.g - start;
}

DOT512_FN static int64_t nf4_decode16_row512(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes,
                                             int64_t n_row, uint16_t *out) {
    if (n_row == 0) {
        memset(out, 0, sizeof(uint16_t) * (size_t)(nbytes * 8));
        return row_popcount(bm, nbytes);
    }
    return qwalk_slack(q, 1, start, n_row) ? nf4_decode16_row_block512(1, q, bm, start, nbytes, n_row, out)
                                        : nf4_decode16_row_block512(0, q, bm, start, nbytes, n_row, out);
}

/* One NF4 row as bf16 words into out[0, nbytes * 8) for the many-token path's bf16 tiles: the row's values decoded
 * in fp32 (nf4_decode_row_avx512), rounded to bf16 (nearest even) in stream order into hbuf, then placed at their
 * columns 32 at a time by decode16_row_avx512. vbuf holds >= nbytes * 8 + 32 floats, hbuf >= nbytes * 8 + 16 words.
 * Returns the values consumed or -1. */
AVX512_FN static int64_t qdecode16_row_avx512(const qstream *q, const uint8_t *bm, int64_t start, int64_t nbytes,
                                              int64_t n_row, uint16_t *out, float *vbuf, uint16_t *hbuf) {
    nf4_decode_row_avx512(q, start, n_row, vbuf);
    const float *v = vbuf + (start & 15);
    const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    for (int64_t i = 0; i < n_row; i += 16) { /* the last group rounds a few buffer floats past the row: unused */
        const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(v + i));
        const __m512i up = _mm512_add_epi32(b, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
        _mm256_storeu_si256((__m256i *)(hbuf + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(up, 16)));
    }
    return decode16_row_avx512(bm, hbuf, nbytes, n_row, out);
}

#endif /* SALR_X86 */

/* x for the buffer-free quantized row kernels, once per call (m rows of qx_cols(nbytes)): INT8 in natural order,
 * zero-padded; NF4 as bf16 words (nf4_permute_x_bf16; *bf16_words set) when `dot` and every value of x is exactly a
 * bf16, else in fp32 (nf4_permute_x). NULL when those kernels do not apply (they want AVX-512 and blocks of >= 64
 * values) or, with *oom set, when the allocation fails. */
static float *q_x(int isa, int dot, const qstream *q, const float *x, int64_t m, int64_t ldx, int64_t nbytes,
                    int *bf16_words, int *oom) {
    *bf16_words = 0;
#if SALR_X86
    if (isa == ISA_AVX512 && q->bshift >= 6 && m > 0) {
        const int64_t kn = qx_cols(nbytes);
        float *xn = (float *)aligned_alloc(64, sizeof(float) * (size_t)(m * kn));
        if (!xn) {
            *oom = 1;
        } else if (q->kind == Q_INT8) {
            for (int64_t t = 0; t < m; t++)
                for (int64_t c = 0; c < kn; c++) xn[t * kn + c] = c < nbytes * 8 ? x[t * ldx + c] : 0.0f;
        } else if (dot && exactly_bf16(x, m, ldx, nbytes * 8)) {
            nf4_permute_x_bf16(x, m, ldx, nbytes * 8, (uint16_t *)xn, kn);
            *bf16_words = 1;
        } else {
            nf4_permute_x(x, m, ldx, nbytes * 8, xn, kn);
        }
        return xn;
    }
#endif
    (void)isa, (void)dot, (void)q, (void)x, (void)m, (void)ldx, (void)nbytes, (void)oom;
    return NULL;
}

/* One row of the quantized GEMV on the chosen ISA; returns 1 if the row is consistent (else its outputs are 0).
 * xn: x for the buffer-free NF4 / INT8 kernels (q_x; bf16 words when xn_bf16), or NULL. */
static int qgemv_row(int isa, const qstream *q, const uint8_t *bm, int64_t start, int64_t end, int64_t nbytes,
                     const float *x, const float *xn, int xn_bf16, int64_t m, int64_t ldx, float *y, int64_t ldy,
                     float *buf, float *vbuf) {
    int ok;
#if SALR_X86
    if (xn) {
        const int64_t kn = qx_cols(nbytes);
        ok = (q->kind == Q_INT8 ? int8_gemv_row512(q, bm, start, nbytes, end - start, xn, m, kn, y, ldy)
              : xn_bf16         ? nf4_gemv_row_dot512(q, bm, start, nbytes, end - start, (const uint16_t *)xn, m, kn,
                                                      y, ldy)
                                : nf4_gemv_row512(q, bm, start, nbytes, end - start, xn, m, kn, y, ldy)) == end - start;
    } else if (isa == ISA_AVX512 && q->kind == Q_NF4 && q->bshift >= 4) {
        ok = qgemv_row_avx512(q, bm, start, nbytes, end - start, x, m, ldx, y, ldy, vbuf) == end - start;
    } else if (isa >= ISA_AVX2) {
        ok = qgemv_row_avx2(q, bm, start, nbytes, end - start, x, m, ldx, y, ldy, buf) == end - start;
    } else
#endif
    if ((ok = row_popcount(bm, nbytes) == end - start))
        qgemv_row_scalar(q, bm, start, nbytes, x, m, ldx, y, ldy);
    (void)buf;
    (void)vbuf;
    (void)xn;
    (void)xn_bf16;
    if (!ok)
        for (int64_t t = 0; t < m; t++) y[t * ldy] = 0.0f;
    return ok;
}

/* A stream description from the entry points' arguments; 0 when they are not supported (blocksize must be a power
 * of two >= 8). */
static int qstream_init(qstream *q, int kind, const void *codes, const float *absmax, int64_t nnz, int64_t bs) {
    q->kind = kind;
    q->codes = (const uint8_t *)codes;
    q->absmax = absmax;
    q->nnz = nnz;
    q->blocksize = bs;
    q->bshift = bs > 0 ? __builtin_ctzll((uint64_t)bs) : 0;
    return (kind == Q_NF4 || kind == Q_INT8) && bs >= 8 && (bs & (bs - 1)) == 0 && nnz >= 0;
}

/* The few-token GEMV over a quantized bitmap weight, as salr_bitmap_gemv (returns -1, a bad row, or -2 for
 * unsupported arguments; ISA_BF16_DOT in isa lets an exactly-bf16 x take nf4_gemv_row_dot512). */
int64_t salr_qbitmap_gemv(int isa, int kind, const uint8_t *bitmask, const void *codes, const float *absmax,
                          int64_t blocksize, const int64_t *row_offsets, int64_t nnz, int64_t rows, int64_t cols,
                          const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy, int nthreads) {
    const int bf16_dot = (isa & ISA_BF16_DOT) != 0;
    isa &= ~ISA_BF16_DOT;
    qstream q;
    if (!qstream_init(&q, kind, codes, absmax, nnz, blocksize)) return -2;
    const int64_t nbytes = (cols + 7) / 8;
    int64_t bad = -1, oom = 0;
    int xn_bf16, xn_oom = 0;
    float *xn = q_x(isa, bf16_dot, &q, x, m, ldx, nbytes, &xn_bf16, &xn_oom);
    if (xn_oom) return -2;
    if (nthreads < 1) nthreads = 1;
    const int chunk = gemv_chunk(rows, nthreads);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        const int64_t tokens = m < MAX_NT ? m : MAX_NT;
        /* packed x for the AVX2 path, then a decoded row for the buffered AVX-512 one (QBUF: a multiple of 8 floats) */
        float *buf = (float *)aligned_alloc(32, sizeof(float) * (size_t)(tokens * QBUF + nbytes * 8 + 32));
        if (!buf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(guided, chunk) nowait /* one barrier (the region's end), not two */
        for (int64_t r = 0; r < rows; r++) {
            int64_t start, end;
            if (!buf) continue;
            if (!(row_range(row_offsets, r, rows, nnz, &start, &end) &&
                  qgemv_row(isa, &q, bitmask + r * nbytes, start, end, nbytes, x, xn, xn_bf16, m, ldx, y + r, ldy, buf,
                            buf + tokens * QBUF))) {
                for (int64_t t = 0; t < m; t++) y[t * ldy + r] = 0.0f;
#pragma omp atomic write
                bad = r;
            }
        }
        free(buf);
    }
    free(xn);
    return oom ? -2 : bad;
}

/* fp32 to bf16, rounding to nearest even (the dequantized values here are never NaN). */
static inline uint16_t finite_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Rows [r0, r1) of a quantized weight, dequantized in fp32: into out32 (fp32) or, when out32 is NULL, rounded to
 * bf16 into out16. */
static int64_t qdecode_rows(int isa, int kind, const uint8_t *bitmask, const void *codes, const float *absmax,
                            int64_t blocksize, const int64_t *row_offsets, int64_t nnz, int64_t rows, int64_t cols,
                            int64_t r0, int64_t r1, float *out32, uint16_t *out16, int64_t ldo, int nthreads) {
    qstream q;
    if (!qstream_init(&q, kind, codes, absmax, nnz, blocksize)) return -2;
    const int64_t nbytes = (cols + 7) / 8;
    int64_t bad = -1, oom = 0;
    const int bf16_cvt = out16 && salr_cpu_has_avx512_bf16_dot() > 0; /* vcvtne2ps2bf16 for nf4_decode16_row512 */
    (void)bf16_cvt;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        /* the row's values in groups (AVX2 decode) or decoded (AVX-512), then the fp32 row itself when the output is
         * bf16, or (AVX-512 NF4) the row's values rounded to bf16 */
        float *vbuf = (float *)malloc(sizeof(float) * (size_t)(nbytes * 16 + 64));
        if (!vbuf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(dynamic, ROW_CHUNK) nowait /* one barrier (the region's end), not two */
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *bm = bitmask + r * nbytes;
            float *o = out32 ? out32 + (r - r0) * ldo : (vbuf ? vbuf + nbytes * 8 + 32 : NULL);
            uint16_t *o16 = out32 ? NULL : out16 + (r - r0) * ldo;
            int64_t start, end;
            int ok = vbuf != NULL && row_range(row_offsets, r, rows, nnz, &start, &end) && end - start <= 8 * nbytes;
#if SALR_X86
            if (ok && o16 && isa == ISA_AVX512 && kind == Q_NF4 && q.bshift >= 6 && bf16_cvt) { /* NF4 to bf16 */
                ok = nf4_decode16_row512(&q, bm, start, nbytes, end - start, o16) == end - start;
                o16 = NULL; /* written */
            } else if (ok && o16 && isa == ISA_AVX512 && kind == Q_NF4 && q.bshift >= 4) { /* NF4 straight to bf16 */
                ok = qdecode16_row_avx512(&q, bm, start, nbytes, end - start, o16, vbuf,
                                          (uint16_t *)(vbuf + nbytes * 8 + 32)) == end - start;
                o16 = NULL; /* written */
            } else if (ok && isa >= ISA_AVX2) {
                ok = qdecode_row_avx2(&q, bm, start, nbytes, end - start, o, vbuf) == end - start;
            } else
#endif
            if (ok && (ok = row_popcount(bm, nbytes) == end - start))
                qdecode_row_scalar(&q, bm, start, nbytes, o);
            if (ok && o16)
                for (int64_t c = 0; c < nbytes * 8; c++) o16[c] = finite_to_bf16(o[c]);
            if (!ok) {
                if (out32) memset(out32 + (r - r0) * ldo, 0, sizeof(float) * nbytes * 8);
                else memset(out16 + (r - r0) * ldo, 0, sizeof(uint16_t) * nbytes * 8);
#pragma omp atomic write
                bad = r;
            }
        }
        free(vbuf);
    }
    return oom ? -2 : bad;
}

/* Rows [r0, r1) of a quantized bitmap weight as dense fp32, as salr_bitmap_decode (-2: unsupported arguments). */
int64_t salr_qbitmap_decode(int isa, int kind, const uint8_t *bitmask, const void *codes, const float *absmax,
                            int64_t blocksize, const int64_t *row_offsets, int64_t nnz, int64_t rows, int64_t cols,
                            int64_t r0, int64_t r1, float *out, int64_t ldo, int nthreads) {
    return qdecode_rows(isa, kind, bitmask, codes, absmax, blocksize, row_offsets, nnz, rows, cols, r0, r1, out, NULL,
                        ldo, nthreads);
}

/* The same rows dequantized in fp32, then rounded to bf16 (nearest even): the bf16 tiles of the many-token path for
 * a bf16 input (salr.ops.cpu.bf16_tiles). */
int64_t salr_qbitmap_decode_bf16(int isa, int kind, const uint8_t *bitmask, const void *codes, const float *absmax,
                                 int64_t blocksize, const int64_t *row_offsets, int64_t nnz, int64_t rows,
                                 int64_t cols, int64_t r0, int64_t r1, uint16_t *out, int64_t ldo, int nthreads) {
    return qdecode_rows(isa, kind, bitmask, codes, absmax, blocksize, row_offsets, nnz, rows, cols, r0, r1, NULL, out,
                        ldo, nthreads);
}

/* ---------------------------------------------------------------------------------------------- fused SALR layer */

/* A dense vector in dtype dt (fp32 / fp16 / bf16) dotted with an fp32 vector of length n. */
static float dot_scalar(int dt, const uint8_t *a, const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += load_value(dt, a, i) * x[i];
    return s;
}

#if SALR_X86
AVX2_INLINE __m256 load8(int dt, const uint8_t *a) {
    if (dt == DT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)a)), 16));
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)a));
    return _mm256_loadu_ps((const float *)a);
}

AVX2_INLINE float dot_avx2_dt(int dt, const uint8_t *a, const float *x, int64_t n) {
    const int esz = elem_size(dt);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(load8(dt, a + esz * i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(load8(dt, a + esz * (i + 8)), _mm256_loadu_ps(x + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(load8(dt, a + esz * i), _mm256_loadu_ps(x + i), acc0);
    float s = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += load_value(dt, a, i) * x[i];
    return s;
}

AVX2_FN static float dot_avx2(int dt, const uint8_t *a, const float *x, int64_t n) {
    if (dt == DT_BF16) return dot_avx2_dt(DT_BF16, a, x, n);
    if (dt == DT_F16) return dot_avx2_dt(DT_F16, a, x, n);
    return dot_avx2_dt(DT_F32, a, x, n);
}
#endif

static inline float dot_any(int isa, int dt, const uint8_t *a, const float *x, int64_t n) {
#if SALR_X86
    if (isa >= ISA_AVX2) return dot_avx2(dt, a, x, n);
#endif
    (void)isa;
    return dot_scalar(dt, a, x, n);
}

/* fp32 -> bf16 with round-to-nearest-even, NaN kept a (quiet) NaN: what torch's .to(torch.bfloat16) does. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline void store_value(int dt, void *y, int64_t i, float v) {
    if (dt == DT_BF16) {
        ((uint16_t *)y)[i] = float_to_bf16(v);
    } else {
        ((float *)y)[i] = v;
    }
}

/* One SALR linear layer for a few tokens (decode), in one call:
 *   y[t, r] = sum_c W[r, c] x[t, c] + sum_k B[r, k] s_k h[t, k] + bias[r],   h[t, k] = sum_c A[k, c] x[t, c]
 * with W the bitmap base, A [rank, cols] and B [rows, rank] contiguous in adt, s_k = 1 for k < residual_rank and
 * lora_scale after. x [m, cols] (row stride ldx) and y [m, rows] (row stride ldy) are in xdt (fp32 or bf16); bias
 * (NULL or [rows]) too. All arithmetic is fp32. m must be <= MAX_NT. Returns -1, or a row whose offsets disagree
 * with its bitmap (its outputs are 0), or -2 for unsupported arguments. Threads share the h = A x step, then rows.
 * W's kept values are `values` in dtype dt, or the quantized stream q when q is not NULL. */
static int64_t linear_decode(int isa, int dt, const qstream *q, const uint8_t *bitmask, const void *values,
                             const int64_t *row_offsets, int64_t nnz, int64_t rows, int64_t cols, int xdt,
                             const void *x, int64_t m, int64_t ldx, int adt, int64_t rank, int64_t residual_rank,
                             float lora_scale, const void *A, const void *B, const void *bias, void *y, int64_t ldy,
                             int nthreads) {
    const int bf16_dot = (isa & ISA_BF16_DOT) != 0;
    isa &= ~ISA_BF16_DOT;
    if (m < 1 || m > MAX_NT || (xdt != DT_F32 && xdt != DT_BF16)) return -2;
    const int64_t nbytes = (cols + 7) / 8, kp = nbytes * 8;
    const uint8_t *vals = (const uint8_t *)values;
    const int esz = elem_size(dt), aesz = elem_size(adt), xesz = elem_size(xdt);
    /* x in fp32, zero-padded to whole bitmap bytes (the AVX2 gemv reads 8 columns per byte); h = s * (A x). */
    float *xf = (float *)malloc(sizeof(float) * (size_t)(m * kp + m * (rank > 0 ? rank : 1)));
    if (!xf) return -2;
    float *h = xf + m * kp;
    for (int64_t t = 0; t < m; t++) {
        const uint8_t *xt = (const uint8_t *)x + xesz * t * ldx;
        for (int64_t c = 0; c < cols; c++) xf[t * kp + c] = load_value(xdt, xt, c);
        for (int64_t c = cols; c < kp; c++) xf[t * kp + c] = 0.0f;
    }
    int64_t bad = -1, oom = 0;
    if (nthreads < 1) nthreads = 1;
#if SALR_X86
    const int wide = !q && isa == ISA_AVX512 && dt == DT_BF16;
    const int64_t kq = chunk_cols(nbytes);
    float *xq = wide ? (float *)malloc(sizeof(float) * (size_t)(m * kq)) : NULL;
    if (wide && !xq) {
        free(xf);
        return -2;
    }
    const int dot = wide && wide_x(bf16_dot, xf, m, kp, kp, kq, xq, (uint16_t *)xq);
#endif
    int xn_bf16 = 0, xn_oom = 0;
    float *xn = q ? q_x(isa, bf16_dot, q, xf, m, kp, nbytes, &xn_bf16, &xn_oom) : NULL;
    if (xn_oom) {
#if SALR_X86
        free(xq);
#endif
        free(xf);
        return -2;
    }
    const int chunk = gemv_chunk(rows, nthreads);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        /* packed x (AVX2) and a decoded row (AVX-512), as in salr_qbitmap_gemv */
        float *qbuf = q ? (float *)aligned_alloc(32, sizeof(float) * (size_t)(m * QBUF + kp + 32)) : NULL;
        if (q && !qbuf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < rank; k++) {
            const float s = k < residual_rank ? 1.0f : lora_scale;
            const uint8_t *ak = (const uint8_t *)A + aesz * k * cols;
            for (int64_t t = 0; t < m; t++) h[t * rank + k] = s * dot_any(isa, adt, ak, xf + t * kp, cols);
        }
        /* implicit barrier: every row needs all of h */
#pragma omp for schedule(guided, chunk)
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *bm = bitmask + r * nbytes;
            float acc[MAX_NT] = {0};
            int64_t start, end;
            int ok = row_range(row_offsets, r, rows, nnz, &start, &end);
            if (q) {
                ok = ok && qbuf && qgemv_row(isa, q, bm, start, end, nbytes, xf, xn, xn_bf16, m, kp, acc, 1, qbuf,
                                              qbuf + m * QBUF);
            } else
#if SALR_X86
            if (ok && wide) {
                const int slack = avx512_slack(end, nnz);
                const uint16_t *v = (const uint16_t *)vals + start;
                ok = (dot ? gemv_row_dot512(slack, bm, v, nbytes, end - start, (const uint16_t *)xq, m, kq, acc, 1)
                          : gemv_row_avx512(slack, bm, v, nbytes, end - start, xq, m, kq, acc, 1)) == end - start;
            } else if (ok && isa >= ISA_AVX2 && avx2_safe(dt, end, nnz)) {
                ok = gemv_row_avx2(dt, bm, vals + esz * start, nbytes, end - start, xf, m, kp, acc, 1) == end - start;
            } else
#endif
            if (ok && (ok = row_popcount(bm, nbytes) == end - start))
                gemv_row_scalar(dt, bm, vals, start, nbytes, xf, m, kp, acc, 1, 0);
            if (ok) {
                const uint8_t *br = (const uint8_t *)B + aesz * r * rank;
                const float b = bias ? load_value(xdt, (const uint8_t *)bias, r) : 0.0f;
                for (int64_t t = 0; t < m; t++)
                    acc[t] += (rank > 0 ? dot_any(isa, adt, br, h + t * rank, rank) : 0.0f) + b;
            } else {
                for (int64_t t = 0; t < m; t++) acc[t] = 0.0f;
#pragma omp atomic write
                bad = r;
            }
            for (int64_t t = 0; t < m; t++) store_value(xdt, y, t * ldy + r, acc[t]);
        }
        free(qbuf);
    }
#if SALR_X86
    free(xq);
#endif
    free(xn);
    free(xf);
    return oom ? -2 : bad;
}

int64_t salr_linear_decode(int isa, int dt, const uint8_t *bitmask, const void *values, const int64_t *row_offsets,
                           int64_t nnz, int64_t rows, int64_t cols, int xdt, const void *x, int64_t m, int64_t ldx,
                           int adt, int64_t rank, int64_t residual_rank, float lora_scale, const void *A,
                           const void *B, const void *bias, void *y, int64_t ldy, int nthreads) {
    return linear_decode(isa, dt, NULL, bitmask, values, row_offsets, nnz, rows, cols, xdt, x, m, ldx, adt, rank,
                         residual_rank, lora_scale, A, B, bias, y, ldy, nthreads);
}

/* salr_linear_decode on a quantized bitmap base (QSALR): W's kept values are the quantized stream. */
int64_t salr_qlinear_decode(int isa, int kind, const uint8_t *bitmask, const void *codes, const float *absmax,
                            int64_t blocksize, const int64_t *row_offsets, int64_t nnz, int64_t rows, int64_t cols,
                            int xdt, const void *x, int64_t m, int64_t ldx, int adt, int64_t rank,
                            int64_t residual_rank, float lora_scale, const void *A, const void *B, const void *bias,
                            void *y, int64_t ldy, int nthreads) {
    qstream q;
    if (!qstream_init(&q, kind, codes, absmax, nnz, blocksize)) return -2;
    return linear_decode(isa, DT_F32, &q, bitmask, NULL, row_offsets, nnz, rows, cols, xdt, x, m, ldx, adt, rank,
                         residual_rank, lora_scale, A, B, bias, y, ldy, nthreads);
}
