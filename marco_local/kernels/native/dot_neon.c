/* NEON dots for ARM64 (the `neon` tier, built with -DMARCO_NEON): Q8_0, Q4_K and Q6_K, the types of most weights in
 * Q4_K_M / Q8_0 files. Each computes the integer sums of dot_ref.c with vector instructions (SDOT where the CPU has
 * the dot-product extension) and combines them with the same float operations in the same order, so the results are
 * bit-identical to the plain-C reference. The other types, and the several-token products, run dot_plain.c's kernels. */
#include "ggml_dot.h"

#if defined(MARCO_NEON_DOTS)
#include <arm_neon.h>

/* sum of 16 int8 products; without SDOT through 16-bit pairs: exact, as |w * a| <= 128 * 127 and two fit int16 */
static inline int32_t dot16(int8x16_t w, int8x16_t a) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), w, a));
#else
    int16x8_t p = vmull_s8(vget_low_s8(w), vget_low_s8(a));
    p = vmlal_s8(p, vget_high_s8(w), vget_high_s8(a));
    return vaddlvq_s16(p);
#endif
}

float dot_q8_0(int k, const void *w, const act32 *a) {
    const blk_q8_0 *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 32; b++) {
        int isum = dot16(vld1q_s8(x[b].qs), vld1q_s8(a[b].qs)) + dot16(vld1q_s8(x[b].qs + 16), vld1q_s8(a[b].qs + 16));
        acc += half_to_float(x[b].d) * a[b].d * (float)isum;
    }
    return acc;
}

float dot_q4_K(int k, const void *w, const act256 *a) {
    const blk_q4_K *x = w;
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    float acc = 0.0f;
    for (int b = 0; b < k / 256; b++) {
        int sum_q = 0, sum_m = 0;
        for (int c = 0; c < 4; c++) { /* qs[32 c + l]: low nibble weight 64 c + l, high nibble 64 c + 32 + l */
            uint8x16_t q0 = vld1q_u8(x[b].qs + 32 * c), q1 = vld1q_u8(x[b].qs + 32 * c + 16);
            const int8_t *ac = a[b].qs + 64 * c;
            int lo = dot16(vreinterpretq_s8_u8(vandq_u8(q0, low4)), vld1q_s8(ac)) +
                     dot16(vreinterpretq_s8_u8(vandq_u8(q1, low4)), vld1q_s8(ac + 16));
            int hi = dot16(vreinterpretq_s8_u8(vshrq_n_u8(q0, 4)), vld1q_s8(ac + 32)) +
                     dot16(vreinterpretq_s8_u8(vshrq_n_u8(q1, 4)), vld1q_s8(ac + 48));
            uint8_t sc, mn;
            k4_scale_min(2 * c, x[b].scales, &sc, &mn);
            sum_q += sc * lo;
            sum_m += mn * (a[b].bsums[4 * c] + a[b].bsums[4 * c + 1]);
            k4_scale_min(2 * c + 1, x[b].scales, &sc, &mn);
            sum_q += sc * hi;
            sum_m += mn * (a[b].bsums[4 * c + 2] + a[b].bsums[4 * c + 3]);
        }
        acc += a[b].d * (half_to_float(x[b].d) * (float)sum_q - half_to_float(x[b].dmin) * (float)sum_m);
    }
    return acc;
}

float dot_q6_K(int k, const void *w, const act256 *a) {
    const blk_q6_K *x = w;
    const uint8x16_t low4 = vdupq_n_u8(0x0F), two = vdupq_n_u8(3);
    const int8x16_t off = vdupq_n_s8(32);
    float acc = 0.0f;
    for (int b = 0; b < k / 256; b++) {
        int sum = 0;
        for (int h = 0; h < 2; h++) { /* weight 128 h + 32 c + l: see dot_q6_K_ref */
            for (int t = 0; t < 2; t++) { /* l in [16 t, 16 t + 16) */
                uint8x16_t l0 = vld1q_u8(x[b].ql + 64 * h + 16 * t), l1 = vld1q_u8(x[b].ql + 64 * h + 32 + 16 * t);
                uint8x16_t qh = vld1q_u8(x[b].qh + 32 * h + 16 * t);
                uint8x16_t q[4] = {
                    vorrq_u8(vandq_u8(l0, low4), vshlq_n_u8(vandq_u8(qh, two), 4)),
                    vorrq_u8(vandq_u8(l1, low4), vshlq_n_u8(vandq_u8(vshrq_n_u8(qh, 2), two), 4)),
                    vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(qh, 4), two), 4)),
                    vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(qh, 6), 4)),
                };
                for (int c = 0; c < 4; c++) {
                    int i = 128 * h + 32 * c + 16 * t;
                    int8x16_t v = vsubq_s8(vreinterpretq_s8_u8(q[c]), off);
                    sum += x[b].scales[i / 16] * dot16(v, vld1q_s8(a[b].qs + i));
                }
            }
        }
        acc += a[b].d * half_to_float(x[b].d) * (float)sum;
    }
    return acc;
}

#else
typedef int marco_no_neon; /* ISO C forbids an empty translation unit */
#endif
