/* Plain-C dot products for builds without AVX2 (the `portable` and `neon` tiers), written in the shape compilers
 * vectorize on any SIMD: SSE2 on baseline x86-64, NEON on ARM64.
 *
 * Per block, the weights are unpacked into int16 (multiplied by their sub-block scale for the K-quants: every product
 * of a scale and a weight fits int16), the int8 activations are widened to int16, and one multiply-add loop sums the
 * products into int32: compilers turn that loop into the vector multiply-add of the target (SSE2 pmaddwd, NEON
 * smlal), which they do not do for int8 operands. The integer sums are the reference's (dot_ref.c) exactly and the
 * float operations are the same in the same order, so every result is bit-identical to the reference; the x4 kernels
 * unpack a row's weights once for 4 tokens (prefill), each token's result bit-identical to the one-token kernel.
 * The neon tier replaces the one-token Q8_0, Q4_K and Q6_K dots with its own (dot_neon.c).
 */
#include "ggml_dot.h"

#if !defined(__AVX2__)

/* Kept out of line: inlined into the block loops, GCC's cost model scalarizes the small unpack loops (Q5_0 took 5x as
 * long) */
#if defined(_MSC_VER) && !defined(__clang__)
#define UNPACK_FN static __declspec(noinline) void
#else
#define UNPACK_FN __attribute__((noinline)) static void
#endif

/* sum of w[i] * a[i], i < n: int16 operands (act_q is int16 without NEON dots), the loop compilers vectorize */
static inline int idot(const int16_t *restrict w, const act_q *restrict a, int n) {
    int s = 0;
    for (int i = 0; i < n; i++) s += w[i] * a[i];
    return s;
}

/* ---- 32-weight blocks: unpacked to their unsigned values (nibbles, nibbles + fifth bit, Q8_0's int8) ---- */

static inline void unpack_q4(const uint8_t *restrict qs, int16_t *restrict q) {
    for (int j = 0; j < 16; j++) q[j] = qs[j] & 0x0F;
    for (int j = 0; j < 16; j++) q[j + 16] = qs[j] >> 4;
}

/* bit j of the block's 32-bit qh is the fifth bit of weight j: tested against a per-weight mask rather than shifted
 * by j, which SSE2 cannot vectorize (its shifts take one count for all lanes) */
static const uint16_t bit_of[16] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};

UNPACK_FN unpack_q5(const uint8_t *restrict qs, const uint8_t *restrict qh, int16_t *restrict q) {
    uint32_t h;
    memcpy(&h, qh, 4);
    uint16_t lo = (uint16_t)h, hi = (uint16_t)(h >> 16);
    for (int j = 0; j < 16; j++) q[j] = (int16_t)((qs[j] & 0x0F) | ((lo & bit_of[j]) ? 16 : 0));
    for (int j = 0; j < 16; j++) q[j + 16] = (int16_t)((qs[j] >> 4) | ((hi & bit_of[j]) ? 16 : 0));
}

static inline float q4_0_block(const blk_q4_0 *x, const act32 *a, const int16_t *q) {
    return half_to_float(x->d) * (a->d * (float)idot(q, a->qs, 32) - 8.0f * a->s);
}
static inline float q4_1_block(const blk_q4_1 *x, const act32 *a, const int16_t *q) {
    return half_to_float(x->d) * a->d * (float)idot(q, a->qs, 32) + half_to_float(x->m) * a->s;
}
static inline float q5_0_block(const blk_q5_0 *x, const act32 *a, const int16_t *q) {
    return half_to_float(x->d) * (a->d * (float)idot(q, a->qs, 32) - 16.0f * a->s);
}
static inline float q5_1_block(const blk_q5_1 *x, const act32 *a, const int16_t *q) {
    return half_to_float(x->d) * a->d * (float)idot(q, a->qs, 32) + half_to_float(x->m) * a->s;
}
static inline float q8_0_block(const blk_q8_0 *x, const act32 *a, const int16_t *q) {
    return half_to_float(x->d) * a->d * (float)idot(q, a->qs, 32);
}

#define UNPACK_Q4(x, q) unpack_q4((x)->qs, q)
#define UNPACK_Q5(x, q) unpack_q5((x)->qs, (x)->qh, q)
#define UNPACK_Q8(x, q) \
    for (int i_ = 0; i_ < 32; i_++) (q)[i_] = (x)->qs[i_]

