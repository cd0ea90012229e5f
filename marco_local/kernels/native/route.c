/* A MoE layer's routing for one token, and routing plus experts in one call.
 *
 * Why: on the decode path the router is a small product followed by softmax, top-k and a renormalisation: in torch
 * that is half a dozen calls per layer, each costing more than its arithmetic. Semantics are the model's
 * (`SparseMoeBlock.route`): logits from the router weights (bf16 or float32, accumulated in float32), softmax in float32, the
 * top_k largest (ties: the lower expert id first), renormalised when norm_topk is set, then rounded to bf16 when
 * round_bf16 is set: the torch path hands the routing weights on in the activation dtype, bf16 in a bf16 model and
 * float32 where the activations are float32 (GGUF files on these kernels).
 */
#include <math.h>
#include <stdint.h>

#include "ggml_dot.h"
#include "platform.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

int marco_moe(int n_sel, const int64_t *gate_ptrs, const int64_t *up_ptrs, const int64_t *down_ptrs,
              const float *route_w, int gate_type, int up_type, int down_type, int hidden, int inter, const float *x,
              float *y, int n_threads);

static float dot_f32_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

typedef struct {
    const float *x;
    const void *w;
    int w_f32, dim;
    float *p;
} logits_job;

static void router_logits(void *ctx, int begin, int end) {
    const logits_job *j = ctx;
    for (int e = begin; e < end; e++)
        j->p[e] = j->w_f32 ? dot_f32_f32(j->x, (const float *)j->w + (size_t)e * j->dim, j->dim)
                           : dot_f32_bf16(j->x, (const uint16_t *)j->w + (size_t)e * j->dim, j->dim);
}

/* ids[top_k], weights[top_k] for x[dim] through the router w ([n_experts, dim], float32 when w_f32, else bf16). */
MARCO_API int marco_route(const float *x, const void *w, int w_f32, int n_experts, int dim, int top_k, int norm_topk,
                          int round_bf16, int32_t *ids, float *weights, int n_threads) {
    if (top_k <= 0 || top_k > n_experts || top_k > 64) return -1;
    float *p = marco_scratch(sizeof(float) * (size_t)n_experts);
    if (!p) return -2;
    logits_job j = {x, w, w_f32, dim, p};
    marco_parallel_for(n_experts, n_threads, router_logits, &j);
    float m = -INFINITY, sum = 0.0f;
    for (int e = 0; e < n_experts; e++) m = p[e] > m ? p[e] : m;
    for (int e = 0; e < n_experts; e++) sum += (p[e] = expf(p[e] - m));
    float picked = 0.0f;
    for (int j = 0; j < top_k; j++) {
        int best = -1;
        for (int e = 0; e < n_experts; e++) {
            if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
        }
        if (best < 0) return -3; /* NaN logits */
        ids[j] = best;
        weights[j] = p[best] / sum;
        picked += weights[j];
        p[best] = -1.0f; /* taken */
    }
    for (int j = 0; j < top_k; j++) {
        float wj = norm_topk ? weights[j] / picked : weights[j];
        weights[j] = round_bf16 ? bf16_to_float(float_to_bf16(wj)) : wj;
    }
    return 0;
}

/* Routing, then the selected experts (marco_moe), for one token. Expert e's gate matrix starts at
 * gate_base + e * gate_stride (likewise up and down). The chosen ids and weights are written out for the caller. */
MARCO_API
int marco_moe_routed(const float *x, const void *router, int router_f32, int n_experts, int top_k, int norm_topk,
                     int round_bf16, int64_t gate_base, int64_t gate_stride, int64_t up_base, int64_t up_stride, int64_t down_base,
                     int64_t down_stride, int gate_type, int up_type, int down_type, int hidden, int inter, float *y,
                     int32_t *ids, float *weights, int n_threads) {
    int code =
        marco_route(x, router, router_f32, n_experts, hidden, top_k, norm_topk, round_bf16, ids, weights, n_threads);
    if (code) return code;
    int64_t g[64], u[64], d[64];
    for (int j = 0; j < top_k; j++) {
        g[j] = gate_base + ids[j] * gate_stride;
        u[j] = up_base + ids[j] * up_stride;
        d[j] = down_base + ids[j] * down_stride;
    }
    return marco_moe(top_k, g, u, d, weights, gate_type, up_type, down_type, hidden, inter, x, y, n_threads);
}
