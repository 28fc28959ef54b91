/* AVX-512 kernels (VPOPCNTDQ): 16 output channels per register, one 32-bit word of
 * input channels per step, broadcast to every lane; a tile of 6 pixels x up to 4
 * blocks keeps 24 accumulators in registers. Per 512 weight bits: xor, popcount, add. */
#include "bitconv.h"

#ifdef BNN_X86
#include <immintrin.h>

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,fma,popcnt")))
#define INLINE static inline __attribute__((always_inline))
#define MB 6

TGT INLINE __m512 clamp1(__m512 v) { return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f)); }

TGT INLINE __m512i iota(void) { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

TGT INLINE void epilogue(const bnn_conv_args *a, const bnn_tile *t, int i, int cb, __m512i acc)
{
    const int taps = a->kh * a->kw, c0 = cb * BNN_LANES;
    const uint64_t all = taps == 64 ? ~0ULL : (1ULL << taps) - 1;
    const int nl = a->c_out - c0 < BNN_LANES ? a->c_out - c0 : BNN_LANES;
    const __mmask16 lanes = (__mmask16)((1u << nl) - 1);
    __m512i base;
    if (t->valid[i] == all) {
        base = _mm512_set1_epi32(taps * a->c_in);
    } else {
        int32_t tmp[BNN_LANES];
        bnn_border_base(a, t->valid[i], cb, tmp);
        base = _mm512_loadu_si512(tmp);
    }
    const __m512i dot = _mm512_sub_epi32(base, _mm512_slli_epi32(acc, 1));
    const long pix = t->pix[i];
    if (a->flags & BNN_OUT_BITS) {
        __mmask16 m = _mm512_mask_cmp_epi32_mask(lanes, dot, _mm512_loadu_si512(a->lo + c0), _MM_CMPINT_NLT);
        m = _mm512_mask_cmp_epi32_mask(m, dot, _mm512_loadu_si512(a->hi + c0), _MM_CMPINT_LE);
        const long hw = (long)a->out_h * a->out_w, img = pix / hw, r = pix % hw;
        const int q = a->out_pad, y = (int)(r / a->out_w), x = (int)(r % a->out_w);
        a->out_bits[((img * (a->out_h + 2 * q) + y + q) * (a->out_w + 2 * q) + x + q) * 2 * a->out_cw + cb] = m;
        return;
    }
    const int f = a->flags;
    __m512 v = _mm512_cvtepi32_ps(dot);
    if (f & BNN_SCALE)
        v = _mm512_mul_ps(v, _mm512_loadu_ps(a->scale + c0));
    if (f & BNN_AFFINE)
        v = _mm512_fmadd_ps(v, _mm512_loadu_ps(a->alpha + c0), _mm512_loadu_ps(a->beta + c0));
    if (f & BNN_CLAMP_BEFORE)
        v = clamp1(v);
    if (f & BNN_RESIDUAL) {
        const float *res = a->residual + bnn_residual_offset(a, pix) + c0 * a->res_sc;
        v = _mm512_add_ps(v, a->res_sc == 1 ? _mm512_maskz_loadu_ps(lanes, res) : _mm512_mask_i32gather_ps(
            _mm512_setzero_ps(), lanes, _mm512_mullo_epi32(iota(), _mm512_set1_epi32((int)a->res_sc)), res, 4));
    }
    if (f & BNN_CLAMP_AFTER)
        v = clamp1(v);
    if (f & BNN_REACT) {
        v = _mm512_add_ps(v, _mm512_loadu_ps(a->bias1 + c0));
        const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NGT_UQ);
        v = _mm512_mask_mul_ps(v, neg, v, _mm512_loadu_ps(a->slope + c0));
        v = _mm512_add_ps(v, _mm512_loadu_ps(a->bias2 + c0));
    }
    _mm512_mask_storeu_ps(a->out + pix * a->c_out + c0, lanes, v);
}

