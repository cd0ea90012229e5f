/* Pieces of one decode step for the native decoder (marco_local/decode/native.py): RMSNorm, the attention block of
 * one new token (q/k norm, rotate-half RoPE, cache write, attention) and several products sharing one input.
 *
 * Why: a decode step of a small model is dozens of tiny torch calls per layer, each costing more than its arithmetic
 * (SmolLM2: 140 us of a layer's 270 us). Each function here replaces a run of them. Everything is float32 except the
 * 16-bit KV cache (bf16 or IEEE half).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ggml_dot.h"
#include "platform.h"

int marco_attend(const float *q, const uint16_t *k, const uint16_t *v, int64_t head_stride, int n_pos, int n_heads,
                 int n_kv, int hd, float scale, int f16, float *out, int n_threads);
int marco_matmul(int type, const uint8_t *w, int64_t row_stride, int n, int k, const float *x, int m, float *y,
                 int n_threads);

/* out[i] = x[i] / rms(x) * w[i], over n values. out may be x. */
MARCO_API void marco_rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* rotate-half RoPE of one head vector in place: pairs (i, i + hd/2) */
static void rope(float *v, const float *cos_, const float *sin_, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos_[i] - b * sin_[i];
        v[i + half] = b * cos_[i + half] + a * sin_[i + half];
    }
}

/* One new token's attention block. qkv: float32 [n_heads * hd | n_kv * hd | n_kv * hd] (the projections), changed in
 * place. q_norm / k_norm: float32 [hd] per-head RMSNorm weights, or NULL (llama). cos/sin: float32 [hd] at this
 * position. The new key (normed, rotated) and value are stored at position `pos` of the layer's cache, as IEEE half
 * when f16 is set, else bf16
 * (kv head g's position p at k_cache + g * head_stride + p * hd), then the query attends over positions 0..pos.
 * out: float32 [n_heads * hd]. */
MARCO_API
int marco_attn_decode(float *qkv, int n_heads, int n_kv, int hd, const float *q_norm, const float *k_norm,
                      float eps, const float *cos_, const float *sin_, uint16_t *k_cache, uint16_t *v_cache,
                      int64_t head_stride, int pos, int f16, float *out, int n_threads) {
    if (hd % 2 || n_kv <= 0 || n_heads % n_kv || pos < 0) return -1;
    float *q = qkv, *k = qkv + (size_t)n_heads * hd, *v = k + (size_t)n_kv * hd;
    for (int h = 0; h < n_heads; h++) {
        float *qh = q + (size_t)h * hd;
        if (q_norm) marco_rms_norm(qh, q_norm, hd, eps, qh);
        rope(qh, cos_, sin_, hd);
    }
    for (int g = 0; g < n_kv; g++) {
        float *kg = k + (size_t)g * hd, *vg = v + (size_t)g * hd;
        if (k_norm) marco_rms_norm(kg, k_norm, hd, eps, kg);
        rope(kg, cos_, sin_, hd);
        uint16_t *kd = k_cache + g * head_stride + (int64_t)pos * hd, *vd = v_cache + g * head_stride + (int64_t)pos * hd;
        for (int i = 0; i < hd; i++) {
            kd[i] = f16 ? float_to_half(kg[i]) : float_to_bf16(kg[i]);
            vd[i] = f16 ? float_to_half(vg[i]) : float_to_bf16(vg[i]);
        }
    }
    return marco_attend(q, k_cache, v_cache, head_stride, pos + 1, n_heads, n_kv, hd, 1.0f / sqrtf((float)hd), f16, out,
                        n_threads);
}

/* y = [W_0 x; W_1 x; ...] for n_mats matrices sharing the input x (k values): types[i], rows[i] rows starting at
 * ptrs[i], row_strides[i] bytes apart. One call instead of one per matrix (q, k and v of a layer). */
MARCO_API
int marco_matmul_multi(int n_mats, const int *types, const int64_t *ptrs, const int64_t *row_strides, const int *rows,
                       int k, const float *x, float *y, int n_threads) {
    for (int i = 0; i < n_mats; i++) {
        int code = marco_matmul(types[i], (const uint8_t *)ptrs[i], row_strides[i], rows[i], k, x, 1, y, n_threads);
        if (code) return code;
        y += rows[i];
    }
    return 0;
}
