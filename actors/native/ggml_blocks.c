/* Matrix products on GGUF weight blocks as the file stores them (Q4_0, Q4_K, Q5_0, Q6_K,
 * Q8_0), for decoding on CPUs. Built at run time by actors/native/build.py, once per
 * instruction-set variant (scalar, avx2, avx512vnni), and called through ctypes.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k], where w is the weight as the file dequantizes it.
 * The activations are rounded to int8 per block, as llama.cpp does (d = max|x| / 127,
 * round half to even): per 32 values against 32-blocks (Q4_0, Q5_0, Q8_0), per 256
 * against 256-blocks (Q4_K, Q6_K; the mins use the activations' sums per 32). So every
 * product inside a block is exact integer arithmetic, and the float arithmetic is fixed:
 *   eight lane accumulators; lane l gets elements 4l..4l+3 of every 32-group:
 *   32-blocks:  acc_l = fma(d*dx, (float)(sum of w*x over the lane's 4 elements), acc_l);
 *   256-blocks: acc_l = fma(d*dx, (float)(sum over the 8 groups of sc_j * that lane sum), acc_l),
 *               and Q4_K's mins go to four more, mlane l = fma(dmin*dx, (float)(m_2l*s_2l + m_2l+1*s_2l+1), mlane l)
 *               (s_j: the activations' sum over 32-group j);
 *   the result is ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)) [- ((m0+m2) + (m1+m3))].
 * Every variant computes exactly this, so all give bitwise-identical results (the tests
 * check it), and a row's result depends neither on how many rows are multiplied at once
 * nor on the thread count. fma is fused in every variant (fmaf in plain C); build with
 * -ffp-contract=off so the compiler fuses nothing else.
 *
 * Block layouts (bytes per block; w = dequantized weight, q = stored code):
 *   Q8_0  (34 per 32):  d f16 | q int8[32]                       w = d*q
 *   Q4_0  (18 per 32):  d f16 | q u4[32] (byte i: element i low, i+16 high)   w = d*(q-8)
 *   Q5_0  (22 per 32):  d f16 | qh u32 (bit i: 5th bit of element i) | u4[32] as Q4_0
 *                                                                 w = d*(q-16)
 *   Q4_K (144 per 256): d f16 | dmin f16 | 12 bytes of 6-bit scales and mins | u4[256]
 *                       8 sub-blocks of 32: w = (d*sc_j)*q - (dmin*m_j)
 *   Q6_K (210 per 256): ql u4[256] | qh u2[256] | sc int8[16] | d f16
 *                       16 sub-blocks of 16: w = (d*sc_j)*(q-32)
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "pool.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

/* --------------------------------------------------------------------- scalars */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float rd_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h); /* exact, like the scalar conversion */
#else
    return f16_to_f32(h);
#endif
}

static void q4k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

int specray_block_size(int t) { return (t == Q4_K || t == Q6_K) ? 256 : 32; }

int specray_block_bytes(int t) {
    switch (t) {
        case Q8_0: return 34;
        case Q4_0: return 18;
        case Q5_0: return 22;
        case Q4_K: return 144;
        case Q6_K: return 210;
        default: return -1;
    }
}

/* The 32 codes of one 32-element group as unsigned bytes, for every type. Q8_0 codes are
 * stored with +128 so all types share one unsigned-times-signed product. */
static void codes32(int t, const uint8_t *blk, int g, uint8_t *u) {
    if (t == Q8_0) {
        for (int i = 0; i < 32; i++) u[i] = (uint8_t)((int8_t)blk[2 + i] + 128);
    } else if (t == Q4_0 || t == Q5_0) {
        const uint8_t *qs = blk + (t == Q4_0 ? 2 : 6);
        uint32_t qh = 0;
        if (t == Q5_0) memcpy(&qh, blk + 2, 4);
        for (int i = 0; i < 16; i++) {
            u[i] = qs[i] & 0x0f;
            u[i + 16] = qs[i] >> 4;
        }
        if (t == Q5_0)
            for (int i = 0; i < 32; i++) u[i] |= ((qh >> i) & 1) << 4;
    } else if (t == Q4_K) {
        const uint8_t *qs = blk + 16 + 32 * (g / 2);
        int shift = 4 * (g % 2);
        for (int i = 0; i < 32; i++) u[i] = (qs[i] >> shift) & 0x0f;
    } else { /* Q6_K: group g of 8; half h = g/4, row r = g%4 within the half */
        int h = g / 4, r = g % 4;
        const uint8_t *ql = blk + 64 * h + 32 * (r % 2), *qh = blk + 128 + 32 * h;
        int lshift = 4 * (r / 2), hshift = 2 * r;
        for (int i = 0; i < 32; i++) u[i] = ((ql[i] >> lshift) & 0x0f) | (((qh[i] >> hshift) & 3) << 4);
    }
}

/* Scales of group g: w = s0*(u - off) on the first 16 codes, s1*(u - off) on the last 16,
 * minus z (Q4_K's min) on all 32. */
typedef struct { float s0, s1, z; int off; } group_scales;

