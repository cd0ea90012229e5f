/* Vectorised dot products for the 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
 *
 * Approach: one 256-bit vector holds a whole block (32 weights x 8 bits). The weights are widened to 32 unsigned
 * bytes (nibbles; nibbles + 16 where the fifth bit is set; Q8_0: w + 128 with VNNI, |w| with w's sign moved onto
 * the activation on plain AVX2), multiplied with the 32 int8 activations and summed in groups of 4 into 8 int32 lanes
 * (VNNI vpdpbusd; on AVX2 vpmaddubsw + vpmaddwd, which cannot saturate on these values). Four blocks per step: their
 * four int32 vectors are folded into one (unpack + add), converted to float and FMA'd with the four block scales
 * d_w * d_a, so each step does one float FMA and the row is reduced horizontally once. The additive constants (the
 * -8 / -16 / -128 offsets, Q4_1/Q5_1's m) go through the activation block's s = d_a * sum(q_a), four blocks per FMA.
 * The per-block scale work (halves, activation scales) costs about as much as the integer work, hence the 4-block
 * step and the cheap ways of gathering scales (integer-register packing of the halves, 64-bit loads of d_a, s_a);
 * vpermt2w/vpermt2ps gathers, vphaddd, gathers and 512-bit vectors were tried and were slower on Zen 4.
 * Integer sums are exact (Q8_0 with VNNI sums (w + 128) * q_a, and takes 128 * d_w * s_a off in float); only the float
 * additions differ from the reference (dot_ref.c).
 *
 * Measured, EPYC Zen 4, 1 thread, one token, 768 rows x 1024 inputs, matrix warm in cache, us per matvec through
 * native.matmul from Python (about 5 us of it is the call and activation quantization), reference -> this file:
 * Q4_0 240 -> 19.8, Q4_1 265 -> 21.5, Q5_0 110 -> 23.2, Q5_1 120 -> 24.8, Q8_0 65 -> 19.0. The kernels alone
 * (C timing loop): Q4_0 14.8, Q4_1 16.6, Q5_0 18.0, Q5_1 19.4, Q8_0 13.6 (VNNI path); the AVX2 path built with
 * -march=haswell on the same CPU: 15.9, 17.0, 24.9, 25.6, 15.5.
 *
 * Several tokens (prefill): dot_q8_0_x4, dot_q5_0_x4 (and the same for Q4_0, Q4_1, Q5_1) dot one row with 4 tokens
 * (AVX-512 build; the others call the one-token kernel per token), forming the weights' bytes and d_w once, on
 * activations that pack_act32x4 transposed per 4 blocks so that no reduce4 is needed (see DOT_ROW_X4); each token's
 * result is bit-identical to the one-token kernel's. marco_matmul runs them for M >= 4 in tiles of rows (matmul.c).
 * Measured (bench/native_tokens.py, Zen 5, us per native.matmul call, 1024 x 1024, before -> after): Q8_0 1 thread
 * M = 16 291 -> 153, M = 128 2304 -> 1217; 2 threads M = 45 419 -> 233. Q5_0 1 thread M = 16 391 -> 194, M = 128
 * 3125 -> 1524; 2 threads M = 45 563 -> 297. Without the packed activations (weights shared, reduce4 per token) the
 * gain was a third of that: Q8_0 M = 128 2304 -> 1982, Q5_0 3125 -> 2338. Q4_0 / Q4_1 / Q5_1, 1 thread M = 128:
 * 2733 -> 1309, 2987 -> 1336, 3437 -> 1614. End to end, a 512-token prefill at 2 threads: nano Q8_0 ~180 -> ~260 tok/s,
 * nano Q4_K_M (Q5_0 expert down-projections, Q6_K) ~250 -> ~282 tok/s.
 */
#include "ggml_dot.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* The VNNI path (AVX512-VNNI + VL + BW: vpdpbusd on 256-bit vectors, byte masks for Q5's fifth bit) or the AVX2 one
 * (also taken with AVX-VNNI, which only changes the byte dot); F16C converts the halves. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define HAVE_DPBUSD 1 /* exact 32-bit sums of u8 x s8 products */
