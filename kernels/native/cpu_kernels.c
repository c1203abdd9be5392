/* The native CPU kernels: the multi-LoRA update of one projection (first part) and the decode attention over
 * the paged KV cache (at the end). The multi-LoRA update, for the adapters of one batch:
 *
 * For every slot k of the call (an adapter's A and B.T for this layer and module) and every token t of
 * that slot:
 *
 *     y[t] += scale_k * (x[t] @ A_k^T) @ B_k^T        A_k: [r, in] rows,  B_k^T: [r, out] rows
 *
 * Weights are read straight from the adapter pool, in fp32 or bf16 (bf16 is widened to fp32 in
 * registers: zero-extend to 32 bits, shift left 16); x, y and every sum are fp32. A tensor lies either
 * on consecutive pages (an element offset into the pool) or on scattered ones (a list of page ids,
 * gathered into a scratch buffer first), see kernels/native.py for the descriptor.
 *
 * Two phases, both parallel over the threads of the OpenMP runtime, each thread taking an equal share of
 * the work measured in weight elements times (tokens + FIXED_COST):
 *   shrink: h[t, j] = scale * dot(x[t], A[j])   work items are rows j of the slots' A
 *   expand: y[t, c] += sum_j h[t, j] * Bt[j, c]  work items are blocks of 16 columns of the slots' B.T
 * Every token belongs to one slot, so the threads write disjoint parts of y.
 *
 * Decode (a few tokens per slot) is bound by reading the weights: both phases stream each tensor once,
 * a tile of 4 rows at a time, applying each chunk to up to 4 tokens (expand adds into y rows that stay
 * in L1), and for bf16 request the next tile's rows ahead of use (the hardware prefetcher alone was
 * ~20% slower on the short bf16 rows; for fp32 it keeps up). With more than BLOCKED_FROM tokens a slot
 * is bound by multiply-adds instead, and expand keeps 4 tokens x 64 columns of sums in registers over
 * all rows of B.T, so y is loaded and stored once (splitting a slot's columns between threads then
 * halves its time; adding into y per tile of rows did not).
 *
 * Plain C with GCC vector extensions (AVX-512 intrinsics only for the bf16 widening and horizontal sums,
 * which GCC otherwise splits into 256-bit halves): the compiler picks the widest vectors the target has
 * (-march=native). No dependency besides libc and the OpenMP runtime.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define VW 16          /* fp32 lanes of one vector value */