/* The scales of every 32-group of one block (1 group, or 8 for the 256-blocks). */
static void block_scales(int t, const uint8_t *blk, group_scales *r) {
    if (t == Q4_K) {
        float d = rd_f16(blk), dmin = rd_f16(blk + 2);
        for (int g = 0; g < 8; g++) {
            int sc, m;
            q4k_scale_min(blk + 4, g, &sc, &m);
            r[g].s0 = r[g].s1 = d * (float)sc;
            r[g].z = dmin * (float)m;
            r[g].off = 0;
        }
    } else if (t == Q6_K) {
        float d = rd_f16(blk + 208);
        const int8_t *sc = (const int8_t *)(blk + 192);
        for (int g = 0; g < 8; g++) {
            r[g].s0 = d * (float)sc[2 * g];
            r[g].s1 = d * (float)sc[2 * g + 1];
            r[g].z = 0.0f;
            r[g].off = 32;
        }
    } else {
        r[0].s0 = r[0].s1 = rd_f16(blk);
        r[0].z = 0.0f;
        r[0].off = t == Q8_0 ? 128 : t == Q4_0 ? 8 : 16;
    }
}

/* ------------------------------------------------------------- dequantization */

/* The file's own dequantized values (as gguf-py computes them), row by row. */
void specray_dequantize(int t, const uint8_t *w, int64_t n_rows, int64_t k, int64_t row_bytes,
                        const int64_t *rows, float *out) {
    int bs = specray_block_size(t), bb = specray_block_bytes(t);
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *row = w + (rows ? rows[r] : r) * row_bytes;
        float *o = out + r * k;
        for (int64_t b = 0; b < k / bs; b++) {
            const uint8_t *blk = row + b * bb;
            group_scales gs[8];
            block_scales(t, blk, gs);
            for (int g = 0; g < bs / 32; g++) {
                uint8_t u[32];
                codes32(t, blk, g, u);
                group_scales s = gs[g];
                float *og = o + b * bs + 32 * g;
                for (int i = 0; i < 32; i++) {
                    float si = i < 16 ? s.s0 : s.s1;
                    if (t == Q4_K) og[i] = si * (float)u[i] - s.z;
                    else og[i] = si * (float)(u[i] - s.off);
                }
            }
        }
    }
}

/* ------------------------------------------------------ activation quantization */

/* One row x[k] -> int8 codes, one scale per `bs` values, and the codes' sums per 32. */
static void quantize_x(const float *x, int64_t k, int bs, int8_t *q, float *d, int16_t *sum32) {
    for (int64_t b = 0; b < k / bs; b++) {
        const float *xb = x + bs * b;
        float amax = 0.0f;
        for (int i = 0; i < bs; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float db = amax / 127.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
        d[b] = db;
        for (int g = 0; g < bs / 32; g++) {
            int32_t s = 0;
            for (int i = 32 * g; i < 32 * g + 32; i++) {
                int v = (int)nearbyintf(xb[i] * id);
                q[bs * b + i] = (int8_t)v;
                s += v;
            }
            sum32[(bs * b) / 32 + g] = (int16_t)s; /* |s| <= 32 * 127 */
        }
    }
}

/* ------------------------------------------------------------------ scalar path */

/* Signed weight codes of 32-group g (all types but Q4_K): w = code - offset. */
static void signed32(int t, const uint8_t *blk, int g, int8_t *w) {
    uint8_t u[32];
    codes32(t, blk, g, u);
    int off = t == Q8_0 ? 128 : t == Q4_0 ? 8 : t == Q5_0 ? 16 : 32;
    for (int i = 0; i < 32; i++) w[i] = (int8_t)((int)u[i] - off);
}

static float hsum8(const float *a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }
static float hsum4(const float *a) { return (a[0] + a[2]) + (a[1] + a[3]); }

#if !defined(__AVX2__)
/* Q4_K: one row of weights against `mc` rows of activations; lanes as at the top. */
static void row_q4k(const uint8_t *row, int64_t nb, const int8_t *xq, const float *xd, const int16_t *xs,
                    int64_t K, int64_t mc, float *lanes, float *macc) {
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 144;
        uint8_t u[8][32];
        int sc[8], mn[8];
        float d = rd_f16(blk), dmin = rd_f16(blk + 2);
        for (int j = 0; j < 8; j++) {
            q4k_scale_min(blk + 4, j, &sc[j], &mn[j]);
            codes32(Q4_K, blk, j, u[j]);
        }
        for (int64_t i = 0; i < mc; i++) {
            const int8_t *x = xq + i * K + 256 * b;
            float dx = xd[i * (K / 256) + b];
            for (int l = 0; l < 8; l++) {
                int32_t isum = 0;
                for (int j = 0; j < 8; j++) {
                    int32_t p = 0;
                    for (int e = 4 * l; e < 4 * l + 4; e++) p += (int32_t)u[j][e] * x[32 * j + e];
                    isum += sc[j] * p;
                }
                lanes[8 * i + l] = fmaf(d * dx, (float)isum, lanes[8 * i + l]);
            }
            const int16_t *s = xs + i * (K / 32) + 8 * b;
            for (int l = 0; l < 4; l++)
                macc[4 * i + l] = fmaf(dmin * dx, (float)(mn[2 * l] * s[2 * l] + mn[2 * l + 1] * s[2 * l + 1]),
                                       macc[4 * i + l]);
        }
    }
}