#endif

/* Sum over groups of 4 of u[i] * s[i] (u unsigned, s signed bytes) into 8 int32 lanes. */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else /* 16-bit pair sums: exact while |u0 * s0 + u1 * s1| < 2^15 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i load32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* The 32 nibbles of qs[16] as bytes: weight j (low nibble of qs[j]) in byte j, weight j + 16 (high nibble) in byte
 * j + 16. One broadcast load, then the upper 128 bits shifted right by 4. */
static inline __m256i nibbles(const uint8_t *qs) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    v = _mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* nibbles + 16 for each bit j set in the little-endian uint32 qh (the fifth bit of weight j). */
static inline __m256i q5_values(const uint8_t *qs, const uint8_t *qh) {
    uint32_t h;
    memcpy(&h, qh, 4);
    __m256i n = nibbles(qs);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_or_si256(n, _mm256_maskz_mov_epi8((__mmask32)h, _mm256_set1_epi8(0x10)));
#else
    /* byte j <- byte j / 8 of h, then keep bit j % 8 and turn it into 0x10 */
    __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h),
                                     _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                                       0x0101010101010101LL, 0x0000000000000000LL));
    __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    hb = _mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit);
    return _mm256_or_si256(n, _mm256_and_si256(hb, _mm256_set1_epi8(0x10)));
#endif
}

/* Four blocks' int32 lane vectors -> [t0 t1 t2 t3 | t0' t1' t2' t3']: the two 128-bit halves each hold half of
 * every block's sum (so the scale vector is the 4 block scales twice, and the row's total is the sum of all lanes). */
static inline __m256i reduce4(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
    __m256i t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(i0, i1), _mm256_unpackhi_epi32(i0, i1));
    __m256i t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(i2, i3), _mm256_unpackhi_epi32(i2, i3));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
}

/* Four halves, packed with scalar integer loads and shifts (fewer vector operations than inserts or a gather). */
static inline __m128 halves4(uint16_t h0, uint16_t h1, uint16_t h2, uint16_t h3) {
    uint64_t v = (uint64_t)h0 | (uint64_t)h1 << 16 | (uint64_t)h2 << 32 | (uint64_t)h3 << 48;
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)v));
}

/* [d0 s0 d1 s1] of two consecutive activation blocks (d and s are adjacent): two 64-bit loads. */
static inline __m128 ds2(const act32 *ab) {
    __m128 lo = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)&ab[0].d));
    return _mm_loadh_pi(lo, (const __m64 *)&ab[1].d);
}

