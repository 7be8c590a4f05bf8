/* Batch-lane direct convolution kernels of sparselearn.speed (compiled with _native.c by _native.py).
 *
 * Layout "B16": a feature map batch is stored as (NB, C, Hb, Wb, 16) floats, NB = ceil(N / 16):
 * the 16 lanes of one vector are the same pixel of 16 samples. Every load is then one aligned
 * 64-byte vector whatever the image width (no row tails, no shifted unaligned loads), and one
 * loaded input pixel serves every tap that reads it: a whole 3x3 kernel applied to a 4x4 output tile
 * is 36 loads for 144 multiply-adds, where the row-wise kernel of _native.c needs one (unaligned,
 * often cache-line splitting) load per multiply-add. That ratio is what lets a kernel-sparse
 * convolution run near the arithmetic rate instead of the L2 bandwidth.
 *
 * Two entry formats:
 *  - kernels (3x3 only): CSR over output channels of whole kernels, kchan[k] the input channel and
 *    kval[9k .. 9k+8] its weights (inactive taps hold 0): Starfire CK masks (Sec. 2.1.1), where
 *    every kept kernel is whole;
 *  - taps (any kernel size): CSR of single active taps with their offset inside the source buffer:
 *    window masks (a few taps per kernel, Sec. 2.1.1) and unstructured ones.
 * The input gradient is the same convolution on the transposed (CSC) lists with mirrored taps over
 * the output gradient, padded by kernel - 1 - padding.
 */
#include <stdint.h>
#include <string.h>
#include "_simd.h"

typedef float v16a __attribute__((vector_size(64)));

/* Keeps a loaded vector in a register: without it GCC folds the load into each of the up to 9
 * multiply-adds that use the vector, 144 loads per tile instead of 36 (the loads, not the
 * arithmetic, then set the speed). */
#if defined(__AVX512F__)
#define PIN(v) __asm__("" : "+v"(v))
#else
#define PIN(v) (void)0 /* 16-float vectors span two registers without AVX-512 */
#endif

/* Layout changes between (N, C, H, W) and lanes. With AVX-512 they move 16 x 16 blocks (16 samples
 * x 16 pixels of one row) through registers, transposed by four rounds of two-source permutes:
 * ~0.4 cycle per float, where the element loop (one strided access per float) took 2-3 and was a
 * quarter of a CK-80% forward at 128 channels. */
#if defined(__AVX512F__)
#include <immintrin.h>

/* One butterfly round of the 16 x 16 transpose: rows i and i + B (i & B == 0) exchange their
 * blocks of B lanes. B is a constant after inlining, so the masks fold and the rows stay in
 * registers (a loop over B kept them on the stack: 3x slower). */
#define T_LO(k, B) (((k) & (B)) ? 16 + (k) - (B) : (k))
#define T_HI(k, B) (((k) & (B)) ? 16 + (k) : (k) + (B))
#define T_MASK(F, B) _mm512_set_epi32(F(15, B), F(14, B), F(13, B), F(12, B), F(11, B), F(10, B), F(9, B), F(8, B), \
                                      F(7, B), F(6, B), F(5, B), F(4, B), F(3, B), F(2, B), F(1, B), F(0, B))
static inline __attribute__((always_inline)) void transpose_round(__m512 *r, const int B)
{
    const __m512i lo = T_MASK(T_LO, B), hi = T_MASK(T_HI, B);
    #pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        if (i & B) continue;
        const __m512 x = r[i], y = r[i + B];
        r[i] = _mm512_permutex2var_ps(x, lo, y);
        r[i + B] = _mm512_permutex2var_ps(x, hi, y);
    }
}

/* r[i][k] <- r[k][i] over 16 vectors of 16 floats. */
static inline __attribute__((always_inline)) void transpose16(__m512 *r)
{
    transpose_round(r, 8);
    transpose_round(r, 4);
    transpose_round(r, 2);
    transpose_round(r, 1);
}

/* Lane sums of 2B vectors (B = 8 or 4) in one vector (r is overwritten): the rounds of transpose16
 * from B lanes down, each adding its two halves instead of keeping both, so each round halves the
 * vectors. B = 8: lane i is the sum of r[i] (45 operations for 16 sums, where 16 hsum16 take 128);
 * B = 4: lanes i and i + 8 hold halves of r[i]'s sum, i < 8 (the caller adds them). */
static inline __attribute__((always_inline)) __m512 lane_sums(__m512 *r, const int B0)
{
    #pragma GCC unroll 4
    for (int B = B0; B; B >>= 1) {
        const __m512i lo = T_MASK(T_LO, B), hi = T_MASK(T_HI, B);
        #pragma GCC unroll 8
        for (int i = 0; i < B; i++)
            r[i] = _mm512_add_ps(_mm512_permutex2var_ps(r[i], lo, r[i + B]), _mm512_permutex2var_ps(r[i], hi, r[i + B]));
    }
    return r[0];
}

