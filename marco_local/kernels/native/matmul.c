/* Matrix products on ggml blocks: y = x @ W.T for a quantized W, and one token through a layer's selected experts.
 *
 * Threads: marco_parallel_for (platform.h), with the thread count passed in by the caller (torch.get_num_threads()).
 * Activations are quantized into a per-thread scratch that grows and is reused, so the decode path allocates nothing
 * after its first call.
 */
#include <math.h>
#include <stdlib.h>

#include "ggml_dot.h"
#include "platform.h"

typedef float (*dot32_fn)(int, const void *, const act32 *);
typedef float (*dot256_fn)(int, const void *, const act256 *);
typedef void (*dot32x4_fn)(int, const void *, const act32 *, float[4]);
typedef void (*dot256x4_fn)(int, const void *, const act256 *, float[4]);

typedef struct {
    int block, type_size;
    dot32_fn dot32;     /* set for the 32-weight types */
    dot256_fn dot256;   /* set for the K-quants */
    dot32x4_fn x4_32;   /* one row against 4 tokens (bit-identical to dot32 per token), or NULL */
    dot256x4_fn x4_256; /* the same for dot256 */
} kind;

static int kind_of(int type, kind *t) {
    kind k = {0};
    switch (type) {
    case T_Q4_0: k = (kind){32, 18, .dot32 = dot_q4_0, .x4_32 = dot_q4_0_x4}; break;
    case T_Q4_1: k = (kind){32, 20, .dot32 = dot_q4_1, .x4_32 = dot_q4_1_x4}; break;
    case T_Q5_0: k = (kind){32, 22, .dot32 = dot_q5_0, .x4_32 = dot_q5_0_x4}; break;
    case T_Q5_1: k = (kind){32, 24, .dot32 = dot_q5_1, .x4_32 = dot_q5_1_x4}; break;
    case T_Q8_0: k = (kind){32, 34, .dot32 = dot_q8_0, .x4_32 = dot_q8_0_x4}; break;
    case T_Q4_K: k = (kind){256, 144, .dot256 = dot_q4_K, .x4_256 = dot_q4_K_x4}; break;
    case T_Q5_K: k = (kind){256, 176, .dot256 = dot_q5_K, .x4_256 = dot_q5_K_x4}; break;
    case T_Q6_K: k = (kind){256, 210, .dot256 = dot_q6_K, .x4_256 = dot_q6_K_x4}; break;
    default: return -1;
    }
    *t = k;
    return 0;
}

static size_t act_bytes(const kind *t, int k) {
    return t->dot32 ? (size_t)(k / 32) * sizeof(act32) : (size_t)(k / 256) * sizeof(act256);
}

static void quantize_act(const kind *t, const float *x, void *dst, int k) {
    if (t->dot32)
        quantize_act32(x, dst, k);
    else
        quantize_act256(x, dst, k);
}

static inline float dot(const kind *t, int k, const uint8_t *w, const void *a) {
    return t->dot32 ? t->dot32(k, w, a) : t->dot256(k, w, a);
}

static inline int has_x4(const kind *t) { return t->x4_32 || t->x4_256; }

static inline void dot_x4(const kind *t, int k, const uint8_t *w, const void *a, float o[4]) {
    if (t->x4_32)
        t->x4_32(k, w, a, o);
    else
        t->x4_256(k, w, a, o);
}

/* Rows [r0, r1) against all m tokens of acts (`ab` bytes per token), for a type with an x4 kernel: tokens in groups
 * of 4 (the x4 kernel unpacks each row's weights once per group; results bit-identical to the one-token kernel), the
 * rest one by one. The group loop is outside the row loop: a group's activations (4 x 1168 bytes for Q4_K at
 * k = 1024, 4 x 1280 for the 32-weight types) stay in L1 across the tile's rows, whose weights stay there across the
 * groups. */
static void x4_tile(const kind *t, int k, const uint8_t *w, int64_t row_stride, int r0, int r1, const uint8_t *acts,
                    size_t ab, int m, float *y, int n) {
    int i = 0;
    for (; i + 4 <= m; i += 4)
        for (int r = r0; r < r1; r++) {
            float o[4];
            dot_x4(t, k, w + (size_t)r * row_stride, acts + ab * i, o);
            for (int j = 0; j < 4; j++) y[(size_t)(i + j) * n + r] = o[j];
        }
    for (; i < m; i++)
        for (int r = r0; r < r1; r++) y[(size_t)i * n + r] = dot(t, k, w + (size_t)r * row_stride, acts + ab * i);
}

/* Rows per x4_tile: about 16 KB of weights (half of a 48 KB L1, the rest for the activations). */
static int x4_tile_rows(const kind *t, int k) {
    int rows = 16384 / ((k / t->block) * t->type_size);
    return rows > 1 ? rows : 1;
}

/* Scratch of the calling thread, grown on demand and kept (shared by the calls of this library: none nests). */
static MARCO_THREAD_LOCAL void *scratch_ptr;
static MARCO_THREAD_LOCAL size_t scratch_size;

