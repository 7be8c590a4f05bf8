/* Row-sparse kernels of sparselearn.speed (compiled at first use by _native.py).
 *
 * Both kernels work on "channels" of flat float rows: a tensor of shape (N, C, L), row (n, c) being
 * L contiguous floats. A sparse weight is a list of entries p = (row, chan[p], off[p], val[p]),
 * grouped by row through rowptr (CSR). One entry of a convolution is one active tap: its input
 * channel and its offset r * Wp + s in the zero-padded input of width Wp; a linear layer has off = 0
 * and rows of length batch (inputs stored transposed).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "_simd.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define CHUNK 64 /* floats per row chunk of sparse_rows */

/* dst[n, c, q] = sum_{p in rowptr[c] .. rowptr[c+1]} val[p] * src[n, chan[p], q + off[p]],  q < Ldst.
 * The caller guarantees q + off[p] < Lsrc. With use_w (linear layers, off = 0) the values are read
 * straight from the dense (Cdst, wcols) weight, val[p] = w[c, chan[p]], instead of a gathered copy:
 * a training step's separate gather pass over the whole weight (~5 ms at 4096x4096) folds into
 * the loop, whose time the input rows' L2 reads already set. */
static inline __attribute__((always_inline)) void
rows_impl(const float *src, int64_t N, int64_t Csrc, int64_t Lsrc, const int64_t *rowptr, const int32_t *chan,
          const int32_t *off, const float *val, const float *w, int64_t wcols, const int use_w,
          float *dst, int64_t Cdst, int64_t Ldst, int threads)
{
#define VAL(p) (use_w ? wr[chan[p]] : val[p])
    /* Two samples at a time share every entry's index loads and give eight independent
     * accumulator chains (the add latency, not the arithmetic, bounds one chain). */
    const int64_t NP = (N + 1) / 2;
    #pragma omp parallel for collapse(2) schedule(dynamic, 4) num_threads(threads)
    for (int64_t np = 0; np < NP; np++) {
        for (int64_t c = 0; c < Cdst; c++) {
            const int64_t n = 2 * np;
            const int two = n + 1 < N;
            float *d = dst + (n * Cdst + c) * Ldst;
            float *e = two ? dst + ((n + 1) * Cdst + c) * Ldst : d;
            const float *s0 = src + n * Csrc * Lsrc;
            const float *s1 = two ? s0 + Csrc * Lsrc : s0;
            const int64_t p0 = rowptr[c], p1 = rowptr[c + 1];
            const float *wr = use_w ? w + c * wcols : val;
            int64_t q0 = 0;
            if (!two) {  /* one sample (odd batch, linear layers): eight chains along the row */
                for (; q0 + 2 * CHUNK <= Ldst; q0 += 2 * CHUNK) {
                    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
                    for (int64_t p = p0; p < p1; p++) {
                        const float v = VAL(p);
                        const v16 *t = (const v16 *)(s0 + (int64_t)chan[p] * Lsrc + off[p] + q0);
                        a0 += v * t[0]; a1 += v * t[1]; a2 += v * t[2]; a3 += v * t[3];
                        a4 += v * t[4]; a5 += v * t[5]; a6 += v * t[6]; a7 += v * t[7];
                    }
                    v16 *x = (v16 *)(d + q0);
                    x[0] = a0; x[1] = a1; x[2] = a2; x[3] = a3; x[4] = a4; x[5] = a5; x[6] = a6; x[7] = a7;
                }
            }
            for (; q0 + CHUNK <= Ldst; q0 += CHUNK) {
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
                for (int64_t p = p0; p < p1; p++) {
                    const float v = VAL(p);
                    const int64_t o = (int64_t)chan[p] * Lsrc + off[p] + q0;
                    const v16 *s = (const v16 *)(s0 + o), *t = (const v16 *)(s1 + o);
                    a0 += v * s[0]; a1 += v * s[1]; a2 += v * s[2]; a3 += v * s[3];
                    b0 += v * t[0]; b1 += v * t[1]; b2 += v * t[2]; b3 += v * t[3];
                }
                v16 *x = (v16 *)(d + q0), *y = (v16 *)(e + q0);
                if (two) { y[0] = b0; y[1] = b1; y[2] = b2; y[3] = b3; }
                x[0] = a0; x[1] = a1; x[2] = a2; x[3] = a3;
            }
            for (; q0 + 16 <= Ldst; q0 += 16) {
                v16 a0 = {0}, b0 = {0};
                for (int64_t p = p0; p < p1; p++) {
                    const int64_t o = (int64_t)chan[p] * Lsrc + off[p] + q0;
                    a0 += VAL(p) * *(const v16 *)(s0 + o);
                    b0 += VAL(p) * *(const v16 *)(s1 + o);
                }
                if (two) *(v16 *)(e + q0) = b0;
                *(v16 *)(d + q0) = a0;
            }
            for (int k = 0; k <= two; k++) {  /* scalar tail (linear layers: batch % 16) */
                const float *sk = k ? s1 : s0;
                float *dk = k ? e : d;
                for (int64_t q = q0; q < Ldst; q++) {
                    float a = 0.0f;
                    for (int64_t p = p0; p < p1; p++) a += VAL(p) * sk[(int64_t)chan[p] * Lsrc + off[p] + q];
                    dk[q] = a;
                }
            }
        }
    }
}
#undef VAL

