/* Vectorised dot products for the K-quants (Q4_K, Q5_K, Q6_K) with act256 activations.
 *
 * Approach (same integer sums as dot_ref.c, float arithmetic reordered): per super-block of 256 weights, each run of
 * 32 weights is rebuilt as unsigned bytes (nibble, plus the fifth bit for Q5_K, plus the top two bits for Q6_K, whose
 * -32 offset is taken out afterwards through the activation block sums) and dotted with the int8 activations, u8 x s8
 * -> int32 partial sums of 4 (vpdpbusd; on plain AVX2 vpmaddubsw + vpmaddwd). Those partials fit int16 (|4 * 63 *
 * 127| < 32768), so two of them are packed (vpackssdw, never saturating) and multiplied by their sub-block scales with
 * one vpdpwssd (vpmaddwd + vpaddd on AVX2) into the super-block's int32 vector. Q4_K/Q5_K mins and Q6_K's -32 offset
 * come from vpmaddwd of the block sums with the mins/scales. Each super-block ends in float FMAs of its int32 lanes
 * (one for Q6_K, scale part and mins part for Q4_K/Q5_K); the row is reduced horizontally once.
 *
 * Three builds: 512-bit (AVX512BW + VNNI: 64 weight bytes per instruction; Q6_K's halves line up with the activations,
 * Q4_K/Q5_K pair sub-blocks with one vshufi64x2), 256-bit (AVX2, with vpdpbusd when AVX512VL+VNNI); without AVX2, dot_plain.c. What
 * bounds these loops (measured on the EPYC here, cpu family 26, whose 512-bit ops run at the 256-bit rate): loads (2
 * per cycle; weight vectors are loaded once, the compiler would fold them into every use), then shuffles. Scales are
 * decoded once per block (next block's one iteration ahead) into a byte vector that vpshufb / vpermw spread; stack
 * round trips (store, then broadcast loads) measured slower.
 *
 * Measured (1 thread, one token, 768 rows x 1024 inputs, matrix in cache; us per native.matmul call, of which ~5 us is
 * the call itself: ctypes, activation quantization, output tensor; bench/native_kernels_kquants.py):
 *   Q4_K  50.4 -> 15.5   (the loop alone: 8.9 us, 12 cycles per super-block; 256-bit AVX2 build 13.3 us)
 *   Q5_K  85.0 -> 18.2   (12.2 us; AVX2 17.6 us)
 *   Q6_K  1319 -> 15.3   (8.8 us; AVX2 15.5 us)
 * A 151936 x 1024 Q6_K lm_head (128 MB, from memory): 2.6-2.8 ms at 2 threads, 46-49 GB/s (a plain 2-thread read of
 * the same size: ~57 GB/s); 3.9 ms, 33 GB/s at 1 thread.
 *
 * Several tokens (prefill): dot_q4_K_x4 dots one Q4_K row with 4 tokens, unpacking weights and scales once (512-bit
 * build; the others call the one-token kernel per token), each token's result bit-identical to dot_q4_K's. Measured
 * (bench/native_tokens.py, us per native.matmul call, 384 x 1024, with matmul.c's row tiles): 1 thread M = 16
 * 92 -> 62, M = 128 714 -> 472; 2 threads M = 45 136 -> 94. End to end, a 512-token prefill of the nano Q4_K_M model
 * at 2 threads: 206 -> 245 tok/s. dot_q6_K_x4 does the same for Q6_K (1024 x 1024: 1 thread M = 128 1752 -> 1100 us,
 * 2 threads M = 45 316 -> 208 us), dot_q5_K_x4 for Q5_K (1024 x 1024: 1 thread M = 128 2364 -> 1271 us, 2 threads
 * M = 45 424 -> 241 us; 384 x 1024, 1 thread M = 16 120 -> 72 us).
 */
#include "ggml_dot.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVX2__)

