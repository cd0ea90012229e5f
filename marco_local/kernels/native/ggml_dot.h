/* Dot products of ggml weight blocks with int8-quantized activations, for marco-local's native CPU kernels.
 *
 * Why: torch's int4 kernel cannot read ggml's 5-, 6- and 8-bit blocks without splitting them into two nibbles, which
 * costs memory and bandwidth. These kernels read the blocks as they lie in the GGUF file (or in an offload slot).
 *
 * Activations are quantized once per matrix product, like llama.cpp does (Q8_0 / Q8_K): to blocks of 32 for the
 * 32-weight types, to blocks of 256 for the K-quants. Block layouts of the weights are ggml's (ggml-common.h).
 */
#ifndef MARCO_GGML_DOT_H
#define MARCO_GGML_DOT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* the neon tier (-DMARCO_NEON on ARM64): dot_neon.c replaces the plain-C Q8_0, Q4_K and Q6_K dots */
#if defined(MARCO_NEON) && defined(__aarch64__) && defined(__ARM_NEON)
#define MARCO_NEON_DOTS 1
#endif

/* ggml type ids (the GGUF file's numbers) */
enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30,
};

/* Quantized activation values: int8 for the vector kernels (AVX2, AVX-512, NEON dots), int16 for the plain-C ones
 * (dot_plain.c): SIMD multiply-adds take int16 operands, and widening the activations once per product beats widening
 * them for every weight row. The values are the same (-127..127) either way. */
#if defined(__AVX2__) || defined(MARCO_NEON_DOTS)
typedef int8_t act_q;
#else
typedef int16_t act_q;
#endif

/* Activations, blocks of 32: x[i] ~= d * qs[i]; s = d * sum(qs) (carries the weight blocks' additive constants). */
typedef struct {
    float d;
    float s;
    act_q qs[32];
} act32;

/* Activations, blocks of 256: x[i] ~= d * qs[i]; bsums[j] = sum(qs[16 j .. 16 j + 15]). */
typedef struct {
    float d;
    int16_t bsums[16];
    act_q qs[256];
} act256;

/* Weight blocks (ggml-common.h). Halves are IEEE binary16 stored as uint16_t. */
typedef struct { uint16_t d; uint8_t qs[16]; } blk_q4_0;                      /* 18 bytes */
typedef struct { uint16_t d, m; uint8_t qs[16]; } blk_q4_1;                   /* 20 */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_0;       /* 22 */
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_1;    /* 24 */
typedef struct { uint16_t d; int8_t qs[32]; } blk_q8_0;                       /* 34 */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } blk_q4_K;              /* 144 */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } blk_q5_K; /* 176 */
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } blk_q6_K;     /* 210 */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            mant &= 0x3FF;
            bits = sign | ((exp + 112) << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* get_scale_min_k4: the j-th 6-bit (scale, min) of a Q4_K/Q5_K block's packed scales[12]. */
static inline void k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float32 -> bf16, round to nearest even (NaN stays NaN), as torch's .to(torch.bfloat16). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((b >> 16) | 0x40);
    return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

/* float32 -> IEEE half, round to nearest even (as torch's .to(torch.float16)): what falls past the largest half
 * (65504, halfway to 65536 included) becomes inf, NaN stays NaN, below 2^-14 is a subnormal half. */
static inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7FFFFFFFu, h, rem, tie;
    if (ax > 0x7F800000u) return sign | 0x7E00;
    if (ax >= 0x477FF000u) return sign | 0x7C00; /* >= 65520 */
    if (ax >= 0x38800000u) {                     /* >= 2^-14: a normal half; rebias 127 -> 15, 23 -> 10 bits */
        h = (ax - (112u << 23)) >> 13;
        rem = ax & 0x1FFF;
        tie = 0x1000;
    } else {                                     /* a subnormal half, in units of 2^-24 */
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
        if (e < 102) return sign;                /* below 2^-25: rounds to zero */
        uint32_t shift = 126 - e;                /* 14..24 */
        h = m >> shift;
        rem = m & ((1u << shift) - 1);
        tie = 1u << (shift - 1);
    }
    h += rem > tie || (rem == tie && (h & 1)); /* a carry into the exponent is the right result */
    return (uint16_t)(sign | h);
}

/* float32 . bf16 over n values (attention.c). */
float dot_f32_bf16(const float *q, const uint16_t *k, int n);

/* The calling thread's scratch buffer, grown to `bytes` and kept between calls (NULL without memory). */
void *marco_scratch(size_t bytes);

void quantize_act32(const float *x, act32 *y, int k);   /* k % 32 == 0 */
void quantize_act256(const float *x, act256 *y, int k); /* k % 256 == 0 */

/* One weight row (k inputs, k / block_size blocks) dotted with one quantized activation row. */
float dot_q4_0(int k, const void *w, const act32 *a);
float dot_q4_1(int k, const void *w, const act32 *a);
float dot_q5_0(int k, const void *w, const act32 *a);
float dot_q5_1(int k, const void *w, const act32 *a);
float dot_q8_0(int k, const void *w, const act32 *a);
float dot_q4_K(int k, const void *w, const act256 *a);
float dot_q5_K(int k, const void *w, const act256 *a);
float dot_q6_K(int k, const void *w, const act256 *a);
/* One Q4_K row dotted with 4 tokens' activation rows, a[0 .. nb), a[nb .. 2 nb), ... (nb = k / 256 blocks each):
 * out[t] is bit-identical to dot_q4_K(k, w, a + t * nb); the weights are unpacked once for the 4 (prefill). */
void dot_q4_K_x4(int k, const void *w, const act256 *a, float out[4]);
void dot_q5_K_x4(int k, const void *w, const act256 *a, float out[4]); /* the same for Q5_K */
void dot_q6_K_x4(int k, const void *w, const act256 *a, float out[4]); /* the same for Q6_K */
/* The same for the 32-weight types (nb = k / 32 blocks per token): out[t] bit-identical to dot_q8_0 etc. on token
 * t's activation row before pack_act32x4, which must have rearranged each of the 4 rows (in place, same size; the
 * one-token kernels cannot read a packed row). */
void dot_q4_0_x4(int k, const void *w, const act32 *a, float out[4]);
void dot_q4_1_x4(int k, const void *w, const act32 *a, float out[4]);
void dot_q5_0_x4(int k, const void *w, const act32 *a, float out[4]);
void dot_q5_1_x4(int k, const void *w, const act32 *a, float out[4]);
void dot_q8_0_x4(int k, const void *w, const act32 *a, float out[4]);
void pack_act32x4(act32 *a, int nb);

/* Plain-C versions of the same (the reference the vectorised ones are tested against). */
float dot_q4_0_ref(int k, const void *w, const act32 *a);
float dot_q4_1_ref(int k, const void *w, const act32 *a);
float dot_q5_0_ref(int k, const void *w, const act32 *a);
float dot_q5_1_ref(int k, const void *w, const act32 *a);
float dot_q8_0_ref(int k, const void *w, const act32 *a);
float dot_q4_K_ref(int k, const void *w, const act256 *a);
float dot_q5_K_ref(int k, const void *w, const act256 *a);
float dot_q6_K_ref(int k, const void *w, const act256 *a);

#endif