/* A whole 64-byte line of a pack's or an unpack's destination, streamed past the cache where it is
 * aligned (always, in the buffers torch allocates; the check keeps any other pointer correct). Why:
 * both passes write each line once, and an ordinary store first fetches the line it fills (read
 * for ownership). Measured side by side after a dense convolution, one thread, medians of 20:
 * - channels-last unpack of a 32 x 64 x 32 x 32 result 3.7-4.6 -> 1.5-2.2 ms (with a ReLU pass over
 *   the result after it: 5.1-5.6 -> 2.8-3.5 ms), 128@16 2.1 -> 1.1 ms, 512@2 0.16 -> 0.13 ms;
 * - pack and the convolution reading it: 64@32 12.7 -> 10.9 ms (the pack 3.6-4.8 -> 1.9 ms),
 *   128@16 9.2 -> 7.7 ms, 256@8 7.3 -> 6.9 ms, 512@2 2.02 -> 1.98 ms.
 * Every function that streams fences its stores (fence_results) before its parallel loop ends. */
static inline __attribute__((always_inline)) void stream_line(float *o, __m512 v)
{
    if (((uintptr_t)o & 63) == 0)
        _mm512_stream_ps(o, v);
    else
        _mm512_storeu_ps(o, v);
}

/* row[k * 16 + l] = s[l * stride + k] for k < W: one image row of 16 samples into lanes (samples
 * l >= lanes are zeros). */
static inline void pack_row(float *row, const float *s, int64_t stride, int64_t lanes, int64_t W)
{
    for (int64_t x0 = 0; x0 < W; x0 += 16) {
        const int64_t n = W - x0 < 16 ? W - x0 : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        __m512 r[16];
        #pragma GCC unroll 16
        for (int64_t l = 0; l < 16; l++)
            r[l] = l < lanes ? _mm512_maskz_loadu_ps(m, s + l * stride + x0) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t j = 0; j < n; j++) stream_line(row + (x0 + j) * 16, r[j]);
    }
}

/* A result's store: whole lines streamed (stream_line), partial ones masked. */
static inline __attribute__((always_inline)) void store_result(float *o, __mmask16 m, int whole, __m512 v)
{
    if (whole)
        stream_line(o, v);
    else
        _mm512_mask_storeu_ps(o, m, v);
}

/* o[l * stride + k] = row[k * 16 + l] + b for k < W, l < lanes: one lane row back to its samples. */
static inline void unpack_row(float *o, int64_t stride, const float *row, int64_t lanes, int64_t W, float b)
{
    const __m512 bv = _mm512_set1_ps(b);
    for (int64_t x0 = 0; x0 < W; x0 += 16) {
        const int64_t n = W - x0 < 16 ? W - x0 : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        __m512 r[16];
        #pragma GCC unroll 16
        for (int64_t j = 0; j < 16; j++)
            r[j] = j < n ? _mm512_loadu_ps(row + (x0 + j) * 16) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t l = 0; l < lanes; l++) store_result(o + l * stride + x0, m, n == 16, _mm512_add_ps(r[l], bv));
    }
}
static inline void fence_results(void) { _mm_sfence(); }
#else
/* The same moves one float at a time (rows of a plane stay in L1). */
static inline void pack_row(float *row, const float *s, int64_t stride, int64_t lanes, int64_t W)
{
    for (int64_t k = 0; k < W; k++)
        for (int64_t l = 0; l < 16; l++) row[k * 16 + l] = l < lanes ? s[l * stride + k] : 0.0f;
}

static inline void unpack_row(float *o, int64_t stride, const float *row, int64_t lanes, int64_t W, float b)
{
    for (int64_t l = 0; l < lanes; l++)
        for (int64_t k = 0; k < W; k++) o[l * stride + k] = row[k * 16 + l] + b;
}
static inline void fence_results(void) {}
#endif

/* Zeroes the border of one Hb x Wb lane plane around its H x W interior at (oy, ox): the padding
 * (only the border: the interior is written by the pack). */
static void zero_border(float *d, int64_t H, int64_t W, int64_t oy, int64_t ox, int64_t Hb, int64_t Wb)
{
    memset(d, 0, sizeof(float) * oy * Wb * 16);
    memset(d + (oy + H) * Wb * 16, 0, sizeof(float) * (Hb - oy - H) * Wb * 16);
    for (int64_t y = 0; y < H; y++) {
        float *row = d + (y + oy) * Wb * 16;
        memset(row, 0, sizeof(float) * ox * 16);
        memset(row + (ox + W) * 16, 0, sizeof(float) * (Wb - ox - W) * 16);
    }
}

/* dst[nb, c, y + oy, x + ox, l] = x[16 nb + l, c, y, x]; zero elsewhere (padding, lanes >= N). */
void b16_pack(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t oy, int64_t ox,
              float *dst, int64_t Hb, int64_t Wb, int threads)
{
    const int64_t NB = (N + 15) / 16, plane = Hb * Wb * 16;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t c = 0; c < C; c++) {
            float *d = dst + (nb * C + c) * plane;
            zero_border(d, H, W, oy, ox, Hb, Wb);
            const int64_t lanes = N - nb * 16 < 16 ? N - nb * 16 : 16;
            for (int64_t y = 0; y < H; y++)
                pack_row(d + (y + oy) * Wb * 16 + ox * 16, x + (nb * 16 * C + c) * H * W + y * W, C * H * W, lanes, W);
            fence_results();
        }
}