void *marco_scratch(size_t bytes) {
    if (bytes > scratch_size) {
        void *p = realloc(scratch_ptr, bytes);
        if (!p) return NULL;
        scratch_ptr = p;
        scratch_size = bytes;
    }
    return scratch_ptr;
}

/* Bytes of one row of k inputs of `type`, or -1 when the type is not supported or k is not a whole number of
 * blocks. */
MARCO_API int64_t marco_row_bytes(int type, int k) {
    kind t;
    if (kind_of(type, &t) || k <= 0 || k % t.block) return -1;
    return (int64_t)(k / t.block) * t.type_size;
}

typedef struct {
    const kind *t;
    int k, n, m, tile;
    const uint8_t *w;
    int64_t row_stride;
    const float *x;
    float *y;
    uint8_t *acts;
    size_t ab;
} matmul_job;

static void matmul_quantize(void *p, int begin, int end) {
    const matmul_job *j = p;
    for (int i = begin; i < end; i++) {
        quantize_act(j->t, j->x + (size_t)i * j->k, j->acts + j->ab * i, j->k);
        /* the tokens x4_tile runs in groups of 4: in the layout the 32-weight x4 kernels read */
        if (j->t->x4_32 && i < (j->m & ~3)) pack_act32x4((act32 *)(j->acts + j->ab * i), j->k / 32);
    }
}

static void matmul_tiles(void *p, int begin, int end) {
    const matmul_job *j = p;
    for (int b = begin; b < end; b++) {
        int r0 = b * j->tile, r1 = r0 + j->tile < j->n ? r0 + j->tile : j->n;
        x4_tile(j->t, j->k, j->w, j->row_stride, r0, r1, j->acts, j->ab, j->m, j->y, j->n);
    }
}

static void matmul_rows(void *p, int begin, int end) {
    const matmul_job *j = p;
    for (int r = begin; r < end; r++) {
        const uint8_t *row = j->w + (size_t)r * j->row_stride;
        for (int i = 0; i < j->m; i++) j->y[(size_t)i * j->n + r] = dot(j->t, j->k, row, j->acts + j->ab * i);
    }
}

/* y[m, n] = x[m, k] @ W.T, W = n rows of ggml blocks, `row_stride` bytes apart. Returns 0, or -1 for an unsupported
 * type or shape, -2 when scratch memory could not be had. */