void sparse_rows(const float *src, int64_t N, int64_t Csrc, int64_t Lsrc,
                 const int64_t *rowptr, const int32_t *chan, const int32_t *off, const float *val,
                 float *dst, int64_t Cdst, int64_t Ldst, int threads)
{
    rows_impl(src, N, Csrc, Lsrc, rowptr, chan, off, val, 0, 0, 0, dst, Cdst, Ldst, threads);
}

/* sparse_rows with val[p] = w[c * wcols + chan[p]] (see rows_impl). */
void sparse_rows_w(const float *src, int64_t N, int64_t Csrc, int64_t Lsrc,
                   const int64_t *rowptr, const int32_t *chan, const int32_t *off, const float *w, int64_t wcols,
                   float *dst, int64_t Cdst, int64_t Ldst, int threads)
{
    rows_impl(src, N, Csrc, Lsrc, rowptr, chan, off, 0, w, wcols, 1, dst, Cdst, Ldst, threads);
}

/* out[p] = sum_n sum_{q < Lq} a[n, row[p], q] * b[n, chan[p], q + off[p]]: the weight gradient of the
 * active entries only. */
void sparse_dots(const float *a, int64_t Ca, int64_t La, const float *b, int64_t Cb, int64_t Lb,
                 int64_t N, int64_t nnz, const int32_t *row, const int32_t *chan, const int32_t *off,
                 int64_t Lq, float *out, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < nnz; p++) {
        v16 acc = {0}, acc2 = {0}, acc3 = {0}, acc4 = {0};
        float tail = 0.0f;
        for (int64_t n = 0; n < N; n++) {
            const float *x = a + (n * Ca + row[p]) * La;
            const float *y = b + (n * Cb + chan[p]) * Lb + off[p];
            int64_t q = 0;
            for (; q + 64 <= Lq; q += 64) {
                acc += *(const v16 *)(x + q) * *(const v16 *)(y + q);
                acc2 += *(const v16 *)(x + q + 16) * *(const v16 *)(y + q + 16);
                acc3 += *(const v16 *)(x + q + 32) * *(const v16 *)(y + q + 32);
                acc4 += *(const v16 *)(x + q + 48) * *(const v16 *)(y + q + 48);
            }
            for (; q + 16 <= Lq; q += 16) acc += *(const v16 *)(x + q) * *(const v16 *)(y + q);
            for (; q < Lq; q++) tail += x[q] * y[q];
        }
        acc += acc2 + acc3 + acc4;
        out[p] = tail + hsum16(acc);
    }
}

/* A linear layer with inputs batch-innermost: dst[c, q] = sum over the entries p of row c, in every
 * column block, of v(p) * src[chan[p], q] for q < B, where v(p) = val[p], or w[c * wcols + chan[p]]
 * with use_w (a first layer's training step: no separate gather pass over the weight). One call for
 * all nblocks column blocks (rowptr: nblocks arrays of rows + 1 absolute positions), block by block so
 * the slice of src a block reads stays in cache; block 0 writes each row and later blocks add to it
 * (one output per block and their sum were 2 MB temporaries at 4096 x 128, page-faulted anew at every
 * step). The batch of one row sits in up to eight 16-float registers while its entries stream past. */