static inline float fp16(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return half_to_float(h);
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
/* u8 x s8, groups of 4 bytes -> int32 */
static inline __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
/* acc + pairwise int16 products -> int32 */
static inline __m256i madd_acc(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }
#else
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); /* pairs <= 2 * 63 * 127: exact */
}
static inline __m256i madd_acc(__m256i acc, __m256i a, __m256i b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}
#endif

static inline __m256i loadu(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* A load kept in a register: without the empty asm the compiler folds the load into every instruction that uses the
 * value, loading the same bytes 2-4 times (loads, 2 per cycle, are what these loops run out of first). */
static inline __m256i loadr(const void *p) {
    __m256i v = loadu(p);
    __asm__("" : "+v"(v));
    return v;
}

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 8 six-bit scales and 8 mins of a Q4_K/Q5_K block's packed scales[12], as bytes in each 128-bit lane: bytes 0-3
 * scales 0-3, 4-7 mins 0-3, 8-11 scales 4-7, 12-15 mins 4-7 (the values k4_scale_min gives). With u0 u1 u2 the
 * packed bytes' dwords, bytewise: scales 0-3 = u0 & 63, mins 0-3 = u1 & 63, scales 4-7 = (u2 & 15) | (u0 >> 6) << 4,
 * mins 4-7 = (u2 >> 4) | (u1 >> 6) << 4. Reads 16 bytes (the 12, then 4 of the quants that follow them). */
static inline __m256i k4_scales_mins(const uint8_t *q) {
    __m256i u = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q)); /* u0 u1 u2 - */
    __m256i lo = _mm256_srlv_epi32(_mm256_shuffle_epi32(u, _MM_SHUFFLE(2, 2, 1, 0)),
                                   _mm256_setr_epi32(0, 0, 0, 4, 0, 0, 0, 4)); /* u0 u1 u2 u2>>4 */
    lo = _mm256_and_si256(lo, _mm256_setr_epi32(0x3F3F3F3F, 0x3F3F3F3F, 0x0F0F0F0F, 0x0F0F0F0F, 0x3F3F3F3F,
                                                 0x3F3F3F3F, 0x0F0F0F0F, 0x0F0F0F0F));
    __m256i hi = _mm256_srli_epi32(_mm256_shuffle_epi32(u, _MM_SHUFFLE(1, 0, 0, 0)), 2); /* - - u0>>2 u1>>2 */
    hi = _mm256_and_si256(hi, _mm256_setr_epi32(0, 0, 0x30303030, 0x30303030, 0, 0, 0x30303030, 0x30303030));
    return _mm256_or_si256(lo, hi);
}

/* [d_a * d, -d_a * dmin] (lanes 0, 1) of a block's two halves */
static inline __m128 k45_factors(const uint16_t *dm, const float *da) {
#if defined(__F16C__)
    uint32_t v;
    memcpy(&v, dm, 4);
    __m128i h = _mm_xor_si128(_mm_cvtsi32_si128((int)v), _mm_cvtsi32_si128((int)0x80000000u)); /* -dmin */
    return _mm_mul_ps(_mm_cvtph_ps(h), _mm_broadcast_ss(da));
#else
    return _mm_setr_ps(*da * half_to_float(dm[0]), -*da * half_to_float(dm[1]), 0.0f, 0.0f);
#endif
}

/* Shared by Q4_K and Q5_K (qh NULL for Q4_K), sm = k4_scales_mins of the block:
 * acc += d_a * (d * sum_j sc_j * dot_j - dmin * sum_j m_j * bsums_j), spread over 8 lanes. */