/* one row against one token, and against 4 tokens (a + t * nb is token t's row) with the weights unpacked once */
#define DOT32(name, blk, UNPACK, block_fn)                                             \
    float name(int k, const void *w, const act32 *a) {                                 \
        const blk *x = w;                                                              \
        float acc = 0.0f;                                                              \
        int16_t q[32];                                                                 \
        for (int b = 0; b < k / 32; b++) {                                             \
            UNPACK(x + b, q);                                                          \
            acc += block_fn(x + b, a + b, q);                                          \
        }                                                                              \
        return acc;                                                                    \
    }
#define DOT32_X4(name, blk, UNPACK, block_fn)                                          \
    void name(int k, const void *w, const act32 *a, float out[4]) {                    \
        const blk *x = w;                                                              \
        int nb = k / 32;                                                               \
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                       \
        int16_t q[32];                                                                 \
        for (int b = 0; b < nb; b++) {                                                 \
            UNPACK(x + b, q);                                                          \
            for (int t = 0; t < 4; t++) acc[t] += block_fn(x + b, a + (size_t)t * nb + b, q); \
        }                                                                              \
        for (int t = 0; t < 4; t++) out[t] = acc[t];                                   \
    }

DOT32(dot_q4_0, blk_q4_0, UNPACK_Q4, q4_0_block)
DOT32(dot_q4_1, blk_q4_1, UNPACK_Q4, q4_1_block)
DOT32(dot_q5_0, blk_q5_0, UNPACK_Q5, q5_0_block)
DOT32(dot_q5_1, blk_q5_1, UNPACK_Q5, q5_1_block)
DOT32_X4(dot_q4_0_x4, blk_q4_0, UNPACK_Q4, q4_0_block)
DOT32_X4(dot_q4_1_x4, blk_q4_1, UNPACK_Q4, q4_1_block)
DOT32_X4(dot_q5_0_x4, blk_q5_0, UNPACK_Q5, q5_0_block)
DOT32_X4(dot_q5_1_x4, blk_q5_1, UNPACK_Q5, q5_1_block)
#if !defined(MARCO_NEON_DOTS)
DOT32(dot_q8_0, blk_q8_0, UNPACK_Q8, q8_0_block)
DOT32_X4(dot_q8_0_x4, blk_q8_0, UNPACK_Q8, q8_0_block)
#else
void dot_q8_0_x4(int k, const void *w, const act32 *a, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q8_0(k, w, a + (size_t)t * (k / 32));
}
#endif

/* the activations stay as quantize_act32 wrote them (only the AVX-512 x4 kernels read a packed layout) */
void pack_act32x4(act32 *a, int nb) {
    (void)a;
    (void)nb;
}

/* ---- K-quants: 256-weight super-blocks, weights pre-multiplied by their sub-block scales ---- */

/* Q4_K / Q5_K: the 8 sub-blocks' 6-bit scales and mins, decoded before the loops that use them (a decode inside a
 * loop keeps the compiler from vectorizing it) */
static inline void k45_scales(const uint8_t *scales, int16_t sc[8], int16_t mn[8]) {
    for (int j = 0; j < 8; j++) {
        uint8_t s, m;
        k4_scale_min(j, scales, &s, &m);
        sc[j] = s;
        mn[j] = m;
    }
}

/* sc * value <= 63 * 31 fits int16. qs[32 c + l]: low nibble is weight 64 c + l, high nibble weight 64 c + 32 + l;
 * Q5_K's bit j of qh[l] is the fifth bit of weight 32 j + l. Each value is formed in an int16 lane (SSE2 has no byte
 * shifts). */
static inline void unpack_k45(const int16_t sc[8], const uint8_t *restrict qs, const uint8_t *restrict qh,
                              int16_t *restrict q) {
    for (int c = 0; c < 4; c++) {
        const uint8_t *b = qs + 32 * c;
        int16_t s0 = sc[2 * c], s1 = sc[2 * c + 1], *o = q + 64 * c;
        if (qh) {
            uint8_t m0 = (uint8_t)(1u << (2 * c)), m1 = (uint8_t)(2u << (2 * c));
            for (int l = 0; l < 32; l++) o[l] = (int16_t)(s0 * ((b[l] & 0x0F) | ((qh[l] & m0) ? 16 : 0)));
            for (int l = 0; l < 32; l++) o[32 + l] = (int16_t)(s1 * ((b[l] >> 4) | ((qh[l] & m1) ? 16 : 0)));
        } else {
            for (int l = 0; l < 32; l++) o[l] = (int16_t)(s0 * (b[l] & 0x0F));
            for (int l = 0; l < 32; l++) o[32 + l] = (int16_t)(s1 * (b[l] >> 4));
        }
    }
}

