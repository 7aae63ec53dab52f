/* NF4 codebook lookup on AVX2: cycles (TSC ticks) per 32 values for the gemv's current lookup (broadcast, variable
 * shift, two 8-lane vpermps of the block's scaled codebook halves, a blend; csrc/bitmap_cpu.c `qgroup`) against a
 * lookup from in-lane byte shuffles (the fp32 codebook split into four byte planes, one vpshufb each for 32 codes,
 * the code bytes pre-shuffled so the unpacks land in stream order, then one multiply by the block scale). Both are
 * checked bit-exact against NF4[code] * absmax first. Each value meets an FMA with x, as in the gemv; the x packing
 * at the bitmap's set bits is not part of it. A probe for a future AVX2 NF4 path (docs/benchmarks.md section 14):
 *
 *     gcc -O2 -mavx2 -mfma -o /tmp/nf4_lookup benchmarks/nf4_lookup_avx2.c && taskset -c 0 /tmp/nf4_lookup
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <x86intrin.h>
static const float T[16] __attribute__((aligned(32))) = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
#define N (1 << 16)  /* values: 32 KiB of codes, L1/L2 resident */
static inline __m256 old8(const uint8_t *c, __m256 lo, __m256 hi) {
  __m256i word = _mm256_castps_si256(_mm256_broadcast_ss((const float *)c));
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  __m256i idx = _mm256_srlv_epi32(word, shifts);
  __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
/* 32 values from 16 code bytes: out[0..3] = values 0-7, 8-15, 16-23, 24-31, each NF4[c]*s exactly. */
static inline void new32(const uint8_t *c, __m256i p0, __m256i p1, __m256i p2, __m256i p3, __m256 s, __m256 *out) {
  __m128i x = _mm_loadu_si128((const __m128i *)c);
  x = _mm_shuffle_epi8(x, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
  const __m128i m = _mm_set1_epi8(15);
  __m128i h = _mm_and_si128(_mm_srli_epi16(x, 4), m), l = _mm_and_si128(x, m);
  __m256i idx = _mm256_setr_m128i(_mm_unpacklo_epi8(h, l), _mm_unpackhi_epi8(h, l));
  __m256i b0 = _mm256_shuffle_epi8(p0, idx), b1 = _mm256_shuffle_epi8(p1, idx);
  __m256i b2 = _mm256_shuffle_epi8(p2, idx), b3 = _mm256_shuffle_epi8(p3, idx);
  __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)), s);
  out[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)), s);
  out[2] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)), s);
  out[3] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)), s);
}
int main(void) {
  uint8_t *codes = aligned_alloc(64, N / 2);
  float *x = aligned_alloc(64, N * 4), ref[32], got[32];
  srand(1);
  for (int i = 0; i < N / 2; i++) codes[i] = rand() & 255;
  for (int i = 0; i < N; i++) x[i] = (rand() % 1000) / 1000.0f;
  const float sc = 0.0371f;
  __m256 s = _mm256_set1_ps(sc), lo = _mm256_mul_ps(_mm256_load_ps(T), s), hi = _mm256_mul_ps(_mm256_load_ps(T + 8), s);
  uint8_t pl[4][16];
  for (int c = 0; c < 16; c++) { uint32_t u; memcpy(&u, &T[c], 4); for (int k = 0; k < 4; k++) pl[k][c] = (u >> (8 * k)) & 255; }
  __m256i p[4];
  for (int k = 0; k < 4; k++) p[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)pl[k]));
  int bad = 0;
  for (int g = 0; g < N; g += 32) {
    for (int i = 0; i < 32; i++) { uint8_t b = codes[(g + i) / 2]; ref[i] = T[(i & 1) ? (b & 15) : (b >> 4)] * sc; }
    __m256 o[4]; new32(codes + g / 2, p[0], p[1], p[2], p[3], s, o);
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(got + 8 * k, o[k]);
    bad += memcmp(ref, got, sizeof ref) != 0;
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(got + 8 * k, old8(codes + (g + 8 * k) / 2, lo, hi));
    bad += memcmp(ref, got, sizeof ref) != 0;
  }
  printf("mismatching groups: %d\n", bad);
  for (int rep = 0; rep < 3; rep++) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    uint64_t t0 = __rdtsc();
    for (int it = 0; it < 200; it++)
      for (int g = 0; g < N; g += 32) {
        a0 = _mm256_fmadd_ps(old8(codes + g / 2, lo, hi), _mm256_load_ps(x + g), a0);
        a1 = _mm256_fmadd_ps(old8(codes + g / 2 + 4, lo, hi), _mm256_load_ps(x + g + 8), a1);
        a2 = _mm256_fmadd_ps(old8(codes + g / 2 + 8, lo, hi), _mm256_load_ps(x + g + 16), a2);
        a3 = _mm256_fmadd_ps(old8(codes + g / 2 + 12, lo, hi), _mm256_load_ps(x + g + 24), a3);
      }
    uint64_t t1 = __rdtsc();
    __m256 b0 = _mm256_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
    for (int it = 0; it < 200; it++)
      for (int g = 0; g < N; g += 32) {
        __m256 o[4]; new32(codes + g / 2, p[0], p[1], p[2], p[3], s, o);
        b0 = _mm256_fmadd_ps(o[0], _mm256_load_ps(x + g), b0);
        b1 = _mm256_fmadd_ps(o[1], _mm256_load_ps(x + g + 8), b1);
        b2 = _mm256_fmadd_ps(o[2], _mm256_load_ps(x + g + 16), b2);
        b3 = _mm256_fmadd_ps(o[3], _mm256_load_ps(x + g + 24), b3);
      }
    uint64_t t2 = __rdtsc();
    float r[8]; _mm256_storeu_ps(r, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float q[8]; _mm256_storeu_ps(q, _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
    double per = 200.0 * N / 32;
    printf("TSC ticks per 32 values: vpermps %.2f, vpshufb %.2f (sums %.3f %.3f)\n", (t1 - t0) / per, (t2 - t1) / per, r[0], q[0]);
  }
  return 0;
}