static inline float hsum4(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Per-type block sums: sum over the block of (unsigned weight byte) * q_a, in 8 int32 lanes. */
static inline __m256i isum_q4_0(const blk_q4_0 *x, const act32 *a) { return dot_u8s8(nibbles(x->qs), load32(a->qs)); }
static inline __m256i isum_q4_1(const blk_q4_1 *x, const act32 *a) { return dot_u8s8(nibbles(x->qs), load32(a->qs)); }
static inline __m256i isum_q5_0(const blk_q5_0 *x, const act32 *a) {
    return dot_u8s8(q5_values(x->qs, x->qh), load32(a->qs));
}
static inline __m256i isum_q5_1(const blk_q5_1 *x, const act32 *a) {
    return dot_u8s8(q5_values(x->qs, x->qh), load32(a->qs));
}
#if defined(HAVE_DPBUSD)
/* Q8_0, signed x signed, with vpdpbusd: w + 128 (w xor 0x80) as the unsigned operand; the extra 128 * sum(q_a) goes
 * out through s_a like Q4_0's 8 (OFFSET -128). One xor instead of two sign operations: ~7% faster. */
#define Q8_OFFSET (-128)
static inline __m256i isum_q8_0(const blk_q8_0 *x, const act32 *a) {
    return dot_u8s8(_mm256_xor_si256(load32(x->qs), _mm256_set1_epi8((char)0x80)), load32(a->qs));
}
#else
/* Q8_0 with vpmaddubsw, whose 16-bit pair sums would saturate on (w + 128) * q_a: |w| as the unsigned operand, w's
 * sign moved onto the activation (q_a != -128, so the negation cannot overflow; w = -128 gives |w| = 0x80 = 128 as
 * an unsigned byte, which is right). */
#define Q8_OFFSET 0
static inline __m256i isum_q8_0(const blk_q8_0 *x, const act32 *a) {
    __m256i wq = load32(x->qs), aq = load32(a->qs);
    return dot_u8s8(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(aq, wq));
}
#endif

/* The row: sum over blocks of d_w * d_a * isum (vector lanes, 4 blocks per step) plus, for the types with an
 * additive constant, OFFSET * sum of c_b * s_a, where c_b is the block's d_w (Q4_0, Q5_0: OFFSET -8, -16) or its m
 * (Q4_1, Q5_1: OFFSET 1); Q8_0: d_w with OFFSET -128 (VNNI, weights + 128) or none (OFFSET 0). */
#define DOT_ROW(BLK, ISUM, CVEC, CONE, OFFSET)                                                                  \
    const BLK *x = w;                                                                                         \
    int nb = k / 32, b = 0;                                                                                   \
    __m256 acc = _mm256_setzero_ps();                                                                         \
    __m128 off = _mm_setzero_ps();                                                                            \
    float off1 = 0.0f;                                                                                        \
    const BLK *xb = x;                                                                                        \
    const act32 *ab = a;                                                                                      \
    for (int n4 = nb >> 2; n4 > 0; n4--, xb += 4, ab += 4) {                                                  \
        __m256i r = reduce4(ISUM(xb, ab), ISUM(xb + 1, ab + 1), ISUM(xb + 2, ab + 2), ISUM(xb + 3, ab + 3));    \
        __m128 dw = halves4(xb[0].d, xb[1].d, xb[2].d, xb[3].d), ds01 = ds2(ab), ds23 = ds2(ab + 2);          \
        __m128 s = _mm_mul_ps(dw, _mm_shuffle_ps(ds01, ds23, 0x88));                                          \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), _mm256_set_m128(s, s), acc);                             \
        if (OFFSET) off = _mm_fmadd_ps(CVEC(xb, dw), _mm_shuffle_ps(ds01, ds23, 0xDD), off);                  \
    }                                                                                                         \
    for (b = nb & ~3; b < nb; b++) {                                                                          \
        float dw = h2f(x[b].d);                                                                               \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ISUM(x + b, a + b)), _mm256_set1_ps(dw * a[b].d), acc);      \
        if (OFFSET) off1 += CONE(x + b, dw) * a[b].s;                                                         \
    }                                                                                                         \
    float r = hsum8(acc);                                                                                     \
    return OFFSET ? r + (float)(OFFSET) * (hsum4(off) + off1) : r;

#define C_D4(xb, dw) (dw)
#define C_M4(xb, dw) halves4((xb)[0].m, (xb)[1].m, (xb)[2].m, (xb)[3].m)
#define C_D1(xb, dw) (dw)
#define C_M1(xb, dw) h2f((xb)->m)

float dot_q4_0(int k, const void *w, const act32 *a) { DOT_ROW(blk_q4_0, isum_q4_0, C_D4, C_D1, -8) }
float dot_q4_1(int k, const void *w, const act32 *a) { DOT_ROW(blk_q4_1, isum_q4_1, C_M4, C_M1, 1) }
float dot_q5_0(int k, const void *w, const act32 *a) { DOT_ROW(blk_q5_0, isum_q5_0, C_D4, C_D1, -16) }
float dot_q5_1(int k, const void *w, const act32 *a) { DOT_ROW(blk_q5_1, isum_q5_1, C_M4, C_M1, 1) }
float dot_q8_0(int k, const void *w, const act32 *a) { DOT_ROW(blk_q8_0, isum_q8_0, C_D4, C_D1, Q8_OFFSET) }

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
/* Several tokens (prefill): one row dotted with 4 tokens' activation rows a[0 .. nb), a[nb .. 2 nb), ..., which
 * pack_act32x4 has rearranged. The weights' unsigned bytes (WVAL: loads, Q8_0's xor, nibbles and fifth bits)
 * and the blocks' d_w are formed once per 4 blocks for the 4 tokens.
 *
 * DOT_ROW's reduce4 (9 shuffles and adds per token and 4 blocks) is what the packed layout saves: per group of 4
 * blocks the activations' dwords are transposed (4 x 4 within each 128-bit half, the same for the weights, shared),
 * so that vector j holds dword j of every block in the low half and dword 4 + j in the high half; four accumulating
 * vpdpbusd then leave in lane b the sum over block b's bytes 0..15 and in lane 4 + b its bytes 16..31 -- the very
 * int32 values reduce4 forms (integer sums: the order does not matter). d_a and s_a of the 4 blocks lie together, one
 * load each. The float operations per token are DOT_ROW's, in its order, so out[t] is bit-identical to the one-token
 * kernel's result for token t. Blocks past the last group of 4 stay in the act32 layout and run DOT_ROW's tail loop. */