static inline __attribute__((always_inline)) void
linear_impl(const float *src, int64_t B, const int64_t *rowptr, int64_t nblocks, const int32_t *chan,
            const float *val, const float *w, int64_t wcols, const int use_w, float *dst, int64_t rows, int threads)
{
#define LVAL(p) (use_w ? wr[chan[p]] : val[p])
    if (nblocks <= 0) { memset(dst, 0, (size_t)(rows * B) * sizeof(float)); return; }
    for (int64_t k = 0; k < nblocks; k++) {
        const int64_t *ptr = rowptr + k * (rows + 1);
        #pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
        for (int64_t c = 0; c < rows; c++) {
            const int64_t p0 = ptr[c], p1 = ptr[c + 1];
            float *d = dst + c * B;
            const float *wr = use_w ? w + c * wcols : val;
            int64_t q0 = 0;
            for (; q0 + 128 <= B; q0 += 128) {
                v16 *o = (v16 *)(d + q0);
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
                if (k) { a0 = o[0]; a1 = o[1]; a2 = o[2]; a3 = o[3]; a4 = o[4]; a5 = o[5]; a6 = o[6]; a7 = o[7]; }
                for (int64_t p = p0; p < p1; p++) {
                    const float v = LVAL(p);
                    const v16 *t = (const v16 *)(src + (int64_t)chan[p] * B + q0);
                    a0 += v * t[0]; a1 += v * t[1]; a2 += v * t[2]; a3 += v * t[3];
                    a4 += v * t[4]; a5 += v * t[5]; a6 += v * t[6]; a7 += v * t[7];
                }
                o[0] = a0; o[1] = a1; o[2] = a2; o[3] = a3; o[4] = a4; o[5] = a5; o[6] = a6; o[7] = a7;
            }
            for (; q0 + 64 <= B; q0 += 64) {
                v16 *o = (v16 *)(d + q0);
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                if (k) { a0 = o[0]; a1 = o[1]; a2 = o[2]; a3 = o[3]; }
                for (int64_t p = p0; p < p1; p++) {
                    const float v = LVAL(p);
                    const v16 *t = (const v16 *)(src + (int64_t)chan[p] * B + q0);
                    a0 += v * t[0]; a1 += v * t[1]; a2 += v * t[2]; a3 += v * t[3];
                }
                o[0] = a0; o[1] = a1; o[2] = a2; o[3] = a3;
            }
            for (; q0 + 16 <= B; q0 += 16) {
                v16 *o = (v16 *)(d + q0);
                v16 a0 = {0};
                if (k) a0 = o[0];
                for (int64_t p = p0; p < p1; p++) a0 += LVAL(p) * *(const v16 *)(src + (int64_t)chan[p] * B + q0);
                o[0] = a0;
            }
            for (; q0 < B; q0++) {  /* the batch % 16 tail */
                float a = k ? d[q0] : 0.0f;
                for (int64_t p = p0; p < p1; p++) a += LVAL(p) * src[(int64_t)chan[p] * B + q0];
                d[q0] = a;
            }
        }
    }
#undef LVAL
}

void linear_rows(const float *src, int64_t B, const int64_t *rowptr, int64_t nblocks, const int32_t *chan,
                 const float *val, float *dst, int64_t rows, int threads)
{
    linear_impl(src, B, rowptr, nblocks, chan, val, 0, 0, 0, dst, rows, threads);
}

/* linear_rows with v(p) = w[c * wcols + chan[p]]. */
void linear_rows_w(const float *src, int64_t B, const int64_t *rowptr, int64_t nblocks, const int32_t *chan,
                   const float *w, int64_t wcols, float *dst, int64_t rows, int threads)
{
    linear_impl(src, B, rowptr, nblocks, chan, 0, w, wcols, 1, dst, rows, threads);
}

/* dst[k] = src[idx[k]] (torch's advanced indexing costs ~17 ns an element single-threaded here). */
void gather_f32(const float *src, const int64_t *idx, int64_t n, float *dst)
{
    for (int64_t k = 0; k < n; k++) dst[k] = src[idx[k]];
}

/* dst[idx[k]] = src[k] (dst already zeroed). */
void scatter_f32(const float *src, const int64_t *idx, int64_t n, float *dst)
{
    for (int64_t k = 0; k < n; k++) dst[idx[k]] = src[k];
}

/* dst[didx[k]] = src[sidx[k]]: a gather and a scatter in one pass (no list in between). */
void gather_scatter_f32(const float *src, const int64_t *sidx, const int64_t *didx, int64_t n, float *dst)
{
    for (int64_t k = 0; k < n; k++) dst[didx[k]] = src[sidx[k]];
}

/* w[i] = mask[i] ? w[i] : 0 over n floats, mask as one byte per weight (a bool tensor's storage):
 * a select, so an inf or NaN in a masked entry becomes 0 (a multiply would keep NaN). */
void masked_zero_f32(float *w, const uint8_t *mask, int64_t n)
{
    for (int64_t i = 0; i < n; i++) w[i] = mask[i] ? w[i] : 0.0f;
}

/* bits[i / 64] bit i % 64 = (mask[i] != 0): a bool mask packed eight to a byte for masked_zero_bits_f32
 * (packed again only when the mask changes: ~1.5 ms for VGG16-D's 15.2M weights). */
void pack_mask_bits(const uint8_t *mask, int64_t n, uint64_t *bits)
{
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; i + 64 <= n; i += 64) {
        const __m512i m = _mm512_loadu_si512((const void *)(mask + i));
        bits[i >> 6] = (uint64_t)_mm512_test_epi8_mask(m, m);
    }