static inline float k45_block(const int16_t mn[8], uint16_t d, uint16_t dmin, const act256 *a, const int16_t *q) {
    int sum_m = 0;
    for (int j = 0; j < 8; j++) sum_m += mn[j] * (a->bsums[2 * j] + a->bsums[2 * j + 1]);
    int sum_q = idot(q, a->qs, 256);
    return a->d * (half_to_float(d) * (float)sum_q - half_to_float(dmin) * (float)sum_m);
}

/* Q6_K: |scale * (q6 - 32)| <= 128 * 32 fits int16. In half h, weight 128 h + 32 c + l has its low nibble in
 * ql[64 h + 32 (c % 2) + l] (low nibble for c < 2, high for c >= 2) and its top two bits at bit 2 c of qh[32 h + l]. */
UNPACK_FN unpack_q6_K(const blk_q6_K *restrict x, int16_t *restrict q) {
    for (int h = 0; h < 2; h++)
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = x->ql + 64 * h + 16 * half, *qh = x->qh + 32 * h + 16 * half;
            const int8_t *sc = x->scales + 8 * h + half;
            int16_t s0 = sc[0], s1 = sc[2], s2 = sc[4], s3 = sc[6];
            int16_t *o = q + 128 * h + 16 * half;
            for (int l = 0; l < 16; l++) o[l] = (int16_t)(s0 * (((ql[l] & 0x0F) | ((qh[l] & 0x03) << 4)) - 32));
            for (int l = 0; l < 16; l++) o[32 + l] = (int16_t)(s1 * (((ql[32 + l] & 0x0F) | ((qh[l] & 0x0C) << 2)) - 32));
            for (int l = 0; l < 16; l++) o[64 + l] = (int16_t)(s2 * (((ql[l] >> 4) | (qh[l] & 0x30)) - 32));
            for (int l = 0; l < 16; l++) o[96 + l] = (int16_t)(s3 * (((ql[32 + l] >> 4) | ((qh[l] & 0xC0) >> 2)) - 32));
        }
}

#define UNPACK_Q4K(x, q) k45_scales((x)->scales, sc, mn), unpack_k45(sc, (x)->qs, NULL, q)
#define UNPACK_Q5K(x, q) k45_scales((x)->scales, sc, mn), unpack_k45(sc, (x)->qs, (x)->qh, q)
#define UNPACK_Q6K_FN(x, q) unpack_q6_K(x, q)
#define Q45K_BLOCK(x, a, q) k45_block(mn, (x)->d, (x)->dmin, a, q)
#define Q6K_BLOCK(x, a, q) ((a)->d * half_to_float((x)->d) * (float)idot(q, (a)->qs, 256))

#define DOT256(name, blk, UNPACK, BLOCK)                                               \
    float name(int k, const void *w, const act256 *a) {                                \
        const blk *x = w;                                                              \
        float acc = 0.0f;                                                              \
        int16_t q[256], sc[8], mn[8];                                                  \
        (void)sc, (void)mn;                                                            \
        for (int b = 0; b < k / 256; b++) {                                            \
            UNPACK(x + b, q);                                                          \
            acc += BLOCK(x + b, a + b, q);                                             \
        }                                                                              \
        return acc;                                                                    \
    }
#define DOT256_X4(name, blk, UNPACK, BLOCK)                                            \
    void name(int k, const void *w, const act256 *a, float out[4]) {                   \
        const blk *x = w;                                                              \
        int nb = k / 256;                                                              \
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                       \
        int16_t q[256], sc[8], mn[8];                                                  \
        (void)sc, (void)mn;                                                            \
        for (int b = 0; b < nb; b++) {                                                 \
            UNPACK(x + b, q);                                                          \
            for (int t = 0; t < 4; t++) acc[t] += BLOCK(x + b, a + (size_t)t * nb + b, q); \
        }                                                                              \
        for (int t = 0; t < 4; t++) out[t] = acc[t];                                   \
    }

DOT256(dot_q5_K, blk_q5_K, UNPACK_Q5K, Q45K_BLOCK)
DOT256_X4(dot_q5_K_x4, blk_q5_K, UNPACK_Q5K, Q45K_BLOCK)
DOT256_X4(dot_q4_K_x4, blk_q4_K, UNPACK_Q4K, Q45K_BLOCK)
DOT256_X4(dot_q6_K_x4, blk_q6_K, UNPACK_Q6K_FN, Q6K_BLOCK)
#if !defined(MARCO_NEON_DOTS)
DOT256(dot_q4_K, blk_q4_K, UNPACK_Q4K, Q45K_BLOCK)
DOT256(dot_q6_K, blk_q6_K, UNPACK_Q6K_FN, Q6K_BLOCK)
#endif

#endif
