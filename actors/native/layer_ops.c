/* The float work of a decoder layer around its quantized products, each as one call:
 * RMSNorm, rotary embedding + KV-cache write, attention of single rows over cache slots,
 * and SwiGLU. Used by row-exact quantized models (actors/fused.py), where a decoding step
 * is otherwise ~40 small torch ops per layer, each costing more to dispatch than to run.
 *
 * Every function works row by row, in a fixed order of float operations that does not
 * depend on how many rows come in one call, on the thread count, or on the instruction
 * set (no reassociation: built with -ffp-contract=off, lane sums written out), so a
 * verify pass still gives each row the bits of decoding it alone.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "pool.h"

/* e^x for the softmax and SiLU: Cephes' expf (range reduction by ln 2, a degree-6
 * polynomial, ~1 ulp), written as plain float operations (rounding by the 1.5 * 2^23
 * trick), so the compiler vectorizes it and every instruction set gets the same bits. */
static inline float exp_f(float x) {
    x = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

/* out[m] = w * (x[m] * (1 / sqrt(mean(x[m]^2) + eps))), as Llama/Qwen's RMSNorm; the sum of
 * squares in 16 lanes (K % 16 == 0, else the tail goes to lane 0), folded in a fixed order. */
void specray_rmsnorm(const float *x, int64_t M, int64_t K, const float *w, float eps, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float acc[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= K; i += 16)
            for (int l = 0; l < 16; l++) acc[l] = acc[l] + xr[i + l] * xr[i + l];
        for (; i < K; i++) acc[0] = acc[0] + xr[i] * xr[i];
        for (int half = 8; half > 0; half /= 2)
            for (int l = 0; l < half; l++) acc[l] = acc[l] + acc[l + half];
        float r = 1.0f / sqrtf(acc[0] / (float)K + eps);
        for (i = 0; i < K; i++) out[m * K + i] = w[i] * (xr[i] * r);
    }
}

/* x [D] rotated in place at one position (rotate-half RoPE): the same float operations as
 * x * cos + rotate_half(x) * sin, element by element. */
static void rotate(float *x, const float *c, const float *s, int D, float *dst) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        dst[i] = a * c[i] + (-b) * s[i];
        dst[i + h] = b * c[i + h] + a * s[i + h];
    }
}

/* qkv rows [T, ld]: q heads [H, D] at 0, k heads [Hkv, D] at H*D, v at (H+Hkv)*D.
 * Rotates q in place; writes rotated k and v to cache slots start..start+T-1 of
 * kc/vc [Hkv, cap, D]. cos/sin [T, D]: each row's position. */
void specray_rope_store(float *qkv, int64_t T, int64_t ld, int H, int Hkv, int D, const float *cos,
                        const float *sin, float *kc, float *vc, int64_t cap, int64_t start) {
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * ld;
        const float *c = cos + t * D, *s = sin + t * D;
        for (int h = 0; h < H; h++) rotate(row + h * D, c, s, D, row + h * D);
        for (int h = 0; h < Hkv; h++) {
            float *kd = kc + ((int64_t)h * cap + start + t) * D, *vd = vc + ((int64_t)h * cap + start + t) * D;
            rotate(row + (H + h) * D, c, s, D, kd);
            memcpy(vd, row + (H + Hkv + h) * D, (size_t)D * sizeof(float));
        }
    }
}

#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* a . b for D % 8 == 0: eight lanes (lane l sums elements l, l + 8, ...), folded in a fixed
 * order. The AVX2 form does exactly these float operations. */
static float dot(const float *a, const float *b, int D) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#if defined(__AVX2__)
    __m256 v = _mm256_setzero_ps();
    for (int i = 0; i < D; i += 8) v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    _mm256_storeu_ps(acc, v);
#else
    for (int i = 0; i < D; i += 8)
        for (int l = 0; l < 8; l++) acc[l] = acc[l] + a[i + l] * b[i + l];
#endif
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* o[d] = o[d] + w * v[d], d < D (D % 8 == 0). */
static void axpy(float *o, float w, const float *v, int D) {
#if defined(__AVX2__)
    __m256 wv = _mm256_set1_ps(w);
    for (int d = 0; d < D; d += 8)
        _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_loadu_ps(o + d), _mm256_mul_ps(wv, _mm256_loadu_ps(v + d))));
