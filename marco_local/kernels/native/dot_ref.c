/* Plain-C dot products of ggml weight blocks with quantized activations: the reference for the vectorised kernels
 * (and the fallback on CPUs without AVX2). Each follows the block's definition of a weight directly. */
#include "ggml_dot.h"

float dot_q4_0_ref(int k, const void *w, const act32 *a) {
    const blk_q4_0 *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 32; b++) {
        int isum = 0; /* weight j: (nibble - 8) * d; low nibble of qs[j] is weight j, high nibble weight j + 16 */
        for (int j = 0; j < 16; j++) isum += (x[b].qs[j] & 0x0F) * a[b].qs[j] + (x[b].qs[j] >> 4) * a[b].qs[j + 16];
        acc += half_to_float(x[b].d) * (a[b].d * (float)isum - 8.0f * a[b].s);
    }
    return acc;
}

float dot_q4_1_ref(int k, const void *w, const act32 *a) {
    const blk_q4_1 *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 32; b++) {
        int isum = 0; /* weight j: nibble * d + m */
        for (int j = 0; j < 16; j++) isum += (x[b].qs[j] & 0x0F) * a[b].qs[j] + (x[b].qs[j] >> 4) * a[b].qs[j + 16];
        acc += half_to_float(x[b].d) * a[b].d * (float)isum + half_to_float(x[b].m) * a[b].s;
    }
    return acc;
}

static inline int q5_value(const uint8_t *qs, const uint8_t *qh, int j) {
    uint32_t h;
    memcpy(&h, qh, 4);
    int lo = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
    return lo | (int)(((h >> j) & 1) << 4);
}

float dot_q5_0_ref(int k, const void *w, const act32 *a) {
    const blk_q5_0 *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 32; b++) {
        int isum = 0; /* weight j: (q5 - 16) * d, bit 4 of weight j is bit j of qh */
        for (int j = 0; j < 32; j++) isum += q5_value(x[b].qs, x[b].qh, j) * a[b].qs[j];
        acc += half_to_float(x[b].d) * (a[b].d * (float)isum - 16.0f * a[b].s);
    }
    return acc;
}

float dot_q5_1_ref(int k, const void *w, const act32 *a) {
    const blk_q5_1 *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 32; b++) {
        int isum = 0; /* weight j: q5 * d + m */
        for (int j = 0; j < 32; j++) isum += q5_value(x[b].qs, x[b].qh, j) * a[b].qs[j];
        acc += half_to_float(x[b].d) * a[b].d * (float)isum + half_to_float(x[b].m) * a[b].s;
    }
    return acc;
}

float dot_q8_0_ref(int k, const void *w, const act32 *a) {
    const blk_q8_0 *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 32; b++) {
        int isum = 0;
        for (int j = 0; j < 32; j++) isum += x[b].qs[j] * a[b].qs[j];
        acc += half_to_float(x[b].d) * a[b].d * (float)isum;
    }
    return acc;
}

float dot_q4_K_ref(int k, const void *w, const act256 *a) {
    const blk_q4_K *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 256; b++) {
        /* sub-block j (32 weights) = d * sc_j * nibble - dmin * m_j. qs[32 c + l]: low nibble is weight 64 c + l,
         * high nibble weight 64 c + 32 + l. */
        int sum_q = 0, sum_m = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            k4_scale_min(j, x[b].scales, &sc, &mn);
            const uint8_t *q = x[b].qs + 32 * (j / 2);
            int isum = 0;
            for (int l = 0; l < 32; l++) isum += ((j & 1) ? (q[l] >> 4) : (q[l] & 0x0F)) * a[b].qs[32 * j + l];
            sum_q += sc * isum;
            sum_m += mn * (a[b].bsums[2 * j] + a[b].bsums[2 * j + 1]);
        }
        acc += a[b].d * (half_to_float(x[b].d) * (float)sum_q - half_to_float(x[b].dmin) * (float)sum_m);
    }
    return acc;
}

float dot_q5_K_ref(int k, const void *w, const act256 *a) {
    const blk_q5_K *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 256; b++) {
        /* as Q4_K, plus a fifth bit: bit j of qh[l] belongs to weight 32 j + l */
        int sum_q = 0, sum_m = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            k4_scale_min(j, x[b].scales, &sc, &mn);
            const uint8_t *q = x[b].qs + 32 * (j / 2);
            int isum = 0;
            for (int l = 0; l < 32; l++) {
                int v = ((j & 1) ? (q[l] >> 4) : (q[l] & 0x0F)) | (((x[b].qh[l] >> j) & 1) << 4);
                isum += v * a[b].qs[32 * j + l];
            }
            sum_q += sc * isum;
            sum_m += mn * (a[b].bsums[2 * j] + a[b].bsums[2 * j + 1]);
        }
        acc += a[b].d * (half_to_float(x[b].d) * (float)sum_q - half_to_float(x[b].dmin) * (float)sum_m);
    }
    return acc;
}

float dot_q6_K_ref(int k, const void *w, const act256 *a) {
    const blk_q6_K *x = w;
    float acc = 0.0f;
    for (int b = 0; b < k / 256; b++) {
        /* weight i = d * scales[i / 16] * (q6 - 32). In half h (128 weights), weight 128 h + 32 c + l has its low
         * nibble in ql[64 h + 32 (c % 2) + l] (low nibble for c < 2, high for c >= 2) and its top two bits at bit
         * 2 c of qh[32 h + l]. */
        int sum = 0;
        for (int i = 0; i < 256; i++) {
            int h = i / 128, c = (i % 128) / 32, l = i % 32;
            uint8_t lq = x[b].ql[64 * h + 32 * (c % 2) + l];
            int lo = c < 2 ? (lq & 0x0F) : (lq >> 4);
            int hi = (x[b].qh[32 * h + l] >> (2 * c)) & 3;
            sum += x[b].scales[i / 16] * ((lo | (hi << 4)) - 32) * a[b].qs[i];
        }
        acc += a[b].d * half_to_float(x[b].d) * (float)sum;
    }
    return acc;
}