static inline __m256 k45_block(const uint16_t *dm, __m256i sm, const uint8_t *qs, const uint8_t *qh,
                               const act256 *a, __m256 acc) {
    const __m256i m0f = _mm256_set1_epi8(0x0F), m10 = _mm256_set1_epi8(0x10);
    const char Z = (char)0x80; /* pshufb: zero byte */
    /* int16 [m0 m0 m1 m1 .. m3 m3 | m4 m4 .. m7 m7] against bsums[0..15] */
    __m256i mn16 = _mm256_shuffle_epi8(sm, _mm256_setr_epi8(4, Z, 4, Z, 5, Z, 5, Z, 6, Z, 6, Z, 7, Z, 7, Z, 12, Z, 12,
                                                            Z, 13, Z, 13, Z, 14, Z, 14, Z, 15, Z, 15, Z));
    __m256i sum_m = _mm256_madd_epi16(loadu(a->bsums), mn16);
    __m256i qhv = qh ? loadu(qh) : _mm256_setzero_si256();
    __m256i sum_q = _mm256_setzero_si256();
    /* scale j sits in byte S(j) of sm */
#define S(j) ((j) < 4 ? (j) : (j) + 4)
#define K45_PAIR(c, SHL_LO, SHR_LO, SHL_HI, SHR_HI)                                                                   \
    do {                                                                                                               \
        __m256i q = loadr(qs + 32 * (c));                                                                              \
        __m256i lo = _mm256_and_si256(q, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m0f);                   \
        if (qh) { /* bit j of qh[l] -> bit 4 of weight 32 j + l */                                                     \
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_srli_epi16(_mm256_slli_epi16(qhv, SHL_LO), SHR_LO), m10)); \
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi16(_mm256_slli_epi16(qhv, SHL_HI), SHR_HI), m10)); \
        }                                                                                                              \
        __m256i p0 = dot_u8s8(lo, loadu(a->qs + 64 * (c))), p1 = dot_u8s8(hi, loadu(a->qs + 64 * (c) + 32));          \
        /* int16 [p0 0-3, p1 0-3 | p0 4-7, p1 4-7] times [sc_2c x4, sc_2c+1 x4] in each lane */                        \
        const char e = S(2 * (c)), o = S(2 * (c) + 1);                                                                 \
        __m256i sc = _mm256_shuffle_epi8(sm, _mm256_setr_epi8(e, Z, e, Z, e, Z, e, Z, o, Z, o, Z, o, Z, o, Z, e, Z, e, \
                                                              Z, e, Z, e, Z, o, Z, o, Z, o, Z, o, Z));                 \
        sum_q = madd_acc(sum_q, _mm256_packs_epi32(p0, p1), sc);                                                       \
    } while (0)
    /* sub-block 2c takes bit 2c of qh, sub-block 2c + 1 bit 2c + 1: shift left then right within 16-bit lanes so the
     * bit lands on bit 4 (the mask drops what crossed from the neighbouring byte) */
    K45_PAIR(0, 4, 0, 3, 0);
    K45_PAIR(1, 2, 0, 1, 0);
    K45_PAIR(2, 0, 0, 0, 1);
    K45_PAIR(3, 0, 2, 0, 3);
#undef K45_PAIR
#undef S
    /* lanes [q0+q1, q2+q3, m0+m1, m2+m3 | same for 4-7] times [d_a d, d_a d, -d_a dmin, -d_a dmin | ...] */
    __m256 f = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(k45_factors(dm, &a->d)),
                                        _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(sum_q, sum_m)), f, acc);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* 64-byte pshufb controls: pattern for Q4_K half h (see dot_q4_K), int16 scale bytes from the scale vector */
#define ZB 0x80
#define PAT4(e, o) e, ZB, e, ZB, e, ZB, e, ZB, o, ZB, o, ZB, o, ZB, o, ZB
static const uint8_t k4_pat[2][64] __attribute__((aligned(64))) = {
    {PAT4(0, 2), PAT4(0, 2), PAT4(1, 3), PAT4(1, 3)},     /* sub-blocks 0-3: scale bytes 0-3 */
    {PAT4(8, 10), PAT4(8, 10), PAT4(9, 11), PAT4(9, 11)}, /* sub-blocks 4-7: scale bytes 8-11 */
};
#undef PAT4
#undef ZB

/* Half h (sub-blocks 4h .. 4h+3) of a Q4_K / Q5_K block's weights as unsigned bytes, paired for the activations:
 * *x0 = [4h | 4h+1], *x1 = [4h+2 | 4h+3]. The 64 quant bytes hold low nibbles [4h | 4h+2] and high nibbles
 * [4h+1 | 4h+3]; for Q5_K (has_qh, qhz = qh[32] in both 256-bit halves) bit j of qh[l] is bit 4 of weight 32 j + l:
 * per 256-bit half, j = 4h (+2) and 4h+1 (+2). */
