/* Rows of a ggml matrix dequantized to float32, for embedding lookups (a token's row of token_embd, which is also
 * the tied output matrix): a decode step's lookup takes 9 us with the call, against 49 us of torch ops in
 * quant/ggml_codecs.py. Each weight is computed with the float operations of ggml's dequantize_row_* in the same
 * order, so the rows are bit-exact with ggml and with the codecs (tests/test_native.py checks every type). */
/* ggml rounds d * q and then the + m; a fused multiply-add would round once. (The products here are exact in float32,
 * a half times a small integer, so it could not change a value today; this keeps the operations ggml's by
 * construction.) */
#pragma GCC optimize("fp-contract=off")

#include "ggml_dot.h"
#include "platform.h"

static void row_q4_0(const blk_q4_0 *x, int nb, float *y) {
    for (int b = 0; b < nb; b++, y += 32) {
        const float d = half_to_float(x[b].d);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((x[b].qs[j] & 0x0F) - 8);
            y[j + 16] = d * (float)((x[b].qs[j] >> 4) - 8);
        }
    }
}

static void row_q4_1(const blk_q4_1 *x, int nb, float *y) {
    for (int b = 0; b < nb; b++, y += 32) {
        const float d = half_to_float(x[b].d), m = half_to_float(x[b].m);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(x[b].qs[j] & 0x0F) + m;
            y[j + 16] = d * (float)(x[b].qs[j] >> 4) + m;
        }
    }
}

/* weight j of a Q5 block: low nibble from qs (j < 16: low half of qs[j], else high half of qs[j - 16]), bit 4 from
 * bit j of qh */
static inline int q5(const uint8_t *qs, const uint8_t *qh, int j) {
    uint32_t h;
    memcpy(&h, qh, 4);
    const int lo = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
    return lo | (int)(((h >> j) & 1) << 4);
}

static void row_q5_0(const blk_q5_0 *x, int nb, float *y) {
    for (int b = 0; b < nb; b++, y += 32) {
        const float d = half_to_float(x[b].d);
        for (int j = 0; j < 32; j++) y[j] = d * (float)(q5(x[b].qs, x[b].qh, j) - 16);
    }
}

static void row_q5_1(const blk_q5_1 *x, int nb, float *y) {
    for (int b = 0; b < nb; b++, y += 32) {
        const float d = half_to_float(x[b].d), m = half_to_float(x[b].m);
        for (int j = 0; j < 32; j++) y[j] = d * (float)q5(x[b].qs, x[b].qh, j) + m;
    }
}

static void row_q8_0(const blk_q8_0 *x, int nb, float *y) {
    for (int b = 0; b < nb; b++, y += 32) {
        const float d = half_to_float(x[b].d);
        for (int j = 0; j < 32; j++) y[j] = d * (float)x[b].qs[j];
    }
}

/* One Q4_K or Q5_K block: sub-block j (32 weights) is (d * sc_j) * q - dmin * m_j; qs[32 c + l] holds weight
 * 64 c + l in its low nibble and 64 c + 32 + l in its high nibble; Q5_K's bit 4 of weight 32 j + l is bit j of
 * qh[l] (qh is NULL for Q4_K). */
static void block_q45_K(uint16_t d16, uint16_t dmin16, const uint8_t *scales, const uint8_t *qs, const uint8_t *qh,
                        float *y) {
    const float d = half_to_float(d16), dmin = half_to_float(dmin16);
    for (int j = 0; j < 8; j++) {
        uint8_t sc, mn;
        k4_scale_min(j, scales, &sc, &mn);
        const float scale = d * (float)sc, min = dmin * (float)mn;
        const uint8_t *q = qs + 32 * (j / 2);
        for (int l = 0; l < 32; l++) {
            const int lo = (j & 1) ? q[l] >> 4 : q[l] & 0x0F;
            const int hi = qh ? ((qh[l] >> j) & 1) << 4 : 0;
            y[32 * j + l] = scale * (float)(lo | hi) - min;
        }
    }
}

static void row_q4_K(const blk_q4_K *x, int nb, float *y) {
    for (int b = 0; b < nb; b++) block_q45_K(x[b].d, x[b].dmin, x[b].scales, x[b].qs, NULL, y + 256 * b);
}

static void row_q5_K(const blk_q5_K *x, int nb, float *y) {
    for (int b = 0; b < nb; b++) block_q45_K(x[b].d, x[b].dmin, x[b].scales, x[b].qs, x[b].qh, y + 256 * b);
}

/* Q6_K: in each 128-weight half h, weight 32 k + l (k = 0..3) has its low nibble in ql[64 h + 32 (k % 2) + l] (low
 * nibble for k < 2, high for k >= 2) and its top two bits at bit 2 k of qh[32 h + l]; stored +32; 16 int8 scales,
 * one per 16 weights: (d * scale) * (q - 32). */
static void row_q6_K(const blk_q6_K *x, int nb, float *y) {
    for (int b = 0; b < nb; b++, y += 256) {
        const float d = half_to_float(x[b].d);
        for (int i = 0; i < 256; i++) {
            const int h = i / 128, k = (i % 128) / 32, l = i % 32;
            const uint8_t ql = x[b].ql[64 * h + 32 * (k % 2) + l];
            const int lo = k < 2 ? ql & 0x0F : ql >> 4;
            const int hi = (x[b].qh[32 * h + l] >> (2 * k)) & 3;
            y[i] = (d * (float)x[b].scales[i / 16]) * (float)((lo | (hi << 4)) - 32);
        }
    }
}

/* out[i] = row ids[i] of the matrix at `base` (`rows` rows, `row_stride` bytes apart, k weights each).
 * Returns 0, -1 for a type without a row function, -2 for an id outside [0, rows). */
MARCO_API
int marco_dequant_rows(int type, const uint8_t *base, int64_t row_stride, int64_t rows, const int64_t *ids, int n,
                       int k, float *out) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return -2;
    for (int i = 0; i < n; i++) {
        const void *w = base + ids[i] * row_stride;
        float *y = out + (int64_t)i * k;
        switch (type) {
        case T_Q4_0: row_q4_0(w, k / 32, y); break;
        case T_Q4_1: row_q4_1(w, k / 32, y); break;
        case T_Q5_0: row_q5_0(w, k / 32, y); break;
        case T_Q5_1: row_q5_1(w, k / 32, y); break;
        case T_Q8_0: row_q8_0(w, k / 32, y); break;
        case T_Q4_K: row_q4_K(w, k / 256, y); break;
        case T_Q5_K: row_q5_K(w, k / 256, y); break;
        case T_Q6_K: row_q6_K(w, k / 256, y); break;
        default: return -1;
        }
    }
    return 0;
}
