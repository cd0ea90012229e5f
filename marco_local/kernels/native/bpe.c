/* Byte-level BPE over a GGUF vocabulary (see marco_local/bpe.py for why and how it is used).
 *
 * Tables, for a vocabulary of n tokens and m merges:
 * - the tokens' text (byte-level form, UTF-8) in one blob, and an open-addressing table text -> id;
 * - each token's decoded bytes (GPT-2's byte-to-char map reversed) in a second blob;
 * - an open-addressing table (left id, right id) -> (rank, merged id).
 * For Qwen's 151,936 tokens and 151,387 merges that is ~9 MB, against ~30 MB in the tokenizers library.
 *
 * Encoding merges the lowest-ranked adjacent pair first, the leftmost on ties, through a binary heap of candidate
 * merges over a linked list of symbols (O(n log n) per piece, so a long unbroken word cannot stall it), as the
 * tokenizers library does. Characters missing from the vocabulary are dropped (BPE without an unknown token).
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "platform.h"

enum { BPE_OK = 0, BPE_NO_MEMORY = 1, BPE_BAD_COUNT = 2, BPE_BAD_MERGE = 3 };

typedef struct {
    int32_t n_tokens;
    char *text;         /* token i's text: text[text_off[i] .. text_off[i + 1]) */
    uint32_t *text_off; /* n_tokens + 1 */
    uint8_t *decoded;   /* token i's bytes: decoded[dec_off[i] .. dec_off[i + 1]) */
    uint32_t *dec_off;
    uint8_t *special;   /* 1: skipped when decoding with skip_special */
    uint32_t vocab_mask;
    int32_t *vocab_slots; /* token id or -1 */
    uint32_t merge_mask;
    uint64_t *merge_keys; /* (left << 32 | right), or EMPTY */
    int32_t *merge_rank;
    int32_t *merge_result;
} marco_bpe;

#define EMPTY_KEY UINT64_MAX

static uint64_t hash_bytes(const char *s, int64_t len) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int64_t i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static uint64_t hash_pair(uint64_t key) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    return key ^ (key >> 33);
}

static uint32_t table_size(int64_t n) {
    uint32_t size = 1024;
    while (size < n + n / 3) size <<= 1; /* load factor <= 3/4 */
    return size;
}

static int32_t lookup(const marco_bpe *b, const char *s, int64_t len) {
    for (uint32_t slot = (uint32_t)hash_bytes(s, len) & b->vocab_mask;; slot = (slot + 1) & b->vocab_mask) {
        int32_t id = b->vocab_slots[slot];
        if (id < 0) return -1;
        int64_t tlen = b->text_off[id + 1] - b->text_off[id];
        if (tlen == len && memcmp(b->text + b->text_off[id], s, len) == 0) return id;
    }
}

/* Later duplicates win, as in a Python dict built from the token list. */
static void insert_token(marco_bpe *b, int32_t id) {
    const char *s = b->text + b->text_off[id];
    int64_t len = b->text_off[id + 1] - b->text_off[id];
    uint32_t slot = (uint32_t)hash_bytes(s, len) & b->vocab_mask;
    for (;; slot = (slot + 1) & b->vocab_mask) {
        int32_t other = b->vocab_slots[slot];
        if (other < 0) break;
        int64_t olen = b->text_off[other + 1] - b->text_off[other];
        if (olen == len && memcmp(b->text + b->text_off[other], s, len) == 0) break;
    }
    b->vocab_slots[slot] = id;
}

static int32_t merge_slot(const marco_bpe *b, uint64_t key) {
    uint32_t slot = (uint32_t)hash_pair(key) & b->merge_mask;
    while (b->merge_keys[slot] != EMPTY_KEY && b->merge_keys[slot] != key) slot = (slot + 1) & b->merge_mask;
    return (int32_t)slot;
}

static uint64_t pair_key(int32_t left, int32_t right) { return (uint64_t)(uint32_t)left << 32 | (uint32_t)right; }

/* The byte GPT-2's byte-level map sends to codepoint cp, or -1. Printable Latin-1 bytes map to themselves, the other
 * 68 bytes (controls, space, 0x7f-0xa0, 0xad) to 256, 257, ... in byte order. */