static inline void k45_weights512(const uint8_t *qs, int has_qh, __m512i qhz, int h, __m512i *x0, __m512i *x1) {
    const __m512i m0f = _mm512_set1_epi8(0x0F), m10 = _mm512_set1_epi8(0x10);
    __m512i q = _mm512_loadu_si512(qs + 64 * h);
    __asm__("" : "+v"(q));
    __m512i lo = _mm512_and_si512(q, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f);
    if (has_qh) {
        const __m512i c4 = _mm512_set1_epi16(4), c3 = _mm512_set1_epi16(3), c2 = _mm512_set1_epi16(2);
        const __m512i c1 = _mm512_set1_epi16(1), c0 = _mm512_setzero_si512();
        __m512i bl = h ? _mm512_srlv_epi16(qhz, _mm512_mask_mov_epi64(c0, 0xF0, c2))  /* j = 4 | 6 */
                       : _mm512_sllv_epi16(qhz, _mm512_mask_mov_epi64(c4, 0xF0, c2)); /* j = 0 | 2 */
        __m512i bh = h ? _mm512_srlv_epi16(qhz, _mm512_mask_mov_epi64(c1, 0xF0, c3))  /* j = 5 | 7 */
                       : _mm512_sllv_epi16(qhz, _mm512_mask_mov_epi64(c3, 0xF0, c1)); /* j = 1 | 3 */
        lo = _mm512_or_si512(lo, _mm512_and_si512(bl, m10));
        hi = _mm512_or_si512(hi, _mm512_and_si512(bh, m10));
    }
    *x0 = _mm512_shuffle_i64x2(lo, hi, 0x44);
    *x1 = _mm512_shuffle_i64x2(lo, hi, 0xEE);
}

/* Q4_K (qh NULL) and Q5_K super-block, 512 bits at a time: *accz += d_a * d * sum_j sc_j dot_j (16 lanes),
 * acc -= d_a * dmin * sum_j m_j bsums_j (8 lanes). */
static inline __m256 k45_block512(const uint16_t *dm, __m256i sm, const uint8_t *qs, const uint8_t *qh,
                                  const act256 *a, __m256 acc, __m512 *accz) {
    const char Z = (char)0x80;
    __m256i mn16 = _mm256_shuffle_epi8(sm, _mm256_setr_epi8(4, Z, 4, Z, 5, Z, 5, Z, 6, Z, 6, Z, 7, Z, 7, Z, 12, Z, 12, Z,
                                                            13, Z, 13, Z, 14, Z, 14, Z, 15, Z, 15, Z));
    __m256i sum_m = _mm256_madd_epi16(loadu(a->bsums), mn16);
    __m512i smz = _mm512_broadcast_i64x4(sm);
    __m512i qhz = qh ? _mm512_broadcast_i64x4(loadu(qh)) : _mm512_setzero_si512();
    __m512i sum_q = _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {
        __m512i x0, x1;
        k45_weights512(qs, qh != NULL, qhz, h, &x0, &x1);
        __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x0, _mm512_loadu_si512(a->qs + 128 * h));
        __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x1, _mm512_loadu_si512(a->qs + 128 * h + 64));
        /* 128-bit lane l: int16 [p0 (sub-block 4h + l/2) x4, p1 (4h + 2 + l/2) x4] */
        __m512i sc = _mm512_shuffle_epi8(smz, _mm512_load_si512(k4_pat[h]));
        sum_q = _mm512_dpwssd_epi32(sum_q, _mm512_packs_epi32(p0, p1), sc);
    }
    __m128 f = k45_factors(dm, &a->d);
    *accz = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_q), _mm512_broadcastss_ps(f), *accz);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_m), _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f),
                                                                                 _mm256_set1_epi32(1)), acc);
}
/* the 8 float lanes of a 16-lane accumulator */
static inline __m256 fold512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#define K45_512 1
#else
#define K45_512 0
#endif

