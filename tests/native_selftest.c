/* Self-test of the native kernels as a program, for targets this machine cannot load into Python (an aarch64 build
 * run under qemu, tests/test_native_build.py): every type's product, several tokens and threads, against the
 * plain-C reference dot (dot_ref.c) on the same random blocks. Exit status 0 when all agree. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int64_t marco_row_bytes(int type, int k);
int marco_matmul(int type, const uint8_t *w, int64_t row_stride, int n, int k, const float *x, int m, float *y,
                 int n_threads);
float marco_dot_ref(int type, const uint8_t *w, int k, const float *x);
const char *marco_build_info(void);

static uint32_t state = 12345;
static uint32_t next_random(void) {
    state = state * 1664525u + 1013904223u;
    return state >> 8;
}

static void put_half(uint8_t *p, uint16_t h) { memcpy(p, &h, 2); }

int main(void) {
    /* ggml type, block bytes, offsets of the f16 scales in a block (-1: none) */
    const int spec[][4] = {{2, 18, 0, -1},  {3, 20, 0, 2},    {6, 22, 0, -1},   {7, 24, 0, 2},
                           {8, 34, 0, -1},  {12, 144, 0, 2},  {13, 176, 0, 2},  {14, 210, 208, -1}};
    const int k = 512, n = 37, m = 6;
    int bad = 0;
    /* the portable and neon dots compute the reference's very operations: bit-identical; x86's sum in another order */
    const float tol = strncmp(marco_build_info(), "avx", 3) ? 0.0f : 1e-4f;
    float *x = malloc(sizeof(float) * m * k), *y = malloc(sizeof(float) * m * n);
    for (int i = 0; i < m * k; i++) x[i] = (float)(next_random() % 2001) / 1000.0f - 1.0f;
    for (size_t s = 0; s < sizeof spec / sizeof spec[0]; s++) {
        int type = spec[s][0], bs = spec[s][1];
        int64_t rb = marco_row_bytes(type, k);
        uint8_t *w = malloc((size_t)rb * n);
        for (int64_t i = 0; i < rb * n; i++) w[i] = (uint8_t)next_random();
        for (int64_t b = 0; b < rb * n; b += bs) { /* finite scales: 0.0625 and 0.015625 */
            put_half(w + b + spec[s][2], 0x2C00);
            if (spec[s][3] >= 0) put_half(w + b + spec[s][3], 0x2400);
        }
        for (int tokens = 1; tokens <= m; tokens += m - 1) {
            for (int threads = 1; threads <= 3; threads++) {
                if (marco_matmul(type, w, rb, n, k, x, tokens, y, threads)) {
                    printf("type %d: marco_matmul failed\n", type);
                    return 2;
                }
                for (int i = 0; i < tokens; i++)
                    for (int r = 0; r < n; r++) {
                        float want = marco_dot_ref(type, w + r * rb, k, x + i * k), got = y[i * n + r];
                        if (!(fabsf(got - want) <= tol * (fabsf(want) + 1.0f))) {
                            if (bad++ < 5) printf("type %d row %d token %d: %g != %g\n", type, r, i, got, want);
                        }
                    }
            }
        }
        free(w);
    }
    printf("%s: %d mismatches\n", marco_build_info(), bad);
    free(x);
    free(y);
    return bad != 0;
}
