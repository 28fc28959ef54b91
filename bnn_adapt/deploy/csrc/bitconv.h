/* XNOR-popcount convolution of bit-packed signs (bnn_adapt.deploy).
 *
 * Layouts (all little-endian, channels innermost):
 *   activations  uint32 [n][h + 2*pad][w + 2*pad][cw]   bit c%32 of word c/32 = !(x_c < 0)
 *                (+1 for 0, -0 and NaN, as the float model's sign, nn/quantizers.py);
 *                the border of `pad` pixels and the bits past the last channel are 0
 *   weights      uint32 [cob][kh][kw][cw][16]           lane l of block b: output channel 16*b + l;
 *                output channels past c_out and input channels past c_in are 0
 *   tap_pc       int32  [cob][kh*kw][16]                popcount of each tap's weight bits
 *
 * For output channel o at a pixel whose valid taps are V (the others fall in the
 * zero padding of the float model), the float model computes
 *     dot = sum_{t in V} sum_c a_c w_c = |V| c_in - 2 sum_{t in V} popcount(a_t ^ w_t).
 * The kernel sums popcount over all taps; a padded tap holds zero bits, so it
 * adds popcount(w_t): dot = |V| c_in + 2 sum_{t not in V} tap_pc[t] - 2 acc.
 */
#ifndef BNN_BITCONV_H
#define BNN_BITCONV_H

#include <stddef.h>
#include <stdint.h>

#define BNN_LANES 16
#define BNN_MAX_TAPS 64

/* epilogue flags */
#define BNN_OUT_BITS 1          /* write packed bits: lo[o] <= dot <= hi[o] */
#define BNN_SCALE 2             /* v = fl(dot * scale[o]) */
#define BNN_AFFINE 4            /* v = fma(v, alpha[o], beta[o])  (eval-mode BN) */
#define BNN_CLAMP_BEFORE 8      /* v = clamp(v, -1, 1) before the residual */
#define BNN_RESIDUAL 16         /* v += residual (any strides: NCHW, NHWC) */
#define BNN_CLAMP_AFTER 32      /* v = clamp(v, -1, 1) after the residual */
#define BNN_REACT 64            /* v += bias1; v = v > 0 ? v : slope * v; v += bias2 */

enum { BNN_ISA_PORTABLE = 0, BNN_ISA_AVX2 = 1, BNN_ISA_AVX512 = 2 };

typedef struct bnn_conv_args {
    /* input activations */
    const uint32_t *in;
    int n, in_h, in_w, in_pad, cw;
    /* layer */
    const uint32_t *weights;
    const int32_t *tap_pc;
    int c_in, c_out, kh, kw, stride, pad;
    int out_h, out_w;
    /* epilogue; per-channel arrays hold 16 * cob entries */
    int flags;
    const float *scale, *alpha, *beta, *bias1, *slope, *bias2;
    const float *residual;
    long res_sn, res_sc, res_sh, res_sw;  /* residual strides in elements */
    float *out;                 /* NHWC float, c_out per pixel */
    const int32_t *lo, *hi;
    uint16_t *out_bits;         /* packed activations with out_pad, out_cw words per pixel */
    int out_pad, out_cw;
} bnn_conv_args;

/* one tile: `np` output pixels (<= the ISA's tile height) x output-channel blocks [cb0, cb0 + ncb) */
typedef struct bnn_tile {
    const uint32_t *px[16];     /* first input word of each pixel's receptive field (padded buffer) */
    uint64_t valid[16];         /* bit t set: tap t lies inside the image */
    long pix[16];               /* flat output pixel index n*out_h*out_w + y*out_w + x */
    int np;
} bnn_tile;

typedef void (*bnn_tile_fn)(const bnn_conv_args *a, const bnn_tile *t, int cb0, int ncb);
/* pack one image row: `pixels` pixels of `c` floats (element (p, ch) at x[p * sw + ch * sc]) into
 * dst[p * cw + word], bit ch % 32 of word ch / 32 = !(x + bias[ch] < 0) (NaN: 1) */
typedef void (*bnn_pack_fn)(const float *x, int pixels, int c, long sw, long sc, const float *bias, uint32_t *dst,
                            int cw);

typedef struct bnn_isa {
    const char *name;
    int tile_pixels;            /* pixels per tile */
    int max_blocks;             /* output-channel blocks of 16 per tile */
    bnn_tile_fn tile;
    bnn_pack_fn pack;
} bnn_isa;

/* the correction of a tile's pixel: |V| c_in + 2 sum over padded taps of tap_pc (one block, 16 lanes) */
static inline void bnn_border_base(const bnn_conv_args *a, uint64_t valid, int cb, int32_t out[BNN_LANES])
{
    const int taps = a->kh * a->kw;
    const int32_t *pc = a->tap_pc + (size_t)cb * taps * BNN_LANES;
    int nvalid = 0;
    for (int l = 0; l < BNN_LANES; l++)
        out[l] = 0;
    for (int t = 0; t < taps; t++) {
        if (valid >> t & 1) {
            nvalid++;
        } else {
            for (int l = 0; l < BNN_LANES; l++)
                out[l] += 2 * pc[t * BNN_LANES + l];
        }
    }
    for (int l = 0; l < BNN_LANES; l++)
        out[l] += nvalid * a->c_in;
}

/* offset of output pixel `pix`'s first channel in the residual */
static inline long bnn_residual_offset(const bnn_conv_args *a, long pix)
{
    const long hw = (long)a->out_h * a->out_w, img = pix / hw, r = pix % hw;
    return img * a->res_sn + (r / a->out_w) * a->res_sh + (r % a->out_w) * a->res_sw;
}

/* the generic pack: any strides */
static inline void bnn_pack_scalar(const float *x, int pixels, int c, long sw, long sc, const float *bias,
                                   uint32_t *dst, int cw)
{
    for (int p = 0; p < pixels; p++) {
        for (int w = 0; w < (c + 31) / 32; w++) {
            uint32_t word = 0;
            for (int l = 0; l < 32 && 32 * w + l < c; l++) {
                const int ch = 32 * w + l;
                const float v = bias ? x[p * sw + ch * sc] + bias[ch] : x[p * sw + ch * sc];
                word |= (uint32_t)!(v < 0.0f) << l;  /* NaN: +1, as the float path */
            }
            dst[(long)p * cw + w] = word;
        }
    }
}

void bnn_tile_portable(const bnn_conv_args *a, const bnn_tile *t, int cb0, int ncb);
void bnn_pack_portable(const float *x, int pixels, int c, long sw, long sc, const float *bias, uint32_t *dst, int cw);
#if defined(__x86_64__) || defined(__i386__)
#define BNN_X86 1
void bnn_tile_avx2(const bnn_conv_args *a, const bnn_tile *t, int cb0, int ncb);
void bnn_pack_avx2(const float *x, int pixels, int c, long sw, long sc, const float *bias, uint32_t *dst, int cw);
void bnn_tile_avx512(const bnn_conv_args *a, const bnn_tile *t, int cb0, int ncb);
void bnn_pack_avx512(const float *x, int pixels, int c, long sw, long sc, const float *bias, uint32_t *dst, int cw);
#endif

#endif