/* A Q4_K or Q5_K row: blocks of `block_bytes` with d, dmin at byte 0, the packed scales at 4, quants at `qs_at` and
 * (Q5_K) fifth bits at `qh_at` (0: none). The block loop decodes the next block's scales one iteration ahead (it
 * takes a chain of shuffles). Inlined with constant layouts, so each type gets its own loop. */
static inline float dot_k45(int k, const uint8_t *w, size_t block_bytes, size_t qs_at, size_t qh_at,
                            const act256 *a) {
    int nb = k / 256;
    __m256 acc = _mm256_setzero_ps();
    if (nb <= 0) return 0.0f;
#if K45_512
    __m512 accz = _mm512_setzero_ps();
#endif
    __m256i sm_next = k4_scales_mins(w + 4);
    for (int b = 0; b < nb; b++) {
        const uint8_t *x = w + (size_t)b * block_bytes;
        __m256i sm = sm_next;
        sm_next = k4_scales_mins(w + (size_t)(b + 1 < nb ? b + 1 : b) * block_bytes + 4);
        const uint8_t *qh = qh_at ? x + qh_at : NULL;
#if K45_512
        acc = k45_block512((const uint16_t *)x, sm, x + qs_at, qh, a + b, acc, &accz);
#else
        acc = k45_block((const uint16_t *)x, sm, x + qs_at, qh, a + b, acc);
#endif
    }
#if K45_512
    acc = _mm256_add_ps(acc, fold512(accz));
#endif
    return hsum_ps(acc);
}

float dot_q4_K(int k, const void *w, const act256 *a) {
    return dot_k45(k, w, sizeof(blk_q4_K), offsetof(blk_q4_K, qs), 0, a);
}

#if K45_512
/* Q4_K (qh NULL) or Q5_K super-block (dm, qs, qh) dotted with 4 tokens' activations a[0], a[nb], a[2 nb], a[3 nb]
 * (nb blocks per token): the weights' unpacking (loads, nibble masks, fifth bits, lane shuffles) and the scale / min
 * vectors are shared, which is what bounds k45_block512 (loads, then shuffles); each token's integer and float
 * operations are k45_block512's, in its order, so every token's sum is bit-identical to dot_q4_K's / dot_q5_K's. */
static inline void k45_block512_x4(const uint16_t *dm, __m256i sm, const uint8_t *qs, const uint8_t *qh,
                                   const act256 *a, int nb, __m256 acc[4], __m512 accz[4]) {
    const char Z = (char)0x80;
    __m256i mn16 = _mm256_shuffle_epi8(sm, _mm256_setr_epi8(4, Z, 4, Z, 5, Z, 5, Z, 6, Z, 6, Z, 7, Z, 7, Z, 12, Z, 12, Z,
                                                            13, Z, 13, Z, 14, Z, 14, Z, 15, Z, 15, Z));
    __m512i smz = _mm512_broadcast_i64x4(sm);
    __m512i qhz = qh ? _mm512_broadcast_i64x4(loadu(qh)) : _mm512_setzero_si512();
    /* sub-blocks [0 | 1], [2 | 3], [4 | 5], [6 | 7] as bytes, and each half's int16 scales (see k45_block512) */
    __m512i xs[4], sc[2];
    for (int h = 0; h < 2; h++) {
        k45_weights512(qs, qh != NULL, qhz, h, &xs[2 * h], &xs[2 * h + 1]);
        sc[h] = _mm512_shuffle_epi8(smz, _mm512_load_si512(k4_pat[h]));
    }
    /* d_a * d and -d_a * dmin, the products k45_factors forms (IEEE multiplication commutes), each one vmulps with
     * d_a broadcast from memory (the empty asm keeps the compiler from multiplying scalars, then broadcasting) */
    __m512 d = _mm512_set1_ps(fp16(dm[0]));
    __m256 mdmin = _mm256_set1_ps(-fp16(dm[1]));
    __asm__("" : "+v"(d), "+v"(mdmin));
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) {
        const act256 *at = a + (size_t)t * nb;
        __m256i sum_m = _mm256_madd_epi16(loadu(at->bsums), mn16);
        __m512i sum_q = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xs[2 * h], _mm512_loadu_si512(at->qs + 128 * h));
            __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xs[2 * h + 1],
                                             _mm512_loadu_si512(at->qs + 128 * h + 64));
            sum_q = _mm512_dpwssd_epi32(sum_q, _mm512_packs_epi32(p0, p1), sc[h]);
        }
        accz[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_q), _mm512_mul_ps(d, _mm512_set1_ps(at->d)), accz[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_m), _mm256_mul_ps(mdmin, _mm256_set1_ps(at->d)), acc[t]);
    }
}