#define ROWS 4         /* weight rows per tile */
#define TOKS 4         /* tokens per tile */
#define COL_BLOCK 16   /* columns per expand work item */
#define COLS 4         /* vectors of columns per tile of the blocked expand */
#ifndef BLOCKED_FROM
#define BLOCKED_FROM 4 /* slots with more tokens than this expand in register blocks */
#endif
#define FIXED_COST 4   /* cost of reading a weight element, in units of one token's multiply-add */
#ifndef SERIAL_WORK
#define SERIAL_WORK 65536 /* below this much work (see above) one thread does it all */
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint16_t vh_u __attribute__((vector_size(VW * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

#define INLINE static inline __attribute__((always_inline))
/* Request element i of weights w into the cache. */
#define PREFETCH(w, i, bf16) __builtin_prefetch((const char *)(w) + (i) * ((bf16) ? 2 : 4), 0, 3)

INLINE vf load_f32(const float *p) { return *(const vf_u *)p; }
INLINE void store_f32(float *p, vf v) { *(vf_u *)p = v; }

/* VW weights from element i of w, widened to fp32. */
INLINE vf load_w(const void *w, int64_t i, int bf16) {
    if (bf16) {
#if defined(__AVX512F__)
        /* one vpmovzxwd ymm -> zmm (the generic form below is split in two 256-bit halves by GCC) */
        __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
        return (vf)_mm512_slli_epi32(u, 16);
#else
        vu u = __builtin_convertvector(*(const vh_u *)((const uint16_t *)w + i), vu) << 16;
        return (vf)u;
#endif
    }
    return load_f32((const float *)w + i);
}

INLINE float scalar_w(const void *w, int64_t i, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return ((const float *)w)[i];
}

INLINE float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
#endif
}

/* out[i * NT + t] = dot(A[i], x[t]) for NR rows of A (row stride in) and NT tokens. */
INLINE void dot_tile(const void *a, int bf16, int64_t in, const float *const *x, float *out, int NR, int NT) {
    vf acc[ROWS][TOKS];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) acc[i][t] = (vf){0};
    int64_t k = 0;
    for (; k + VW <= in; k += VW) {
        vf w[ROWS];
        for (int i = 0; i < NR; i++) {
            if (bf16) PREFETCH(a, (i + ROWS) * in + k, bf16); /* the next tile's rows */
            w[i] = load_w(a, i * in + k, bf16);
        }
        for (int t = 0; t < NT; t++) {
            vf xv = load_f32(x[t] + k);
            for (int i = 0; i < NR; i++) acc[i][t] += w[i] * xv;
        }
    }
    for (int i = 0; i < NR; i++) {
        for (int t = 0; t < NT; t++) {
            float s = hsum(acc[i][t]);
            for (int64_t kk = k; kk < in; kk++) s += scalar_w(a, i * in + kk, bf16) * x[t][kk];
            out[i * NT + t] = s;
        }
    }
}

/* y[t][c0:c1] += sum_i hb[t][i] * Bt[i][c0:c1] for NR rows of Bt (row stride out) and NT tokens. */
INLINE void axpy_tile(const void *bt, int bf16, int64_t out, int64_t c0, int64_t c1, const float hb[TOKS][ROWS],
                      float *const *y, int NR, int NT) {
    vf hv[TOKS][ROWS];
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < NR; i++) hv[t][i] = (vf){0} + hb[t][i];
    int64_t c = c0;
    for (; c + VW <= c1; c += VW) {
        vf b[ROWS];
        for (int i = 0; i < NR; i++) {
            if (bf16) PREFETCH(bt, (i + ROWS) * out + c, bf16); /* the next tile's rows */
            b[i] = load_w(bt, i * out + c, bf16);
        }
        for (int t = 0; t < NT; t++) {
            vf yv = load_f32(y[t] + c);
            for (int i = 0; i < NR; i++) yv += hv[t][i] * b[i];
            store_f32(y[t] + c, yv);
        }
    }
    for (; c < c1; c++) {
        for (int t = 0; t < NT; t++) {
            float s = y[t][c];
            for (int i = 0; i < NR; i++) s += hb[t][i] * scalar_w(bt, i * out + c, bf16);
            y[t][c] = s;
        }
    }
}

#define DISPATCH_NT(call_nr, NR, nt)        \
    switch (nt) {                           \
    case 1: call_nr(NR, 1); break;          \
    case 2: call_nr(NR, 2); break;          \
    case 3: call_nr(NR, 3); break;          \
    default: call_nr(NR, 4); break;         \
    }

/* h[t * r + j] = scale * dot(x[tok[t]], A[j]) for rows j0..j1 of A and the n tokens of a slot. */
INLINE void shrink_rows(const void *a, int bf16, int64_t in, int64_t j0, int64_t j1, const float *x, int64_t ldx,
                        const int32_t *tok, int n, float scale, float *h, int r) {
    for (int t0 = 0; t0 < n; t0 += TOKS) {
        int nt = n - t0 < TOKS ? n - t0 : TOKS;
        const float *xr[TOKS];
        for (int t = 0; t < nt; t++) xr[t] = x + (int64_t)tok[t0 + t] * ldx;
        float out[ROWS * TOKS];
        int64_t j = j0;
#define SHRINK_CALL(NR, NT) dot_tile((const char *)a + j * in * (bf16 ? 2 : 4), bf16, in, xr, out, NR, NT)
#define SHRINK_STORE(NR)                                                                   \
    for (int i = 0; i < (NR); i++)                                                         \
        for (int t = 0; t < nt; t++) h[(int64_t)(t0 + t) * r + j + i] = scale * out[i * nt + t];
        for (; j + ROWS <= j1; j += ROWS) {
            DISPATCH_NT(SHRINK_CALL, ROWS, nt)
            SHRINK_STORE(ROWS)
        }
        for (; j < j1; j++) {
            DISPATCH_NT(SHRINK_CALL, 1, nt)
            SHRINK_STORE(1)
        }
#undef SHRINK_CALL
#undef SHRINK_STORE
    }
}