#else
    for (int d = 0; d < D; d++) o[d] = o[d] + w * v[d];
#endif
}


struct attend_job {
    const float *q, *kc, *vc;
    int64_t ldq, cap;
    int Hkv, D, g;
    const int64_t *lo, *n, *off, *idx;
    float scale;
    float *out;
    atomic_int fail;
};

/* Tasks [begin, end) of specray_attend_rows: task = row t's KV head kv, t * Hkv + kv. */
static void attend_range(void *ctx, int64_t begin, int64_t end) {
    struct attend_job *j = ctx;
    const int g = j->g, D = j->D, H = j->Hkv * g;
    for (int64_t task = begin; task < end; task++) {
        int64_t t = task / j->Hkv;
        int kv = (int)(task % j->Hkv);
        int64_t len = j->n[t], lo = j->lo[t], off = j->off[t];
        float *p = malloc(sizeof(float) * (size_t)(g * len > 0 ? g * len : 1));
        if (!p) {
            atomic_store(&j->fail, 1);
            continue;
        }
        const float *qs = j->q + t * j->ldq + (int64_t)kv * g * D;
        const float *kh = j->kc + (int64_t)kv * j->cap * D, *vh = j->vc + (int64_t)kv * j->cap * D;
        for (int64_t s = 0; s < len; s++) {
            int64_t slot = off < 0 ? lo + s : j->idx[off + s];
            for (int i = 0; i < g; i++) p[i * len + s] = dot(qs + i * D, kh + slot * D, D) * j->scale;
        }
        for (int i = 0; i < g; i++) {
            float *pi = p + i * len, mx = -INFINITY, sum = 0.0f;
            for (int64_t s = 0; s < len; s++) mx = pi[s] > mx ? pi[s] : mx;
            for (int64_t s = 0; s < len; s++) {
                pi[s] = exp_f(pi[s] - mx);
                sum = sum + pi[s];
            }
            float *o = j->out + t * (int64_t)H * D + ((int64_t)kv * g + i) * D;
            for (int d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t s = 0; s < len; s++) {
                int64_t slot = off < 0 ? lo + s : j->idx[off + s];
                axpy(o, pi[s], vh + slot * D, D);
            }
            for (int d = 0; d < D; d++) o[d] = o[d] / sum;
        }
        free(p);
    }
}

/* Attention of T rows, each alone over its own cache slots. q rows [T, ldq] hold heads
 * [H, D]; query head h reads KV head h / (H / Hkv). Row t sees n[t] slots: lo[t] .. lo[t] +
 * n[t] - 1 when off[t] < 0, else idx[off[t] .. off[t] + n[t] - 1]. out [T, H * D]. */
int specray_attend_rows(const float *q, int64_t T, int64_t ldq, int H, int Hkv, int D, const float *kc,
                        const float *vc, int64_t cap, const int64_t *lo, const int64_t *n, const int64_t *off,
                        const int64_t *idx, float scale, float *out, int threads) {
    if (D % 8 || H % Hkv) return -1;
    int64_t work = 0; /* multiply-adds: threads only where they pay for their start */
    for (int64_t t = 0; t < T; t++) work += n[t] * H * D;
    struct attend_job job = {.q = q, .kc = kc, .vc = vc, .ldq = ldq, .cap = cap, .Hkv = Hkv, .D = D, .g = H / Hkv,
                             .lo = lo, .n = n, .off = off, .idx = idx, .scale = scale, .out = out};
    atomic_init(&job.fail, 0);
    specray_parallel(T * Hkv, work > (1 << 20) ? threads : 1, attend_range, &job);
    return atomic_load(&job.fail) ? -2 : 0;
}

/* out[m, i] = silu(gu[m, i]) * gu[m, I + i]: gate and up side by side, as one product gives them. */
void specray_swiglu(const float *gu, int64_t M, int64_t I, float *out) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i++) {
            float g = gu[m * 2 * I + i];
            out[m * I + i] = g / (1.0f + exp_f(-g)) * gu[m * 2 * I + I + i];
        }
}