#endif
    for (; i < n; i += 64) {
        uint64_t b = 0;
        for (int64_t k = i; k < n && k < i + 64; k++) b |= (uint64_t)(mask[k] != 0) << (k - i);
        bits[i >> 6] = b;
    }
}

/* masked_zero_f32 reading the packed bits of the mask instead of its bytes. The select is bound by
 * what it reads (a read-only pass over w and the mask took as long as the select itself): 4.125
 * instead of 5 bytes per weight measured ~20% faster on VGG16-D. Storing zeros only where the mask
 * is off (a masked store, no load of w) was no faster: the partial line is read for ownership
 * anyway. Bitwise the same as masked_zero_f32: kept entries are copied, NaN and inf included. */
void masked_zero_bits_f32(float *w, const uint64_t *bits, int64_t n)
{
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 64 <= n; i += 64) {
        const uint64_t on = bits[i >> 6];
        for (int j = 0; j < 4; j++)
            _mm512_storeu_ps(w + i + 16 * j, _mm512_maskz_loadu_ps((__mmask16)(on >> (16 * j)), w + i + 16 * j));
    }
#endif
    for (; i < n; i++) w[i] = (bits[i >> 6] >> (i & 63)) & 1 ? w[i] : 0.0f;
}

/* One torch.optim.SGD update of a float32 parameter, then its masked entries set to 0, in one pass
 * over p, g and buf (bits: packed mask words as for masked_zero_bits_f32, or NULL for no mask; buf:
 * NULL when momentum is 0; first: the first step, which sets buf = d instead of reading it).
 *
 * Per entry, op for op as torch's _single_tensor_sgd on CPU, each op rounded as its kernels round
 * (an add with alpha is one fused multiply-add there: at::add's vectorized body is fmadd):
 *   d = maximize ? -g : g;  d = fma(p, wd, d)            if wd != 0
 *   buf = first ? d : fma(d, 1 - dampening, buf * momentum)
 *   d = nesterov ? fma(buf, momentum, d) : buf            if momentum != 0
 *   p = fma(d, -lr, p);  p = mask ? p : 0
 * so the result is bitwise the same as SGD.step() followed by masked_zero_bits_f32. Why fused: torch
 * makes up to five passes over the weight, gradient, momentum and their temporaries, and the mask
 * select after them then finds the weights evicted from L2 (LeNet-300-100: 36 us with the weights in
 * cache, 116 us inside a training step, 6% of the step). Here the select costs one bit read per
 * weight inside a pass that is made anyway. The momentum of masked entries is updated as torch
 * updates it (Sparse Momentum grows by it, Sec. 3). */
void sgd_masked_f32(float *p, const float *g, float *buf, const uint64_t *bits, int64_t n, float neg_lr,
                    float wd, float momentum, float one_minus_damp, int nesterov, int maximize, int first)
{
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 vlr = _mm512_set1_ps(neg_lr), vwd = _mm512_set1_ps(wd), vm = _mm512_set1_ps(momentum),
                 vdamp = _mm512_set1_ps(one_minus_damp), sign = _mm512_set1_ps(-0.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 d = _mm512_loadu_ps(g + i);
        const __m512 w = _mm512_loadu_ps(p + i);
        if (maximize) d = _mm512_xor_ps(d, sign);
        if (wd != 0.0f) d = _mm512_fmadd_ps(w, vwd, d);
        if (buf) {
            const __m512 b = first ? d : _mm512_fmadd_ps(d, vdamp, _mm512_mul_ps(_mm512_loadu_ps(buf + i), vm));
            _mm512_storeu_ps(buf + i, b);
            d = nesterov ? _mm512_fmadd_ps(b, vm, d) : b;
        }
        const __m512 r = _mm512_fmadd_ps(d, vlr, w);
        if (bits)
            _mm512_storeu_ps(p + i, _mm512_maskz_mov_ps((__mmask16)(bits[i >> 6] >> (i & 63)), r));
        else
            _mm512_storeu_ps(p + i, r);
    }
#endif
    for (; i < n; i++) {
        float d = maximize ? -g[i] : g[i];
        if (wd != 0.0f) d = fmaf(p[i], wd, d);
        if (buf) {
            const float b = first ? d : fmaf(d, one_minus_damp, buf[i] * momentum);
            buf[i] = b;
            d = nesterov ? fmaf(b, momentum, d) : b;
        }
        const float r = fmaf(d, neg_lr, p[i]);
        p[i] = (!bits || ((bits[i >> 6] >> (i & 63)) & 1)) ? r : 0.0f;
    }
}

/* sgd_masked_f32 for every parameter of one optimizer group in one call. desc holds 6 int64 per
 * parameter: weight, gradient, momentum buffer (0: none), packed mask bits (0: none), entry count,
 * first (1: the buffer is created by this step). A ctypes call spends ~2 us converting its 12
 * arguments, longer than the update of a bias or of a small layer's weight: one call per parameter
 * cost LeNet-300-100 (6 parameters) ~13 us a step with the interpreter warm, more inside a step. */