/* y[tok[t]][c0:c1] += sum_j h[t * r + j] * Bt[j][c0:c1] for the n tokens of a slot. */
INLINE void expand_cols(const void *bt, int bf16, int64_t out, int64_t c0, int64_t c1, float *y, int64_t ldy,
                        const int32_t *tok, int n, const float *h, int r) {
    for (int t0 = 0; t0 < n; t0 += TOKS) {
        int nt = n - t0 < TOKS ? n - t0 : TOKS;
        float *yr[TOKS];
        for (int t = 0; t < nt; t++) yr[t] = y + (int64_t)tok[t0 + t] * ldy;
        float hb[TOKS][ROWS];
        int j = 0;
#define EXPAND_CALL(NR, NT) axpy_tile((const char *)bt + (int64_t)j * out * (bf16 ? 2 : 4), bf16, out, c0, c1, hb, yr, NR, NT)
#define EXPAND_LOAD(NR)                                                                    \
    for (int t = 0; t < nt; t++)                                                           \
        for (int i = 0; i < (NR); i++) hb[t][i] = h[(int64_t)(t0 + t) * r + j + i];
        for (; j + ROWS <= r; j += ROWS) {
            EXPAND_LOAD(ROWS)
            DISPATCH_NT(EXPAND_CALL, ROWS, nt)
        }
        for (; j < r; j++) {
            EXPAND_LOAD(1)
            DISPATCH_NT(EXPAND_CALL, 1, nt)
        }
#undef EXPAND_CALL
#undef EXPAND_LOAD
    }
}

/* y[t][c:c + NV * VW] += sum_j h[t * r + j] * Bt[j][c:c + NV * VW] for NT tokens: the sums stay in
 * registers over all r rows of B.T, so y is read and written once. */
INLINE void gemm_tile(const void *bt, int bf16, int64_t out, int64_t c, const float *h, int r, float *const *y,
                      int NV, int NT) {
    vf acc[TOKS][COLS];
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < NV; v++) acc[t][v] = (vf){0};
    for (int j = 0; j < r; j++) {
        vf b[COLS];
        for (int v = 0; v < NV; v++) b[v] = load_w(bt, j * out + c + v * VW, bf16);
        for (int t = 0; t < NT; t++) {
            vf hv = (vf){0} + h[t * r + j];
            for (int v = 0; v < NV; v++) acc[t][v] += hv * b[v];
        }
    }
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < NV; v++) store_f32(y[t] + c + v * VW, load_f32(y[t] + c + v * VW) + acc[t][v]);
}

/* expand_cols for many tokens (compute-bound): blocks of COLS vectors of columns, each applied to all
 * tokens in groups of TOKS while that block of B.T (r x COLS * VW) stays in L1. */
INLINE void expand_blocked(const void *bt, int bf16, int64_t out, int64_t c0, int64_t c1, float *y, int64_t ldy,
                           const int32_t *tok, int n, const float *h, int r) {
    int64_t c = c0;
    while (c + VW <= c1) {
        int nv = (int)((c1 - c) / VW) < COLS ? (int)((c1 - c) / VW) : COLS;
        for (int t0 = 0; t0 < n; t0 += TOKS) {
            int nt = n - t0 < TOKS ? n - t0 : TOKS;
            float *yr[TOKS];
            for (int t = 0; t < nt; t++) yr[t] = y + (int64_t)tok[t0 + t] * ldy;
            const float *ht = h + (int64_t)t0 * r;
#define GEMM_NV(NV, NT) gemm_tile(bt, bf16, out, c, ht, r, yr, NV, NT)
            switch (nv) {
            case 1: DISPATCH_NT(GEMM_NV, 1, nt) break;
            case 2: DISPATCH_NT(GEMM_NV, 2, nt) break;
            case 3: DISPATCH_NT(GEMM_NV, 3, nt) break;
            default: DISPATCH_NT(GEMM_NV, 4, nt) break;
            }
#undef GEMM_NV
        }
        c += (int64_t)nv * VW;
    }
    for (; c < c1; c++) /* the last columns of a width that is not a multiple of VW */
        for (int t = 0; t < n; t++) {
            float s = 0.0f;
            for (int j = 0; j < r; j++) s += h[(int64_t)t * r + j] * scalar_w(bt, j * out + c, bf16);
            y[(int64_t)tok[t] * ldy + c] += s;
        }
}