/* NB output-channel blocks x MB pixels; NB is a constant in every inlined copy */
TGT INLINE void tile_nb(const bnn_conv_args *a, const bnn_tile *t, int cb0, const int NB)
{
    const int taps = a->kh * a->kw, row = (a->in_w + 2 * a->in_pad) * a->cw, kwcw = a->kw * a->cw;
    const size_t wstride = (size_t)taps * a->cw * BNN_LANES;
    const uint32_t *wb = a->weights + (size_t)cb0 * wstride;
    __m512i acc[MB][4];
#pragma GCC unroll 6
    for (int i = 0; i < MB; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++)
            acc[i][j] = _mm512_setzero_si512();
    for (int ky = 0; ky < a->kh; ky++) {
        const uint32_t *p[MB];
#pragma GCC unroll 6
        for (int i = 0; i < MB; i++)
            p[i] = t->px[i] + (size_t)ky * row;
        const uint32_t *w = wb + (size_t)ky * kwcw * BNN_LANES;
        for (int k = 0; k < kwcw; k++, w += BNN_LANES) {
            __m512i wv[4];
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++)
                wv[j] = _mm512_loadu_si512(w + j * wstride);
#pragma GCC unroll 6
            for (int i = 0; i < MB; i++) {
                const __m512i av = _mm512_set1_epi32((int)p[i][k]);
#pragma GCC unroll 4
                for (int j = 0; j < NB; j++)
                    acc[i][j] = _mm512_add_epi32(acc[i][j], _mm512_popcnt_epi32(_mm512_xor_si512(av, wv[j])));
            }
        }
    }
    for (int i = 0; i < t->np; i++)
        for (int j = 0; j < NB; j++)
            epilogue(a, t, i, cb0 + j, acc[i][j]);
}

TGT void bnn_tile_avx512(const bnn_conv_args *a, const bnn_tile *t, int cb0, int ncb)
{
    switch (ncb) {
    case 1: tile_nb(a, t, cb0, 1); break;
    case 2: tile_nb(a, t, cb0, 2); break;
    case 3: tile_nb(a, t, cb0, 3); break;
    default: tile_nb(a, t, cb0, 4); break;
    }
}

TGT void bnn_pack_avx512(const float *x, int pixels, int c, long sw, long sc, const float *bias, uint32_t *dst,
                         int cw)
{
    const __m512 zero = _mm512_setzero_ps();
    if (sc == 1) {  /* channels innermost: a compare gives 16 bits at once */
        for (int p = 0; p < pixels; p++) {
            const float *px = x + p * sw;
            uint16_t *out = (uint16_t *)(dst + (long)p * cw);
            for (int c0 = 0; c0 < c; c0 += 16) {
                const __mmask16 lanes = c - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (c - c0)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(lanes, px + c0);
                if (bias)
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, bias + c0));
                out[c0 / 16] = _mm512_mask_cmp_ps_mask(lanes, v, zero, _CMP_NLT_UQ);
            }
        }
    } else if (sw == 1) {  /* pixels innermost (NCHW): 16 pixels per register, one bit per channel OR-ed in */
        const __m512i index = _mm512_mullo_epi32(iota(), _mm512_set1_epi32(cw));
        for (int p0 = 0; p0 < pixels; p0 += 16) {
            const __mmask16 lanes = pixels - p0 >= 16 ? 0xFFFF : (__mmask16)((1u << (pixels - p0)) - 1);
            for (int w = 0; w < cw; w++) {
                __m512i word = _mm512_setzero_si512();
                for (int l = 0; l < 32 && 32 * w + l < c; l++) {
                    const int ch = 32 * w + l;
                    __m512 v = _mm512_maskz_loadu_ps(lanes, x + ch * sc + p0);
                    if (bias)
                        v = _mm512_add_ps(v, _mm512_set1_ps(bias[ch]));
                    const __mmask16 ge = _mm512_mask_cmp_ps_mask(lanes, v, zero, _CMP_NLT_UQ);
                    word = _mm512_mask_or_epi32(word, ge, word, _mm512_set1_epi32((int)(1u << l)));
                }
                if (cw == 1)
                    _mm512_mask_storeu_epi32(dst + p0, lanes, word);
                else
                    _mm512_mask_i32scatter_epi32(dst + (long)p0 * cw + w, lanes, index, word, 4);
            }
        }
    } else {
        bnn_pack_scalar(x, pixels, c, sw, sc, bias, dst, cw);
    }
}
#endif