/* Packed group of 4 act32 blocks (160 bytes, the size of the 4): float d[4], float s[4], then 4 x 32 bytes of q (the
 * transposed dwords). Accessed through intrinsics loads and stores (they may alias). */
#define G_D 0
#define G_S 16
#define G_Q 32

/* 4 x 4 dword transpose within each 128-bit half: v[j] <- [v0.j v1.j v2.j v3.j | v0.(4+j) v1.(4+j) ...] */
static inline void transpose4(__m256i v[4]) {
    __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    v[0] = _mm256_unpacklo_epi64(t0, t2);
    v[1] = _mm256_unpackhi_epi64(t0, t2);
    v[2] = _mm256_unpacklo_epi64(t1, t3);
    v[3] = _mm256_unpackhi_epi64(t1, t3);
}

void pack_act32x4(act32 *a, int nb) {
    for (int b = 0; b + 4 <= nb; b += 4) {
        act32 *g = a + b;
        __m256i v[4] = {load32(g[0].qs), load32(g[1].qs), load32(g[2].qs), load32(g[3].qs)};
        __m128 d = _mm_setr_ps(g[0].d, g[1].d, g[2].d, g[3].d), s = _mm_setr_ps(g[0].s, g[1].s, g[2].s, g[3].s);
        transpose4(v);
        uint8_t *p = (uint8_t *)g;
        _mm_storeu_ps((float *)(p + G_D), d);
        _mm_storeu_ps((float *)(p + G_S), s);
        for (int j = 0; j < 4; j++) _mm256_storeu_si256((__m256i *)(p + G_Q + 32 * j), v[j]);
    }
}

static inline __m256i wval_q4_0(const blk_q4_0 *x) { return nibbles(x->qs); }
static inline __m256i wval_q4_1(const blk_q4_1 *x) { return nibbles(x->qs); }
static inline __m256i wval_q5_0(const blk_q5_0 *x) { return q5_values(x->qs, x->qh); }
static inline __m256i wval_q5_1(const blk_q5_1 *x) { return q5_values(x->qs, x->qh); }
static inline __m256i wval_q8_0(const blk_q8_0 *x) {
    return _mm256_xor_si256(load32(x->qs), _mm256_set1_epi8((char)0x80));
}