/* out[n, c, y, x] = src[n / 16, c, y, x, n % 16] (+ bias[c]) for y < H, x < W: the inverse of the
 * pack of an (NB, C, Hs, Ws, 16) buffer's top-left H x W corner. */
void b16_unpack(const float *src, int64_t C, int64_t Hs, int64_t Ws, float *out, int64_t N, int64_t H, int64_t W,
                const float *bias, int threads)
{
    const int64_t NB = (N + 15) / 16, plane = Hs * Ws * 16;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t c = 0; c < C; c++) {
            const float *s = src + (nb * C + c) * plane;
            const int64_t lanes = N - nb * 16 < 16 ? N - nb * 16 : 16;
            for (int64_t y = 0; y < H; y++)
                unpack_row(out + (nb * 16 * C + c) * H * W + y * W, C * H * W, s + y * Ws * 16, lanes, W,
                           bias ? bias[c] : 0.0f);
            fence_results();
        }
}

/* The same two moves for maps in channels-last memory, x[n, y, x, c] at ((n H + y) W + x) C + c
 * (torch.channels_last): the 16 x 16 blocks are then 16 samples x 16 channels of one pixel, each
 * sample's channels one contiguous load. Why: a sparse convolution that hands its output on in
 * channels-last lets the max-pooling after it run on torch's channels-last kernel, 16x faster on CPU
 * than its NCHW one (15 ms vs 0.9 ms at 32x64x32x32: a quarter of VGG16-D's accelerated inference),
 * and the next sparse convolution packs it from there without a layout copy. */
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) __mmask16 first_n(int64_t n) { return (__mmask16)((1u << n) - 1); }
#endif

void b16_pack_cl(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t oy, int64_t ox,
                 float *dst, int64_t Hb, int64_t Wb, int threads)
{
    const int64_t NB = (N + 15) / 16, plane = Hb * Wb * 16;
    /* the borders of every plane first (zeros), then the interior pixel by pixel */
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t c = 0; c < C; c++) zero_border(dst + (nb * C + c) * plane, H, W, oy, ox, Hb, Wb);
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t y = 0; y < H; y++) {
            const int64_t lanes = N - nb * 16 < 16 ? N - nb * 16 : 16, pix = H * W * C;
            for (int64_t xx = 0; xx < W; xx++) {
                const float *s = x + ((nb * 16 * H + y) * W + xx) * C;
                float *d = dst + (nb * C * Hb + y + oy) * Wb * 16 + (xx + ox) * 16;
                for (int64_t c0 = 0; c0 < C; c0 += 16) {
                    const int64_t cn = C - c0 < 16 ? C - c0 : 16;
#if defined(__AVX512F__)
                    const __mmask16 m = first_n(cn);
                    __m512 r[16];
                    #pragma GCC unroll 16
                    for (int64_t l = 0; l < 16; l++)
                        r[l] = l < lanes ? _mm512_maskz_loadu_ps(m, s + l * pix + c0) : _mm512_setzero_ps();
                    transpose16(r);
                    for (int64_t j = 0; j < cn; j++) stream_line(d + (c0 + j) * plane, r[j]);
#else
                    for (int64_t j = 0; j < cn; j++)
                        for (int64_t l = 0; l < 16; l++) d[(c0 + j) * plane + l] = l < lanes ? s[l * pix + c0 + j] : 0.0f;
#endif
                }
            }
            fence_results();
        }
}

/* o[l * pix + c] = s[c * plane + l] (+ bias[c]) for c < C, l < lanes: one pixel's channels of 16 lanes
 * back to its samples' channels-last memory. */
static inline void unpack_pixel_cl(float *o, int64_t pix, const float *s, int64_t plane, int64_t C, int64_t lanes,
                                   const float *bias)
{
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int64_t cn = C - c0 < 16 ? C - c0 : 16;
#if defined(__AVX512F__)
        const __mmask16 m = first_n(cn);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
        __m512 r[16];
        #pragma GCC unroll 16
        for (int64_t j = 0; j < 16; j++) r[j] = j < cn ? _mm512_loadu_ps(s + (c0 + j) * plane) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t l = 0; l < lanes; l++) store_result(o + l * pix + c0, m, cn == 16, _mm512_add_ps(r[l], b));
#else
        for (int64_t l = 0; l < lanes; l++)
            for (int64_t j = 0; j < cn; j++)
                o[l * pix + c0 + j] = s[(c0 + j) * plane + l] + (bias ? bias[c0 + j] : 0.0f);
#endif
    }
}