void sgd_masked_f32_many(const int64_t *desc, int64_t count, float neg_lr, float wd, float momentum,
                         float one_minus_damp, int nesterov, int maximize)
{
    for (int64_t k = 0; k < count; k++) {
        const int64_t *d = desc + 6 * k;
        sgd_masked_f32((float *)(intptr_t)d[0], (const float *)(intptr_t)d[1], (float *)(intptr_t)d[2],
                       (const uint64_t *)(intptr_t)d[3], d[4], neg_lr, wd, momentum, one_minus_damp,
                       nesterov, maximize, (int)d[5]);
    }
}

/* y[c] = bias[c] + sum_{p in row c} val[p] * x[col[p]] (bias may be NULL): a linear layer on one
 * sample with 16-bit column indices (in_features <= 65536), 6 bytes read per active weight instead
 * of 12 (memory bound). rowptr holds nblocks row-pointer arrays of rows + 1 entries (the index's
 * column blocks): row c is the union of its segments in every block, summed in one pass.
 * With AVX-512 the loads are explicit 16-lane gathers of x (which sits in L1) with the row tail as
 * one masked gather: the compiler's scalar-gather loop ran at ~10 GB/s, a third of what the dense
 * matrix-vector product streams. Four accumulators over 64 entries, and the values and indices
 * prefetched 1024 entries ahead (4 KB and 2 KB). Each row alternates between the column blocks'
 * arrays (a 90%-sparse 4096-wide layer: two segments of ~200 entries a row); why the explicit
 * prefetch helps that much was not profiled. Side by side on that layer, one thread: 0.88-0.99 ->
 * 0.58-0.70 ms against two accumulators without prefetch (256 entries ahead: 0.63-0.71 ms). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MATVEC_AHEAD 1024
void sparse_matvec_u16(const float *x, const int64_t *rowptr, int64_t nblocks, const uint16_t *col,
                       const float *val, const float *bias, float *y, int64_t rows, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < rows; c++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t *ptr = rowptr + b * (rows + 1);
            int64_t p = ptr[c];
            const int64_t p1 = ptr[c + 1];
            for (; p + 64 <= p1; p += 64) {
                /* a prefetch past the arrays' end is harmless: it never faults */
                for (int j = 0; j < 64; j += 16) _mm_prefetch((const char *)(val + p + MATVEC_AHEAD + j), _MM_HINT_T0);
                _mm_prefetch((const char *)(col + p + MATVEC_AHEAD), _MM_HINT_T0);
                _mm_prefetch((const char *)(col + p + MATVEC_AHEAD + 32), _MM_HINT_T0);
                const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(col + p)));
                const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(col + p + 16)));
                const __m512i i2 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(col + p + 32)));
                const __m512i i3 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(col + p + 48)));
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + p), _mm512_i32gather_ps(i0, x, 4), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + p + 16), _mm512_i32gather_ps(i1, x, 4), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(val + p + 32), _mm512_i32gather_ps(i2, x, 4), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(val + p + 48), _mm512_i32gather_ps(i3, x, 4), a3);
            }
            for (; p < p1; p += 16) {
                const __mmask16 k = p + 16 <= p1 ? (__mmask16)0xFFFF : (__mmask16)((1u << (p1 - p)) - 1);
                const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, col + p));
                const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, i0, x, 4);
                a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, val + p), xv, a1);
            }
        }
        const float a = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        y[c] = bias ? bias[c] + a : a;
    }
}
#else
void sparse_matvec_u16(const float *x, const int64_t *rowptr, int64_t nblocks, const uint16_t *col,
                       const float *val, const float *bias, float *y, int64_t rows, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < rows; c++) {
        float lane[16] = {0};
        float a = 0.0f;
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t *ptr = rowptr + b * (rows + 1);
            int64_t p = ptr[c];
            const int64_t p1 = ptr[c + 1];
            for (; p + 16 <= p1; p += 16)
                for (int j = 0; j < 16; j++) lane[j] += val[p + j] * x[col[p + j]];
            for (; p < p1; p++) a += val[p] * x[col[p]];
        }
        for (int j = 0; j < 16; j++) a += lane[j];
        y[c] = bias ? bias[c] + a : a;
    }
}
#endif

/* Asks the OS for 2 MiB pages over the whole 2 MiB-aligned interior of a fresh, untouched buffer of
 * n bytes (a hint: where transparent huge pages are off it does nothing). A 4096x4096 float
 * gradient then takes 32 page faults instead of 16384: first touch measured 12 ms instead of 31 ms. */