/* CVEC, CONE, OFFSET: DOT_ROW's (the blocks' additive constants). */
#define DOT_ROW_X4(BLK, WVAL, CVEC, CONE, OFFSET)                                                                      \
    const BLK *x = w;                                                                                                  \
    int nb = k / 32;                                                                                                   \
    __m256 acc[4];                                                                                                     \
    __m128 off[4];                                                                                                     \
    float off1[4];                                                                                                     \
    _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {                                                              \
        acc[t] = _mm256_setzero_ps();                                                                                  \
        off[t] = _mm_setzero_ps();                                                                                     \
        off1[t] = 0.0f;                                                                                                \
    }                                                                                                                  \
    for (int b = 0; b + 4 <= nb; b += 4) {                                                                             \
        const BLK *xb = x + b;                                                                                         \
        __m256i v[4] = {WVAL(xb), WVAL(xb + 1), WVAL(xb + 2), WVAL(xb + 3)};                                           \
        transpose4(v);                                                                                                 \
        __m128 dw = halves4(xb[0].d, xb[1].d, xb[2].d, xb[3].d);                                                       \
        __m256 dw2 = _mm256_set_m128(dw, dw);                                                                          \
        __m128 c = CVEC(xb, dw);                                                                                       \
        _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {                                                          \
            const uint8_t *g = (const uint8_t *)(a + (size_t)t * nb + b);                                              \
            __m256i r = _mm256_dpbusd_epi32(_mm256_setzero_si256(), v[0], load32(g + G_Q));                            \
            r = _mm256_dpbusd_epi32(r, v[1], load32(g + G_Q + 32));                                                    \
            r = _mm256_dpbusd_epi32(r, v[2], load32(g + G_Q + 64));                                                    \
            r = _mm256_dpbusd_epi32(r, v[3], load32(g + G_Q + 96));                                                    \
            __m256 s = _mm256_mul_ps(dw2, _mm256_broadcast_ps((const __m128 *)(g + G_D)));                             \
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), s, acc[t]);                                                \
            if (OFFSET) off[t] = _mm_fmadd_ps(c, _mm_loadu_ps((const float *)(g + G_S)), off[t]);                      \
        }                                                                                                              \
    }                                                                                                                  \
    for (int b = nb & ~3; b < nb; b++) {                                                                               \
        float dw = h2f(x[b].d);                                                                                        \
        __m256i v = WVAL(x + b);                                                                                       \
        _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {                                                          \
            const act32 *at = a + (size_t)t * nb + b;                                                                  \
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(v, load32(at->qs))), _mm256_set1_ps(dw * at->d),      \
                                     acc[t]);                                                                          \
            if (OFFSET) off1[t] += CONE(x + b, dw) * at->s;                                                            \
        }                                                                                                              \
    }                                                                                                                  \
    _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {                                                              \
        float r = hsum8(acc[t]);                                                                                       \
        out[t] = OFFSET ? r + (float)(OFFSET) * (hsum4(off[t]) + off1[t]) : r;                                         \
    }

void dot_q4_0_x4(int k, const void *w, const act32 *a, float out[4]) { DOT_ROW_X4(blk_q4_0, wval_q4_0, C_D4, C_D1, -8) }
void dot_q4_1_x4(int k, const void *w, const act32 *a, float out[4]) { DOT_ROW_X4(blk_q4_1, wval_q4_1, C_M4, C_M1, 1) }
void dot_q5_0_x4(int k, const void *w, const act32 *a, float out[4]) {
    DOT_ROW_X4(blk_q5_0, wval_q5_0, C_D4, C_D1, -16)
}
void dot_q5_1_x4(int k, const void *w, const act32 *a, float out[4]) { DOT_ROW_X4(blk_q5_1, wval_q5_1, C_M4, C_M1, 1) }
void dot_q8_0_x4(int k, const void *w, const act32 *a, float out[4]) {
    DOT_ROW_X4(blk_q8_0, wval_q8_0, C_D4, C_D1, Q8_OFFSET)
}
#define HAVE_X4 1
#endif

#endif

#if defined(__AVX2__) && !defined(HAVE_X4)
/* AVX2 builds without the AVX-512 path: the activations stay as they are, and the one-token kernel runs per token */
void pack_act32x4(act32 *a, int nb) {
    (void)a;
    (void)nb;
}
void dot_q4_0_x4(int k, const void *w, const act32 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q4_0(k, w, a + (size_t)t * (k / 32));
}
void dot_q4_1_x4(int k, const void *w, const act32 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q4_1(k, w, a + (size_t)t * (k / 32));
}
void dot_q5_0_x4(int k, const void *w, const act32 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q5_0(k, w, a + (size_t)t * (k / 32));
}
void dot_q5_1_x4(int k, const void *w, const act32 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q5_1(k, w, a + (size_t)t * (k / 32));
}
void dot_q8_0_x4(int k, const void *w, const act32 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q8_0(k, w, a + (size_t)t * (k / 32));
}
#endif