static void row_q6k(const uint8_t *row, int64_t nb, const int8_t *xq, const float *xd, int64_t K, int64_t mc,
                    float *lanes) {
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 210;
        int8_t w[8][32];
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = rd_f16(blk + 208);
        for (int j = 0; j < 8; j++) signed32(Q6_K, blk, j, w[j]);
        for (int64_t i = 0; i < mc; i++) {
            const int8_t *x = xq + i * K + 256 * b;
            float dx = xd[i * (K / 256) + b];
            for (int l = 0; l < 8; l++) {
                int32_t isum = 0;
                for (int j = 0; j < 8; j++) {
                    int32_t p = 0;
                    for (int e = 4 * l; e < 4 * l + 4; e++) p += (int32_t)w[j][e] * x[32 * j + e];
                    isum += sc[2 * j + l / 4] * p;
                }
                lanes[8 * i + l] = fmaf(d * dx, (float)isum, lanes[8 * i + l]);
            }
        }
    }
}

/* 32-blocks. */
static void row_q32(int t, const uint8_t *row, int64_t nb, const int8_t *xq, const float *xd, int64_t K,
                    int64_t mc, float *lanes) {
    int bb = specray_block_bytes(t);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        int8_t w[32];
        signed32(t, blk, 0, w);
        float d = rd_f16(blk);
        for (int64_t i = 0; i < mc; i++) {
            const int8_t *x = xq + i * K + 32 * b;
            float s = d * xd[i * (K / 32) + b];
            for (int l = 0; l < 8; l++) {
                int32_t p = 0;
                for (int e = 4 * l; e < 4 * l + 4; e++) p += (int32_t)w[e] * x[e];
                lanes[8 * i + l] = fmaf(s, (float)p, lanes[8 * i + l]);
            }
        }
    }
}
#else
/* ------------------------------------------------------------------- SIMD path */

/* Bytes ahead in the weight stream. 2048 measured 6-7% faster than 1024 for the 1.5B's
 * products at 1 and 4 rows, AVX2 and AVX-512 alike (512 slower, 3072 the same; BENCHMARKS.md). */
#ifndef PREFETCH
#define PREFETCH 2048
#endif

static inline __m256i nibbles32(const uint8_t *qs) { /* 16 bytes -> 32 codes: low nibbles, then high */
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    __m128i m = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

static inline __m256i bits_to_bytes(uint32_t bits) { /* byte i = 0xff where bit i is set */
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                    _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                       0x0303030303030303LL));
    __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* Signed codes of a 32-block (Q4_0, Q5_0, Q8_0). */
static inline __m256i signed_q32(int t, const uint8_t *blk) {
    if (t == Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2));
    if (t == Q4_0) return _mm256_sub_epi8(nibbles32(blk + 2), _mm256_set1_epi8(8));
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    __m256i hi = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
    return _mm256_sub_epi8(_mm256_or_si256(nibbles32(blk + 6), hi), _mm256_set1_epi8(16));
}

/* int16 pair sums of unsigned u times signed x; of signed w times signed x. */
static inline __m256i pairs_u8(__m256i u, __m256i x) { return _mm256_maddubs_epi16(u, x); }
static inline __m256i pairs_s8(__m256i w, __m256i x) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

/* acc + lane sums (4 elements each) of int16 pairs p times int16 scales s. */
static inline __m256i add_scaled(__m256i acc, __m256i p, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, p, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define WIDE512 1
/* Two 32-groups at once: codes a (low half) and b (high half) as one register. */
static inline __m512i pair512(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
/* Fold the two halves' lanes: lane l of group a plus lane l of group b (exact integers). */
static inline __m256i fold512(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}
/* int16 pair sums of signed w times signed x (AVX-512 has no byte sign: negate x by mask). */
static inline __m512i pairs_s8_512(__m512i w, __m512i x) {
    __mmask64 neg = _mm512_movepi8_mask(w);
    return _mm512_maddubs_epi16(_mm512_abs_epi8(w), _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x));
}
#endif

#ifdef WIDE512
/* int16 lane k of the scale vector for 64 codes c: Q4_K's group 2c + k / 16, Q6_K's 16-group 4c + k / 8. */
#define IDX16(f) {f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7), f(8), f(9), f(10), f(11), f(12), f(13), f(14), \
                  f(15), f(16), f(17), f(18), f(19), f(20), f(21), f(22), f(23), f(24), f(25), f(26), f(27), f(28), \
                  f(29), f(30), f(31)}
#define Q4K_0(k) ((k) / 16)
#define Q4K_1(k) (2 + (k) / 16)
#define Q4K_2(k) (4 + (k) / 16)
#define Q4K_3(k) (6 + (k) / 16)
#define Q6K_0(k) ((k) / 8)
#define Q6K_1(k) (4 + (k) / 8)
#define Q6K_2(k) (8 + (k) / 8)
#define Q6K_3(k) (12 + (k) / 8)
static const int16_t Q4K_SCALE_IDX[4][32] __attribute__((aligned(64))) = {IDX16(Q4K_0), IDX16(Q4K_1), IDX16(Q4K_2),
                                                                          IDX16(Q4K_3)};