MARCO_API int marco_matmul(int type, const uint8_t *w, int64_t row_stride, int n, int k, const float *x, int m,
                           float *y, int n_threads) {
    kind t;
    if (kind_of(type, &t) || k % t.block || n < 0 || m < 0) return -1;
    size_t ab = act_bytes(&t, k);
    uint8_t *acts = marco_scratch(ab * (size_t)m);
    if (!acts && m) return -2;
    matmul_job j = {&t, k, n, m, 0, w, row_stride, x, y, acts, ab};
    /* Several tokens are quantized by all threads (one token: by this one, sparing a handover); then rows are split
     * over threads, and each thread runs every token of its rows (a weight row is read once). */
    if (m == 1)
        quantize_act(&t, x, acts, k);
    else
        marco_parallel_for(m, n_threads, matmul_quantize, &j);
    if (has_x4(&t) && m >= 4) { /* several tokens, a type with an x4 kernel: in tiles of rows (x4_tile) */
        j.tile = x4_tile_rows(&t, k);
        marco_parallel_for((n + j.tile - 1) / j.tile, n_threads, matmul_tiles, &j);
    } else {
        marco_parallel_for(n, n_threads, matmul_rows, &j);
    }
    return 0;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

typedef struct {
    const kind *tg, *tu, *td;
    int n_sel, hidden, inter, accumulate;
    const int64_t *gate_ptrs, *up_ptrs, *down_ptrs;
    const float *route_w;
    int64_t rg, ru, rd;
    const uint8_t *xg, *xu;
    float *h;
    uint8_t *ad;
    size_t db;
    float *y;
} moe_job;

static void moe_gate_up(void *p, int begin, int end) {
    const moe_job *j = p;
    for (int r = begin; r < end; r++) {
        int e = r / (2 * j->inter), which = (r / j->inter) & 1, i = r % j->inter;
        const uint8_t *row = which ? (const uint8_t *)j->up_ptrs[e] + (size_t)i * j->ru
                                   : (const uint8_t *)j->gate_ptrs[e] + (size_t)i * j->rg;
        j->h[r] = which ? dot(j->tu, j->hidden, row, j->xu) : dot(j->tg, j->hidden, row, j->xg);
    }
}

static void moe_act(void *p, int begin, int end) {
    const moe_job *j = p;
    for (int e = begin; e < end; e++) {
        float *g = j->h + (size_t)e * 2 * j->inter, *u = g + j->inter;
        for (int i = 0; i < j->inter; i++) g[i] = silu(g[i]) * u[i] * j->route_w[e];
        quantize_act(j->td, g, j->ad + j->db * e, j->inter);
    }
}

static void moe_down(void *p, int begin, int end) {
    const moe_job *j = p;
    for (int r = begin; r < end; r++) {
        float acc = j->accumulate ? j->y[r] : 0.0f;
        for (int e = 0; e < j->n_sel; e++)
            acc += dot(j->td, j->inter, (const uint8_t *)j->down_ptrs[e] + (size_t)r * j->rd, j->ad + j->db * e);
        j->y[r] = acc;
    }
}

/* One token through `n_sel` experts: y[hidden] = sum_e route_w[e] * down_e(silu(gate_e(x)) * up_e(x)).
 * Expert e's matrices start at gate_ptrs[e] / up_ptrs[e] ([inter] rows of `hidden` inputs) and down_ptrs[e]
 * ([hidden] rows of `inter` inputs), rows contiguous. The routing weight is applied before the (linear) down
 * projection, so each output row sums its experts in one pass and no thread reduces another's work. */
static int moe(int n_sel, const int64_t *gate_ptrs, const int64_t *up_ptrs, const int64_t *down_ptrs,
               const float *route_w, int gate_type, int up_type, int down_type, int hidden, int inter, const float *x,
               float *y, int accumulate, int n_threads) {
    kind tg, tu, td;
    if (kind_of(gate_type, &tg) || kind_of(up_type, &tu) || kind_of(down_type, &td)) return -1;
    if (hidden % tg.block || hidden % tu.block || inter % td.block || n_sel <= 0) return -1;
    size_t gb = act_bytes(&tg, hidden), ub = act_bytes(&tu, hidden), db = act_bytes(&td, inter);
    size_t hbytes = sizeof(float) * 2 * (size_t)n_sel * inter;
    uint8_t *buf = marco_scratch(gb + ub + hbytes + db * n_sel);
    if (!buf) return -2;
    uint8_t *xg = buf, *xu = buf + gb;
    float *h = (float *)(buf + gb + ub); /* [n_sel][2][inter]: gate, then up */
    uint8_t *ad = buf + gb + ub + hbytes;
    int64_t rg = (int64_t)(hidden / tg.block) * tg.type_size, ru = (int64_t)(hidden / tu.block) * tu.type_size;
    int64_t rd = (int64_t)(inter / td.block) * td.type_size;
    quantize_act(&tg, x, xg, hidden);
    if ((tu.dot32 && tg.dot32) || (tu.dot256 && tg.dot256))
        xu = xg;
    else
        quantize_act(&tu, x, xu, hidden);
    moe_job j = {&tg, &tu, &td, n_sel, hidden, inter, accumulate, gate_ptrs, up_ptrs, down_ptrs, route_w, rg, ru, rd,
                 xg, xu, h, ad, db, y};
    marco_parallel_for(2 * n_sel * inter, n_threads, moe_gate_up, &j);
    marco_parallel_for(n_sel, n_threads, moe_act, &j);
    marco_parallel_for(hidden, n_threads, moe_down, &j);
    return 0;
}

MARCO_API int marco_moe(int n_sel, const int64_t *gate_ptrs, const int64_t *up_ptrs, const int64_t *down_ptrs,
              const float *route_w, int gate_type, int up_type, int down_type, int hidden, int inter, const float *x,
              float *y, int n_threads) {
    return moe(n_sel, gate_ptrs, up_ptrs, down_ptrs, route_w, gate_type, up_type, down_type, hidden, inter, x, y, 0,
               n_threads);
}

/* marco_moe adding onto y instead of overwriting it. Experts run in groups (an offload cache with fewer slots than
 * a token's experts) accumulate into one float32 y, in routing order: the additions are the very ones of a single
 * call over all experts, so the result is bit-identical to it. */
MARCO_API int marco_moe_acc(int n_sel, const int64_t *gate_ptrs, const int64_t *up_ptrs, const int64_t *down_ptrs,
                  const float *route_w, int gate_type, int up_type, int down_type, int hidden, int inter,
                  const float *x, float *y, int n_threads) {
    return moe(n_sel, gate_ptrs, up_ptrs, down_ptrs, route_w, gate_type, up_type, down_type, hidden, inter, x, y, 1,
               n_threads);
}

/* The plain-C reference kernels by type, for tests: one row dotted with x (quantized here). */
MARCO_API float marco_dot_ref(int type, const uint8_t *w, int k, const float *x) {
    kind t;
    if (kind_of(type, &t) || k % t.block) return NAN;
    void *a = malloc(act_bytes(&t, k));
    if (!a) return NAN;
    quantize_act(&t, x, a, k);
    float r;
    switch (type) {
    case T_Q4_0: r = dot_q4_0_ref(k, w, a); break;
    case T_Q4_1: r = dot_q4_1_ref(k, w, a); break;
    case T_Q5_0: r = dot_q5_0_ref(k, w, a); break;
    case T_Q5_1: r = dot_q5_1_ref(k, w, a); break;
    case T_Q8_0: r = dot_q8_0_ref(k, w, a); break;
    case T_Q4_K: r = dot_q4_K_ref(k, w, a); break;
    case T_Q5_K: r = dot_q5_K_ref(k, w, a); break;
    default: r = dot_q6_K_ref(k, w, a); break;
    }
    free(a);
    return r;
}