static int byte_of_codepoint(uint32_t cp) {
    static int16_t table[324];
    static int ready = 0;
    if (!ready) {
        for (int i = 0; i < 324; i++) table[i] = -1;
        int next = 256;
        for (int byte = 0; byte < 256; byte++) {
            int printable = (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174;
            table[printable ? byte : next++] = (int16_t)byte;
        }
        ready = 1;
    }
    return cp < 324 ? table[cp] : -1;
}

/* Length of the UTF-8 character starting at s (1 for a stray byte), and its codepoint. */
static int utf8_char(const uint8_t *s, int64_t left, uint32_t *cp) {
    int n = s[0] < 0x80 ? 1 : (s[0] >> 5) == 6 ? 2 : (s[0] >> 4) == 14 ? 3 : (s[0] >> 3) == 30 ? 4 : 1;
    if (n > left) n = 1;
    uint32_t c = n == 1 ? s[0] : (uint32_t)(s[0] & (0x7f >> n));
    for (int i = 1; i < n; i++) c = c << 6 | (s[i] & 0x3f);
    *cp = c;
    return n;
}

/* A token's bytes: its characters mapped back through the byte-level map, or its UTF-8 text when one of them has no
 * byte (an added token such as "my token"), as the tokenizers library's ByteLevel decoder does. */
static int64_t decode_token(const char *s, int64_t len, uint8_t *out) {
    int64_t n = 0;
    for (int64_t i = 0; i < len;) {
        uint32_t cp;
        int step = utf8_char((const uint8_t *)s + i, len - i, &cp);
        int byte = byte_of_codepoint(cp);
        if (byte < 0) {
            memcpy(out, s, len);
            return len;
        }
        out[n++] = (uint8_t)byte;
        i += step;
    }
    return n;
}

MARCO_API void marco_bpe_free(void *handle) {
    marco_bpe *b = handle;
    if (!b) return;
    free(b->text);
    free(b->text_off);
    free(b->decoded);
    free(b->dec_off);
    free(b->special);
    free(b->vocab_slots);
    free(b->merge_keys);
    free(b->merge_rank);
    free(b->merge_result);
    free(b);
}

/* tokens: n_tokens NUL-terminated texts back to back; merges: n_merges NUL-terminated "left right" texts. On error
 * returns NULL with *error set (BPE_BAD_COUNT: a text holds a NUL; BPE_BAD_MERGE: a merge without a space, or of
 * tokens that are not in the vocabulary; *bad_merge is its index). */
MARCO_API
void *marco_bpe_new(const char *tokens, int64_t tokens_len, int32_t n_tokens, const char *merges, int64_t merges_len,
                    int32_t n_merges, int32_t *error, int32_t *bad_merge) {
    *error = BPE_NO_MEMORY;
    *bad_merge = -1;
    if (tokens_len >= UINT32_MAX) return NULL;
    marco_bpe *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->n_tokens = n_tokens;
    b->text = malloc(tokens_len + 1);
    b->text_off = malloc((n_tokens + 1) * sizeof(uint32_t));
    b->decoded = malloc(tokens_len + 1);
    b->dec_off = malloc((n_tokens + 1) * sizeof(uint32_t));
    b->special = calloc(n_tokens + 1, 1);
    uint32_t vsize = table_size(n_tokens), msize = table_size(n_merges);
    b->vocab_mask = vsize - 1;
    b->vocab_slots = malloc(vsize * sizeof(int32_t));
    b->merge_mask = msize - 1;
    b->merge_keys = malloc(msize * sizeof(uint64_t));
    b->merge_rank = malloc(msize * sizeof(int32_t));
    b->merge_result = malloc(msize * sizeof(int32_t));
    if (!b->text || !b->text_off || !b->decoded || !b->dec_off || !b->special || !b->vocab_slots || !b->merge_keys ||
        !b->merge_rank || !b->merge_result) {
        marco_bpe_free(b);
        return NULL;
    }
    memset(b->vocab_slots, 0xff, vsize * sizeof(int32_t));
    for (uint32_t i = 0; i < msize; i++) b->merge_keys[i] = EMPTY_KEY;

    /* texts without their NULs, and decoded bytes (never longer than the text) */
    int64_t pos = 0, text_len = 0, dec_len = 0;
    for (int32_t id = 0; id < n_tokens; id++) {
        if (pos >= tokens_len) {
            *error = BPE_BAD_COUNT;
            marco_bpe_free(b);
            return NULL;
        }
        int64_t len = (int64_t)strnlen(tokens + pos, tokens_len - pos);
        b->text_off[id] = (uint32_t)text_len;
        memcpy(b->text + text_len, tokens + pos, len);
        b->dec_off[id] = (uint32_t)dec_len;
        dec_len += decode_token(tokens + pos, len, b->decoded + dec_len);
        text_len += len;
        pos += len + 1;
    }
    b->text_off[n_tokens] = (uint32_t)text_len;
    b->dec_off[n_tokens] = (uint32_t)dec_len;
    if (pos != tokens_len) {
        *error = BPE_BAD_COUNT;
        marco_bpe_free(b);
        return NULL;
    }
    for (int32_t id = 0; id < n_tokens; id++) insert_token(b, id);

    pos = 0;
    for (int32_t rank = 0; rank < n_merges; rank++) {
        int64_t len = pos < merges_len ? (int64_t)strnlen(merges + pos, merges_len - pos) : -1;
        const char *m = merges + pos, *space = len > 0 ? memchr(m, ' ', len) : NULL;
        int32_t left = -1, right = -1, merged = -1;
        if (space) {
            left = lookup(b, m, space - m);
            right = lookup(b, space + 1, m + len - space - 1);
            /* the merged text is the two texts without the space */
            char stack[256], *joined = len - 1 <= (int64_t)sizeof stack ? stack : malloc(len);
            if (joined) {
                memcpy(joined, m, space - m);
                memcpy(joined + (space - m), space + 1, m + len - space - 1);
                merged = lookup(b, joined, len - 1);
                if (joined != stack) free(joined);
            }
        }
        if (left < 0 || right < 0 || merged < 0) {
            *error = BPE_BAD_MERGE;
            *bad_merge = rank;
            marco_bpe_free(b);
            return NULL;
        }
        uint64_t key = pair_key(left, right);
        int32_t slot = merge_slot(b, key); /* a repeated merge keeps its later rank, as a dict would */
        b->merge_keys[slot] = key;
        b->merge_rank[slot] = rank;
        b->merge_result[slot] = merged;
        pos += len + 1;
    }
    *error = BPE_OK;
    return b;
}

MARCO_API void marco_bpe_set_special(void *handle, int32_t id) {
    marco_bpe *b = handle;
    if (id >= 0 && id < b->n_tokens) b->special[id] = 1;
}

MARCO_API int32_t marco_bpe_lookup(void *handle, const char *s, int64_t len) { return lookup(handle, s, len); }

typedef struct {
    int32_t rank, pos;
} candidate;

static int before(candidate a, candidate b) { return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos); }