/* Copy n elements from element e0 of a tensor stored on pages `pages` (page_elems elements each). */
static void gather_pages(const char *storage, int esize, int64_t page_elems, const int64_t *pages, int64_t e0,
                         int64_t n, char *dst) {
    while (n > 0) {
        int64_t p = e0 / page_elems, within = e0 % page_elems;
        int64_t len = page_elems - within < n ? page_elems - within : n;
        memcpy(dst, storage + (pages[p] * page_elems + within) * esize, (size_t)(len * esize));
        dst += len * esize;
        e0 += len;
        n -= len;
    }
}

static void mark_failed(int *failed) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
    *failed = 1;
}

typedef struct {
    const char *a, *bt;               /* contiguous tensors, or NULL when paged */
    const int64_t *a_pages, *b_pages; /* page ids when paged */
    const int32_t *tok;
    float *h;                         /* [n][r] */
    float scale;
    int r, n;
    int64_t cost1, cost2;             /* cumulative work before this slot, per phase */
} Slot;

/* The [first, last) items of a slot whose start (item i starts at base + i * unit) lies in [lo, hi). */
static void share(int64_t base, int64_t unit, int64_t items, int64_t lo, int64_t hi, int64_t *first, int64_t *last) {
    int64_t f = lo <= base ? 0 : (lo - base + unit - 1) / unit;
    int64_t l = hi <= base ? 0 : (hi - base + unit - 1) / unit;
    *first = f < items ? f : items;
    *last = l < items ? l : items;
}

static void run_phases(const Slot *slots, int ns, int64_t total1, int64_t total2, int bf16, int64_t page_elems,
                       const char *storage, const float *x, int64_t ldx, int64_t in, float *y, int64_t ldy,
                       int64_t out, int tid, int nth, int *failed) {
    int esize = bf16 ? 2 : 4;
    int64_t lo = total1 * tid / nth, hi = total1 * (tid + 1) / nth;
    for (int s = 0; s < ns; s++) {
        const Slot *sl = &slots[s];
        int64_t unit = in * (sl->n + FIXED_COST), j0, j1;
        share(sl->cost1, unit, sl->r, lo, hi, &j0, &j1);
        if (j0 >= j1) continue;
        const char *a = sl->a;
        char *buf = NULL;
        if (a == NULL) {
            buf = malloc((size_t)((j1 - j0) * in * esize));
            if (buf == NULL) { mark_failed(failed); continue; }
            gather_pages(storage, esize, page_elems, sl->a_pages, j0 * in, (j1 - j0) * in, buf);
            a = buf - j0 * in * esize;
        }
        if (bf16) shrink_rows(a, 1, in, j0, j1, x, ldx, sl->tok, sl->n, sl->scale, sl->h, sl->r);
        else shrink_rows(a, 0, in, j0, j1, x, ldx, sl->tok, sl->n, sl->scale, sl->h, sl->r);
        free(buf);
    }
#ifdef _OPENMP
    if (nth > 1) {
#pragma omp barrier
    }
#endif
    int64_t blocks = (out + COL_BLOCK - 1) / COL_BLOCK;
    lo = total2 * tid / nth;
    hi = total2 * (tid + 1) / nth;
    for (int s = 0; s < ns; s++) {
        const Slot *sl = &slots[s];
        int64_t unit = (int64_t)COL_BLOCK * sl->r * (sl->n + FIXED_COST), b0, b1;
        share(sl->cost2, unit, blocks, lo, hi, &b0, &b1);
        if (b0 >= b1) continue;
        int64_t c0 = b0 * COL_BLOCK, c1 = b1 * COL_BLOCK < out ? b1 * COL_BLOCK : out;
        const char *bt = sl->bt;
        char *buf = NULL;
        if (bt == NULL) {
            buf = malloc((size_t)(sl->r * out * esize));
            if (buf == NULL) { mark_failed(failed); continue; }
            gather_pages(storage, esize, page_elems, sl->b_pages, 0, sl->r * out, buf);
            bt = buf;
        }
        if (sl->n > BLOCKED_FROM) {
            if (bf16) expand_blocked(bt, 1, out, c0, c1, y, ldy, sl->tok, sl->n, sl->h, sl->r);
            else expand_blocked(bt, 0, out, c0, c1, y, ldy, sl->tok, sl->n, sl->h, sl->r);
        } else if (bf16) expand_cols(bt, 1, out, c0, c1, y, ldy, sl->tok, sl->n, sl->h, sl->r);
        else expand_cols(bt, 0, out, c0, c1, y, ldy, sl->tok, sl->n, sl->h, sl->r);
        free(buf);
    }
}