/* out[n, y, x, c] (channels-last memory) = src[n / 16, c, y, x, n % 16] (+ bias[c]) for y < H, x < W. */
void b16_unpack_cl(const float *src, int64_t C, int64_t Hs, int64_t Ws, float *out, int64_t N, int64_t H, int64_t W,
                   const float *bias, int threads)
{
    const int64_t NB = (N + 15) / 16, plane = Hs * Ws * 16;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t y = 0; y < H; y++) {
            const int64_t lanes = N - nb * 16 < 16 ? N - nb * 16 : 16, pix = H * W * C;
            for (int64_t xx = 0; xx < W; xx++)
                unpack_pixel_cl(out + ((nb * 16 * H + y) * W + xx) * C, pix, src + (nb * C * Hs + y) * Ws * 16 + xx * 16,
                                plane, C, lanes, bias);
            fence_results();
        }
}

/* Where a convolution's result goes when it is unpacked as it is computed (fused): the (N, Cd, H, W)
 * result ``out``, in channels-last memory when ``cl``, plus ``bias`` per channel. */
typedef struct {
    float *out;
    const float *bias;
    int64_t N, H, W;
    int cl;
} result_to;

/* Unpacks one band of a fused convolution: scr holds rows y0 .. y0 + TR of lane block nb as (Cd, TR,
 * Wo, 16); the rows and columns past the result's H x W (whole tiles) are dropped. */
static void unpack_band(const float *scr, int64_t Cd, int64_t TR, int64_t Wo, int64_t nb, int64_t y0,
                        const result_to *r)
{
    const int64_t lanes = r->N - nb * 16 < 16 ? r->N - nb * 16 : 16, H = r->H, W = r->W;
    const int64_t rows = H - y0 < TR ? H - y0 : TR, pix = H * W * Cd;
    if (r->cl) {
        for (int64_t a = 0; a < rows; a++)
            for (int64_t xx = 0; xx < W; xx++)
                unpack_pixel_cl(r->out + ((nb * 16 * H + y0 + a) * W + xx) * Cd, pix, scr + (a * Wo + xx) * 16,
                                TR * Wo * 16, Cd, lanes, r->bias);
    } else {
        for (int64_t o = 0; o < Cd; o++)
            for (int64_t a = 0; a < rows; a++)
                unpack_row(r->out + ((nb * 16 * Cd + o) * H + y0 + a) * W, pix, scr + (o * TR + a) * Wo * 16, lanes, W,
                           r->bias ? r->bias[o] : 0.0f);
    }
    fence_results();
}

#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM omp_get_thread_num()
#else
#define THREAD_NUM 0
#endif

/* The tile loop shared by both entry formats. Entries are ordered by (input channel block, output
 * channel): ptr holds nblk row-pointer arrays of Cd + 1 absolute positions. For one output tile the
 * input pixels of one block of channels (16 channels: 37 KB for a 4x4 tile of a 3x3 convolution)
 * stay in L1 while every output channel runs over them; without the blocks each entry's lines came
 * from L2 again for every output channel (measured 0.6 multiply-adds per cycle for window masks).
 * The first block writes each tile, later ones add to it. The body adds entry p to acc[TR][TP]
 * reading from b0, the tile's corner in the sample's source.
 *
 * Results: with res NULL, into the lane buffer dst (NB, Cd, Ho, Wo, 16); otherwise fused with the
 * unpack: each band of TR rows of one lane block goes into the calling thread's part of dst, (Cd, TR,
 * Wo, 16) floats per thread, and from there to res->out while it is still in L2. Why: the separate
 * unpack read the whole lane result back from memory after the convolution had written it there (a
 * window-80% 128@16 batch-32 forward: 0.6 of its 7 ms), and the lane result's memory is no longer
 * kept at all. */
#define TILE_LOOP(TR, TP, ...)                                                                       \
    const int64_t bands = Ho / TR, tiles = Wo / TP;                                                  \
    const int64_t ostride = res ? TR * Wo * 16 : Ho * Wo * 16; /* between output channels' tiles */ \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)")                \
    for (int64_t nb = 0; nb < NB; nb++)                                                              \
        for (int64_t band = 0; band < bands; band++) {                                               \
            float *base = res ? dst + THREAD_NUM * Cd * ostride                                      \
                              : dst + (nb * Cd * Ho + band * TR) * Wo * 16;                          \
            for (int64_t t = 0; t < tiles; t++) {                                                    \
                const float *b0 = src + nb * sstride + (band * TR * Wb + t * TP) * 16;               \
                for (int64_t bk = 0; bk < nblk; bk++) {                                              \
                    const int64_t *pt = ptr + bk * (Cd + 1);                                         \
                    for (int64_t o = 0; o < Cd; o++) {                                               \
                        const int64_t p0 = pt[o], p1 = pt[o + 1];                                    \
                        if (bk > 0 && p0 == p1) continue;                                            \
                        float *d = base + o * ostride + t * TP * 16;                                 \
                        v16a acc[TR][TP];                                                            \
                        for (int a = 0; a < TR; a++)                                                 \
                            for (int b = 0; b < TP; b++)                                             \
                                acc[a][b] = bk ? *(const v16a *)(d + (a * Wo + b) * 16) : (v16a){0}; \
                        for (int64_t p = p0; p < p1; p++) { __VA_ARGS__ }                            \
                        for (int a = 0; a < TR; a++)                                                 \
                            for (int b = 0; b < TP; b++) *(v16a *)(d + (a * Wo + b) * 16) = acc[a][b]; \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
            if (res) unpack_band(base, Cd, TR, Wo, nb, band * TR, res);                              \
        }