static void heap_push(candidate *heap, int64_t *n, candidate c) {
    int64_t i = (*n)++;
    while (i > 0 && before(c, heap[(i - 1) / 2])) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = c;
}

static candidate heap_pop(candidate *heap, int64_t *n) {
    candidate top = heap[0], last = heap[--(*n)];
    int64_t i = 0;
    for (;;) {
        int64_t child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && before(heap[child + 1], heap[child])) child++;
        if (!before(heap[child], last)) break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = last;
    return top;
}

/* Rank of merging symbols (left, right), or -1; the merged id in *merged. */
static int32_t merge_of(const marco_bpe *b, int32_t left, int32_t right, int32_t *merged) {
    int32_t slot = merge_slot(b, pair_key(left, right));
    if (b->merge_keys[slot] == EMPTY_KEY) return -1;
    *merged = b->merge_result[slot];
    return b->merge_rank[slot];
}

static void push_pair(const marco_bpe *b, const int32_t *id, int32_t left, int32_t right, candidate *heap,
                      int64_t *n) {
    int32_t merged;
    int32_t rank = merge_of(b, id[left], id[right], &merged);
    if (rank >= 0) heap_push(heap, n, (candidate){rank, left});
}

/* One piece (a pre-tokenizer's output, byte-level form) into ids written at out; returns how many. Scratch arrays
 * hold at least len entries (heap: 3 * len). */
