/* AVX2 kernels: no vector popcount, so each byte of (a ^ w) is counted with two
 * 4-bit table lookups (vpshufb, Mula et al. 2018). Byte counters take up to 31
 * steps (31 * 8 < 256) before they are widened to 32 bits. A tile is 4 pixels x
 * one block of 16 output channels (two registers). */
#include "bitconv.h"

#ifdef BNN_X86
#include <immintrin.h>

#define TGT __attribute__((target("avx2,fma,popcnt")))
#define INLINE static inline __attribute__((always_inline))
#define MB 4

TGT INLINE __m256 clamp1(__m256 v) { return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f)); }

TGT INLINE __m256i lane_mask(int lanes)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

TGT INLINE void epilogue(const bnn_conv_args *a, const bnn_tile *t, int i, int cb, const __m256i acc[2])
{
    const int taps = a->kh * a->kw, c0 = cb * BNN_LANES;
    const uint64_t all = taps == 64 ? ~0ULL : (1ULL << taps) - 1;
    const int nl = a->c_out - c0 < BNN_LANES ? a->c_out - c0 : BNN_LANES;
    int32_t base[BNN_LANES];
    if (t->valid[i] == all) {
        for (int l = 0; l < BNN_LANES; l++)
            base[l] = taps * a->c_in;
    } else {
        bnn_border_base(a, t->valid[i], cb, base);
    }
    const long pix = t->pix[i];
    if (a->flags & BNN_OUT_BITS) {
        unsigned m = 0;
        for (int h = 0; h < 2; h++) {
            const __m256i dot = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(base + 8 * h)),
                                                 _mm256_slli_epi32(acc[h], 1));
            const __m256i out = _mm256_or_si256(
                _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(a->lo + c0 + 8 * h)), dot),
                _mm256_cmpgt_epi32(dot, _mm256_loadu_si256((const __m256i *)(a->hi + c0 + 8 * h))));
            m |= (unsigned)(~_mm256_movemask_ps(_mm256_castsi256_ps(out)) & 0xFF) << (8 * h);
        }
        m &= (1u << nl) - 1;
        const long hw = (long)a->out_h * a->out_w, img = pix / hw, r = pix % hw;
        const int q = a->out_pad, y = (int)(r / a->out_w), x = (int)(r % a->out_w);
        a->out_bits[((img * (a->out_h + 2 * q) + y + q) * (a->out_w + 2 * q) + x + q) * 2 * a->out_cw + cb] =
            (uint16_t)m;
        return;
    }
    const int f = a->flags;
    for (int h = 0; h < 2; h++) {
        const int c = c0 + 8 * h;
        const __m256i lanes = lane_mask(nl - 8 * h);
        const __m256i dot = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(base + 8 * h)),
                                             _mm256_slli_epi32(acc[h], 1));
        __m256 v = _mm256_cvtepi32_ps(dot);
        if (f & BNN_SCALE)
            v = _mm256_mul_ps(v, _mm256_loadu_ps(a->scale + c));
        if (f & BNN_AFFINE)
            v = _mm256_fmadd_ps(v, _mm256_loadu_ps(a->alpha + c), _mm256_loadu_ps(a->beta + c));
        if (f & BNN_CLAMP_BEFORE)
            v = clamp1(v);
        if (f & BNN_RESIDUAL) {
            const float *res = a->residual + bnn_residual_offset(a, pix) + c * a->res_sc;
            v = _mm256_add_ps(v, a->res_sc == 1 ? _mm256_maskload_ps(res, lanes) : _mm256_mask_i32gather_ps(
                _mm256_setzero_ps(), res, _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                _mm256_set1_epi32((int)a->res_sc)), _mm256_castsi256_ps(lanes), 4));
        }
        if (f & BNN_CLAMP_AFTER)
            v = clamp1(v);
        if (f & BNN_REACT) {
            v = _mm256_add_ps(v, _mm256_loadu_ps(a->bias1 + c));
            const __m256 pos = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ);
            v = _mm256_blendv_ps(_mm256_mul_ps(v, _mm256_loadu_ps(a->slope + c)), v, pos);
            v = _mm256_add_ps(v, _mm256_loadu_ps(a->bias2 + c));
        }
        if (nl > 8 * h)
            _mm256_maskstore_ps(a->out + pix * a->c_out + c, lanes, v);
    }
}

TGT INLINE void widen(__m256i acc8[MB][2], __m256i acc32[MB][2])
{
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int i = 0; i < MB; i++)
        for (int h = 0; h < 2; h++) {
            acc32[i][h] = _mm256_add_epi32(acc32[i][h], _mm256_madd_epi16(_mm256_maddubs_epi16(acc8[i][h], ones8), ones16));
            acc8[i][h] = _mm256_setzero_si256();
        }
}