/* dst[nb, o, y, x] = sum_{k in row o} sum_{r, s < 3} kval[9k + 3r + s] * src[nb, kchan[k], y + r, x + s]
 * for y < Ho, x < Wo (multiples of the tile); src is (NB, Cs, Hb, Wb, 16) with Hb >= Ho + 2, Wb >= Wo + 2.
 * Per kernel and tile: the 6 x 6 input pixels are loaded once each and feed all 9 taps. */
#define DEFINE_CONV3(NAME, TR, TP)                                                                             \
static void NAME(const float *src, int64_t NB, int64_t Cs, int64_t Hb, int64_t Wb, int64_t nblk,                 \
                 const int64_t *ptr, const int32_t *kchan, const float *kval, float *dst, int64_t Cd,          \
                 int64_t Ho, int64_t Wo, const result_to *res, int threads)                                    \
{                                                                                                              \
    const int64_t plane = Hb * Wb * 16, sstride = Cs * plane;                                                  \
    TILE_LOOP(TR, TP,                                                                                          \
        const float *w = kval + 9 * p;                                                                         \
        v16a wv[9];                                                                                            \
        for (int j = 0; j < 9; j++) wv[j] = (v16a){0} + w[j];                                                  \
        const float *c0 = b0 + kchan[p] * plane;                                                               \
        _Pragma("GCC unroll 6")                                                                                \
        for (int yy = 0; yy < TR + 2; yy++) {                                                                  \
            _Pragma("GCC unroll 6")                                                                            \
            for (int xx = 0; xx < TP + 2; xx++) {                                                              \
                v16a v = *(const v16a *)(c0 + (yy * Wb + xx) * 16);                                            \
                PIN(v);                                                                                        \
                _Pragma("GCC unroll 3")                                                                        \
                for (int r = 0; r < 3; r++) {                                                                  \
                    _Pragma("GCC unroll 3")                                                                    \
                    for (int s = 0; s < 3; s++) {                                                              \
                        const int a = yy - r, b = xx - s;                                                      \
                        if (a >= 0 && a < TR && b >= 0 && b < TP) acc[a][b] += wv[3 * r + s] * v;              \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    )                                                                                                          \
}
DEFINE_CONV3(conv3_4x4, 4, 4)
DEFINE_CONV3(conv3_2x2, 2, 2)

/* 4x4 output tiles, or 2x2 where the output is 2 wide or high (512-channel VGG layers at 2x2 on
 * CIFAR: a 4x4 tile there computed 4 times the output). With out NULL the result is the lane buffer
 * dst; otherwise it is unpacked into out (N, Cd, H, W) as it is computed, channels-last when cl, plus
 * bias (may be NULL), and dst is the threads' band memory, threads x (Cd, 4, Wo, 16) floats. */
void b16_conv3(const float *src, int64_t NB, int64_t Cs, int64_t Hb, int64_t Wb, int64_t nblk, const int64_t *ptr,
               const int32_t *kchan, const float *kval, float *dst, int64_t Cd, int64_t Ho, int64_t Wo,
               float *out, const float *bias, int64_t N, int64_t H, int64_t W, int cl, int threads)
{
    const result_to r = {out, bias, N, H, W, cl};
    (Ho % 4 || Wo % 4 ? conv3_2x2 : conv3_4x4)(src, NB, Cs, Hb, Wb, nblk, ptr, kchan, kval, dst, Cd, Ho, Wo,
                                               out ? &r : NULL, threads);
}

/* dst[nb, o, y, x] = sum_{p in row o} val[p] * src[nb * sstride + off[p] + (y * Wb + x) * 16] for y < Ho,
 * x < Wo (multiples of the tile): one entry per active tap, off[p] = (chan * Hb * Wb + r * Wb + s) * 16.
 * One pointer per tile row, read at constant offsets (the empty asm keeps it a register): otherwise GCC
 * indexes every load by a row offset it keeps on the stack, and a multiply-add with an indexed memory
 * operand issues as two micro-ops (7% slower at 128 and 256 channels, side by side). */
#define DEFINE_CONV_TAPS(NAME, TR, TP)                                                                         \
static void NAME(const float *src, int64_t NB, int64_t sstride, int64_t Wb, int64_t nblk, const int64_t *ptr,    \
                 const int64_t *off, const float *val, float *dst, int64_t Cd, int64_t Ho, int64_t Wo,         \
                 const result_to *res, int threads)                                                            \
{                                                                                                              \
    TILE_LOOP(TR, TP,                                                                                          \
        const v16a w = (v16a){0} + val[p];                                                                     \
        const float *ra = b0 + off[p];                                                                         \
        _Pragma("GCC unroll 4")                                                                                \
        for (int a = 0; a < TR; a++, ra += Wb * 16) {                                                          \
            const float *r = ra;                                                                               \
            __asm__("" : "+r"(r));                                                                             \
            _Pragma("GCC unroll 4")                                                                            \
            for (int b = 0; b < TP; b++) acc[a][b] += w * *(const v16a *)(r + b * 16);                         \
        }                                                                                                      \
    )                                                                                                          \
}
DEFINE_CONV_TAPS(conv_taps_4x4, 4, 4)
DEFINE_CONV_TAPS(conv_taps_2x2, 2, 2)

/* The results as for b16_conv3. */
void b16_conv_taps(const float *src, int64_t NB, int64_t sstride, int64_t Wb, int64_t nblk, const int64_t *ptr,
                   const int64_t *off, const float *val, float *dst, int64_t Cd, int64_t Ho, int64_t Wo,
                   float *out, const float *bias, int64_t N, int64_t H, int64_t W, int cl, int threads)
{
    const result_to r = {out, bias, N, H, W, cl};
    (Ho % 4 || Wo % 4 ? conv_taps_2x2 : conv_taps_4x4)(src, NB, sstride, Wb, nblk, ptr, off, val, dst, Cd, Ho, Wo,
                                                         out ? &r : NULL, threads);
}

/* The weight gradients run band by band (WB output rows of one sample at a time): a band's output
 * gradient and input rows of every channel (~1.5 MB at 128 channels of 16x16) stay in L2 while all
 * kernels run over them; whole planes per kernel went to L3 once per kernel. Each band's partial
 * dot products are added to out (zeroed first). */
#define WB 4

/* acc[3r + s] += sum_{b < CH} g[b] * x[r, b + s] for CH output pixels (a constant after inlining):
 * the CH gradient vectors stay in registers and CH + 2 input vectors per kernel row feed 3 CH
 * multiply-adds. */
static inline __attribute__((always_inline)) void
wgrad3_chunk(v16a *acc, const float *grow, const float *xrow, int64_t Wb, const int CH)
{
    v16a gv[8];
    for (int b = 0; b < CH; b++) gv[b] = *(const v16a *)(grow + b * 16);
    #pragma GCC unroll 3
    for (int r = 0; r < 3; r++) {
        const float *xr = xrow + r * Wb * 16;
        #pragma GCC unroll 10
        for (int j = 0; j < CH + 2; j++) {
            const v16a v = *(const v16a *)(xr + j * 16);
            #pragma GCC unroll 3
            for (int s = 0; s < 3; s++) {
                const int b = j - s;
                if (b >= 0 && b < CH) acc[3 * r + s] += gv[b] * v;
            }
        }
    }
}

/* wgrad3_chunk for two kernels of the same input channel: each input vector feeds both (4 output
 * pixels: 26 loads for 72 multiply-adds, against 38 for 72 in one kernel's 8-pixel chunk; CH = 2
 * for maps 2 wide, which a chunk of 4 computed twice over). */
static inline __attribute__((always_inline)) void
wgrad3_pair(v16a *acc, v16a *acd, const float *grow, const float *hrow, const float *xrow, int64_t Wb, const int CH)
{
    v16a gv[4], hv[4];
    for (int b = 0; b < CH; b++) {
        gv[b] = *(const v16a *)(grow + b * 16);
        hv[b] = *(const v16a *)(hrow + b * 16);
    }
    #pragma GCC unroll 3
    for (int r = 0; r < 3; r++) {
        const float *xr = xrow + r * Wb * 16;
        #pragma GCC unroll 6
        for (int j = 0; j < CH + 2; j++) {
            v16a v = *(const v16a *)(xr + j * 16);
            PIN(v);
            #pragma GCC unroll 3
            for (int s = 0; s < 3; s++) {
                const int b = j - s;
                if (b >= 0 && b < CH) {
                    acc[3 * r + s] += gv[b] * v;
                    acd[3 * r + s] += hv[b] * v;
                }
            }
        }
    }
}

/* out[9k + j] += the lane sum of acc[j] and out[9k2 + j] += that of acd[j], j < 9. With AVX-512 the
 * first 16 sums come from one lane_sums and go out as two masked adds. */
static inline __attribute__((always_inline)) void
wgrad3_pair_out(float *out, int64_t k, int64_t k2, v16a *acc, v16a *acd)
{
#if defined(__AVX512F__)
    __m512 r[16];
    #pragma GCC unroll 9
    for (int j = 0; j < 9; j++) r[j] = (__m512)acc[j];
    #pragma GCC unroll 7
    for (int j = 0; j < 7; j++) r[9 + j] = (__m512)acd[j];
    const __m512 s = lane_sums(r, 8);
    float *o = out + 9 * k, *o2 = out + 9 * k2;
    _mm512_mask_storeu_ps(o, 0x1FF, _mm512_add_ps(_mm512_maskz_loadu_ps(0x1FF, o), s));
    const __m512 s2 = _mm512_maskz_compress_ps(0xFE00, s);  /* lanes 9-15 to 0-6 */
    _mm512_mask_storeu_ps(o2, 0x7F, _mm512_add_ps(_mm512_maskz_loadu_ps(0x7F, o2), s2));
    o2[7] += hsum16(acd[7]);
    o2[8] += hsum16(acd[8]);
#else
    for (int j = 0; j < 9; j++) {
        out[9 * k + j] += hsum16(acc[j]);
        out[9 * k2 + j] += hsum16(acd[j]);
    }
#endif
}

/* The weight gradient of whole 3x3 kernels:
 * out[9k + 3r + s] = sum_{nb, y < Ho, x < Wo} g[nb, krow[k], y + gy, x + gx] * xs[nb, kchan[k], y + r, x + s],
 * g an (NB, Cg, Hg, Wg, 16) output gradient (zero where it has no output), xs the forward's
 * (NB, Cx, Hb, Wb, 16) packed input; both hold round4(Wo) columns (chunks of 4, and of 2 at a
 * remainder of 1 or 2, read zeros past Wo). The kernels run as the npairs pairs
 * (pairs[2q], pairs[2q + 1]) of kernels that read the same input channel (the second -1 where a
 * kernel has no partner): a pair shares its input loads; a single kernel runs chunks of 8, then 4. */
void b16_wgrad3(const float *g, int64_t Cg, int64_t Hg, int64_t Wg, int64_t gy, int64_t gx,
                const float *xs, int64_t Cx, int64_t Hb, int64_t Wb, int64_t NB, int64_t Ho, int64_t Wo,
                int64_t K, const int32_t *krow, const int32_t *kchan, int64_t npairs, const int32_t *pairs,
                float *out, int threads)
{
    memset(out, 0, sizeof(float) * 9 * K);
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t y0 = 0; y0 < Ho; y0 += WB) {
            const int64_t y1 = y0 + WB < Ho ? y0 + WB : Ho;
            #pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t q = 0; q < npairs; q++) {
                const int32_t k = pairs[2 * q], k2 = pairs[2 * q + 1];
                v16a acc[9], acd[9];
                for (int j = 0; j < 9; j++) acc[j] = acd[j] = (v16a){0};
                const float *gp = g + ((nb * Cg + krow[k]) * Hg + gy) * Wg * 16 + gx * 16;
                const float *xp = xs + (nb * Cx + kchan[k]) * Hb * Wb * 16;
                if (k2 >= 0) {
                    const float *hp = g + ((nb * Cg + krow[k2]) * Hg + gy) * Wg * 16 + gx * 16;
                    for (int64_t y = y0; y < y1; y++) {
                        const float *grow = gp + y * Wg * 16, *hrow = hp + y * Wg * 16, *xrow = xp + y * Wb * 16;
                        int64_t x = 0;
                        for (; x + 2 < Wo; x += 4)
                            wgrad3_pair(acc, acd, grow + x * 16, hrow + x * 16, xrow + x * 16, Wb, 4);
                        if (x < Wo) wgrad3_pair(acc, acd, grow + x * 16, hrow + x * 16, xrow + x * 16, Wb, 2);
                    }
                    wgrad3_pair_out(out, k, k2, acc, acd);
                } else {
                    for (int64_t y = y0; y < y1; y++) {
                        const float *grow = gp + y * Wg * 16, *xrow = xp + y * Wb * 16;
                        int64_t x = 0;
                        for (; x + 8 <= Wo; x += 8) wgrad3_chunk(acc, grow + x * 16, xrow + x * 16, Wb, 8);
                        for (; x + 2 < Wo; x += 4) wgrad3_chunk(acc, grow + x * 16, xrow + x * 16, Wb, 4);
                        if (x < Wo) wgrad3_chunk(acc, grow + x * 16, xrow + x * 16, Wb, 2);
                    }
                    for (int j = 0; j < 9; j++) out[9 * k + j] += hsum16(acc[j]);
                }
            }
        }
}

/* out[j] += the band's dot product of the output gradient row gp with the input of entry j, for G
 * entries (8 or 4, a constant after inlining) that share each loaded gradient vector. Each entry reads
 * through its own pointer at constant offsets: the empty asm stops GCC from folding them into one
 * index, whose indexed multiply-adds issue as two micro-ops. */
static inline __attribute__((always_inline)) void
wgrad_tap_group(float *out, const float *gp, const float *x0, const int32_t *chan, const int32_t *tr,
                const int32_t *ts, int64_t xplane, int64_t y0, int64_t y1, int64_t Wg, int64_t Wb, int64_t Wo,
                const int G)
{
    const v16a *xp[8];
    v16a a[8][2];
    #pragma GCC unroll 8
    for (int j = 0; j < G; j++) {
        xp[j] = (const v16a *)(x0 + chan[j] * xplane + (tr[j] * Wb + ts[j]) * 16);
        a[j][0] = a[j][1] = (v16a){0};
    }
    for (int64_t y = y0; y < y1; y++) {
        const v16a *gr = (const v16a *)(gp + y * Wg * 16), *ge = gr + Wo, *q[8];
        #pragma GCC unroll 8
        for (int j = 0; j < G; j++) q[j] = xp[j] + y * Wb;
        for (; gr < ge; gr += 2) {
            const v16a g0 = gr[0], g1 = gr[1];
            #pragma GCC unroll 8
            for (int j = 0; j < G; j++) {
                __asm__("" : "+r"(q[j]));
                a[j][0] += g0 * q[j][0];
                a[j][1] += g1 * q[j][1];
                q[j] += 2;
            }
        }
    }
#if defined(__AVX512F__)
    if (G == 8) {
        __m512 r[8];
        #pragma GCC unroll 8
        for (int j = 0; j < 8; j++) r[j] = (__m512)(a[j][0] + a[j][1]);
        const __m512 h = lane_sums(r, 4);
        const __m512 sum = _mm512_add_ps(h, _mm512_shuffle_f32x4(h, h, 0x4E));  /* + the other 256 bits */
        _mm512_mask_storeu_ps(out, 0xFF, _mm512_add_ps(_mm512_maskz_loadu_ps(0xFF, out), sum));
        return;
    }
#endif
    for (int j = 0; j < G; j++) out[j] += hsum16(a[j][0] + a[j][1]);
}

/* The weight gradient of single taps: out[p] = sum_{nb, y < Ho, x < Wo} g[nb, o, y + gy, x + gx] *
 * xs[nb, chan[p], y + r[p], x + s[p]] for the entries p of row o, layouts as in b16_wgrad3, Wo a
 * multiple of 4. Entries come ordered by (block of input channels, row) with nblk row-pointer arrays
 * of rows + 1 absolute positions: a band's input rows of one block (4 channels: ~28 KB for a 3x3
 * layer at 16x16) stay in L1 while every output row runs over them, where entry after entry from
 * all channels streamed ~110 bytes per multiply-add from L2. Eight (then four) entries of a row at a
 * time share each loaded gradient vector: 9 loads per 8 multiply-adds instead of 16 (window masks keep
 * ~2 taps per kernel, so whole-kernel dots would waste 7 of 9; a block row of a window mask holds 8).
 * Each entry reads through its own pointer at constant offsets (the empty asm stops GCC from folding
 * them into one index, whose indexed multiply-adds issue as two micro-ops): 1.1-1.2x side by side,
 * eight at a time another 1.0-1.2x. */
void b16_wgrad_taps(const float *g, int64_t Cg, int64_t Hg, int64_t Wg, int64_t gy, int64_t gx,
                    const float *xs, int64_t Cx, int64_t Hb, int64_t Wb, int64_t NB, int64_t Ho, int64_t Wo,
                    int64_t rows, int64_t nblk, const int64_t *ptr, const int32_t *chan, const int32_t *tr,
                    const int32_t *ts, float *out, int threads)
{
    memset(out, 0, sizeof(float) * ptr[nblk * (rows + 1) - 1]);
    const int64_t xplane = Hb * Wb * 16;
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t y0 = 0; y0 < Ho; y0 += WB) {
            const int64_t y1 = y0 + WB < Ho ? y0 + WB : Ho;
            /* a thread per block: blocks hold disjoint entries, so no two threads write one out[p] */
            #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
            for (int64_t bk = 0; bk < nblk; bk++)
            for (int64_t o = 0; o < rows; o++) {
                const int64_t *rowptr = ptr + bk * (rows + 1);
                const float *gp = g + ((nb * Cg + o) * Hg + gy) * Wg * 16 + gx * 16;
                const float *x0 = xs + nb * Cx * xplane;
                int64_t p = rowptr[o];
                const int64_t p1 = rowptr[o + 1];
                for (; p + 8 <= p1; p += 8) wgrad_tap_group(out + p, gp, x0, chan + p, tr + p, ts + p, xplane, y0, y1, Wg,
                                                            Wb, Wo, 8);
                for (; p + 4 <= p1; p += 4) wgrad_tap_group(out + p, gp, x0, chan + p, tr + p, ts + p, xplane, y0, y1, Wg,
                                                            Wb, Wo, 4);
                for (; p < p1; p++) {
                    const v16a *xr0 = (const v16a *)(x0 + chan[p] * xplane + (tr[p] * Wb + ts[p]) * 16);
                    v16a a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                    for (int64_t y = y0; y < y1; y++) {
                        const v16a *gr = (const v16a *)(gp + y * Wg * 16), *xr = xr0 + y * Wb;
                        for (int64_t x = 0; x < Wo; x += 4) {
                            a0 += gr[x] * xr[x];
                            a1 += gr[x + 1] * xr[x + 1];
                            a2 += gr[x + 2] * xr[x + 2];
                            a3 += gr[x + 3] * xr[x + 3];
                        }
                    }
                    out[p] += hsum16(a0 + a1 + a2 + a3);
                }
            }
        }
}