static int64_t encode_piece(const marco_bpe *b, const char *s, int64_t len, int ignore_merges, int32_t *out,
                            int32_t *id, int32_t *prev, int32_t *next, candidate *heap) {
    if (ignore_merges) {
        int32_t whole = lookup(b, s, len);
        if (whole >= 0) {
            out[0] = whole;
            return 1;
        }
    }
    int32_t n = 0;
    for (int64_t i = 0; i < len;) {
        uint32_t cp;
        int step = utf8_char((const uint8_t *)s + i, len - i, &cp);
        int32_t t = lookup(b, s + i, step);
        if (t >= 0) {
            id[n] = t;
            prev[n] = n - 1;
            next[n] = n + 1;
            n++;
        }
        i += step;
    }
    if (n == 0) return 0;
    next[n - 1] = -1;
    int64_t heap_n = 0;
    for (int32_t i = 0; i + 1 < n; i++) push_pair(b, id, i, i + 1, heap, &heap_n);
    while (heap_n > 0) {
        candidate c = heap_pop(heap, &heap_n);
        int32_t left = c.pos, right = next[left];
        if (id[left] < 0 || right < 0) continue; /* merged into its left neighbour, or now last */
        int32_t merged;
        if (merge_of(b, id[left], id[right], &merged) != c.rank) continue; /* a stale candidate */
        id[left] = merged;
        id[right] = -1;
        next[left] = next[right];
        if (next[right] >= 0) prev[next[right]] = left;
        if (prev[left] >= 0) push_pair(b, id, prev[left], left, heap, &heap_n);
        if (next[left] >= 0) push_pair(b, id, left, next[left], heap, &heap_n);
    }
    int64_t count = 0;
    for (int32_t i = 0; i >= 0; i = next[i]) out[count++] = id[i];
    return count;
}

/* Pieces back to back in text, piece k ending at byte ends[k]. Writes at most text_len ids (a piece yields at most
 * one id per character); returns how many, or -1 when scratch memory cannot be had. */
MARCO_API
int64_t marco_bpe_encode(void *handle, const char *text, const int64_t *ends, int64_t n_pieces, int32_t ignore_merges,
                         int32_t *out) {
    const marco_bpe *b = handle;
    int64_t longest = 1, start = 0;
    for (int64_t k = 0; k < n_pieces; k++) {
        if (ends[k] - start > longest) longest = ends[k] - start;
        start = ends[k];
    }
    int32_t *scratch = malloc(longest * 3 * sizeof(int32_t));
    candidate *heap = malloc(longest * 3 * sizeof(candidate));
    if (!scratch || !heap) {
        free(scratch);
        free(heap);
        return -1;
    }
    int64_t count = 0;
    start = 0;
    for (int64_t k = 0; k < n_pieces; k++) {
        count += encode_piece(b, text + start, ends[k] - start, ignore_merges, out + count, scratch,
                              scratch + longest, scratch + 2 * longest, heap);
        start = ends[k];
    }
    free(scratch);
    free(heap);
    return count;
}

/* The bytes of ids (those out of range skipped, special ones too when skip_special), written at out when it holds
 * cap bytes; returns the length either way, so a caller can size out with a first call. */
MARCO_API
int64_t marco_bpe_decode(void *handle, const int32_t *ids, int64_t n, int32_t skip_special, uint8_t *out, int64_t cap) {
    const marco_bpe *b = handle;
    int64_t len = 0;
    for (int64_t k = 0; k < n; k++) {
        int32_t t = ids[k];
        if (t < 0 || t >= b->n_tokens || (skip_special && b->special[t])) continue;
        int64_t tlen = b->dec_off[t + 1] - b->dec_off[t];
        if (len + tlen <= cap) memcpy(out + len, b->decoded + b->dec_off[t], tlen);
        len += tlen;
    }
    return len;
}