/* Version of the calling convention below; kernels/native.py checks it. */
int lora_cpu_abi(void) { return 2; }

/* Threads an OpenMP parallel region gets by default (the runtime's setting, shared with torch). */
int lora_cpu_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* One projection of one batch. Returns 0, or -1 when scratch memory could not be allocated (y may then
 * be partly updated).
 *
 * storage:    the adapter pool's first element; bf16: 1 for bf16 weights, 0 for fp32
 * page_elems: elements per pool page (for paged tensors)
 * desc:       per slot of the batch, 5 int64: A's element offset (-1: paged), B.T's element offset
 *             (-1: paged), address of A's page ids, address of B.T's page ids, rank (0: not adapted)
 * scales:     per slot of the batch, the adapter's scale for this projection
 * nslots:     slots of this call; slots[k] is its index into desc and scales, and its tokens are
 *             tok_idx[tok_ptr[k] .. tok_ptr[k + 1]) (rows of x and y)
 * x:          [*, in] fp32 rows, row stride ldx (elements); y: [*, out] fp32 rows, row stride ldy
 * nthreads:   upper bound on threads (<= 0: the runtime's default)
 */
int lora_cpu_apply(const void *storage, int bf16, int64_t page_elems, const int64_t *desc, const float *scales,
                   int nslots, const int32_t *slots, const int32_t *tok_ptr, const int32_t *tok_idx,
                   const float *x, int64_t ldx, int64_t in, float *y, int64_t ldy, int64_t out, int nthreads) {
    if (nslots <= 0) return 0;
    Slot *sl = malloc(sizeof(Slot) * (size_t)nslots);
    if (sl == NULL) return -1;
    int esize = bf16 ? 2 : 4;
    const char *base = storage;
    int ns = 0;
    int64_t hsize = 0, total1 = 0, total2 = 0;
    for (int k = 0; k < nslots; k++) {
        const int64_t *d = desc + (int64_t)slots[k] * 5;
        int r = (int)d[4], n = tok_ptr[k + 1] - tok_ptr[k];
        if (r <= 0 || n <= 0) continue;
        Slot *s = &sl[ns++];
        s->a = d[0] >= 0 ? base + d[0] * esize : NULL;
        s->bt = d[1] >= 0 ? base + d[1] * esize : NULL;
        s->a_pages = (const int64_t *)(intptr_t)d[2];
        s->b_pages = (const int64_t *)(intptr_t)d[3];
        s->tok = tok_idx + tok_ptr[k];
        s->scale = scales[slots[k]];
        s->r = r;
        s->n = n;
        s->h = (float *)(intptr_t)hsize; /* offset for now */
        hsize += (int64_t)n * r;
        s->cost1 = total1;
        s->cost2 = total2;
        total1 += (int64_t)r * in * (n + FIXED_COST);
        total2 += (int64_t)r * ((out + COL_BLOCK - 1) / COL_BLOCK) * COL_BLOCK * (n + FIXED_COST);
    }
    if (ns == 0) {
        free(sl);
        return 0;
    }
    float *h = malloc(sizeof(float) * (size_t)hsize);
    if (h == NULL) {
        free(sl);
        return -1;
    }
    for (int k = 0; k < ns; k++) sl[k].h = h + (intptr_t)sl[k].h;
    int failed = 0;
    int nth = 1;
#ifdef _OPENMP
    nth = nthreads > 0 ? nthreads : omp_get_max_threads();
    if (total1 + total2 < SERIAL_WORK) nth = 1;
    if (nth > 1) {
#pragma omp parallel num_threads(nth)
        {
            int got = omp_get_num_threads();
            run_phases(sl, ns, total1, total2, bf16, page_elems, base, x, ldx, in, y, ldy, out,
                       omp_get_thread_num(), got, &failed);
        }
    } else
#endif
    {
        (void)nthreads;
        run_phases(sl, ns, total1, total2, bf16, page_elems, base, x, ldx, in, y, ldy, out, 0, 1, &failed);
    }
    free(h);
    free(sl);
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Decode attention over the paged KV cache, without gathering it: for each decode token and KV head, the
 * scores of its `group` query heads against every context position (read block by block from the page
 * table), a softmax, and the weighted sum of V. K and V are read once, where the torch path first copies
 * the context into a dense [kv_heads, tokens, span, head_dim] tensor and then reads the copy.
 *
 * k, v:         one layer's cache, [kv_heads][num_blocks * block_size][head_dim] fp32
 * q:            [*][num_heads * head_dim] fp32 rows, row stride ldq; out likewise (ldo)
 * rows:         [n] the row of q and out of each decode token
 * tables:       [n][max_blocks] int64 block ids; lens: [n] context length of each decode token
 * Heads h*group .. h*group + group - 1 share KV head h (grouped-query attention).
 * Returns 0, or -1 when scratch memory could not be allocated.
 */
int paged_decode_attention(const float *k, const float *v, int64_t num_blocks, int block_size, int head_dim,
                           int kv_heads, int group, const float *q, int64_t ldq, const int64_t *rows,
                           const int64_t *tables, int max_blocks, const int64_t *lens, int n, float scale,
                           float *out, int64_t ldo, int nthreads) {
    int64_t slots = num_blocks * block_size, max_ctx = (int64_t)max_blocks * block_size;
    int failed = 0;
    int nth = 1;
#ifdef _OPENMP
    nth = nthreads > 0 ? nthreads : omp_get_max_threads();
    if ((int64_t)n * kv_heads * max_ctx * head_dim < SERIAL_WORK) nth = 1;
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        float *scores = malloc(sizeof(float) * (size_t)(group * (max_ctx > 0 ? max_ctx : 1)));
        float *acc = malloc(sizeof(float) * (size_t)(group * head_dim));
        if (scores == NULL || acc == NULL) mark_failed(&failed);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t item = 0; item < (int64_t)n * kv_heads; item++) {
            if (scores == NULL || acc == NULL) continue;
            int64_t i = item / kv_heads;
            int h = (int)(item % kv_heads);
            int64_t ctx = lens[i];
            const float *kh = k + (int64_t)h * slots * head_dim, *vh = v + (int64_t)h * slots * head_dim;
            const float *qh = q + rows[i] * ldq + (int64_t)h * group * head_dim;
            for (int64_t p = 0; p < ctx; p++) {
                const float *kr = kh + (tables[i * max_blocks + p / block_size] * block_size + p % block_size) * head_dim;
                for (int g = 0; g < group; g++) {
                    const float *qg = qh + (int64_t)g * head_dim;
                    float s = 0.0f;
                    int d = 0;
                    if (head_dim % VW == 0) {
                        vf sv = (vf){0};
                        for (; d < head_dim; d += VW) sv += load_f32(qg + d) * load_f32(kr + d);
                        s = hsum(sv);
                    }
                    for (; d < head_dim; d++) s += qg[d] * kr[d];
                    scores[(int64_t)g * max_ctx + p] = s * scale;
                }
            }
            for (int g = 0; g < group; g++) {
                float *sg = scores + (int64_t)g * max_ctx, m = sg[0], sum = 0.0f;
                for (int64_t p = 1; p < ctx; p++) m = sg[p] > m ? sg[p] : m;
                for (int64_t p = 0; p < ctx; p++) {
                    sg[p] = expf(sg[p] - m);
                    sum += sg[p];
                }
                float inv = 1.0f / sum;
                for (int64_t p = 0; p < ctx; p++) sg[p] *= inv;
            }
            for (int64_t e = 0; e < (int64_t)group * head_dim; e++) acc[e] = 0.0f;
            for (int64_t p = 0; p < ctx; p++) {
                const float *vr = vh + (tables[i * max_blocks + p / block_size] * block_size + p % block_size) * head_dim;
                for (int g = 0; g < group; g++) {
                    float w = scores[(int64_t)g * max_ctx + p], *ag = acc + (int64_t)g * head_dim;
                    int d = 0;
                    if (head_dim % VW == 0) {
                        vf wv = (vf){0} + w;
                        for (; d < head_dim; d += VW) store_f32(ag + d, load_f32(ag + d) + wv * load_f32(vr + d));
                    }
                    for (; d < head_dim; d++) ag[d] += w * vr[d];
                }
            }
            float *o = out + rows[i] * ldo + (int64_t)h * group * head_dim;
            memcpy(o, acc, sizeof(float) * (size_t)(group * head_dim));
        }
        free(scores);
        free(acc);
    }
    return failed ? -1 : 0;
}