/* dot_k45 for 4 tokens (see k45_block512_x4) */
static inline void dot_k45_x4(int k, const uint8_t *w, size_t block_bytes, size_t qs_at, size_t qh_at,
                              const act256 *a, float out[4]) {
    int nb = k / 256;
    __m256 acc[4];
    __m512 accz[4];
    for (int t = 0; t < 4; t++) {
        acc[t] = _mm256_setzero_ps();
        accz[t] = _mm512_setzero_ps();
    }
    if (nb > 0) {
        __m256i sm_next = k4_scales_mins(w + 4);
        for (int b = 0; b < nb; b++) {
            const uint8_t *x = w + (size_t)b * block_bytes;
            __m256i sm = sm_next;
            sm_next = k4_scales_mins(w + (size_t)(b + 1 < nb ? b + 1 : b) * block_bytes + 4);
            k45_block512_x4((const uint16_t *)x, sm, x + qs_at, qh_at ? x + qh_at : NULL, a + b, nb, acc, accz);
        }
    }
    for (int t = 0; t < 4; t++) out[t] = nb > 0 ? hsum_ps(_mm256_add_ps(acc[t], fold512(accz[t]))) : 0.0f;
}

void dot_q4_K_x4(int k, const void *w, const act256 *a, float out[4]) {
    dot_k45_x4(k, w, sizeof(blk_q4_K), offsetof(blk_q4_K, qs), 0, a, out);
}

void dot_q5_K_x4(int k, const void *w, const act256 *a, float out[4]) {
    dot_k45_x4(k, w, sizeof(blk_q5_K), offsetof(blk_q5_K, qs), offsetof(blk_q5_K, qh), a, out);
}
#else
/* 256-bit build: the single-token kernel per token */
void dot_q4_K_x4(int k, const void *w, const act256 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q4_K(k, w, a + (size_t)t * (k / 256));
}
void dot_q5_K_x4(int k, const void *w, const act256 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q5_K(k, w, a + (size_t)t * (k / 256));
}
#endif