static const int16_t Q6K_SCALE_IDX[4][32] __attribute__((aligned(64))) = {IDX16(Q6K_0), IDX16(Q6K_1), IDX16(Q6K_2),
                                                                          IDX16(Q6K_3)};
#endif

#ifdef WIDE512
/* Signed codes of two consecutive 32-blocks (a in the low half, b in the high): the
 * nibbles and Q5_0's fifth bits unpacked for both blocks at once. */
static inline __m512i signed_q32_pair(int t, const uint8_t *a, const uint8_t *b) {
    if (t == Q8_0) return pair512(_mm256_loadu_si256((const __m256i *)(a + 2)), _mm256_loadu_si256((const __m256i *)(b + 2)));
    int qs = t == Q4_0 ? 2 : 6;
    __m256i v = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(b + qs)), _mm_loadu_si128((const __m128i *)(a + qs)));
    __m256i nib = _mm256_set1_epi8(0x0f);
    __m512i lohi = pair512(_mm256_and_si256(v, nib), _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
    __m512i codes = _mm512_shuffle_i64x2(lohi, lohi, _MM_SHUFFLE(3, 1, 2, 0)); /* lo a, hi a, lo b, hi b */
    if (t == Q4_0) return _mm512_sub_epi8(codes, _mm512_set1_epi8(8));
    uint32_t qa, qb;
    memcpy(&qa, a + 2, 4);
    memcpy(&qb, b + 2, 4);
    /* w = (q | bit << 4) - 16: elements with the bit set keep q, the others lose 16 */
    __mmask64 low = _knot_mask64(_cvtu64_mask64((uint64_t)qa | ((uint64_t)qb << 32)));
    return _mm512_mask_sub_epi8(codes, low, codes, _mm512_set1_epi8(16));
}
#endif

static inline __m256 lane_step(__m256 acc, float scale, __m256i isum) {
    return _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(isum), acc);
}

/* One 32-block's signed codes w (scale d) against one activation row x (scale dx). */
static inline __m256 q32_step(__m256i w, float d, const int8_t *x, float dx, __m256 acc) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
#else
    __m256i p = _mm256_madd_epi16(pairs_s8(w, xv), _mm256_set1_epi16(1));
#endif
    return lane_step(acc, d * dx, p);
}

#ifdef WIDE512
/* Two consecutive blocks (codes w, scales d0, d1) against one row: block 0's lanes added first. */
static inline __m256 q32_pair(__m512i w, float d0, float d1, const int8_t *x, const float *dx, __m256 acc) {
    __m512i xv = _mm512_loadu_si512(x);
    __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w),
                                    _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(w), _mm512_setzero_si512(), xv));
    acc = lane_step(acc, d0 * dx[0], _mm512_castsi512_si256(p));
    return lane_step(acc, d1 * dx[1], _mm512_extracti64x4_epi64(p, 1));
}
#endif

static void row_q32(int t, const uint8_t *row, int64_t nb, const int8_t *xq, const float *xd, int64_t K,
                    int64_t mc, float *lanes) {
    int bb = specray_block_bytes(t);
    if (mc == 1) { /* decoding: the accumulator stays in a register across blocks, not in memory */
        __m256 acc = _mm256_loadu_ps(lanes);
        int64_t b = 0;
#ifdef WIDE512
        for (; b + 1 < nb; b += 2) {
            const uint8_t *blk = row + b * bb;
            _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
            acc = q32_pair(signed_q32_pair(t, blk, blk + bb), rd_f16(blk), rd_f16(blk + bb), xq + 32 * b, xd + b, acc);
        }
#endif
        for (; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            if (b % 2 == 0) _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
            acc = q32_step(signed_q32(t, blk), rd_f16(blk), xq + 32 * b, xd[b], acc);
        }
        _mm256_storeu_ps(lanes, acc);
        return;
    }
    int64_t b = 0; /* verifying: each block's codes are unpacked once for all rows */
#ifdef WIDE512
    for (; b + 1 < nb; b += 2) {
        const uint8_t *blk = row + b * bb;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m512i w = signed_q32_pair(t, blk, blk + bb);
        float d0 = rd_f16(blk), d1 = rd_f16(blk + bb);
        for (int64_t i = 0; i < mc; i++)
            _mm256_storeu_ps(lanes + 8 * i, q32_pair(w, d0, d1, xq + i * K + 32 * b, xd + i * (K / 32) + b,
                                                      _mm256_loadu_ps(lanes + 8 * i)));
    }
#endif
    for (; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        if (b % 2 == 0) _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m256i w = signed_q32(t, blk);
        float d = rd_f16(blk);
        for (int64_t i = 0; i < mc; i++)
            _mm256_storeu_ps(lanes + 8 * i, q32_step(w, d, xq + i * K + 32 * b, xd[i * (K / 32) + b],
                                                      _mm256_loadu_ps(lanes + 8 * i)));
    }
}

/* The 8 six-bit scales and the 8 mins of a Q4_K block, scale (min) j in byte j of a 64-bit
 * word: the byte loop of q4k_scale_min done four bytes at a time, kept in registers (bytes
 * stored and read back as one word would stall store forwarding, in every block). */