static void hint_huge(void *p, int64_t n)
{
#ifdef MADV_HUGEPAGE
    const uintptr_t H = (uintptr_t)2 << 20;
    uintptr_t s = ((uintptr_t)p + H - 1) / H * H, e = ((uintptr_t)p + (uintptr_t)n) / H * H;
    if (n >= (int64_t)(4 << 20) && e > s) madvise((void *)s, e - s, MADV_HUGEPAGE);
#endif
}

/* o[col[p] - c0] = g_row . x[col[p]] for the entries p0 .. p1 of one row (g_row: B floats; x: (cols, B)).
 * 128 batch values of g sit in registers while the entries stream their x rows past; every entry is
 * assigned by its first batch chunk, so stale values never leak in. */
static inline void dots_row(const float *gr, const float *x, int64_t B, const int32_t *col, int64_t p0, int64_t p1,
                            float *o, int64_t c0)
{
    int64_t q0 = 0;
    for (; q0 + 128 <= B; q0 += 128) {
        const v16 *gv = (const v16 *)(gr + q0);
        const v16 g0 = gv[0], g1 = gv[1], g2 = gv[2], g3 = gv[3], g4 = gv[4], g5 = gv[5], g6 = gv[6], g7 = gv[7];
        for (int64_t p = p0; p < p1; p++) {
            const v16 *t = (const v16 *)(x + (int64_t)col[p] * B + q0);
            const v16 a = (g0 * t[0] + g1 * t[1]) + (g2 * t[2] + g3 * t[3]);
            const v16 b = (g4 * t[4] + g5 * t[5]) + (g6 * t[6] + g7 * t[7]);
            const float d = hsum16(a + b);
            float *e = o + (col[p] - c0);
            *e = q0 == 0 ? d : *e + d;
        }
    }
    for (; q0 + 32 <= B; q0 += 32) {
        const v16 *gv = (const v16 *)(gr + q0);
        const v16 g0 = gv[0], g1 = gv[1];
        for (int64_t p = p0; p < p1; p++) {
            const v16 *t = (const v16 *)(x + (int64_t)col[p] * B + q0);
            const float d = hsum16(g0 * t[0] + g1 * t[1]);
            float *e = o + (col[p] - c0);
            *e = q0 == 0 ? d : *e + d;
        }
    }
    if (q0 < B || B == 0) {
        for (int64_t p = p0; p < p1; p++) {
            const float *t = x + (int64_t)col[p] * B;
            float a = 0.0f;
            for (int64_t q = q0; q < B; q++) a += gr[q] * t[q];
            float *e = o + (col[p] - c0);
            *e = q0 == 0 ? a : *e + a;
        }
    }
}

/* dst[0 .. n) = src[0 .. n) with streaming stores for the whole 64-byte lines of dst: written without
 * being read for ownership first (half the memory traffic of ordinary stores to lines not cached). */
static inline void copy_streaming(float *dst, const float *src, int64_t n)
{
    int64_t q = 0;
#if defined(__AVX512F__)
    for (; q < n && ((uintptr_t)(dst + q) & 63); q++) dst[q] = src[q];
    for (; q + 16 <= n; q += 16) _mm512_stream_ps(dst + q, _mm512_loadu_ps(src + q));
#endif
    for (; q < n; q++) dst[q] = src[q];
}

/* The dense weight gradient of a sparse linear layer with only its active entries computed:
 * out[c, col[p]] = sum_q g[c, q] * x[col[p], q] for the entries p of row c, 0 elsewhere
 * (a sampled dense-dense product, Lasby et al. 2024's condensed layout being its equal-row case).
 * g is (rows, B) and x (cols, B) (batch innermost); the entries of row c in column block k are
 * rowptr[k * (rows + 1) + c] .. rowptr[k * (rows + 1) + c + 1], block k holding the columns
 * k * bc .. (k + 1) * bc (the last block up to cols). Block by block, so the slice of x a block reads
 * stays in cache.
 * zero = 0: out already holds zeros at every non-entry (the same index wrote it last and nothing
 * changed it since): only the entries are written. Otherwise (2: out is a fresh buffer, given the
 * huge-page hint) each row's block segment is filled in a zeroed scratch segment and streamed to out
 * in whole lines: 13.7 instead of 17.6 ms at 4096x4096, 10%, batch 128, against 12.6 ms for the
 * entries alone, with the next optimizer step over the gradient no slower (a zero fill fused into the
 * pass had to read every line of out for ownership; a separate zero fill + scatter took 37 ms). */