float dot_q5_K(int k, const void *w, const act256 *a) {
    return dot_k45(k, w, sizeof(blk_q5_K), offsetof(blk_q5_K, qs), offsetof(blk_q5_K, qh), a);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* vpermw indexes: for half h, 128-bit lane l holds int16 [scales[8h + l] x4, scales[8h + 4 + l] x4] */
#define PAT6(e, o) e, e, e, e, o, o, o, o
static const uint16_t k6_pat[2][32] __attribute__((aligned(64))) = {
    {PAT6(0, 4), PAT6(1, 5), PAT6(2, 6), PAT6(3, 7)},
    {PAT6(8, 12), PAT6(9, 13), PAT6(10, 14), PAT6(11, 15)},
};
#undef PAT6

float dot_q6_K(int k, const void *w, const act256 *a) {
    const blk_q6_K *x = w;
    const __m512i m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    /* per 256-bit half: top bits of weights 32 c + l at bits 2c of qh[l] go to bits 4-5 */
    const __m512i shl01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1); /* c = 0 | 1 */
    const __m512i shr23 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1); /* c = 2 | 3 */
    const __m512i pat0 = _mm512_load_si512(k6_pat[0]), pat1 = _mm512_load_si512(k6_pat[1]);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < k / 256; b++) {
        const act256 *ab = a + b;
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x[b].scales)); /* int16 scales[0..15] */
        /* -32 offset: sum_i scales[i / 16] * 32 * qa_i = 32 * sum_g scales[g] * bsums[g] */
        __m256i off = _mm256_madd_epi16(loadu(ab->bsums), sc16);
        __m512i scz = _mm512_castsi256_si512(sc16);
        __m512i isum = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            /* weight 128 h + 32 c + l: nibble c of (ql[l], ql[32 + l], ql[l] >> 4, ql[32 + l] >> 4), top bits 2c of
             * qh[l]; [c0 | c1] and [c2 | c3] line up with the activations' 64-byte halves */
            __m512i ql = _mm512_loadu_si512(x[b].ql + 64 * h);
            __m512i qh = _mm512_broadcast_i64x4(loadu(x[b].qh + 32 * h));
            __asm__("" : "+v"(ql), "+v"(qh));
            __m512i q01 = _mm512_or_si512(_mm512_and_si512(ql, m0f), _mm512_and_si512(_mm512_sllv_epi16(qh, shl01), m30));
            __m512i q23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m0f),
                                          _mm512_and_si512(_mm512_srlv_epi16(qh, shr23), m30));
            __m512i p01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q01, _mm512_loadu_si512(ab->qs + 128 * h));
            __m512i p23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q23, _mm512_loadu_si512(ab->qs + 128 * h + 64));
            /* lane l of packs: int16 [p01 (16-weight group 8h + l) x4, p23 (group 8h + 4 + l) x4] */
            isum = _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(p01, p23), _mm512_permutexvar_epi16(h ? pat1 : pat0, scz));
        }
        __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(isum), _mm512_extracti64x4_epi64(isum, 1));
        s = _mm256_sub_epi32(s, _mm256_slli_epi32(off, 5));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(ab->d * fp16(x[b].d)), acc);
    }
    return hsum_ps(acc);
}

/* One Q6_K row against 4 tokens a[0 .. nb), a[nb .. 2 nb), ...: the weights' 6-bit values (loads, masks, shifts) and
 * the scale vectors are formed once per super-block for the 4; each token's integer and float operations are
 * dot_q6_K's, in its order, so out[t] is bit-identical to dot_q6_K for token t. */