static inline void q4k_scales(const uint8_t *s, uint64_t *sc, uint64_t *m) {
    uint32_t a, b, c, lo = 0x3f3f3f3f, nib = 0x0f0f0f0f, top = 0x03030303;
    memcpy(&a, s, 4);
    memcpy(&b, s + 4, 4);
    memcpy(&c, s + 8, 4);
    uint32_t sc0 = a & lo, sc1 = (c & nib) | (((a >> 6) & top) << 4);
    uint32_t m0 = b & lo, m1 = ((c >> 4) & nib) | (((b >> 6) & top) << 4);
    *sc = sc0 | (uint64_t)sc1 << 32;
    *m = m0 | (uint64_t)m1 << 32;
}

/* Q4_K mins of one block against one activation row (s: its 8 sums per 32), into the four
 * min lanes: lane l gets m_2l*s_2l + m_2l+1*s_2l+1 (exact), scaled by dmin*dx. */
static inline __m128 q4k_min_step(__m128 macc, __m128i mins, const int16_t *s, float scale) {
    const __m128i p = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)s));
    return _mm_fmadd_ps(_mm_set1_ps(scale), _mm_cvtepi32_ps(p), macc);
}

/* One block's header: d, dmin (exact f16 conversions), its scales and mins as int16. */
static inline void q4k_head(const uint8_t *blk, float *d, float *dmin, __m128i *sc16, __m128i *mins) {
    int32_t dpair;
    memcpy(&dpair, blk, 4);
    const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(dpair));
    *d = _mm_cvtss_f32(dd);
    *dmin = _mm_cvtss_f32(_mm_movehdup_ps(dd));
    uint64_t sc8, mn8;
    q4k_scales(blk + 4, &sc8, &mn8);
    *mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((int64_t)mn8));
    *sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((int64_t)sc8));
}

static inline void q4k_prefetch(const uint8_t *blk) {
    _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
    _mm_prefetch((const char *)blk + PREFETCH + 64, _MM_HINT_T0);
    _mm_prefetch((const char *)blk + PREFETCH + 128, _MM_HINT_T0);
}

/* Decoding (one activation row): the block's integer lane sums against x. On AVX2 each 64
 * codes are unpacked, scaled and used at once, so nothing spills (eight codes and eight
 * scales would take all 16 ymm registers). */
static inline __m256i q4k_isum_one(const uint8_t *blk, __m128i sc16, const int8_t *x) {
#ifdef WIDE512
    const __m512i nib = _mm512_set1_epi8(0x0f), sc512 = _mm512_broadcast_i32x4(sc16);
    __m512i wide = _mm512_setzero_si512();
    for (int c = 0; c < 4; c += 2) {
        const __m512i q = _mm512_loadu_si512(blk + 16 + 32 * c);
        const __m512i lo = _mm512_and_si512(q, nib), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), nib);
        const __m512i c0 = _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i c1 = _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));
        wide = _mm512_dpwssd_epi32(wide, _mm512_maddubs_epi16(c0, _mm512_loadu_si512(x + 64 * c)),
                                   _mm512_permutexvar_epi16(_mm512_load_si512(Q4K_SCALE_IDX[c]), sc512));
        wide = _mm512_dpwssd_epi32(wide, _mm512_maddubs_epi16(c1, _mm512_loadu_si512(x + 64 * c + 64)),
                                   _mm512_permutexvar_epi16(_mm512_load_si512(Q4K_SCALE_IDX[c + 1]), sc512));
    }
    return fold512(wide);
#else
    const __m256i nib = _mm256_set1_epi8(0x0f), sc256 = _mm256_broadcastsi128_si256(sc16);
    __m256i isum = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * c));
        const __m256i slo = _mm256_shuffle_epi8(sc256, _mm256_set1_epi16((short)(((4 * c + 1) << 8) | (4 * c))));
        const __m256i shi = _mm256_shuffle_epi8(sc256, _mm256_set1_epi16((short)(((4 * c + 3) << 8) | (4 * c + 2))));
        isum = add_scaled(isum, pairs_u8(_mm256_and_si256(q, nib), _mm256_loadu_si256((const __m256i *)(x + 64 * c))),
                          slo);
        isum = add_scaled(isum, pairs_u8(_mm256_and_si256(_mm256_srli_epi16(q, 4), nib),
                                         _mm256_loadu_si256((const __m256i *)(x + 64 * c + 32))), shi);
    }
    return isum;
#endif
}

/* Decoding: both accumulators stay in registers across blocks, not in memory. */
static void row_q4k_one(const uint8_t *row, int64_t nb, const int8_t *x, const float *xd, const int16_t *xs,
                        float *lanes, float *macc) {
    __m256 acc = _mm256_loadu_ps(lanes);
    __m128 mac = _mm_loadu_ps(macc);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 144;
        q4k_prefetch(blk);
        float d, dmin;
        __m128i sc16, mins;
        q4k_head(blk, &d, &dmin, &sc16, &mins);
        const __m256i isum = q4k_isum_one(blk, sc16, x + 256 * b);
        const float dx = xd[b];
        acc = lane_step(acc, d * dx, isum);
        mac = q4k_min_step(mac, mins, xs + 8 * b, dmin * dx);
    }
    _mm256_storeu_ps(lanes, acc);
    _mm_storeu_ps(macc, mac);
}