TGT void bnn_tile_avx2(const bnn_conv_args *a, const bnn_tile *t, int cb0, int ncb)
{
    const int taps = a->kh * a->kw, row = (a->in_w + 2 * a->in_pad) * a->cw, kwcw = a->kw * a->cw;
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int cb = cb0; cb < cb0 + ncb; cb++) {
        const uint32_t *wb = a->weights + (size_t)cb * taps * a->cw * BNN_LANES;
        __m256i acc8[MB][2], acc32[MB][2];
        for (int i = 0; i < MB; i++)
            for (int h = 0; h < 2; h++)
                acc8[i][h] = acc32[i][h] = _mm256_setzero_si256();
        int steps = 0;
        for (int ky = 0; ky < a->kh; ky++) {
            const uint32_t *p[MB];
            for (int i = 0; i < MB; i++)
                p[i] = t->px[i] + (size_t)ky * row;
            const uint32_t *w = wb + (size_t)ky * kwcw * BNN_LANES;
            for (int k = 0; k < kwcw; k++, w += BNN_LANES) {
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)w);
                const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 8));
#pragma GCC unroll 4
                for (int i = 0; i < MB; i++) {
                    const __m256i av = _mm256_set1_epi32((int)p[i][k]);
                    const __m256i x0 = _mm256_xor_si256(av, w0), x1 = _mm256_xor_si256(av, w1);
                    acc8[i][0] = _mm256_add_epi8(acc8[i][0], _mm256_add_epi8(
                        _mm256_shuffle_epi8(lut, _mm256_and_si256(x0, low)),
                        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x0, 4), low))));
                    acc8[i][1] = _mm256_add_epi8(acc8[i][1], _mm256_add_epi8(
                        _mm256_shuffle_epi8(lut, _mm256_and_si256(x1, low)),
                        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x1, 4), low))));
                }
                if (++steps == 31) {
                    widen(acc8, acc32);
                    steps = 0;
                }
            }
        }
        widen(acc8, acc32);
        for (int i = 0; i < t->np; i++)
            epilogue(a, t, i, cb, acc32[i]);
    }
}

TGT void bnn_pack_avx2(const float *x, int pixels, int c, long sw, long sc, const float *bias, uint32_t *dst,
                       int cw)
{
    const __m256 zero = _mm256_setzero_ps();
    if (sc == 1) {  /* channels innermost */
        for (int p = 0; p < pixels; p++) {
            const float *px = x + p * sw;
            uint16_t *out = (uint16_t *)(dst + (long)p * cw);
            for (int c0 = 0; c0 < c; c0 += 16) {
                unsigned m = 0;
                for (int h = 0; h < 2 && c0 + 8 * h < c; h++) {
                    const __m256i lanes = lane_mask(c - c0 - 8 * h);
                    __m256 v = _mm256_maskload_ps(px + c0 + 8 * h, lanes);
                    if (bias)
                        v = _mm256_add_ps(v, _mm256_maskload_ps(bias + c0 + 8 * h, lanes));
                    const int ge = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_NLT_UQ),
                                                                    _mm256_castsi256_ps(lanes)));
                    m |= (unsigned)ge << (8 * h);
                }
                out[c0 / 16] = (uint16_t)m;
            }
        }
    } else if (sw == 1) {  /* pixels innermost (NCHW): 8 pixels per register */
        for (int p0 = 0; p0 < pixels; p0 += 8) {
            const int np = pixels - p0 < 8 ? pixels - p0 : 8;
            const __m256i lanes = lane_mask(np);
            for (int w = 0; w < cw; w++) {
                __m256i word = _mm256_setzero_si256();
                for (int l = 0; l < 32 && 32 * w + l < c; l++) {
                    const int ch = 32 * w + l;
                    __m256 v = _mm256_maskload_ps(x + ch * sc + p0, lanes);
                    if (bias)
                        v = _mm256_add_ps(v, _mm256_set1_ps(bias[ch]));
                    const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_NLT_UQ));
                    word = _mm256_or_si256(word, _mm256_and_si256(ge, _mm256_set1_epi32((int)(1u << l))));
                }
                uint32_t out[8];
                _mm256_storeu_si256((__m256i *)out, word);
                for (int i = 0; i < np; i++)
                    dst[(long)(p0 + i) * cw + w] = out[i];
            }
        }
    } else {
        bnn_pack_scalar(x, pixels, c, sw, sc, bias, dst, cw);
    }
}
#endif
