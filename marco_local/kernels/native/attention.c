/* One new token's attention over a 16-bit KV cache (bf16, or IEEE half: llama.cpp's F16 cache, whose 10-bit
 * mantissa keeps a GGUF model's prompt closer to the exact model), grouped-query, for decode on the CPU.
 *
 * Why: torch's CPU attention is fast only in float32, and casting the whole cached prefix to float32 every step costs
 * a copy that grows with the context (Nano-shaped model: 1 ms/token at 64 positions, 45 ms at 2048). Here the keys
 * and values are read once, as 16-bit values, and widened in registers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml_dot.h"
#include "platform.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Widened 16-bit cache values, 16 (AVX-512) or 8 (AVX2 with F16C) at a time */
#ifdef __AVX512F__
static inline __m512 widen16(const uint16_t *p, int f16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return f16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(__AVX2__) && defined(__F16C__)
static inline __m256 widen8(const uint16_t *p, int f16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return f16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* IEEE half to float without branches (normals and subnormals by two float operations, then a select), so that
 * compilers vectorize the loops that use it: the plain-C path converts a whole cache row before its dot. */
static inline float half_to_float_nb(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w, bits;
    uint32_t norm_bits = (two_w >> 4) + (0xE0u << 23), denorm_bits = (two_w >> 17) | (126u << 23);
    float norm, denorm;
    memcpy(&norm, &norm_bits, 4);
    memcpy(&denorm, &denorm_bits, 4);
    norm *= 0x1.0p-112f; /* rebias the exponent: 15 -> 127; inf and NaN stay inf and NaN */
    denorm -= 0.5f;      /* a subnormal's mantissa, as 0.5 + m * 2^-24 - 0.5 */
    uint32_t nb, db;
    memcpy(&nb, &norm, 4);
    memcpy(&db, &denorm, 4);
    bits = sign | (two_w < (1u << 27) ? db : nb);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void widen_row(const uint16_t *src, float *dst, int n, int f16) {
    if (f16)
        for (int i = 0; i < n; i++) dst[i] = half_to_float_nb(src[i]);
    else
        for (int i = 0; i < n; i++) dst[i] = bf16_to_float(src[i]);
}

static float dot_f32_kv(const float *q, const uint16_t *k, int hd, int f16) {
#ifdef __AVX512F__
    if (hd % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < hd; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), widen16(k + d, f16), acc);
        return _mm512_reduce_add_ps(acc);
    }
#elif defined(__AVX2__) && defined(__F16C__)
    if (hd % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int d = 0; d < hd; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), widen8(k + d, f16), acc);
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
#endif
    float row[512], s = 0.0f;
    for (int d0 = 0; d0 < hd; d0 += 512) {
        int n = hd - d0 < 512 ? hd - d0 : 512;
        widen_row(k + d0, row, n, f16);
        for (int d = 0; d < n; d++) s += q[d0 + d] * row[d];
    }
    return s;
}

float dot_f32_bf16(const float *q, const uint16_t *k, int hd) { return dot_f32_kv(q, k, hd, 0); }

static void axpy_kv(float a, const uint16_t *v, float *out, int hd, int f16) {
#ifdef __AVX512F__
    if (hd % 16 == 0) {
        __m512 va = _mm512_set1_ps(a);
        for (int d = 0; d < hd; d += 16)
            _mm512_storeu_ps(out + d, _mm512_fmadd_ps(va, widen16(v + d, f16), _mm512_loadu_ps(out + d)));
        return;
    }
#elif defined(__AVX2__) && defined(__F16C__)
    if (hd % 8 == 0) {
        __m256 va = _mm256_set1_ps(a);
        for (int d = 0; d < hd; d += 8)
            _mm256_storeu_ps(out + d, _mm256_fmadd_ps(va, widen8(v + d, f16), _mm256_loadu_ps(out + d)));
        return;
    }
#endif
    float row[512];
    for (int d0 = 0; d0 < hd; d0 += 512) {
        int n = hd - d0 < 512 ? hd - d0 : 512;
        widen_row(v + d0, row, n, f16);
        for (int d = 0; d < n; d++) out[d0 + d] += a * row[d];
    }
}

typedef struct {
    const float *q;
    const uint16_t *k, *v;
    int64_t head_stride;
    int n_pos, group, hd, f16;
    float scale, *scores, *out;
} attend_job;

static void attend_heads(void *ctx, int begin, int end) {
    const attend_job *j = ctx;
    int n_pos = j->n_pos, hd = j->hd;
    for (int h = begin; h < end; h++) {
        const uint16_t *kh = j->k + (int64_t)(h / j->group) * j->head_stride;
        const uint16_t *vh = j->v + (int64_t)(h / j->group) * j->head_stride;
        const float *qh = j->q + (size_t)h * hd;
        float *s = j->scores + (size_t)h * n_pos, *o = j->out + (size_t)h * hd, m = -INFINITY, sum = 0.0f;
        for (int p = 0; p < n_pos; p++) {
            s[p] = j->scale * dot_f32_kv(qh, kh + (size_t)p * hd, hd, j->f16);
            m = s[p] > m ? s[p] : m;
        }
        for (int p = 0; p < n_pos; p++) {
            s[p] = expf(s[p] - m);
            sum += s[p];
        }
        memset(o, 0, sizeof(float) * hd);
        float inv = 1.0f / sum;
        for (int p = 0; p < n_pos; p++) axpy_kv(s[p] * inv, vh + (size_t)p * hd, o, hd, j->f16);
    }
}

/* out[h, :] = softmax(scale * q_h . K_g) V_g over the first n_pos cached positions, g = h / (n_heads / n_kv).
 * q, out: float32 [n_heads, hd]; keys/values: bf16, or IEEE half when f16 is set, kv head g's position p at
 * k + g * head_stride + p * hd. Returns 0, -1 on bad arguments, -2 without memory. */
MARCO_API int marco_attend(const float *q, const uint16_t *k, const uint16_t *v, int64_t head_stride, int n_pos,
                           int n_heads, int n_kv, int hd, float scale, int f16, float *out, int n_threads) {
    if (n_pos <= 0 || n_kv <= 0 || n_heads % n_kv || hd <= 0) return -1;
    float *scores = marco_scratch(sizeof(float) * (size_t)n_heads * n_pos);
    if (!scores) return -2;
    attend_job j = {q, k, v, head_stride, n_pos, n_heads / n_kv, hd, f16, scale, scores, out};
    marco_parallel_for(n_heads, n_threads, attend_heads, &j);
    return 0;
}