void sparse_dots_dense(const float *g, const float *x, int64_t B, const int64_t *rowptr, int64_t nblocks, int64_t bc,
                       const int32_t *col, float *out, int64_t rows, int64_t cols, int zero, int threads)
{
    if (zero == 2) hint_huge(out, rows * cols * (int64_t)sizeof(float));
    if (nblocks <= 0) {
        if (zero) memset(out, 0, (size_t)(rows * cols) * sizeof(float));
        return;
    }
    for (int64_t k = 0; k < nblocks; k++) {
        const int64_t *ptr = rowptr + k * (rows + 1);
        const int64_t c0 = nblocks > 1 ? k * bc : 0, c1 = nblocks > 1 && k + 1 < nblocks ? (k + 1) * bc : cols;
        const int64_t w = c1 > c0 ? c1 - c0 : 0;
        #pragma omp parallel num_threads(threads)
        {
            float *seg = zero && w ? (float *)malloc((size_t)w * sizeof(float)) : 0;
            #pragma omp for schedule(static)
            for (int64_t c = 0; c < rows; c++) {
                const int64_t p0 = ptr[c], p1 = ptr[c + 1];
                if (!zero) { dots_row(g + c * B, x, B, col, p0, p1, out + c * cols, 0); continue; }
                if (!w) continue;
                if (!seg) { memset(out + c * cols + c0, 0, (size_t)w * sizeof(float)); dots_row(g + c * B, x, B, col, p0, p1, out + c * cols, 0); continue; }
                memset(seg, 0, (size_t)w * sizeof(float));
                dots_row(g + c * B, x, B, col, p0, p1, seg, c0);
                copy_streaming(out + c * cols + c0, seg, w);
            }
            free(seg);
#if defined(__AVX512F__)
            _mm_sfence();  /* the streaming stores are visible before the caller reads out */
#endif
        }
    }
}

/* The pointers of csr_csc_index (the sizes to allocate before placing): returns the number of entries. */
int64_t csr_csc_count(const uint8_t *mask, int64_t rows, int64_t cols, int64_t bc, int64_t nbc, int64_t br,
                      int64_t *rowptr, int64_t *colptr)
{
    const int64_t nbr = (rows + br - 1) / br;
    memset(rowptr, 0, (size_t)(nbc * rows + 1) * sizeof(int64_t));
    memset(colptr, 0, (size_t)((nbr > 0 ? nbr : 1) * cols + 1) * sizeof(int64_t));
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *m = mask + r * cols;
        int64_t *cc = colptr + 1 + (r / br) * cols;
        for (int64_t k = 0; k < nbc; k++) {
            const int64_t c1 = (k + 1) * bc < cols ? (k + 1) * bc : cols;
            int64_t n = 0;
            for (int64_t c = k * bc; c < c1; c++) { const int64_t on = m[c] != 0; n += on; cc[c] += on; }
            rowptr[1 + k * rows + r] = n;
        }
    }
    for (int64_t i = 0; i < nbc * rows; i++) rowptr[i + 1] += rowptr[i];
    for (int64_t i = 0; i < (nbr > 0 ? nbr : 1) * cols; i++) colptr[i + 1] += colptr[i];
    return rowptr[nbc * rows];
}

/* The CSR and CSC entry lists of a (rows, cols) bool mask in one counting pass and one placing pass
 * (torch's nonzero + two sorts of the entry keys took ~470 ms for a 4096x4096 mask at 10%; this,
 * ~60 ms: it runs at every topology update). CSR entries are ordered by (column block, row, col)
 * and CSC ones by (row block, col, row), blocks of bc columns / br rows (nbc, nbr blocks);
 * rowptr gets nbc * rows + 1 absolute positions (block k's row c starts at rowptr[k * rows + c]),
 * colptr nbr * cols + 1, both filled by csr_csc_count first. perm[q] is the CSR position of the q-th
 * CSC entry. */
void csr_csc_index(const uint8_t *mask, int64_t rows, int64_t cols, int64_t bc, int64_t nbc, int64_t br, int64_t nbr,
                   int64_t *rowptr, int64_t *colptr, int64_t *flat, int32_t *row, int32_t *col, int64_t *perm,
                   int32_t *row_t, int32_t *col_t)
{
    const int64_t nnz = rowptr[nbc * rows];
    hint_huge(flat, nnz * 8); hint_huge(perm, nnz * 8);
    hint_huge(row, nnz * 4); hint_huge(col, nnz * 4); hint_huge(row_t, nnz * 4); hint_huge(col_t, nnz * 4);

    /* placing: each bucket's start pointer doubles as its next free slot */
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *m = mask + r * cols;
        int64_t *cnext = colptr + (r / br) * cols;
        for (int64_t k = 0; k < nbc; k++) {
            const int64_t c1 = (k + 1) * bc < cols ? (k + 1) * bc : cols;
            int64_t p = rowptr[k * rows + r];
            for (int64_t c = k * bc; c < c1; c++) {
                if (!m[c]) continue;
                flat[p] = r * cols + c; row[p] = (int32_t)r; col[p] = (int32_t)c;
                const int64_t q = cnext[c]++;
                perm[q] = p++; row_t[q] = (int32_t)r; col_t[q] = (int32_t)c;
            }
            rowptr[k * rows + r] = p;
        }
    }
    /* each bucket's pointer now holds its end = the next bucket's start: shift back by one */
    for (int64_t i = nbc * rows; i > 0; i--) rowptr[i] = rowptr[i - 1];
    rowptr[0] = 0;
    for (int64_t i = nbr * cols; i > 0; i--) colptr[i] = colptr[i - 1];
    colptr[0] = 0;
}