void dot_q6_K_x4(int k, const void *w, const act256 *a, float out[4]) {
    const blk_q6_K *x = w;
    int nb = k / 256;
    const __m512i m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    const __m512i shl01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1); /* see dot_q6_K */
    const __m512i shr23 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i pat0 = _mm512_load_si512(k6_pat[0]), pat1 = _mm512_load_si512(k6_pat[1]);
    __m256 acc[4];
    for (int t = 0; t < 4; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x[b].scales));
        __m512i scz = _mm512_castsi256_si512(sc16);
        __m512i q01[2], q23[2], sc[2];
        for (int h = 0; h < 2; h++) {
            __m512i ql = _mm512_loadu_si512(x[b].ql + 64 * h);
            __m512i qh = _mm512_broadcast_i64x4(loadu(x[b].qh + 32 * h));
            __asm__("" : "+v"(ql), "+v"(qh));
            q01[h] = _mm512_or_si512(_mm512_and_si512(ql, m0f), _mm512_and_si512(_mm512_sllv_epi16(qh, shl01), m30));
            q23[h] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m0f),
                                     _mm512_and_si512(_mm512_srlv_epi16(qh, shr23), m30));
            sc[h] = _mm512_permutexvar_epi16(h ? pat1 : pat0, scz);
        }
        float d = fp16(x[b].d);
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
            const act256 *ab = a + (size_t)t * nb + b;
            __m256i off = _mm256_madd_epi16(loadu(ab->bsums), sc16);
            __m512i isum = _mm512_setzero_si512();
            for (int h = 0; h < 2; h++) {
                __m512i p01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q01[h], _mm512_loadu_si512(ab->qs + 128 * h));
                __m512i p23 =
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), q23[h], _mm512_loadu_si512(ab->qs + 128 * h + 64));
                isum = _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(p01, p23), sc[h]);
            }
            __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(isum), _mm512_extracti64x4_epi64(isum, 1));
            s = _mm256_sub_epi32(s, _mm256_slli_epi32(off, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(ab->d * d), acc[t]);
        }
    }
    for (int t = 0; t < 4; t++) out[t] = hsum_ps(acc[t]);
}
#else
/* 256-bit build: the single-token kernel per token */
void dot_q6_K_x4(int k, const void *w, const act256 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q6_K(k, w, a + (size_t)t * (k / 256));
}
float dot_q6_K(int k, const void *w, const act256 *a) {
    const blk_q6_K *x = w;
    const __m256i m0f = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < k / 256; b++) {
        const act256 *ab = a + b;
        __m128i sc8 = _mm_loadu_si128((const __m128i *)x[b].scales);
        /* -32 offset: sum_i scales[i / 16] * 32 * qa_i = 32 * sum_g scales[g] * bsums[g] */
        __m256i off = _mm256_madd_epi16(loadu(ab->bsums), _mm256_cvtepi8_epi16(sc8));
        /* int16 scales, lane 0 the even 16-weight groups [s0 s2 .. s14], lane 1 the odd ones [s1 s3 .. s15] */
        __m256i sc16 = _mm256_cvtepi8_epi16(
            _mm_shuffle_epi8(sc8, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)));
        __m256i isum = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5));
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = x[b].ql + 64 * h;
            __m256i l0 = loadr(ql), l1 = loadr(ql + 32), qh = loadr(x[b].qh + 32 * h);
            /* weight 128 h + 32 c + l: nibble c of (l0, l1, l0 >> 4, l1 >> 4), top bits 2c of qh */
            __m256i q0 = _mm256_or_si256(_mm256_and_si256(l0, m0f), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            __m256i q1 = _mm256_or_si256(_mm256_and_si256(l1, m0f), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m0f), _mm256_and_si256(qh, m30));
            __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m0f),
                                         _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            const int8_t *qa = ab->qs + 128 * h;
            __m256i p0 = dot_u8s8(q0, loadu(qa)), p1 = dot_u8s8(q1, loadu(qa + 32));
            __m256i p2 = dot_u8s8(q2, loadu(qa + 64)), p3 = dot_u8s8(q3, loadu(qa + 96));
            /* packs(p0, p1) = int16 [p0 0-3, p1 0-3 | p0 4-7, p1 4-7]: groups (8h, 8h+2 | 8h+1, 8h+3), i.e. entries
             * 4h, 4h+1 of either lane of sc16; packs(p2, p3) entries 4h+2, 4h+3 */
            int e = 8 * h; /* byte offset of entry 4h */
            __m256i s01 = _mm256_shuffle_epi8(
                sc16, _mm256_setr_epi8(e, e + 1, e, e + 1, e, e + 1, e, e + 1, e + 2, e + 3, e + 2, e + 3, e + 2, e + 3,
                                       e + 2, e + 3, e, e + 1, e, e + 1, e, e + 1, e, e + 1, e + 2, e + 3, e + 2, e + 3,
                                       e + 2, e + 3, e + 2, e + 3));
            __m256i s23 = _mm256_shuffle_epi8(
                sc16, _mm256_setr_epi8(e + 4, e + 5, e + 4, e + 5, e + 4, e + 5, e + 4, e + 5, e + 6, e + 7, e + 6,
                                       e + 7, e + 6, e + 7, e + 6, e + 7, e + 4, e + 5, e + 4, e + 5, e + 4, e + 5,
                                       e + 4, e + 5, e + 6, e + 7, e + 6, e + 7, e + 6, e + 7, e + 6, e + 7));
            isum = madd_acc(isum, _mm256_packs_epi32(p0, p1), s01);
            isum = madd_acc(isum, _mm256_packs_epi32(p2, p3), s23);
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(ab->d * fp16(x[b].d)), acc);
    }
    return hsum_ps(acc);
}

#endif

#endif /* without AVX2: dot_plain.c */