static void row_q4k(const uint8_t *row, int64_t nb, const int8_t *xq, const float *xd, const int16_t *xs,
                    int64_t K, int64_t mc, float *lanes, float *macc) {
    if (mc == 1) {
        row_q4k_one(row, nb, xq, xd, xs, lanes, macc);
        return;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 144;
        q4k_prefetch(blk);
        float d, dmin;
        __m128i sc16, mins;
        q4k_head(blk, &d, &dmin, &sc16, &mins);
#ifdef WIDE512
        /* codes2[c]: 32-group 2c's codes (low nibbles of bytes 32c..32c+31), then group
         * 2c + 1's (their high nibbles); scale2[c]: sc[2c] in the low half, sc[2c + 1] in the
         * high, as int16 */
        __m512i codes2[4], scale2[4];
        const __m512i nib = _mm512_set1_epi8(0x0f), sc512 = _mm512_broadcast_i32x4(sc16);
        for (int c = 0; c < 4; c += 2) {
            const __m512i q = _mm512_loadu_si512(blk + 16 + 32 * c);
            const __m512i lo = _mm512_and_si512(q, nib), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), nib);
            codes2[c] = _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));
            codes2[c + 1] = _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int c = 0; c < 4; c++) scale2[c] = _mm512_permutexvar_epi16(_mm512_load_si512(Q4K_SCALE_IDX[c]), sc512);
#else
        /* verifying: codes[j]: 32-group j's codes; scale[j]: sc[j] as int16 in every lane (one
         * byte shuffle), unpacked once for all rows */
        __m256i codes[8], scale[8];
        const __m256i nib = _mm256_set1_epi8(0x0f), sc256 = _mm256_broadcastsi128_si256(sc16);
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * c));
            codes[2 * c] = _mm256_and_si256(q, nib);
            codes[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), nib);
        }
        for (int j = 0; j < 8; j++)
            scale[j] = _mm256_shuffle_epi8(sc256, _mm256_set1_epi16((short)(((2 * j + 1) << 8) | (2 * j))));
#endif
        for (int64_t i = 0; i < mc; i++) {
            const int8_t *x = xq + i * K + 256 * b;
#ifdef WIDE512
            __m512i wide = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++)
                wide = _mm512_dpwssd_epi32(wide, _mm512_maddubs_epi16(codes2[c], _mm512_loadu_si512(x + 64 * c)),
                                           scale2[c]);
            __m256i isum = fold512(wide);
#else
            __m256i isum = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++)
                isum = add_scaled(isum, pairs_u8(codes[j], _mm256_loadu_si256((const __m256i *)(x + 32 * j))), scale[j]);
#endif
            const float dx = xd[i * (K / 256) + b];
            _mm256_storeu_ps(lanes + 8 * i, lane_step(_mm256_loadu_ps(lanes + 8 * i), d * dx, isum));
            _mm_storeu_ps(macc + 4 * i,
                          q4k_min_step(_mm_loadu_ps(macc + 4 * i), mins, xs + i * (K / 32) + 8 * b, dmin * dx));
        }
    }
}

#ifndef WIDE512
/* Q6_K decoding on AVX2 (one activation row): each 32-group's codes and scales are made
 * and used at once, so nothing spills, and the accumulator stays in a register. */
static void row_q6k_one(const uint8_t *row, int64_t nb, const int8_t *x, const float *xd, float *lanes) {
    const __m256i nib = _mm256_set1_epi8(0x0f), two = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    __m256 acc = _mm256_loadu_ps(lanes);
    for (int64_t b = 0; b < nb; b++, x += 256) {
        const uint8_t *blk = row + b * 210;
        for (int c = 0; c < 256; c += 64) _mm_prefetch((const char *)blk + PREFETCH + c, _MM_HINT_T0);
        const __m256i sc8 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 192)));
        __m256i isum = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            for (int r = 0; r < 4; r++) {
                const int j = 4 * h + r;
                const __m256i l = r & 1 ? l1 : l0;
                const __m256i lo = r < 2 ? _mm256_and_si256(l, nib) : _mm256_and_si256(_mm256_srli_epi16(l, 4), nib);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 2 * r), two);
                const __m256i w = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), off);
                const __m256i pick = _mm256_setr_m128i(_mm_set1_epi16((short)((2 * j) << 8 | 0x80)),
                                                       _mm_set1_epi16((short)((2 * j + 1) << 8 | 0x80)));
                isum = add_scaled(isum, pairs_s8(w, _mm256_loadu_si256((const __m256i *)(x + 32 * j))),
                                  _mm256_srai_epi16(_mm256_shuffle_epi8(sc8, pick), 8));
            }
        }
        acc = lane_step(acc, rd_f16(blk + 208) * xd[b], isum);
    }
    _mm256_storeu_ps(lanes, acc);
}
#endif