/* The polyphase form of a strided or dilated convolution's input (speed/polyphase.py):
 * out[n, c * P + i, u, v] = x[n, c, sh * u + pa[i] - ph, sw * v + pb[i] - pw] for u < U, v < V, zero
 * where that is outside x; phase i = (pa[i], pb[i]). Every plane of x is read from L1 / L2 once per
 * phase; the strides are compile-time constants in the common cases (1, 2), so the row copies
 * vectorize. Why not torch: its pad and strided stack of the phases took 3-5 ms for a 32x64x32x32
 * input (two passes, fresh memory), more than the sparse convolution after it. */
static inline void poly_row(float *restrict o, const float *restrict row, int64_t V, int64_t v0, int64_t v1,
                            int64_t sw)
{
    for (int64_t v = 0; v < v0; v++) o[v] = 0.0f;
    if (sw == 1)
        memcpy(o + v0, row + v0, sizeof(float) * (v1 - v0));
    else if (sw == 2)
        for (int64_t v = v0; v < v1; v++) o[v] = row[2 * v];
    else
        for (int64_t v = v0; v < v1; v++) o[v] = row[sw * v];
    for (int64_t v = v1 > v0 ? v1 : v0; v < V; v++) o[v] = 0.0f;
}

/* The first and one-past-last v whose column sw * v + b0 lies in [0, W). */
static inline void poly_cols(int64_t W, int64_t V, int64_t sw, int64_t b0, int64_t *v0, int64_t *v1)
{
    int64_t a = b0 >= 0 ? 0 : (-b0 + sw - 1) / sw;
    int64_t b = W - b0 <= 0 ? 0 : (W - b0 + sw - 1) / sw;
    *v0 = a < V ? a : V;
    *v1 = b < V ? b : V;
    if (*v1 < *v0) *v1 = *v0;
}

void poly_split(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sh, int64_t sw, int64_t ph,
                int64_t pw, const int64_t *pa, const int64_t *pb, int64_t P, float *out, int64_t U, int64_t V,
                int threads)
{
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++) {
            const float *xs = x + (n * C + c) * H * W;
            for (int64_t i = 0; i < P; i++) {
                float *o = out + ((n * C + c) * P + i) * U * V;
                const int64_t b0 = pb[i] - pw;
                int64_t v0, v1;
                poly_cols(W, V, sw, b0, &v0, &v1);
                for (int64_t u = 0; u < U; u++) {
                    const int64_t y = sh * u + pa[i] - ph;
                    if (y < 0 || y >= H) {
                        memset(o + u * V, 0, sizeof(float) * V);
                        continue;
                    }
                    poly_row(o + u * V, xs + y * W + b0, V, v0, v1, sw);
                }
            }
        }
}

/* The transpose of poly_split (the gradient of x): gx[n, c, y, q] = g[n, c * P + i, u, v] where
 * y = sh * u + pa[i] - ph and q = sw * v + pb[i] - pw for some phase i and u < U, v < V (at most one:
 * the phases are distinct), else zero. */
void poly_merge(const float *g, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sh, int64_t sw, int64_t ph,
                int64_t pw, const int64_t *pa, const int64_t *pb, int64_t P, float *gx, int64_t U, int64_t V,
                int threads)
{
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++) {
            float *o = gx + (n * C + c) * H * W;
            memset(o, 0, sizeof(float) * H * W);
            for (int64_t i = 0; i < P; i++) {
                const float *s = g + ((n * C + c) * P + i) * U * V;
                const int64_t b0 = pb[i] - pw;
                int64_t v0, v1;
                poly_cols(W, V, sw, b0, &v0, &v1);
                for (int64_t u = 0; u < U; u++) {
                    const int64_t y = sh * u + pa[i] - ph;
                    if (y < 0 || y >= H) continue;
                    float *restrict row = o + y * W + b0;
                    const float *restrict sr = s + u * V;
                    if (sw == 1)
                        memcpy(row + v0, sr + v0, sizeof(float) * (v1 - v0));
                    else if (sw == 2)
                        for (int64_t v = v0; v < v1; v++) row[2 * v] = sr[v];
                    else
                        for (int64_t v = v0; v < v1; v++) row[sw * v] = sr[v];
                }
            }
        }
}