static void row_q6k(const uint8_t *row, int64_t nb, const int8_t *xq, const float *xd, int64_t K, int64_t mc,
                    float *lanes) {
#ifndef WIDE512
    if (mc == 1) {
        row_q6k_one(row, nb, xq, xd, lanes);
        return;
    }
#endif
    const __m256i nib = _mm256_set1_epi8(0x0f), two = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 210;
        for (int c = 0; c < 256; c += 64) _mm_prefetch((const char *)blk + PREFETCH + c, _MM_HINT_T0);
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = rd_f16(blk + 208);
        __m256i codes[8];
#ifndef WIDE512
        __m256i scale[8];
#endif
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            __m256i lo[4] = {_mm256_and_si256(l0, nib), _mm256_and_si256(l1, nib),
                             _mm256_and_si256(_mm256_srli_epi16(l0, 4), nib),
                             _mm256_and_si256(_mm256_srli_epi16(l1, 4), nib)};
            __m256i hi[4] = {_mm256_and_si256(q, two), _mm256_and_si256(_mm256_srli_epi16(q, 2), two),
                             _mm256_and_si256(_mm256_srli_epi16(q, 4), two),
                             _mm256_and_si256(_mm256_srli_epi16(q, 6), two)};
            for (int r = 0; r < 4; r++)
                codes[4 * h + r] = _mm256_sub_epi8(_mm256_or_si256(lo[r], _mm256_slli_epi16(hi[r], 4)), off);
        }
#ifdef WIDE512
        /* scale2[c]: sc[4c + i] in quarter i, as int16: one permute each */
        __m512i codes2[4], scale2[4];
        const __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc)));
        for (int c = 0; c < 4; c++) {
            codes2[c] = pair512(codes[2 * c], codes[2 * c + 1]);
            scale2[c] = _mm512_permutexvar_epi16(_mm512_load_si512(Q6K_SCALE_IDX[c]), sc16);
        }
#else
        /* scale[j]: sc[2j] in the low 128 bits, sc[2j + 1] in the high, as int16: the byte
         * shuffled into each int16's high byte, then shifted down with its sign */
        const __m256i sc8 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)sc));
        for (int j = 0; j < 8; j++) {
            const __m256i pick = _mm256_setr_m128i(_mm_set1_epi16((short)((2 * j) << 8 | 0x80)),
                                                   _mm_set1_epi16((short)((2 * j + 1) << 8 | 0x80)));
            scale[j] = _mm256_srai_epi16(_mm256_shuffle_epi8(sc8, pick), 8);
        }
#endif
        for (int64_t i = 0; i < mc; i++) {
            const int8_t *x = xq + i * K + 256 * b;
#ifdef WIDE512
            __m512i wide = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++)
                wide = _mm512_dpwssd_epi32(wide, pairs_s8_512(codes2[c], _mm512_loadu_si512(x + 64 * c)), scale2[c]);
            __m256i isum = fold512(wide);
#else
            __m256i isum = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++)
                isum = add_scaled(isum, pairs_s8(codes[j], _mm256_loadu_si256((const __m256i *)(x + 32 * j))), scale[j]);
#endif
            _mm256_storeu_ps(lanes + 8 * i, lane_step(_mm256_loadu_ps(lanes + 8 * i), d * xd[i * (K / 256) + b], isum));
        }
    }
}
#endif

/* ----------------------------------------------------------------- the product */

#define MCHUNK 32

int64_t specray_scratch_bytes(int64_t M, int64_t K);


struct quantize_job {
    const float *x;
    int64_t K;
    int bs;
    int8_t *q;
    float *d;
    int16_t *s;
};

static void quantize_range(void *ctx, int64_t begin, int64_t end) {
    const struct quantize_job *j = ctx;
    for (int64_t m = begin; m < end; m++)
        quantize_x(j->x + m * j->K, j->K, j->bs, j->q + m * j->K, j->d + m * (j->K / j->bs), j->s + m * (j->K / 32));
}

/* Rows x[M, K] -> int8 codes [M, K], scales [M, K/bs] and sums per 32 [M, K/32] in `scratch`. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int bs, void *scratch, int threads,
                          int8_t **xq, float **xd, int16_t **xs) {
    *xq = (int8_t *)scratch;
    *xd = (float *)(*xq + ((M * K + 63) / 64) * 64);
    *xs = (int16_t *)(*xd + M * (K / 32));
    struct quantize_job job = {.x = x, .K = K, .bs = bs, .q = *xq, .d = *xd, .s = *xs};
    specray_parallel(M, M > 4 ? threads : 1, quantize_range, &job);
}

/* One weight row against every activation row: out[m * ldo] for m < M. */
static void product_row(int t, const uint8_t *row, int64_t K, int64_t M, const int8_t *xq, const float *xd,
                        const int16_t *xs, float *out, int64_t ldo) {
    int64_t nb = K / specray_block_size(t);
    if (M == 1) { /* decoding: accumulators of one row, not MCHUNK's zeroed and summed from memory (15% of a
                   * 1.5B step on a Zen 3, where a row of 1536 is only 6 Q4_K blocks); same arithmetic */
        float lanes[8] = {0}, macc[4] = {0};
        if (t == Q4_K) row_q4k(row, nb, xq, xd, xs, K, 1, lanes, macc);
        else if (t == Q6_K) row_q6k(row, nb, xq, xd, K, 1, lanes);
        else row_q32(t, row, nb, xq, xd, K, 1, lanes);
        out[0] = hsum8(lanes) - hsum4(macc);
        return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        int64_t mc = M - m0 < MCHUNK ? M - m0 : MCHUNK;
        float lanes[8 * MCHUNK], macc[4 * MCHUNK];
        for (int64_t i = 0; i < 8 * mc; i++) lanes[i] = 0.0f;
        for (int64_t i = 0; i < 4 * mc; i++) macc[i] = 0.0f;
        const int8_t *xm = xq + m0 * K;
        if (t == Q4_K) row_q4k(row, nb, xm, xd + m0 * nb, xs + m0 * (K / 32), K, mc, lanes, macc);
        else if (t == Q6_K) row_q6k(row, nb, xm, xd + m0 * nb, K, mc, lanes);
        else row_q32(t, row, nb, xm, xd + m0 * nb, K, mc, lanes);
        for (int64_t i = 0; i < mc; i++) out[(m0 + i) * ldo] = hsum8(lanes + 8 * i) - hsum4(macc + 4 * i);
    }
}

struct product_job {
    int count;
    const int *types;
    const uint8_t *const *ws;
    const float *const *bias;
    const int64_t *first; /* weight i's rows are output columns first[i] .. first[i + 1] - 1 */
    int64_t K, M;
    const int8_t *q32, *q256;
    const float *d32, *d256;
    const int16_t *s32, *s256;
    const float *residual;
    float *out;
};

/* Output columns [begin, end) of specray_matmul_many: one weight row each. */
static void product_range(void *ctx, int64_t begin, int64_t end) {
    const struct product_job *j = ctx;
    const int64_t K = j->K, M = j->M, total = j->first[j->count];
    int i = 0;
    for (int64_t n = begin; n < end; n++) {
        while (n >= j->first[i + 1]) i++;
        int t = j->types[i], bs = specray_block_size(t);
        int64_t r = n - j->first[i], rb = K / bs * specray_block_bytes(t);
        if (bs == 32) product_row(t, j->ws[i] + r * rb, K, M, j->q32, j->d32, j->s32, j->out + n, total);
        else product_row(t, j->ws[i] + r * rb, K, M, j->q256, j->d256, j->s256, j->out + n, total);
        if (j->bias && j->bias[i]) {
            float b = j->bias[i][r];
            for (int64_t m = 0; m < M; m++) j->out[m * total + n] = j->out[m * total + n] + b;
        }
        if (j->residual)
            for (int64_t m = 0; m < M; m++) j->out[m * total + n] = j->residual[m * total + n] + j->out[m * total + n];
    }
}

/* Several weights w_i [N_i, K] (types t_i) against the same x [M, K], side by side in one
 * output: out[M, sum N_i] = [x @ w_0.T + b_0 | x @ w_1.T + b_1 | ...] (+ residual, same
 * shape, when given). x is quantized once per block size, and one parallel loop runs over
 * every weight row, so a layer's q/k/v (or gate/up) cost one call. Each output element is
 * computed exactly as a product with that weight alone (same row code, same arithmetic),
 * and the bias and residual are single float adds, as torch's `y + b` would be. */
int specray_matmul_many(int count, const int *types, const uint8_t *const *ws, const int64_t *ns,
                        const float *const *bias, const float *x, int64_t M, int64_t K, const float *residual,
                        float *out, int threads, void *scratch) {
    if (count < 1 || count > 8) return -4;
    int64_t first[9], total = 0;
    int need32 = 0, need256 = 0;
    for (int i = 0; i < count; i++) {
        int bs = specray_block_size(types[i]);
        if (specray_block_bytes(types[i]) < 0) return -1;
        if (K % bs) return -2;
        if (bs == 32) need32 = 1; else need256 = 1;
        first[i] = total;
        total += ns[i];
    }
    first[count] = total;
    /* scratch: one quantization of x per block size in use */
    int64_t one = specray_scratch_bytes(M, K);
    int8_t *q32 = NULL, *q256 = NULL;
    float *d32 = NULL, *d256 = NULL;
    int16_t *s32 = NULL, *s256 = NULL;
    if (need32) quantize_rows(x, M, K, 32, scratch, threads, &q32, &d32, &s32);
    if (need256) quantize_rows(x, M, K, 256, (uint8_t *)scratch + one * need32, threads, &q256, &d256, &s256);

    struct product_job job = {.count = count, .types = types, .ws = ws, .bias = bias, .first = first, .K = K, .M = M,
                              .q32 = q32, .q256 = q256, .d32 = d32, .d256 = d256, .s32 = s32, .s256 = s256,
                              .residual = residual, .out = out};
    specray_parallel(total, threads, product_range, &job);
    return 0;
}

/* out[m, n] = sum_k x[m, k] * w[n, k] for m < M, n < N; w rows of row_bytes bytes. */
int specray_matmul(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                   int64_t row_bytes, float *out, int threads, void *scratch) {
    int bs = specray_block_size(t), bb = specray_block_bytes(t);
    if (bb < 0) return -1;
    if (K % bs) return -2;
    if (row_bytes != K / bs * bb) return -3;
    return specray_matmul_many(1, &t, &w, &N, NULL, x, M, K, NULL, out, threads, scratch);
}

/* Bytes of scratch specray_matmul needs for M rows of K. */
int64_t specray_scratch_bytes(int64_t M, int64_t K) {
    return ((M * K + 63) / 64) * 64 + 2 * M * (K / 32) * 4 + 64;
}

/* Which SIMD path this build took: 0 scalar, 1 avx2, 2 avx512vnni. */
int specray_variant(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
